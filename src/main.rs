//! `rufus-gateway`: parse the command line, run it, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use rufus_gateway::{Cli, execute, exit_code};

fn main() -> ExitCode {
    rufus_gateway::abort_unless_caught();
    let cli = Cli::parse();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rufus-gateway: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
