//! `meshpath-cni`: the chained CNI plugin the container runtime runs for every pod sandbox
//! (see [`meshpath::cni`]). Its answer goes to stdout as the CNI spec says; what it did goes
//! to `<STATE_DIR>/<node>/cni.log` (stderr when that cannot be opened).
#![forbid(unsafe_code)]

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

use meshpath::cni::spec::{Code, Invocation, SpecError, cni_version};
use meshpath::cni::{self, plugin};

/// A network configuration is a few kilobytes; anything past this is not one.
const MAX_STDIN: u64 = 1024 * 1024;

fn main() -> ExitCode {
    let mut stdin = String::new();
    let read = std::io::stdin().take(MAX_STDIN).read_to_string(&mut stdin);
    let version = cni_version(&stdin);
    init_log(&stdin);
    let result = match read {
        Err(e) => Err(SpecError::new(Code::BadConfig, format!("reading stdin: {e}"))),
        Ok(_) => Invocation::from_env(|k| std::env::var(k).ok()).and_then(|inv| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| SpecError::new(Code::TryAgain, format!("starting: {e}")))?;
            rt.block_on(plugin::run(&inv, &stdin))
        }),
    };
    let mut out = std::io::stdout().lock();
    match result {
        Ok(text) => {
            // DEL, CHECK and GC print nothing.
            if !text.is_empty() {
                let _ = writeln!(out, "{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{}", e.msg);
            let _ = writeln!(out, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

/// Logs to the node's plugin log, named in the configuration; to stderr without one.
fn init_log(stdin: &str) {
    let node = serde_json::from_str::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("node")?.as_str().map(str::to_owned))
        .filter(|n| meshpath::datapath::validate_node_name(n).is_ok());
    let builder = tracing_subscriber::fmt().with_ansi(false).with_target(false);
    match node.map(|n| cni::open_log(&n)) {
        Some(Ok(file)) => builder.with_writer(std::sync::Mutex::new(file)).init(),
        _ => builder.with_writer(std::io::stderr).init(),
    }
}
