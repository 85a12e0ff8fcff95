//! The `fhirgate` command line: parses arguments and hands over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fhirgate",
    version,
    about = "FHIR R4 gateway for prior authorization"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (embedded store on 127.0.0.1:8080, data under ./data, unless configured).
    Serve {
        /// TOML configuration file; `FHIRGATE_SECTION__KEY` variables override it.
        #[arg(long, env = "FHIRGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = fhirgate::config::Config::load(config.as_deref())?;
            fhirgate::init_logging(&config.log);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(config.server.bind)
                    .await
                    .with_context(|| format!("binding {}", config.server.bind))?;
                fhirgate::run(listener, config, fhirgate::http::shutdown_signal()).await
            })
        }
    }
}
