//! Any `meshpath map` words and flags, run as the command runs them (read-only BPF
//! syscalls on this kernel's maps): an exit status and text, never a panic; JSON when
//! asked for and successful.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshpath::bpftool::{MapArgs, run_captured};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let args = MapArgs {
        json: flags & 1 != 0,
        pretty: flags & 2 != 0,
        decode: flags & 4 != 0,
        workloads: None,
        trust_domain: "cluster.local".into(),
        // Entering namespaces would move the fuzzer itself.
        netns: None,
        args: text.split(['\0', ' ']).map(str::to_owned).collect(),
    };
    let done = run_captured(&args);
    // With -j, what succeeds is JSON (bpftool's writer, which ours follows, never emits
    // half a document).
    if args.json && done.status == 0 && !done.stdout.is_empty() {
        assert!(serde_json::from_str::<serde_json::Value>(&done.stdout).is_ok(), "not JSON: {}", done.stdout);
    }
});
