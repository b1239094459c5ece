//! WAL checkpoints off the commit path.
//!
//! In WAL mode every commit appends pages to `gateway.db-wal`; a checkpoint copies them back
//! into the database file and fsyncs it. SQLite's default runs that checkpoint inside the
//! COMMIT that pushes the WAL past 1000 pages — on the pipeline's writer thread, before the
//! uplinks of that batch can be acknowledged, and while every uplink behind them waits.
//! Under load that was the writer's largest single cost and the source of its latency tail
//! (BENCHMARKS.md).
//!
//! So the writer connection turns auto-checkpointing off ([`configure_writer`]) and this
//! thread, with its own connection, runs `PRAGMA wal_checkpoint(PASSIVE)` every
//! [`INTERVAL`]: a passive checkpoint copies what no reader still needs and never blocks
//! the writer or the readers, so the copying and its fsync run beside the commits (on
//! another core when there is one).
//!
//! # Keeping the WAL bounded
//!
//! A WAL file is only rewound to its start by a writer that finds every frame already
//! copied. A background checkpoint under continuous load always trails the newest commit by
//! a few frames, so the writer also calls [`catch_up`] after it has answered a batch
//! whenever the WAL has grown past [`CATCH_UP_FRAMES`]: a passive checkpoint that only has
//! the last few frames left to copy (cheap), after which the next transaction rewinds the
//! WAL. `journal_size_limit` then truncates the file back to [`WAL_SIZE_LIMIT`] bytes when
//! it was rewound, so a burst does not leave a huge file behind. If the checkpointer stops
//! (it cannot fail the gateway: errors are logged and retried), the writer's catch-up still
//! bounds the WAL.
//!
//! Readers that keep a snapshot open (a long query, the forwarder mid-read) pin the frames
//! after it: a passive checkpoint stops there and finishes on a later round.

use std::ffi::c_int;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::hooks::Wal;
use rusqlite::{Connection, OpenFlags};
use tracing::{debug, info, warn};

use super::StoreError;
use crate::telemetry::metrics as m;

/// How often the background checkpoint runs.
pub const INTERVAL: Duration = Duration::from_millis(250);

/// WAL frames (pages) after which the writer finishes a checkpoint itself so the WAL can be
/// rewound: 8192 pages = 32 MiB with 4 KiB pages.
pub const CATCH_UP_FRAMES: i64 = 8192;

/// Bytes the WAL file is truncated to when it is rewound.
pub const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// What one `wal_checkpoint` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Another checkpoint was running (nothing done by this one).
    pub busy: bool,
    /// Frames in the WAL.
    pub frames: i64,
    /// Of which already copied into the database.
    pub copied: i64,
}

/// Runs one passive checkpoint on `conn`.
pub fn passive(conn: &Connection) -> rusqlite::Result<Progress> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok(Progress {
            busy: r.get::<_, i64>(0)? != 0,
            frames: r.get(1)?,
            copied: r.get(2)?,
        })
    })
}

/// The WAL's length in frames after the writer's last commit (from SQLite's WAL hook).
#[derive(Debug, Clone, Default)]
pub struct WalFrames(Arc<AtomicI64>);

impl WalFrames {
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Sets up the writer's connection: no checkpoint inside COMMIT, a bounded WAL file, and
/// the WAL's length recorded after every commit.
pub fn configure_writer(conn: &mut Connection) -> rusqlite::Result<WalFrames> {
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    let frames = WalFrames::default();
    let slot = Arc::clone(&frames.0);
    // Replaces SQLite's own hook (the one auto-checkpointing installs): from here on only
    // this module checkpoints.
    conn.wal_hook(Some(move |_: &mut Wal, pages: c_int| {
        slot.store(i64::from(pages), Ordering::Relaxed);
        Ok(())
    }))?;
    Ok(frames)
}

/// The writer's part (see the module docs), after it has answered a batch: when the WAL
/// is long, finish the checkpoint so the next transaction rewinds it.
pub fn catch_up(conn: &Connection, frames: &WalFrames) {
    if frames.get() < CATCH_UP_FRAMES {
        return;
    }
    match passive(conn) {
        // Copied up to the end: the next commit rewinds the WAL; until then the hook's
        // figure is stale, so forget it.
        Ok(p) if p.copied == p.frames => frames.0.store(0, Ordering::Relaxed),
        Ok(_) => {}
        Err(e) => debug!(error = %e, "WAL catch-up checkpoint failed; the next commit retries."),
    }
}

/// The background checkpoint thread. Stops (after a last, truncating checkpoint) on
/// [`Checkpointer::stop`] or when dropped.
#[derive(Debug)]
pub struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens its own connection to the (existing, migrated) store at `path` and starts.
    pub fn start(path: &Path) -> Result<Checkpointer, StoreError> {
        let conn = open(path)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let path = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("nbiot-checkpoint".to_owned())
            .spawn(move || run(&conn, &path, &stopped))
            .map_err(|source| StoreError::Thread {
                name: "checkpoint",
                source,
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it: call it after the writer has stopped, so its last
    /// checkpoint leaves the WAL empty.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shut();
    }
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    // A passive checkpoint never waits; the final TRUNCATE may, briefly.
    conn.busy_timeout(Duration::from_secs(2))
        .map_err(open_err)?;
    // The checkpoint fsyncs the database file before it lets the WAL be rewound.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    Ok(conn)
}

fn run(conn: &Connection, path: &Path, stopped: &mpsc::Receiver<()>) {
    let pending = metrics::gauge!(m::STORE_WAL_FRAMES);
    let duration = metrics::histogram!(m::STORE_CHECKPOINT_DURATION);
    let mut failing = false;
    // Until stop is asked (or the owner is gone).
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(INTERVAL) {
        let started = Instant::now();
        match passive(conn) {
            Ok(p) => {
                if !p.busy {
                    duration.record(started.elapsed().as_secs_f64());
                }
                pending.set((p.frames - p.copied).max(0) as f64);
                if failing {
                    info!(path = %path.display(), "WAL checkpoints succeed again.");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    warn!(path = %path.display(), error = %e, "WAL checkpoint failed; retrying every 250 ms (the WAL grows meanwhile).");
                    failing = true;
                }
            }
        }
    }
    // The writer has stopped: copy everything and empty the WAL file, so a stopped gateway
    // leaves one self-contained database file.
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(0) => pending.set(0.0),
        Ok(_) => debug!(
            "Final WAL checkpoint was blocked by a reader; SQLite finishes it on the next open."
        ),
        Err(e) => {
            debug!(error = %e, "Final WAL checkpoint failed; SQLite finishes it on the next open.")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::store::Store;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn store(name: &str) -> (Dir, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("nbiot-checkpoint-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("gateway.db");
        drop(Store::open(&path).expect("store"));
        (Dir(dir), path)
    }

    fn wal_len(path: &Path) -> u64 {
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        std::fs::metadata(PathBuf::from(wal)).map_or(0, |m| m.len())
    }

    /// A writer connection as the pipeline has it, but truncating the WAL file to nothing
    /// when it is rewound, so a rewind shows in the file's length.
    fn writer(path: &Path) -> (Connection, WalFrames) {
        let mut conn = Connection::open(path).expect("open");
        let frames = configure_writer(&mut conn).expect("configure");
        conn.pragma_update(None, "journal_size_limit", 0)
            .expect("limit");
        (conn, frames)
    }

    fn commit(conn: &Connection, i: i64) {
        conn.execute(
            "INSERT INTO store_probe (id, checked_at) VALUES (1, ?1) \
             ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
            [i],
        )
        .expect("write");
    }

    #[test]
    fn the_writer_never_checkpoints_inside_commit() {
        let (_dir, path) = store("auto");
        let (conn, frames) = writer(&path);
        // Past SQLite's default auto-checkpoint (1000 pages), the WAL just keeps growing.
        for i in 0..1500 {
            commit(&conn, i);
        }
        assert_eq!(frames.get(), 1500, "one frame per commit, none rewound");
        assert!(wal_len(&path) >= 1500 * 4096);
    }

    #[test]
    fn the_thread_checkpoints_and_the_next_commit_rewinds_the_wal() {
        let (_dir, path) = store("thread");
        let (conn, frames) = writer(&path);
        for i in 0..100 {
            commit(&conn, i);
        }
        let grown = wal_len(&path);
        assert!(grown >= 100 * 4096);
        let ckpt = Checkpointer::start(&path).expect("checkpointer");
        // Once the thread has copied every frame, a commit starts the WAL again at frame 1.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut i = 100;
        while frames.get() != 1 {
            assert!(
                Instant::now() < deadline,
                "never rewound: {} frames",
                frames.get()
            );
            std::thread::sleep(Duration::from_millis(50));
            i += 1;
            commit(&conn, i);
        }
        assert!(wal_len(&path) < grown);
        // Stopped after the writer: the WAL file is emptied, the data is in the database.
        drop(conn);
        ckpt.stop();
        assert_eq!(wal_len(&path), 0);
        let reader = Connection::open(&path).expect("reopen");
        let last: i64 = reader
            .query_row("SELECT checked_at FROM store_probe", [], |r| r.get(0))
            .expect("probe row");
        assert_eq!(last, i);
    }

    #[test]
    fn catch_up_copies_a_long_wal_so_the_next_commit_rewinds_it() {
        let (_dir, path) = store("catchup");
        let (conn, frames) = writer(&path);
        for i in 0..10 {
            commit(&conn, i);
        }
        // Short WAL: catch_up leaves it alone, the next commit appends.
        catch_up(&conn, &frames);
        commit(&conn, 10);
        assert_eq!(frames.get(), 11);
        // Pretend it is long: catch_up copies it, and the next commit rewinds.
        frames.0.store(CATCH_UP_FRAMES, Ordering::Relaxed);
        catch_up(&conn, &frames);
        commit(&conn, 11);
        assert_eq!(frames.get(), 1);
    }
}
