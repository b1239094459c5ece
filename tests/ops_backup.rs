//! The store backup the README prescribes, done as an operator does it: `sqlite3 gateway.db
//! "VACUUM INTO 'backup.db'"` (Debian `sqlite3`) while the gateway commits a CoAP load. The
//! copy is a consistent snapshot (integrity check passes; every uplink has exactly its
//! readings, as one commit wrote them), and the restore procedure (stop, replace the file,
//! drop the old `-wal`/`-shm`, start) gives a gateway that serves it and takes writes.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use rusqlite::{Connection, OpenFlags};
use support::*;

fn open_ro(path: &Path) -> Connection {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open db")
}

fn uplinks(db: &Path) -> i64 {
    open_ro(db)
        .query_row("SELECT count(*) FROM uplinks", [], |r| r.get(0))
        .unwrap_or(0)
}

fn sqlite3(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .args([".timeout 10000", sql])
        .output()
        .expect("sqlite3 runs (Debian sqlite3; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn vacuum_into_under_load_is_a_consistent_backup_that_restores() {
    let dir = TempDir::new("backup");
    let config = config(&dir, "");
    let db = dir.path("data/gateway.db");
    let mut gw = Gateway::start(&config, &[], &[]);

    let mut fleet = Command::new(env!("CARGO_BIN_EXE_nbiot-load"))
        .args(["--coap", &gw.coap, "--api", &format!("http://{}", gw.http)])
        .args(["--register", "--devices", "200", "--rate", "1500"])
        .args(["--duration", "6", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbiot-load");
    wait_for("the load to get going", DEADLINE, || {
        (db.exists() && uplinks(&db) >= 1000).then_some(())
    });

    // The backup, while uplinks are being committed.
    let backup = dir.path("backup.db");
    sqlite3(&db, &format!("VACUUM INTO '{}'", backup.display()));
    assert!(
        fleet.try_wait().expect("wait").is_none(),
        "the load was still running during the backup"
    );
    let out = fleet.wait_with_output().expect("nbiot-load ends");
    assert!(out.status.success());
    let total = uplinks(&db);

    // A consistent snapshot: sound, and every uplink with exactly its readings.
    assert_eq!(sqlite3(&backup, "PRAGMA integrity_check"), "ok");
    let copied = uplinks(&backup);
    assert!(copied >= 1000 && copied < total, "{copied} of {total}");
    assert_eq!(
        sqlite3(
            &backup,
            "SELECT count(*) FROM uplinks u WHERE u.readings != \
             (SELECT count(*) FROM readings r WHERE r.uplink_id = u.id)",
        ),
        "0"
    );
    let devices = sqlite3(&backup, "SELECT count(*) FROM devices");
    assert_eq!(devices, "200");

    // Restore: stop, replace the database, drop the old WAL and shared memory, start.
    gw.stop();
    std::fs::copy(&backup, &db).expect("restore the backup");
    for ext in ["db-wal", "db-shm"] {
        let _ = std::fs::remove_file(db.with_extension(ext));
    }
    let gw = Gateway::start(&config, &[], &[]);
    let (status, ready) = gw.get("/readyz");
    assert_eq!(status, 200, "{ready}");
    let (status, list) = gw.get("/api/v1/devices?limit=1");
    assert_eq!(status, 200, "{list}");
    let list: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    assert_eq!(list["total"], 200, "{list}");
    assert_eq!(uplinks(&db), copied);
    // It takes writes again: a second run of the fleet lands on top of the restored rows.
    let summary = load(&gw, 200, 500, 0.5, &["--first-sequence", "50000"]);
    let acked = summary["codes"]["2.04"].as_u64().unwrap_or(0);
    assert!(acked > 0, "{summary}");
    wait_for("the new uplinks in the restored store", DEADLINE, || {
        (uplinks(&db) >= copied + acked as i64).then_some(())
    });
}
