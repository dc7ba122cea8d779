//! stemectl: the StemeDB command-line client. `main` only parses, picks the
//! runtime and turns the outcome into an exit code.
//!
//! Code map: `cli` (flags, parsing only), `commands` (dispatch and the data
//! subcommands), `node` (drain, rate limit, status over admin HTTP), `load`
//! (`--file` JSON lines), `bench` (load generator), `admin` (the admin
//! HTTP/1.1 client), `connect` (gRPC channel: TLS, token), `output` and
//! `value` (rendering and typed values), `exit` (exit codes and hints),
//! `backup` (backup, WAL archive, restore).

mod admin;
mod backup;
mod bench;
mod cli;
mod commands;
mod connect;
mod exit;
mod load;
mod node;
mod output;
mod timefmt;
mod value;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() {
    // Clap exits with code 2 on usage errors, as documented.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(exit::FAILURE);
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Bench(args) => bench::run(&cli, args).await,
            _ => commands::run(&cli).await,
        }
    });
    let code = match result {
        Ok(()) => exit::OK,
        // A closed pipe (e.g. `stemectl history e | head`) is not a failure.
        Err(e) if is_broken_pipe(&e) => exit::OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = exit::hint(&e, &cli) {
                eprintln!("hint: {hint}");
            }
            exit::code_for(&e)
        }
    };
    std::process::exit(code);
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}
