//! The HTTP edge: hyper and axum, the access log, authentication, and one
//! thin handler per endpoint (decode → `gateway` → encode). The request path
//! is documented step by step in `gateway/mod.rs`.

pub mod conn;
pub mod error;
pub mod handlers;
pub mod limits;
pub mod messages;
pub mod responses;

use crate::gateway::state::AppState;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use http::HeaderValue;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// The request id, available to handlers and the access log.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

/// Facts a handler leaves on its response for the access log.
pub use crate::gateway::Facts as LogFacts;

/// Builds the whole application: the numbered stack above.
pub fn app(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/chat/completions", post(handlers::chat_completions))
        .route("/completions", post(handlers::completions))
        .route("/embeddings", post(handlers::embeddings))
        .route("/responses", post(responses::create))
        .route(
            "/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route("/models", get(handlers::list_models))
        .route("/models/{id}", get(handlers::get_model))
        .route("/triage/keys/self", get(handlers::key_self))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            handlers::authenticate,
        ))
        .merge(anthropic_routes(&state));
    Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .nest("/v1", v1)
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limits::enforce,
        ))
        .with_state(state)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::internal("The gateway hit an internal error; it has been logged.")
                .into_response()
        }))
        .layer(middleware::from_fn(access_log))
}

/// The Anthropic Messages routes: authenticated like the rest of `/v1`, with
/// every error (authentication's included) in Anthropic's envelope.
fn anthropic_routes(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/messages", post(messages::messages))
        .route("/messages/count_tokens", post(messages::count_tokens))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            handlers::authenticate,
        ))
        .route_layer(middleware::from_fn(messages::anthropic_errors))
}

static REQ_SEQ: AtomicU64 = AtomicU64::new(0);

fn new_request_id() -> Arc<str> {
    use std::io::Write;
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u32> = OnceLock::new();
    let p = PREFIX.get_or_init(rand::random::<u32>);
    let n = REQ_SEQ.fetch_add(1, Ordering::Relaxed);
    // Formatted on the stack: one allocation (the Arc) per request instead of two.
    let mut buf = [0u8; 32];
    let mut w = &mut buf[..];
    let len = match write!(w, "req-{p:08x}{n:010x}") {
        Ok(()) => 32 - w.len(),
        Err(_) => return format!("req-{p:08x}{n:010x}").into(),
    };
    std::str::from_utf8(&buf[..len]).unwrap_or("req-").into()
}

fn valid_request_id(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    (!s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())).then_some(s)
}

pub static IN_FLIGHT: AtomicU64 = AtomicU64::new(0);

async fn access_log(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id: Arc<str> = match req.headers().get("x-request-id").and_then(valid_request_id) {
        Some(s) => s.into(),
        None => new_request_id(),
    };
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    // The URI shares the request's buffer: no copy of the path per request.
    let uri = req.uri().clone();
    let path = uri.path();
    IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
    // One span per request; classify/upstream/vote are its children (exported
    // over OTLP with the `otel` feature).
    let span = tracing::info_span!("request", request_id = %id, method = %method, path = %path);
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status().as_u16();
    // This is the outermost layer: nothing after it reads the facts, so take them.
    let facts = resp
        .extensions_mut()
        .remove::<LogFacts>()
        .unwrap_or_default();
    let err = resp.extensions().get::<error::ErrorCode>().map(|e| e.0);
    let micros = start.elapsed().as_micros() as u64;
    if path != "/healthz" && path != "/readyz" && path != "/metrics" {
        tracing::info!(
            target: "triage::access",
            request_id = %id,
            method = %method,
            path = %path,
            status,
            latency_us = micros,
            api = facts.api.unwrap_or("-"),
            key = facts.key.as_deref().unwrap_or("-"),
            route = facts.route.as_deref().unwrap_or("-"),
            cache = facts.cache.unwrap_or("-"),
            error = err.unwrap_or("-"),
            "request"
        );
    }
    resp
}

/// A running gateway (tests and `serve` both use this).
pub struct Gateway {
    pub addr: std::net::SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Binds `listener` and serves until `shutdown()`.
    pub fn start(state: Arc<AppState>, listener: TcpListener) -> std::io::Result<Gateway> {
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            serve(st, listener, async {
                let _ = rx.await;
            })
            .await;
        });
        Ok(Gateway {
            addr,
            state,
            shutdown: Some(tx),
            task,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stops accepting and drains (up to the grace period).
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Accept loop with graceful drain; returns once drained or the grace ends.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    signal: impl std::future::Future<Output = ()>,
) {
    let (grace, header_timeout, max_header) = {
        let rt = state.runtime.load();
        let s = &rt.config.server;
        (s.shutdown_grace, s.header_read_timeout, s.max_header_bytes)
    };
    let service = app(state.clone());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(limits::transport_header_cap(max_header));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(
            u32::try_from(limits::transport_header_cap(max_header)).unwrap_or(u32::MAX),
        );
    let failures = crate::auth::failures::AuthFailures::new();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    state.ready.store(true, Ordering::SeqCst);
    tokio::pin!(signal);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let client = conn::Client { addr: peer, failures: failures.clone() };
                let svc = hyper_util::service::TowerToHyperService::new(conn::with_client(service.clone(), client));
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    // hyper's header timer starts once the protocol is known: a
                    // client that sends nothing must not hold the socket forever.
                    if !request_started(&stream, header_timeout).await {
                        return;
                    }
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned();
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut signal => break,
        }
    }
    state.ready.store(false, Ordering::SeqCst);
    drop(listener);
    tracing::info!(grace_secs = grace.as_secs_f64(), "draining open requests");
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!("grace period over; cutting remaining connections"),
    }
}

/// Waits (up to `limit`) until the client has sent enough to tell HTTP/1
/// from the HTTP/2 preface; false on timeout or EOF.
async fn request_started(stream: &tokio::net::TcpStream, limit: Duration) -> bool {
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    let wait = async {
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if n >= H2_PREFACE.len() || buf[..n] != H2_PREFACE[..n] => return true,
                // Part of the HTTP/2 preface so far: wait for the rest.
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    tokio::time::timeout(limit, wait).await.unwrap_or(false)
}

/// Serves only `/metrics` (for `metrics.listen`, so it need not be public).
pub async fn serve_metrics(state: Arc<AppState>, listener: TcpListener) {
    let app =
        Router::new()
            .route(
                "/metrics",
                get(|State(app): State<Arc<AppState>>| async move {
                    handlers::render_metrics(&app).await
                }),
            )
            .with_state(state);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics listener stopped");
    }
}
