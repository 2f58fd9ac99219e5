//! The `scorestream` binary: parse the command line, start tracing, hand over to a command.

use clap::Parser;
use scorestream::cli::{Cli, Command};
use scorestream::commands;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("SCORESTREAM_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Score(args) => commands::score::run(&args),
        Command::Inspect(args) => commands::inspect::run(&args),
        Command::Quantize(args) => commands::quantize::run(&args),
        Command::Compare(args) => commands::compare::run(&args),
        Command::Run(a) => scorestream::app::run_command(&a.config).map_err(Into::into),
        Command::Serve(a) => scorestream::app::serve_command(&a.config).map_err(Into::into),
        Command::CheckConfig(a) => scorestream::config::check_config(&a.config)
            .map(|_| println!("{}: ok", a.config.display()))
            .map_err(Into::into),
        #[cfg(feature = "cuda")]
        Command::Kernels(args) => commands::kernels::run(&args),
        #[cfg(not(feature = "cuda"))]
        Command::Kernels(_) => Err(anyhow::anyhow!("this scorestream was built without the `cuda` feature")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once, even where an error both names its cause and exposes it.
            eprintln!("error: {}", scorestream::error::join_causes(e.chain().map(ToString::to_string)));
            std::process::ExitCode::FAILURE
        }
    }
}
