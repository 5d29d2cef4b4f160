//! The `triage` command line: a thin shell over the library.

use clap::{Parser, Subcommand};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use triage::config::{Config, Secrets};

/// `println!` that ends the process quietly when the reader has gone
/// (`triage classifier eval | head`) instead of panicking on EPIPE.
macro_rules! outln {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "triage",
    version,
    about = "An OpenAI-compatible LLM gateway that classifies, routes and meters every request"
)]
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
        /// Override `server.listen` (in a container: `0.0.0.0:8080`).
        #[arg(long, env = "TRIAGE_LISTEN")]
        listen: Option<String>,
    },
    /// Validate a config file and print every problem with its key path.
    Check {
        #[arg(short, long, default_value = "config/triage.toml")]
        config: PathBuf,
    },
    /// Classify a prompt with the shipped (or a given) embedded model.
    Classify {
        text: String,
        /// A model file trained with `classifier train`.
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Train or evaluate the embedded classifier.
    Classifier {
        #[command(subcommand)]
        command: ClassifierCommand,
    },
    /// Virtual keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Spend per key and period, from the durable ledger.
    Spend {
        #[arg(short, long, default_value = "config/triage.toml")]
        config: PathBuf,
        #[arg(long)]
        key: Option<String>,
        /// daily, weekly, monthly or total.
        #[arg(long, default_value = "monthly")]
        period: String,
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

#[derive(Subcommand)]
enum ClassifierCommand {
    /// Train from labelled JSONL (`{"text","label"}` per line) and write a model file.
    Train {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Training option as `key=value` (e.g. `l2=1e-5`); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Fit the softmax temperature on predictions for held-out sources (trains once
        /// per `source`; takes minutes on the full set).
        #[arg(long)]
        calibrate: bool,
        /// Store this softmax temperature instead (e.g. the one `eval --split source` printed).
        #[arg(long, conflicts_with = "calibrate")]
        temperature: Option<f32>,
    },
    /// Accuracy, macro-F1, calibration error, confusion matrix, per-source table and the
    /// most confident mistakes on labelled JSONL.
    Eval {
        #[arg(long)]
        data: PathBuf,
        /// Model file; the shipped model when omitted.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Instead of evaluating a model on all of `data`, train on part of it and
        /// evaluate on the rest: `stratified` (80/20 by label) or `source` (every
        /// `source` held out in turn, calibrated on the other sources).
        #[arg(long)]
        split: Option<String>,
        /// Training option for `--split` as `key=value`; repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a fresh random key and the TOML that stores its hash.
    New {
        #[arg(long)]
        name: String,
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
        Command::Classify { text, model } => classify(&text, model.as_deref()),
        Command::Classifier { command } => classifier(command),
        Command::Keys {
            command: KeysCommand::New { name },
        } => {
            let (key, hash) = triage::auth::new_key();
            outln!("key (give this to the client; it is not stored anywhere): {key}\n");
            outln!("[keys.{name}]\nkey_sha256 = \"{hash}\"");
            ExitCode::SUCCESS
        }
        Command::Spend {
            config,
            key,
            period,
        } => spend(&config, key.as_deref(), &period),
        Command::MockUpstream {
            listen,
            latency,
            tokens_per_second,
            reply_words,
        } => run_async(mock_upstream(
            listen,
            latency.into(),
            tokens_per_second,
            reply_words,
        )),
    }
}

fn run_async(fut: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
    // Secrets are only needed to serve: a missing one is a warning here.
    match Config::load_with(path, Secrets::Optional) {
        Ok(cfg) => {
            for w in &cfg.warnings {
                outln!("warning: {w}");
            }
            outln!(
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
            for e in &errs.rendered {
                outln!("{e}");
            }
            outln!("{}: {} problem(s)", path.display(), errs.errors.len());
            ExitCode::FAILURE
        }
    }
}

/// A config that cannot be used, for `error: ...` lines.
fn invalid(path: &std::path::Path, e: &triage::config::ConfigErrors) -> String {
    if e.errors.len() == 1 && e.rendered[0].starts_with(&path.display().to_string()) {
        e.to_string()
    } else {
        format!("{} is not valid:\n{e}", path.display())
    }
}

fn load_model(
    path: Option<&std::path::Path>,
) -> Result<triage::classify::embedded::EmbeddedClassifier, String> {
    use triage::classify::embedded::EmbeddedClassifier;
    match path {
        Some(p) => EmbeddedClassifier::load(p).map_err(|e| e.to_string()),
        None => EmbeddedClassifier::default_model().map_err(|e| e.to_string()),
    }
}

fn classify(text: &str, model: Option<&std::path::Path>) -> ExitCode {
    let m = match load_model(model) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let t0 = std::time::Instant::now();
    let p = m.classify(text);
    let took = t0.elapsed();
    let label = m.label_name(p.label).unwrap_or("?");
    outln!(
        "label {label}  confidence {:.3}  ({} µs)",
        p.confidence,
        took.as_micros()
    );
    let mut scores: Vec<(&str, f32)> = m
        .labels()
        .iter()
        .map(String::as_str)
        .zip(p.scores.iter().copied())
        .collect();
    scores.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (l, s) in scores {
        outln!("  {l:<12} {s:.3}");
    }
    ExitCode::SUCCESS
}

fn train_options(set: &[String]) -> Result<triage::classify::embedded::TrainOptions, String> {
    let mut opts = triage::classify::embedded::TrainOptions::default();
    for kv in set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--set {kv:?}: expected KEY=VALUE"))?;
        opts.set(k.trim(), v.trim()).map_err(|e| e.to_string())?;
    }
    Ok(opts)
}

fn classifier(cmd: ClassifierCommand) -> ExitCode {
    use triage::classify::embedded::{load_jsonl, EmbeddedClassifier};
    use triage::classify::eval;
    let progress = |done: usize, total: usize| {
        if done.is_multiple_of(10) || done == total {
            eprintln!("  held out {done}/{total} sources");
        }
    };
    let run = || -> Result<(), String> {
        match cmd {
            ClassifierCommand::Train {
                data,
                out,
                set,
                calibrate,
                temperature,
            } => {
                let opts = train_options(&set)?;
                let examples = load_jsonl(&data).map_err(|e| e.to_string())?;
                let t0 = std::time::Instant::now();
                let mut m =
                    EmbeddedClassifier::train(&examples, &opts).map_err(|e| e.to_string())?;
                if calibrate {
                    let cv =
                        eval::source_cv(&examples, &opts, progress).map_err(|e| e.to_string())?;
                    m.set_temperature(cv.temperature);
                    outln!(
                        "temperature {:.4} (fitted on held-out sources)",
                        cv.temperature
                    );
                }
                if let Some(t) = temperature {
                    if !(t.is_finite() && t > 0.0) {
                        return Err(format!("--temperature {t}: must be > 0"));
                    }
                    m.set_temperature(t);
                }
                m.save(&out).map_err(|e| e.to_string())?;
                outln!(
                    "trained on {} examples ({} labels) in {:.1}s -> {}",
                    examples.len(),
                    m.labels().len(),
                    t0.elapsed().as_secs_f64(),
                    out.display()
                );
                Ok(())
            }
            ClassifierCommand::Eval {
                data,
                model,
                split,
                set,
            } => {
                let examples = load_jsonl(&data).map_err(|e| e.to_string())?;
                let opts = train_options(&set)?;
                match split.as_deref() {
                    None => {
                        let m = load_model(model.as_deref())?;
                        let outcomes = eval::outcomes(&m, &examples);
                        outln!(
                            "model on all {} examples (temperature {:.3})",
                            outcomes.len(),
                            m.temperature()
                        );
                        outln!("{}", eval::full_report(m.labels(), &outcomes, &examples));
                    }
                    Some("stratified") => {
                        let (train, test) = eval::stratified_split(&examples, 0.2, 7);
                        let m =
                            EmbeddedClassifier::train(&train, &opts).map_err(|e| e.to_string())?;
                        outln!(
                            "stratified split: trained on {}, evaluated on {}",
                            train.len(),
                            test.len()
                        );
                        let outcomes = eval::outcomes(&m, &test);
                        outln!("{}", eval::full_report(m.labels(), &outcomes, &test));
                    }
                    Some("source") => {
                        let with = examples.iter().filter(|e| e.source.is_some()).count();
                        if with == 0 {
                            return Err(format!(
                                "--split source needs a \"source\" field on the examples; none of the {} in {} has one (use --split stratified)",
                                examples.len(),
                                data.display()
                            ));
                        }
                        let t0 = std::time::Instant::now();
                        let mut cv = eval::source_cv(&examples, &opts, progress)
                            .map_err(|e| e.to_string())?;
                        let raw = eval::full_report(&cv.labels, &cv.outcomes, &examples);
                        eval::cross_fit_temperatures(&mut cv.outcomes, &examples);
                        let calibrated = eval::full_report(&cv.labels, &cv.outcomes, &examples);
                        outln!(
                            "source split: every source held out in turn ({:.0}s); probabilities \
                             calibrated with a temperature fitted on the other sources",
                            t0.elapsed().as_secs_f64()
                        );
                        outln!("{calibrated}");
                        outln!(
                            "summary: accuracy {:.4}  macro-F1 {:.4}  mean per-source accuracy {:.4}  \
                             ECE uncalibrated {:.4}  ECE calibrated {:.4}  temperature (all sources) {:.4}",
                            calibrated.metrics.accuracy,
                            calibrated.metrics.macro_f1,
                            calibrated.mean_source_accuracy,
                            raw.ece,
                            calibrated.ece,
                            cv.temperature
                        );
                    }
                    Some(other) => {
                        return Err(format!("unknown split {other:?} (stratified or source)"))
                    }
                }
                Ok(())
            }
        }
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn spend(config: &std::path::Path, key: Option<&str>, period: &str) -> ExitCode {
    use triage::limits::{nanos_to_usd_string, Period};
    let period = match period {
        "daily" => Period::Daily,
        "weekly" => Period::Weekly,
        "monthly" => Period::Monthly,
        "total" => Period::Total,
        other => {
            eprintln!("error: unknown period {other:?} (daily, weekly, monthly or total)");
            return ExitCode::FAILURE;
        }
    };
    // The ledger is keyed by name: no secret is needed to read it.
    let cfg = match Config::load_with(config, Secrets::Optional) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", invalid(config, &e));
            return ExitCode::FAILURE;
        }
    };
    if let Some(k) = key {
        if !cfg.keys.iter().any(|c| c.name == k) {
            let names: Vec<&str> = cfg.keys.iter().map(|c| c.name.as_str()).collect();
            eprintln!(
                "error: unknown key {k:?} (keys in {}: {})",
                config.display(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            );
            return ExitCode::FAILURE;
        }
    }
    // With `redis`, each replica's ledger holds only its own settlements.
    let Some(state_dir) = cfg.store.state_dir() else {
        eprintln!("error: store.kind = \"memory\" keeps no ledger");
        return ExitCode::FAILURE;
    };
    match triage::store::spend_report(state_dir, key, period) {
        Ok(rows) => {
            outln!(
                "{:<20} {:<12} {:>14} {:>10}",
                "key",
                "period",
                "spent_usd",
                "requests"
            );
            for r in rows {
                outln!(
                    "{:<20} {:<12} {:>14} {:>10}",
                    r.key,
                    r.period,
                    nanos_to_usd_string(r.spent_nanos),
                    r.requests
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs (and, with the `otel` feature and OTEL_EXPORTER_OTLP_ENDPOINT set, OTLP
/// traces: one span per request with classify/upstream/vote children).
fn init_logging(json: bool, level: Option<&str>) -> Option<Telemetry> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal; files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none();
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().with_ansi(ansi).boxed()
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otel")]
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        match otel::layer() {
            Ok((layer, provider)) => {
                registry.with(layer).init();
                return Some(Telemetry(provider));
            }
            Err(e) => eprintln!("warning: OTLP export disabled: {e}"),
        }
    }
    registry.init();
    None
}

/// Flushes exported spans when dropped at shutdown.
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
struct Telemetry(#[cfg(feature = "otel")] opentelemetry_sdk::trace::SdkTracerProvider);

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        let _ = self.0.shutdown();
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;

    pub fn layer<S>() -> Result<
        (
            tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
            SdkTracerProvider,
        ),
        String,
    >
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| e.to_string())?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("triage")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("triage");
        Ok((tracing_opentelemetry::layer().with_tracer(tracer), provider))
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
    let cfg = Config::load(&path).map_err(|e| invalid(&path, &e))?;
    let _telemetry = init_logging(cfg.server.log_json, cfg.server.log_level.as_deref());
    for w in &cfg.warnings {
        tracing::warn!("config: {w}");
    }
    let addr = listen.unwrap_or_else(|| cfg.server.listen.clone());
    let metrics_addr = cfg.metrics.listen.clone();
    let metrics_explicit = cfg.metrics.listen_explicit;
    let state = triage::build_state(cfg).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    if let Some(maddr) = metrics_addr {
        match tokio::net::TcpListener::bind(&maddr).await {
            Ok(ml) => {
                tracing::info!(addr = %maddr, "metrics on a separate listener");
                tokio::spawn(triage::server::serve_metrics(state.clone(), ml));
            }
            Err(e) if metrics_explicit => {
                return Err(format!("cannot listen on metrics.listen {maddr}: {e}"));
            }
            // The default address may be another instance's on this host.
            Err(e) => tracing::warn!(addr = %maddr, error = %e,
                "cannot listen on the default metrics address; /metrics is not served (set metrics.listen)"),
        }
    }
    spawn_reloader(state.clone(), path.clone());
    tracing::info!(%addr, config = %path.display(), "triage listening; OpenAI base URL http://{addr}/v1");
    triage::server::serve(state.clone(), listener, shutdown_signal()).await;
    state.flush_limits(std::time::Duration::from_secs(5)).await;
    let st = state.clone();
    let _ = tokio::task::spawn_blocking(move || st.flush()).await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP reloads the config file: a valid one is swapped in atomically, an
/// invalid one is logged and the running config keeps serving.
fn spawn_reloader(state: std::sync::Arc<triage::gateway::state::AppState>, path: PathBuf) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match triage::reload_from_file(&state, &path) {
                Ok(warnings) => {
                    for w in warnings {
                        tracing::warn!("config: {w}");
                    }
                    tracing::info!(config = %path.display(), "config reloaded");
                }
                Err(e) => {
                    tracing::error!(config = %path.display(), "config reload rejected, keeping the running config:\n{e}\nnote: a reload re-reads the file only; environment variables (api_key_env, key_env) keep the values the process started with, so a new secret needs a restart")
                }
            }
        }
    });
}

async fn mock_upstream(
    listen: String,
    latency: std::time::Duration,
    tps: u32,
    words: u32,
) -> Result<(), String> {
    let settings = triage::config::MockSettings {
        latency,
        tokens_per_second: tps,
        reply_words: words.max(1),
        api: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    eprintln!("mock upstream on http://{listen}/v1");
    use axum::serve::ListenerExt;
    // Small SSE writes must not wait for Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, triage::upstream::mock::router(settings))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}
