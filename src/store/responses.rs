//! Stored Responses (`store: true`): the Response object and the full input it answered, kept
//! for `previous_response_id`, `GET /v1/responses/{id}` and `DELETE`, for the key that made it
//! only, for a retention period (30 days by default, as OpenAI).
//!
//! SQLite work runs on tokio's blocking pool, never on a request worker.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

/// File name of the stored-response database inside the state directory. Separate from the
/// spend ledger so large conversations never delay spend writes.
pub const RESPONSES_FILE: &str = "responses.sqlite3";

/// OpenAI keeps stored responses for 30 days.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Expired rows are deleted at most this often (on a write), and at open.
const PURGE_EVERY_MS: i64 = 3_600_000;

/// Most responses the in-memory store holds; the oldest go first.
const MEMORY_CAPACITY: u64 = 100_000;

/// One stored response.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    /// `resp_…` id.
    pub id: String,
    /// Name of the key that created it; no other key can read, continue or delete it.
    pub owner: String,
    /// Unix milliseconds; retention counts from here.
    pub created_unix_ms: i64,
    /// The Response object as the client received it.
    pub response: Value,
    /// Every input item the response answered, earlier turns of a `previous_response_id`
    /// chain included (not `instructions`, which the API does not carry over).
    pub input_items: Vec<Value>,
}

impl StoredResponse {
    /// The conversation a request continuing this response starts from: its input, then its
    /// output.
    pub fn conversation(&self) -> Vec<Value> {
        crate::protocol::responses::continuation_items(&self.input_items, &self.response)
    }
}

/// Stored-response store failures; a request that needs the store fails with a 5xx.
#[derive(Debug, thiserror::Error)]
pub enum ResponseStoreError {
    #[error("response store directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("response store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("stored response {id} is unreadable: {source}")]
    Corrupt {
        id: String,
        source: serde_json::Error,
    },
    #[error("response store task failed: {0}")]
    Task(String),
}

/// Where stored responses live: in memory (lost on restart) or in SQLite in the state directory.
#[derive(Clone)]
pub enum ResponseStore {
    Memory(Arc<MemoryResponses>),
    Sqlite(Arc<SqliteResponses>),
}

impl std::fmt::Debug for ResponseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory(_) => f.write_str("ResponseStore::Memory"),
            Self::Sqlite(s) => write!(f, "ResponseStore::Sqlite({})", s.path.display()),
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn retention_ms(retention: Duration) -> i64 {
    i64::try_from(retention.as_millis()).unwrap_or(i64::MAX)
}

impl ResponseStore {
    /// An in-memory store.
    pub fn memory(retention: Duration) -> Self {
        let cache = moka::sync::Cache::builder()
            .max_capacity(MEMORY_CAPACITY)
            .time_to_live(retention.max(Duration::from_secs(1)))
            .build();
        Self::Memory(Arc::new(MemoryResponses {
            cache,
            retention_ms: retention_ms(retention),
        }))
    }

    /// Opens (creating if missing) `state_dir/responses.sqlite3` and purges expired rows.
    /// Blocking: call at startup or from a blocking context.
    pub fn open_sqlite(state_dir: &Path, retention: Duration) -> Result<Self, ResponseStoreError> {
        Ok(Self::Sqlite(Arc::new(SqliteResponses::open(
            state_dir, retention,
        )?)))
    }

    /// Saves (or replaces) a response.
    pub async fn put(&self, rec: StoredResponse) -> Result<(), ResponseStoreError> {
        match self {
            Self::Memory(m) => {
                m.cache.insert(rec.id.clone(), Arc::new(rec));
                Ok(())
            }
            Self::Sqlite(s) => {
                let s = s.clone();
                blocking(move || s.put(&rec, now_ms())).await
            }
        }
    }

    /// The response `id` if `owner` created it and it has not expired.
    pub async fn get(
        &self,
        id: &str,
        owner: &str,
    ) -> Result<Option<StoredResponse>, ResponseStoreError> {
        match self {
            Self::Memory(m) => Ok(m.get(id, owner, now_ms())),
            Self::Sqlite(s) => {
                let (s, id, owner) = (s.clone(), id.to_owned(), owner.to_owned());
                blocking(move || s.get(&id, &owner, now_ms())).await
            }
        }
    }

    /// Deletes the response `id` if `owner` created it; false when there was none to delete.
    pub async fn delete(&self, id: &str, owner: &str) -> Result<bool, ResponseStoreError> {
        match self {
            Self::Memory(m) => Ok(m.delete(id, owner)),
            Self::Sqlite(s) => {
                let (s, id, owner) = (s.clone(), id.to_owned(), owner.to_owned());
                blocking(move || s.delete(&id, &owner)).await
            }
        }
    }

    /// Deletes expired responses now; returns how many (memory: expiry is the cache's).
    pub async fn purge_expired(&self) -> Result<u64, ResponseStoreError> {
        match self {
            Self::Memory(m) => {
                m.cache.run_pending_tasks();
                Ok(0)
            }
            Self::Sqlite(s) => {
                let s = s.clone();
                blocking(move || s.purge(now_ms())).await
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ResponseStoreError> + Send + 'static,
) -> Result<T, ResponseStoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ResponseStoreError::Task(e.to_string()))?
}

/// In-memory stored responses (moka evicts expired and excess entries).
pub struct MemoryResponses {
    cache: moka::sync::Cache<String, Arc<StoredResponse>>,
    retention_ms: i64,
}

impl MemoryResponses {
    fn get(&self, id: &str, owner: &str, now: i64) -> Option<StoredResponse> {
        let rec = self.cache.get(id)?;
        // The cache's TTL counts from insertion; retention counts from creation.
        let live = rec.created_unix_ms.saturating_add(self.retention_ms) > now;
        (rec.owner == owner && live).then(|| (*rec).clone())
    }

    fn delete(&self, id: &str, owner: &str) -> bool {
        match self.cache.get(id) {
            Some(rec) if rec.owner == owner => {
                self.cache.invalidate(id);
                true
            }
            _ => false,
        }
    }
}

/// SQLite stored responses; one connection, used from the blocking pool.
pub struct SqliteResponses {
    path: PathBuf,
    conn: Mutex<Connection>,
    retention_ms: i64,
    last_purge_ms: AtomicI64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses(created_ms);
";

impl SqliteResponses {
    fn open(state_dir: &Path, retention: Duration) -> Result<Self, ResponseStoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| ResponseStoreError::Dir {
            path: state_dir.to_owned(),
            source,
        })?;
        let path = state_dir.join(RESPONSES_FILE);
        let err = |source| ResponseStoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        let _mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(err)?;
        conn.execute_batch("PRAGMA synchronous=NORMAL;")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        let store = Self {
            path: path.clone(),
            conn: Mutex::new(conn),
            retention_ms: retention_ms(retention),
            last_purge_ms: AtomicI64::new(0),
        };
        store.purge(now_ms())?;
        Ok(store)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> ResponseStoreError + '_ {
        move |source| ResponseStoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn put(&self, rec: &StoredResponse, now: i64) -> Result<(), ResponseStoreError> {
        let response = rec.response.to_string();
        let items = Value::Array(rec.input_items.clone()).to_string();
        self.conn
            .lock()
            .execute(
                "INSERT OR REPLACE INTO responses (id, owner, created_ms, response, input_items) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![rec.id, rec.owner, rec.created_unix_ms, response, items],
            )
            .map_err(self.err())?;
        if now.saturating_sub(self.last_purge_ms.load(Ordering::Relaxed)) >= PURGE_EVERY_MS {
            self.purge(now)?;
        }
        Ok(())
    }

    fn get(
        &self,
        id: &str,
        owner: &str,
        now: i64,
    ) -> Result<Option<StoredResponse>, ResponseStoreError> {
        let row: Option<(i64, String, String)> = self
            .conn
            .lock()
            .query_row(
                "SELECT created_ms, response, input_items FROM responses \
                 WHERE id = ?1 AND owner = ?2 AND created_ms > ?3",
                params![id, owner, now.saturating_sub(self.retention_ms)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(self.err())?;
        let Some((created, response, items)) = row else {
            return Ok(None);
        };
        let corrupt = |source| ResponseStoreError::Corrupt {
            id: id.to_owned(),
            source,
        };
        Ok(Some(StoredResponse {
            id: id.to_owned(),
            owner: owner.to_owned(),
            created_unix_ms: created,
            response: serde_json::from_str(&response).map_err(corrupt)?,
            input_items: serde_json::from_str(&items).map_err(corrupt)?,
        }))
    }

    fn delete(&self, id: &str, owner: &str) -> Result<bool, ResponseStoreError> {
        let n = self
            .conn
            .lock()
            .execute(
                "DELETE FROM responses WHERE id = ?1 AND owner = ?2",
                params![id, owner],
            )
            .map_err(self.err())?;
        Ok(n > 0)
    }

    fn purge(&self, now: i64) -> Result<u64, ResponseStoreError> {
        self.last_purge_ms.store(now, Ordering::Relaxed);
        let n = self
            .conn
            .lock()
            .execute(
                "DELETE FROM responses WHERE created_ms <= ?1",
                params![now.saturating_sub(self.retention_ms)],
            )
            .map_err(self.err())?;
        Ok(n as u64)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(id: &str, owner: &str, created: i64) -> StoredResponse {
        StoredResponse {
            id: id.into(),
            owner: owner.into(),
            created_unix_ms: created,
            response: json!({"id": id, "object": "response", "output": [
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}]}),
            input_items: vec![json!({"type": "message", "role": "user", "content": "hello"})],
        }
    }

    async fn owner_scoping(store: ResponseStore) {
        store.put(rec("resp_1", "alice", now_ms())).await.unwrap();
        let got = store.get("resp_1", "alice").await.unwrap().unwrap();
        assert_eq!(got, rec("resp_1", "alice", got.created_unix_ms));
        assert_eq!(got.conversation().len(), 2);
        assert_eq!(got.conversation()[1]["role"], "assistant");

        assert!(
            store.get("resp_1", "bob").await.unwrap().is_none(),
            "another key sees nothing"
        );
        assert!(store.get("resp_missing", "alice").await.unwrap().is_none());
        assert!(
            !store.delete("resp_1", "bob").await.unwrap(),
            "another key cannot delete"
        );
        assert!(store.get("resp_1", "alice").await.unwrap().is_some());
        assert!(store.delete("resp_1", "alice").await.unwrap());
        assert!(store.get("resp_1", "alice").await.unwrap().is_none());
        assert!(!store.delete("resp_1", "alice").await.unwrap());
    }

    async fn expiry(store: ResponseStore) {
        let old = now_ms() - 31 * 24 * 3600 * 1000;
        store.put(rec("resp_old", "alice", old)).await.unwrap();
        store.put(rec("resp_new", "alice", now_ms())).await.unwrap();
        assert!(
            store.get("resp_old", "alice").await.unwrap().is_none(),
            "past retention"
        );
        assert!(store.get("resp_new", "alice").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn memory_store_scopes_to_owner() {
        owner_scoping(ResponseStore::memory(DEFAULT_RETENTION)).await;
    }

    #[tokio::test]
    async fn memory_store_hides_expired() {
        expiry(ResponseStore::memory(DEFAULT_RETENTION)).await;
    }

    #[tokio::test]
    async fn sqlite_store_scopes_to_owner() {
        let dir = tempfile::tempdir().unwrap();
        owner_scoping(ResponseStore::open_sqlite(dir.path(), DEFAULT_RETENTION).unwrap()).await;
    }

    #[tokio::test]
    async fn sqlite_store_hides_and_purges_expired() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResponseStore::open_sqlite(dir.path(), DEFAULT_RETENTION).unwrap();
        expiry(store.clone()).await;
        assert_eq!(
            store.purge_expired().await.unwrap(),
            1,
            "the old row is deleted"
        );
        assert_eq!(store.purge_expired().await.unwrap(), 0);
        assert!(store.get("resp_new", "alice").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn sqlite_store_survives_reopen_and_purges_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ResponseStore::open_sqlite(dir.path(), DEFAULT_RETENTION).unwrap();
            store.put(rec("resp_keep", "k", now_ms())).await.unwrap();
            store
                .put(rec("resp_gone", "k", now_ms() - 2 * 3_600_000))
                .await
                .unwrap();
        }
        // Reopened with a one-hour retention: the two-hour-old row is purged at open.
        let store = ResponseStore::open_sqlite(dir.path(), Duration::from_secs(3600)).unwrap();
        let got = store.get("resp_keep", "k").await.unwrap().unwrap();
        assert_eq!(got.response["output"][0]["content"][0]["text"], "hi");
        assert_eq!(got.input_items, rec("x", "k", 0).input_items);
        let ResponseStore::Sqlite(inner) = &store else {
            panic!("sqlite store expected")
        };
        let rows: i64 = inner
            .conn
            .lock()
            .query_row("SELECT COUNT(*) FROM responses", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }

    #[tokio::test]
    async fn put_replaces_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResponseStore::open_sqlite(dir.path(), DEFAULT_RETENTION).unwrap();
        let mut r = rec("resp_1", "k", now_ms());
        store.put(r.clone()).await.unwrap();
        r.response["status"] = json!("completed");
        store.put(r.clone()).await.unwrap();
        assert_eq!(store.get("resp_1", "k").await.unwrap().unwrap(), r);
    }
}
