use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = meshpath::cli::Cli::parse();
    meshpath::cli::init_tracing(&cli);
    match meshpath::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line, the whole cause chain, no backtrace.
            eprintln!("meshpath: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
