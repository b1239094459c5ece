//! The gateway's embedded database: one SQLite file (WAL), its versioned schema, and the
//! one connection everything that persists goes through.
//!
//! This module owns opening the file, the pragmas, the migrations (`migrations/NNNN_*.sql`,
//! embedded at build time and applied in order in one transaction, tracked by
//! `PRAGMA user_version`) and a write probe for readiness. It does not own the registry's
//! queries (the registry brings its own SQL and runs it through [`Store::call`]); the ingest
//! path's SQL lives here, in [`ingest`] (what the pipeline's writer thread runs on its own
//! connection) and [`query`] (what the HTTP API reads, on read-only connections).
//!
//! # Durability
//!
//! `synchronous = FULL` in WAL mode: a commit returns only after the WAL is fsynced, so a
//! commit survives power loss, not just a process crash. The registry would be fine with
//! `NORMAL`, but the ingest path acknowledges devices only after their uplink is durably
//! committed (DESIGN.md, "Delivery guarantee"), and it amortises the fsync by group commit.
//!
//! # Concurrency
//!
//! One connection behind a mutex. SQLite allows one writer at a time anyway, and every
//! statement here is short; blocking work runs on tokio's blocking pool via [`Store::call`],
//! never on an async worker thread.

pub mod alerts;
pub mod alerts_query;
pub mod checkpoint;
pub mod ingest;
pub mod query;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use thiserror::Error;

/// The schema migrations, in order. Entry `i` brings the schema to version `i + 1`.
/// Append only: a migration that has shipped is never edited.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_registry",
        sql: include_str!("../../migrations/0001_registry.sql"),
    },
    Migration {
        version: 2,
        name: "0002_ingest",
        sql: include_str!("../../migrations/0002_ingest.sql"),
    },
    Migration {
        version: 3,
        name: "0003_forward",
        sql: include_str!("../../migrations/0003_forward.sql"),
    },
    Migration {
        version: 4,
        name: "0004_alerts",
        sql: include_str!("../../migrations/0004_alerts.sql"),
    },
];

/// `PRAGMA application_id` of our database files ("NBGT"): tells our file from any other
/// SQLite database someone points `[store] path` at.
const APPLICATION_ID: i32 = 0x4E42_4754;

/// How long a statement waits for a lock held by another connection (e.g. an operator's
/// `sqlite3` shell) before failing with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

struct Migration {
    version: u32,
    name: &'static str,
    sql: &'static str,
}

/// Why the store could not be opened or used.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot create the database directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot open the database {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },

    #[error(
        "cannot put the database {} in WAL mode (journal_mode stays {mode}); \
         keep it on a local filesystem",
        path.display()
    )]
    NoWal { path: PathBuf, mode: String },

    #[error(
        "the database {} has schema version {found}, newer than this nbiot-gateway supports \
         ({supported}); run a newer nbiot-gateway or restore a backup",
        path.display()
    )]
    TooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    #[error("{} is not an nbiot-gateway database ({reason})", path.display())]
    Foreign { path: PathBuf, reason: &'static str },

    #[error("migration {name} failed on {}: {source}", path.display())]
    Migration {
        path: PathBuf,
        name: &'static str,
        source: rusqlite::Error,
    },

    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),

    #[error("database task stopped before it finished: {0}")]
    Task(#[from] tokio::task::JoinError),

    #[error("cannot start the {name} thread: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
}

/// The embedded database. Share it as `Arc<Store>`.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (or creates) the database at `path`, creating missing parent directories,
    /// and brings its schema up to date. Blocking: call it at startup, or through
    /// `spawn_blocking`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // journal_mode answers with the mode now in force; anything but "wal" (e.g. a
        // filesystem without shared memory support) is a setup error worth refusing.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NoWal {
                path: path.to_owned(),
                mode,
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        Ok(Store {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version this binary brings a database to.
    pub fn schema_version() -> u32 {
        MIGRATIONS.last().map_or(0, |m| m.version)
    }

    /// The connection, for blocking code that is already off the async workers.
    ///
    /// A panic while the lock was held cannot leave a transaction open (rusqlite's
    /// `Transaction` rolls back on drop, also while unwinding), so a poisoned lock is
    /// recovered rather than propagated.
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        match self.conn.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Runs `f` with the connection on tokio's blocking pool.
    pub async fn call<F, R>(self: &Arc<Self>, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&mut Connection) -> R + Send + 'static,
        R: Send + 'static,
    {
        let store = Arc::clone(self);
        let result = tokio::task::spawn_blocking(move || f(&mut store.lock())).await?;
        Ok(result)
    }

    /// Proves the database still takes writes: rewrites one row and commits (one small WAL
    /// append). This is what `/readyz` runs; a full disk, a read-only remount or a
    /// deleted directory fail here before they fail an uplink.
    pub fn probe_write(&self) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.lock().execute(
            "INSERT INTO store_probe (id, checked_at) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            [now],
        )?;
        Ok(())
    }
}

/// Applies the pending migrations in one immediate transaction, so a database is either
/// at its old version or at ours, never in between; refuses files that are not ours and
/// schemas newer than this binary.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let supported = Store::schema_version();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let app_id: i32 = tx.pragma_query_value(None, "application_id", |r| r.get(0))?;
    if app_id != 0 && app_id != APPLICATION_ID {
        return Err(StoreError::Foreign {
            path: path.to_owned(),
            reason: "its application_id belongs to another program",
        });
    }
    if version == 0 {
        let objects: i64 = tx.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
        if objects > 0 {
            return Err(StoreError::Foreign {
                path: path.to_owned(),
                reason: "it already holds tables but no schema version",
            });
        }
    }
    if version > supported {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: version,
            supported,
        });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > version) {
        tx.execute_batch(m.sql)
            .map_err(|source| StoreError::Migration {
                path: path.to_owned(),
                name: m.name,
                source,
            })?;
        tx.pragma_update(None, "user_version", m.version)?;
        tracing::info!(path = %path.display(), migration = m.name, "Applied database migration.");
    }
    tx.pragma_update(None, "application_id", APPLICATION_ID)?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "nbiot-store-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn creates_parent_dirs_and_migrates_once() {
        let tmp = TempDir::new("create");
        let path = tmp.0.join("a/b/gateway.db");
        let store = Store::open(&path).unwrap();
        {
            let conn = store.lock();
            let v: u32 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(v, Store::schema_version());
            let mode: String = conn
                .pragma_query_value(None, "journal_mode", |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
            let sync: i64 = conn
                .pragma_query_value(None, "synchronous", |r| r.get(0))
                .unwrap();
            assert_eq!(sync, 2, "synchronous = FULL");
        }
        store.probe_write().unwrap();
        drop(store);
        // Reopening an up-to-date database applies nothing and keeps the data.
        let store = Store::open(&path).unwrap();
        let at: i64 = store
            .lock()
            .query_row("SELECT count(*) FROM store_probe", [], |r| r.get(0))
            .unwrap();
        assert_eq!(at, 1);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let tmp = TempDir::new("newer");
        let path = tmp.0.join("gateway.db");
        Store::open(&path)
            .unwrap()
            .lock()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        match Store::open(&path) {
            Err(StoreError::TooNew {
                found, supported, ..
            }) => {
                assert_eq!((found, supported), (99, Store::schema_version()));
            }
            other => panic!("expected TooNew, got {other:?}"),
        }
    }

    #[test]
    fn refuses_someone_elses_database() {
        let tmp = TempDir::new("foreign");
        let path = tmp.0.join("other.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::Foreign { .. })
        ));
    }
}
