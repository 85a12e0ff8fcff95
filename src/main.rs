//! The `fhirgate` command line: parses arguments and hands over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fhirgate::pa::PolicySet;

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
    /// Sync resources from a source to a destination (both named in the configuration).
    ///
    /// Shows progress while it runs and a summary table at the end; exits with 1 when anything
    /// was dead-lettered, missing at the source or unreadable.
    Sync {
        /// TOML configuration file; `FHIRGATE_SECTION__KEY` variables override it.
        #[arg(long, env = "FHIRGATE_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        options: fhirgate::sync::cli::SyncOptions,
    },
    /// Check payer policies or explain a determination.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Credentials for callers.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// TLS certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Facts from clinical notes.
    #[command(subcommand)]
    Extract(ExtractCommand),
}

#[derive(Subcommand)]
enum ExtractCommand {
    /// Score the rules extractor on a labelled note set: precision, recall and F1 per kind of
    /// fact, then every mistake. Exits with 1 when overall F1 is below --min-f1.
    Eval {
        #[arg(default_value = "tests/fixtures/notes")]
        dir: PathBuf,
        #[arg(long, default_value_t = 0.0)]
        min_f1: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a development CA, a server certificate and a client certificate (for mTLS) in
    /// DIR, and print the configuration that uses them. Never for production.
    Dev {
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        /// Names and addresses the server certificate is for; repeatable.
        #[arg(long = "host", default_values = ["localhost", "127.0.0.1", "::1"])]
        hosts: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check that no audit record was edited, removed or reordered. Run it with the server
    /// stopped (the store is opened directly); a running server answers `GET /audit/verify`.
    /// Exits with 1 when the chain is broken.
    Verify {
        /// TOML configuration file (for the data folder).
        #[arg(long, env = "FHIRGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Print a new random API key and the `[[auth.api_keys]]` entry (its SHA-256) that makes
    /// the server accept it. The key is printed once and stored nowhere.
    NewKey {
        /// The service account's name.
        #[arg(long)]
        name: String,
        /// Roles (admin, clinician, staff, reviewer, sync-operator, read-only); repeatable.
        #[arg(long = "role")]
        roles: Vec<String>,
        /// SMART scopes (`system/Claim.c`); repeatable.
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Lint every policy file in DIR; prints `file:line: message` for each problem.
    Check {
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
    /// Decide one order for one patient and print the criteria trace.
    Explain {
        /// A Bundle (or resource) with the patient's record: Patient, Coverage, payor
        /// Organization, Conditions, Observations, medications, procedures.
        #[arg(long)]
        bundle: PathBuf,
        /// The order: ServiceRequest, DeviceRequest, MedicationRequest, …
        #[arg(long)]
        order: PathBuf,
        /// Facts from clinical notes, as a JSON array.
        #[arg(long)]
        facts: Option<PathBuf>,
        /// The policy folder.
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
        /// Evaluate as of this day (YYYY-MM-DD); today by default.
        #[arg(long)]
        date: Option<String>,
        /// Print the determination as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// mimalloc: under many threads it allocates without the lock contention of the system
/// allocator (sync throughput +20–70% on two cores, see `benches/sync.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = fhirgate::config::Config::load(config.as_deref())?;
            fhirgate::init_logging(&config.log);
            runtime()?.block_on(async move {
                let listener = tokio::net::TcpListener::bind(config.server.bind)
                    .await
                    .with_context(|| format!("binding {}", config.server.bind))?;
                fhirgate::run(listener, config, fhirgate::http::shutdown_signal()).await
            })
        }
        Command::Sync { config, options } => {
            let mut config = fhirgate::config::Config::load(config.as_deref())?;
            if std::env::var_os("FHIRGATE_LOG__LEVEL").is_none() {
                // The progress bar owns the terminal; only problems are logged.
                config.log.level = "warn".into();
            }
            fhirgate::init_logging(&config.log);
            let runtime = runtime()?;
            let code = runtime.block_on(fhirgate::sync::cli::run(config, options))?;
            drop(runtime);
            std::process::exit(code);
        }
        Command::Auth(AuthCommand::NewKey {
            name,
            roles,
            scopes,
        }) => {
            fhirgate::auth::check_roles(&roles).map_err(anyhow::Error::msg)?;
            if let Some(bad) = scopes
                .iter()
                .find(|s| fhirgate::auth::scopes::Scope::parse(s).is_none())
            {
                anyhow::bail!("{bad:?} is not a SMART resource scope");
            }
            if roles.is_empty() && scopes.is_empty() {
                anyhow::bail!("give at least one --role or --scope");
            }
            let key = fhirgate::auth::keys::new_key();
            let entry = toml::to_string(&toml::toml! {
                [[auth.api_keys]]
                name = name
                sha256 = (fhirgate::auth::keys::hash(&key))
                roles = roles
                scopes = scopes
            })?;
            println!("API key (shown once; give it to the service as `Authorization: Bearer <key>`):\n{key}\n\nAdd to the configuration file:\n{entry}");
            Ok(())
        }
        Command::Extract(ExtractCommand::Eval { dir, min_f1, json }) => {
            use fhirgate::extract::{eval, rules};
            let set = eval::load(&dir)?;
            let found: Vec<_> = set.iter().map(|n| rules::extract(&n.note)).collect();
            let report = eval::score(&set, &found);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", report.render());
                for mistake in &report.mistakes {
                    println!("- {mistake}");
                }
            }
            if report.overall.f1() < min_f1 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Certs(CertsCommand::Dev { dir, hosts }) => {
            let made = fhirgate::http::tls::generate_dev(&dir, &hosts)?;
            let d = dir.display();
            println!(
                "Wrote {d}/ca.pem, server.pem, server-key.pem, client.pem, client-key.pem (and ca-key.pem).\n\n\
                 Serve HTTPS with:\n\n\
                 [server.tls]\n\
                 cert_file = \"{d}/server.pem\"\n\
                 key_file = \"{d}/server-key.pem\"\n\
                 client_ca_file = \"{d}/ca.pem\"   # ask for client certificates (mTLS)\n\n\
                 [[auth.mtls_clients]]\n\
                 name = \"dev-client\"\n\
                 sha256 = \"{}\"\n\
                 roles = [\"read-only\"]\n\n\
                 Try it: curl --cacert {} --cert {d}/client.pem --key {d}/client-key.pem https://localhost:8080/fhir/metadata",
                made.client_fingerprint,
                made.ca.display(),
            );
            Ok(())
        }
        Command::Audit(AuditCommand::Verify { config }) => {
            let config = fhirgate::config::Config::load(config.as_deref())?;
            let code = runtime()?.block_on(fhirgate::audit::verify_offline(&config))?;
            std::process::exit(code);
        }
        Command::Policy(PolicyCommand::Check { dir }) => match PolicySet::load_dir(&dir) {
            Ok(set) => {
                let rules: usize = set.payers.iter().map(|p| p.rules.len()).sum();
                println!(
                    "{}: {} payers, {rules} rules, no problems",
                    dir.display(),
                    set.payers.len()
                );
                Ok(())
            }
            Err(errors) => {
                eprintln!("{errors}");
                std::process::exit(1);
            }
        },
        Command::Policy(PolicyCommand::Explain {
            bundle,
            order,
            facts,
            policies,
            date,
            json,
        }) => {
            let set = PolicySet::load_dir(&policies).map_err(|e| anyhow::anyhow!("{e}"))?;
            let read = |path: &PathBuf| -> anyhow::Result<serde_json::Value> {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
            };
            let record = read(&bundle)?;
            let order = read(&order)?;
            let facts: Option<Vec<fhirgate::pa::Fact>> = match &facts {
                Some(path) => Some(
                    serde_json::from_value(read(path)?)
                        .context("facts must be a JSON array of facts")?,
                ),
                None => None,
            };
            let today = match date {
                Some(d) => time::Date::parse(
                    &d,
                    time::macros::format_description!("[year]-[month]-[day]"),
                )
                .with_context(|| format!("--date {d}: expected YYYY-MM-DD"))?,
                None => time::OffsetDateTime::now_utc().date(),
            };
            let determination = set.determine_with(&order, &[&record], facts, today);
            if json {
                println!("{}", serde_json::to_string_pretty(&determination)?);
            } else {
                print!("{}", determination.render());
            }
            Ok(())
        }
    }
}
