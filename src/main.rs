//! The `triage` command line: a thin shell over the library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "triage", version, about = "An OpenAI-compatible LLM gateway that classifies, routes and meters every request")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default command).
    Serve {
        #[arg(short, long, default_value = "config/triage.toml")]
        config: PathBuf,
        /// Override `server.listen`.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Validate a config file and print every problem with its key path.
    Check {
        #[arg(short, long, default_value = "config/triage.toml")]
        config: PathBuf,
    },
    /// Serve the built-in mock provider on a socket (for benchmarks).
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: String,
        /// Delay before the first byte, e.g. `20ms`.
        #[arg(long, default_value = "0ms")]
        latency: humantime::Duration,
        /// Streaming speed; 0 sends every chunk at once.
        #[arg(long, default_value_t = 0)]
        tokens_per_second: u32,
        #[arg(long, default_value_t = 24)]
        reply_words: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve {
        config: PathBuf::from("config/triage.toml"),
        listen: None,
    });
    match command {
        Command::Check { config } => check(&config),
        Command::Serve { config, listen } => run_async(serve(config, listen)),
        Command::MockUpstream { listen, latency, tokens_per_second, reply_words } => {
            run_async(mock_upstream(listen, latency.into(), tokens_per_second, reply_words))
        }
    }
}

fn run_async(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match triage::config::Config::load(path) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                println!("warning: {w}");
            }
            println!(
                "{}: ok ({} providers, {} models, {} tiers, {} routers, {} keys)",
                path.display(),
                cfg.providers.len(),
                cfg.models.len(),
                cfg.tiers.len(),
                cfg.routers.len(),
                cfg.keys.len()
            );
            ExitCode::SUCCESS
        }
        Err(errs) => {
            for e in &errs.errors {
                println!("{e}");
            }
            println!("{}: {} problem(s)", path.display(), errs.errors.len());
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn serve(path: PathBuf, listen: Option<String>) -> Result<(), String> {
    let cfg = triage::config::Config::load(&path).map_err(|e| {
        format!("{} is not valid:\n{e}", path.display())
    })?;
    init_logging(cfg.server.log_json, cfg.server.log_level.as_deref());
    for w in &cfg.warnings {
        tracing::warn!("config: {w}");
    }
    let addr = listen.unwrap_or_else(|| cfg.server.listen.clone());
    let state = triage::build_state(cfg).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, config = %path.display(), "triage listening; OpenAI base URL http://{addr}/v1");
    triage::server::serve(state, listener, shutdown_signal()).await;
    Ok(())
}

async fn mock_upstream(listen: String, latency: std::time::Duration, tps: u32, words: u32) -> Result<(), String> {
    let settings = triage::config::MockSettings { latency, tokens_per_second: tps, reply_words: words.max(1) };
    let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    eprintln!("mock upstream on http://{listen}/v1");
    axum::serve(listener, triage::upstream::mock::router(settings))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}
