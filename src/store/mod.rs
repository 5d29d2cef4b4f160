//! Durable spend ledger: SQLite (WAL) written by a background thread in small group commits.
//!
//! Requests never wait on disk: [`SpendLedger::record`] only enqueues. A failing disk is logged,
//! counted and retried; records stay in memory (bounded) until they can be written.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags};
use serde::Serialize;

mod breaker;
mod period;
pub mod responses;
mod shared_redis;
pub use breaker::{Breaker, StoreEvent, StoreEvents, RETRY_EVERY};
pub use period::Period;
pub use shared_redis::SharedRedis;

/// Whether a limit (and a spend record's subject) belongs to a key or a team.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubjectKind {
    /// An API key.
    Key,
    /// A team of keys.
    Team,
}

impl std::fmt::Display for SubjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SubjectKind::Key => "key",
            SubjectKind::Team => "team",
        })
    }
}

/// File name of the ledger inside the state directory.
pub const LEDGER_FILE: &str = "ledger.sqlite3";

/// How long the writer lingers after the first queued record to batch more into one commit.
const LINGER: Duration = Duration::from_millis(25);
/// Largest group commit.
const MAX_BATCH: usize = 1024;
/// Wait between retries after a failed write.
const WRITE_RETRY_EVERY: Duration = Duration::from_secs(1);
/// Unwritten records kept in memory at most; beyond this the oldest are dropped (and counted).
const MAX_PENDING: usize = 1_000_000;
/// Longest `flush` waits for the writer before giving up.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Ledger failures; none of them is fatal to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created or used.
    #[error("ledger directory {path}: {source}")]
    Dir {
        /// Directory path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// SQLite refused an operation.
    #[error("ledger {path}: {source}")]
    Sqlite {
        /// Database path.
        path: PathBuf,
        /// Underlying error.
        source: rusqlite::Error,
    },
    /// Records are still unwritten after a flush (see the write error counter and logs).
    #[error("{pending} ledger records not yet written: {last_error}")]
    Unwritten {
        /// Records still in memory.
        pending: usize,
        /// The most recent write error.
        last_error: String,
    },
    /// The writer thread is gone or did not answer in time.
    #[error("ledger writer unavailable: {0}")]
    Writer(&'static str),
}

/// One settled request, as written to the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRecord {
    /// Settlement time, unix milliseconds (decides the budget period it counts in).
    pub ts_unix_ms: i64,
    /// Key name.
    pub key: Arc<str>,
    /// Team name, if the key belongs to one.
    pub team: Option<Arc<str>>,
    /// Model that served the request.
    pub model: String,
    /// Prompt tokens (including cached ones).
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cached prompt tokens.
    pub cached_tokens: u64,
    /// Cost charged, nano-dollars.
    pub cost_nanos: u64,
    /// True when usage was estimated rather than reported by the provider.
    pub estimated: bool,
    /// Gateway request id.
    pub request_id: String,
}

/// Durable spend records; the SQLite implementation can be swapped for a shared store later.
pub trait SpendLedger: Send + Sync {
    /// Queues a record; never blocks on I/O and never fails (failures are retried and counted).
    fn record(&self, rec: SpendRecord);
    /// Nano-dollars spent by a key or team at or after `since_unix_ms` (written records only).
    fn spent_since(
        &self,
        kind: SubjectKind,
        name: &str,
        since_unix_ms: i64,
    ) -> Result<u64, StoreError>;
    /// Blocks until every record queued before the call is written (or the write failed).
    fn flush(&self) -> Result<(), StoreError>;
}

enum Msg {
    Record(SpendRecord),
    Flush(mpsc::SyncSender<Result<(), StoreError>>),
    Shutdown,
}

#[derive(Default)]
struct Counters {
    write_errors: AtomicU64,
    dropped: AtomicU64,
    pending: AtomicUsize,
    written: AtomicU64,
    #[cfg(test)]
    fail_writes: std::sync::atomic::AtomicBool,
}

/// SQLite-backed [`SpendLedger`] with a dedicated writer thread.
pub struct SqliteLedger {
    path: PathBuf,
    tx: Sender<Msg>,
    reader: Mutex<Connection>,
    counters: Arc<Counters>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for SqliteLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLedger")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS spend (
    id INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    key TEXT NOT NULL,
    team TEXT,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    cost_nanos INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS spend_key_ts ON spend(key, ts_ms);
CREATE INDEX IF NOT EXISTS spend_team_ts ON spend(team, ts_ms);
";

impl SqliteLedger {
    /// Opens (creating if missing) `state_dir/ledger.sqlite3` in WAL mode and starts the writer.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Dir {
            path: state_dir.to_owned(),
            source,
        })?;
        let path = state_dir.join(LEDGER_FILE);
        let err = sql_err(&path);
        let writer_conn = Connection::open(&path).map_err(&err)?;
        writer_conn
            .busy_timeout(Duration::from_secs(5))
            .map_err(&err)?;
        // journal_mode returns a row, so it is queried rather than executed.
        let mode: String = writer_conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(&err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "ledger is not in WAL mode");
        }
        // NORMAL in WAL mode is durable across process crashes; only an OS crash can lose the tail.
        writer_conn
            .execute_batch("PRAGMA synchronous=NORMAL;")
            .map_err(&err)?;
        writer_conn.execute_batch(SCHEMA).map_err(&err)?;
        let reader = Connection::open(&path).map_err(&err)?;
        reader.busy_timeout(Duration::from_secs(5)).map_err(&err)?;

        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel();
        let writer = {
            let counters = counters.clone();
            let path = path.clone();
            std::thread::Builder::new()
                .name("triage-ledger".into())
                .spawn(move || Writer::new(writer_conn, path, counters).run(rx))
                .map_err(|source| StoreError::Dir {
                    path: state_dir.to_owned(),
                    source,
                })?
        };
        drop(err);
        Ok(Self {
            path,
            tx,
            reader: Mutex::new(reader),
            counters,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Failed write attempts since start (for metrics/alerts).
    pub fn write_errors(&self) -> u64 {
        self.counters.write_errors.load(Ordering::Relaxed)
    }

    /// Records dropped because too many were pending unwritten.
    pub fn dropped_records(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Records the writer holds that are not yet on disk (excludes ones still in the channel).
    pub fn pending_records(&self) -> usize {
        self.counters.pending.load(Ordering::Relaxed)
    }

    /// Records written since start.
    pub fn written_records(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    /// Ends the writer's linger early (it may be parked rather than waiting on the channel).
    fn wake_writer(&self) {
        if let Some(handle) = self.writer.lock().as_ref() {
            handle.thread().unpark();
        }
    }

    #[cfg(test)]
    fn set_fail_writes(&self, fail: bool) {
        self.counters.fail_writes.store(fail, Ordering::Relaxed);
    }
}

impl SpendLedger for SqliteLedger {
    fn record(&self, rec: SpendRecord) {
        if self.tx.send(Msg::Record(rec)).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!("ledger writer is gone; spend record dropped");
        }
    }

    fn spent_since(
        &self,
        kind: SubjectKind,
        name: &str,
        since_unix_ms: i64,
    ) -> Result<u64, StoreError> {
        let sql = match kind {
            SubjectKind::Key => {
                "SELECT COALESCE(SUM(cost_nanos), 0) FROM spend WHERE key = ?1 AND ts_ms >= ?2"
            }
            SubjectKind::Team => {
                "SELECT COALESCE(SUM(cost_nanos), 0) FROM spend WHERE team = ?1 AND ts_ms >= ?2"
            }
        };
        let conn = self.reader.lock();
        let total: i64 = conn
            .query_row(sql, params![name, since_unix_ms], |r| r.get(0))
            .map_err(sql_err(&self.path))?;
        Ok(to_u64(total))
    }

    fn flush(&self) -> Result<(), StoreError> {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        self.tx
            .send(Msg::Flush(reply_tx))
            .map_err(|_| StoreError::Writer("writer thread exited"))?;
        self.wake_writer();
        match reply_rx.recv_timeout(FLUSH_TIMEOUT) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(StoreError::Writer("flush timed out")),
            Err(RecvTimeoutError::Disconnected) => Err(StoreError::Writer("writer thread exited")),
        }
    }
}

impl Drop for SqliteLedger {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Shutdown);
        self.wake_writer();
        if let Some(handle) = self.writer.lock().take() {
            if handle.join().is_err() {
                tracing::error!("ledger writer thread panicked");
            }
        }
    }
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    counters: Arc<Counters>,
    pending: VecDeque<SpendRecord>,
    last_error: Option<String>,
    next_retry: Option<Instant>,
}

impl Writer {
    fn new(conn: Connection, path: PathBuf, counters: Arc<Counters>) -> Self {
        Self {
            conn,
            path,
            counters,
            pending: VecDeque::new(),
            last_error: None,
            next_retry: None,
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        let mut flush_waiters = Vec::new();
        let mut shutdown = false;
        while !shutdown {
            // Block until there is something to do: a message, or a due retry.
            let first = match (self.next_retry, self.pending.is_empty()) {
                (None, true) => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                (None, false) => Err(RecvTimeoutError::Timeout),
                (Some(at), _) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            };
            let first = match first {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    shutdown = true;
                    None
                }
            };
            let mut got_record = false;
            if let Some(m) = first {
                got_record = matches!(m, Msg::Record(_));
                self.accept(m, &mut flush_waiters, &mut shutdown);
            }
            // Group commit: linger briefly after a record so concurrent ones share one transaction.
            // Parked, not blocked in `recv`: a record sent meanwhile then costs its sender no
            // wake-up (a futex call and a context switch per request otherwise); `flush` and
            // `Drop` unpark the writer so they never wait out the linger.
            if got_record && flush_waiters.is_empty() && !shutdown {
                let deadline = Instant::now() + LINGER;
                loop {
                    self.drain(&rx, &mut flush_waiters, &mut shutdown);
                    let now = Instant::now();
                    if self.pending.len() >= MAX_BATCH
                        || !flush_waiters.is_empty()
                        || shutdown
                        || now >= deadline
                    {
                        break;
                    }
                    std::thread::park_timeout(deadline - now);
                }
            }
            // Anything already queued joins this commit (and precedes any flush request).
            self.drain(&rx, &mut flush_waiters, &mut shutdown);
            let retry_due = self.next_retry.is_none_or(|at| Instant::now() >= at);
            if !self.pending.is_empty() && (retry_due || !flush_waiters.is_empty() || shutdown) {
                self.write_all();
            }
            for w in flush_waiters.drain(..) {
                let _ = w.send(self.flush_result());
            }
        }
        if !self.pending.is_empty() {
            tracing::error!(
                records = self.pending.len(),
                "ledger shutting down with unwritten spend records"
            );
        }
    }

    /// Takes every message already queued, without waiting.
    fn drain(
        &mut self,
        rx: &Receiver<Msg>,
        waiters: &mut Vec<mpsc::SyncSender<Result<(), StoreError>>>,
        shutdown: &mut bool,
    ) {
        loop {
            match rx.try_recv() {
                Ok(m) => self.accept(m, waiters, shutdown),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    *shutdown = true;
                    break;
                }
            }
        }
    }

    fn accept(
        &mut self,
        m: Msg,
        waiters: &mut Vec<mpsc::SyncSender<Result<(), StoreError>>>,
        shutdown: &mut bool,
    ) {
        match m {
            Msg::Record(r) => {
                if self.pending.len() >= MAX_PENDING {
                    self.pending.pop_front();
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("ledger backlog full; oldest unwritten spend record dropped");
                }
                self.pending.push_back(r);
                self.counters
                    .pending
                    .store(self.pending.len(), Ordering::Relaxed);
            }
            Msg::Flush(w) => waiters.push(w),
            Msg::Shutdown => *shutdown = true,
        }
    }

    fn flush_result(&self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            Ok(())
        } else {
            Err(StoreError::Unwritten {
                pending: self.pending.len(),
                last_error: self.last_error.clone().unwrap_or_default(),
            })
        }
    }

    /// Writes pending records in batches; on failure keeps them and schedules a retry.
    fn write_all(&mut self) {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(MAX_BATCH);
            match self.write_batch(n) {
                Ok(()) => {
                    self.pending.drain(..n);
                    self.counters.written.fetch_add(n as u64, Ordering::Relaxed);
                    self.last_error = None;
                    self.next_retry = None;
                }
                Err(e) => {
                    self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        path = %self.path.display(),
                        error = %e,
                        pending = self.pending.len(),
                        "ledger write failed; keeping records for retry"
                    );
                    self.last_error = Some(e.to_string());
                    self.next_retry = Some(Instant::now() + WRITE_RETRY_EVERY);
                    break;
                }
            }
        }
        self.counters
            .pending
            .store(self.pending.len(), Ordering::Relaxed);
    }

    fn write_batch(&mut self, n: usize) -> Result<(), rusqlite::Error> {
        #[cfg(test)]
        if self.counters.fail_writes.load(Ordering::Relaxed) {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                Some("simulated full disk".into()),
            ));
        }
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO spend (ts_ms, key, team, model, prompt_tokens, completion_tokens, \
                 cached_tokens, cost_nanos, estimated, request_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for r in self.pending.iter().take(n) {
                stmt.execute(params![
                    r.ts_unix_ms,
                    &*r.key,
                    r.team.as_deref(),
                    r.model,
                    to_i64(r.prompt_tokens),
                    to_i64(r.completion_tokens),
                    to_i64(r.cached_tokens),
                    to_i64(r.cost_nanos),
                    r.estimated,
                    r.request_id,
                ])?;
            }
        }
        tx.commit()
    }
}

/// One line of `triage spend`: a key's spend in one period bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpendRow {
    /// Key name.
    pub key: String,
    /// Period label: "2024-02-29" (daily), "2024-02-26" (week's Monday), "2024-02", or "total".
    pub period: String,
    /// Nano-dollars spent.
    pub spent_nanos: u64,
    /// Requests recorded.
    pub requests: u64,
}

/// Opens the ledger read-only and sums spend per key and period (optionally for one key).
pub fn spend_report(
    state_dir: &Path,
    key: Option<&str>,
    group_by: Period,
) -> Result<Vec<SpendRow>, StoreError> {
    let path = state_dir.join(LEDGER_FILE);
    let err = sql_err(&path);
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(&err)?;
    let label = match group_by {
        Period::Daily => "date(ts_ms / 1000, 'unixepoch')",
        // Back six days, then forward to the next Monday (or stay on it).
        Period::Weekly => "date(ts_ms / 1000, 'unixepoch', '-6 days', 'weekday 1')",
        Period::Monthly => "strftime('%Y-%m', ts_ms / 1000, 'unixepoch')",
        Period::Total => "'total'",
    };
    let sql = format!(
        "SELECT key, {label} AS period, COALESCE(SUM(cost_nanos), 0), COUNT(*) FROM spend \
         WHERE (?1 IS NULL OR key = ?1) GROUP BY key, period ORDER BY key, period"
    );
    let mut stmt = conn.prepare(&sql).map_err(&err)?;
    let rows = stmt
        .query_map(params![key], |r| {
            Ok(SpendRow {
                key: r.get(0)?,
                period: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                spent_nanos: to_u64(r.get(2)?),
                requests: to_u64(r.get(3)?),
            })
        })
        .map_err(&err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(&err)
}

#[cfg(test)]
mod tests;
