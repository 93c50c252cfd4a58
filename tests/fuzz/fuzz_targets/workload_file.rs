//! Any workload file: parsed and validated, or rejected with an error; never a panic, and
//! what is accepted holds no duplicate IP and no empty field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpath::workloads::WorkloadFile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(f) = WorkloadFile::parse(text, "fuzz") {
        let mut ips = std::collections::BTreeSet::new();
        for w in &f.workloads {
            assert!(!w.name.trim().is_empty() && !w.ips.is_empty());
            for ip in &w.ips {
                assert!(ips.insert(ip.to_canonical()), "duplicate {ip}");
            }
        }
    }
});
