//! Any CONNECT a peer can send: method and authority as bytes, checked the way the HBONE
//! server checks them. No panic; what passes names the dialed, local workload and no
//! proxy port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpath::identity::Identity;
use meshpath::proxy::inbound::check_request;
use meshpath::state::WorkloadIndex;
use meshpath::workloads::WorkloadFile;

fuzz_target!(|data: &[u8]| {
    let (method, authority) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"CONNECT"[..], data),
    };
    let Ok(method) = http::Method::from_bytes(method) else { return };
    let Ok(uri) = http::Uri::try_from(authority) else { return };
    let file = WorkloadFile::parse(
        "workloads:\n  - {name: a, namespace: ns, serviceAccount: sa, node: n1, ips: [10.0.0.1, \"fd00::1\"]}\n",
        "fuzz",
    )
    .expect("a valid file");
    let index = WorkloadIndex::from_file(&file, "td");
    let serving = Identity::new("td", "ns", "sa");
    for dialed in ["10.0.0.1", "fd00::1"] {
        let dialed = dialed.parse().expect("an IP");
        if let Ok(target) = check_request(&method, &uri, dialed, &serving, &index, "n1") {
            assert_eq!(target.ip(), dialed);
            assert!(!meshpath::proxy::is_proxy_port(target.port()));
        }
    }
});
