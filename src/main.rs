//! The `scorestream` binary: parse the command line, start tracing, hand over to a command.

use std::io::IsTerminal;

use clap::Parser;
use scorestream::cli::{Cli, Command, LogFormat};
use scorestream::commands;
use tracing_subscriber::EnvFilter;

/// Logs go to stderr (stdout carries `score`'s output); colour codes only on a terminal.
fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SCORESTREAM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.with_ansi(colour).init();
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let result = match cli.command {
        Command::Score(args) => match &args.url {
            Some(url) => commands::score_remote::run(&args, url),
            None => commands::score::run(&args),
        },
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
            if e.is::<commands::score::NothingScored>() {
                std::process::ExitCode::from(3)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}
