//! The `lorkd` binary: parse config (flags and LORKD_* variables), set up logging, run the server.

use clap::Parser;
use lorkd::{config, server, Config};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    if config.print_env_vars {
        print!("{}", config::env_vars_listing());
        return std::process::ExitCode::SUCCESS;
    }
    if config.print_memory_plan {
        return match lorkd::package::Package::load(&config.package) {
            Ok(package) => {
                println!("{}", server::MemoryPlan::new(&config, &package).to_json());
                std::process::ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("lorkd: {error}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    server::init_tracing(config.log_format, &config.log);
    match server::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "lorkd cannot run");
            eprintln!("lorkd: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
