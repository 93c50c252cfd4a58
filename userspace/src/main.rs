//! The `meshpath` binary: parses the command line and runs it (see [`meshpath::cli`]); every
//! failure ends as one `meshpath: error:` line and a non-zero exit.
#![forbid(unsafe_code)]

use std::process::ExitCode;

/// jemalloc, tuned at build time (`.cargo/config.toml`), gives freed memory back to the system
/// within a second or two; glibc's malloc kept the high-water mark of every burst
/// (measured in tests/load.rs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::Parser;
use clap::error::ErrorKind;

fn main() -> ExitCode {
    let cli = match meshpath::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            // Same one-line shape as every other error; clap's usage hint adds nothing here.
            // Missing arguments are listed on the lines after the first: kept, on one line.
            let text = e.to_string();
            let lines: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .collect();
            let line = lines.iter().filter(|l| !l.is_empty()).copied().collect::<Vec<_>>().join(" ");
            eprintln!("meshpath: error: {} (see --help)", line.strip_prefix("error: ").unwrap_or(&line));
            return ExitCode::from(2);
        }
    };
    meshpath::cli::init_tracing(&cli);
    match meshpath::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line, the whole cause chain, no backtrace.
            eprintln!("meshpath: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: many errors already include their
/// cause in their own message ("{path}: {source}"), and printing the chain again would say
/// it twice.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
