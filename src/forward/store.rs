//! The forwarder's SQL: reading committed rows in id order ([`Reader`], a read-only
//! connection) and settling delivered batches ([`Ledger`]: the cursor and the dead letters).
//!
//! Both are connections of their own, not the pipeline writer's and not the registry's
//! (`Store`'s mutex): in WAL mode the reader never blocks the writer nor waits for it. The
//! ledger does take SQLite's write lock, once per settled batch, for one tiny transaction
//! (a cursor row and any dead letters). It runs with `synchronous = NORMAL`, so that commit
//! does no fsync and holds the lock for microseconds: a group commit that finds it held
//! waits one busy-handler step (1 ms). The durability it gives up is harmless by design —
//! a cursor update lost in a power cut only means the same points are written again, and
//! writes are idempotent; a dead letter lost with it is found again by the same bisection.
//!
//! Schema: `readings`, `uplinks` (0002), `forward_cursor`, `dead_letters` (0003),
//! `alert_transitions` (0004), `device_labels` (0001).

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::batch::{BatchBuilder, DeadLetter, Source};
use super::line::{AlertRow, Encoder, ReadingRow};
use crate::store::StoreError;

/// The schema version with every table the forwarder reads (alert_transitions: 0004).
const FORWARD_SCHEMA: u32 = 4;

/// How long a statement waits for a lock (the ledger, behind a group commit).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a forwarder is: everything up to these ids is delivered (or dead-lettered).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    pub reading_id: i64,
    pub alert_id: i64,
}

fn open(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    // No CREATE: `Store::open` created and migrated the file before anything forwards.
    let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(open_err)?;
    if version < FORWARD_SCHEMA {
        return Err(StoreError::Foreign {
            path: path.to_owned(),
            reason: "its schema has no forwarding tables (open it with Store::open first)",
        });
    }
    Ok(conn)
}

/// Settles delivered batches: moves the cursor and keeps the dead letters.
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
    name: String,
}

impl Ledger {
    /// Opens the ledger of forwarder `name` and returns where it stands (a forwarder seen
    /// for the first time starts at the first row ever committed, and its cursor row is
    /// created now, so retention keeps everything from here on).
    pub fn open(path: &Path, name: &str) -> Result<(Ledger, Cursor), StoreError> {
        let conn = open(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        // See the module docs: losing a cursor update costs a re-send, never data.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute(
            "INSERT INTO forward_cursor (name, reading_id, updated_ms, alert_id) \
             VALUES (?1, 0, ?2, 0) ON CONFLICT (name) DO NOTHING",
            params![name, now_ms()],
        )?;
        let cursor = conn.query_row(
            "SELECT reading_id, alert_id FROM forward_cursor WHERE name = ?1",
            [name],
            |r| {
                Ok(Cursor {
                    reading_id: r.get(0)?,
                    alert_id: r.get(1)?,
                })
            },
        )?;
        Ok((
            Ledger {
                conn,
                name: name.to_owned(),
            },
            cursor,
        ))
    }

    /// In one transaction: keeps `dead` and moves the cursor to `to` (never backwards).
    pub fn settle(&mut self, to: Cursor, dead: &[DeadLetter]) -> rusqlite::Result<()> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO dead_letters (forwarder, source, row_id, line, status, error, created_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for d in dead {
                insert.execute(params![
                    self.name,
                    d.source.as_str(),
                    d.row_id,
                    d.line,
                    d.status,
                    d.error,
                    now
                ])?;
            }
            tx.prepare_cached(
                "UPDATE forward_cursor SET reading_id = max(reading_id, ?2), \
                 alert_id = max(alert_id, ?3), updated_ms = ?4 WHERE name = ?1",
            )?
            .execute(params![self.name, to.reading_id, to.alert_id, now])?;
        }
        tx.commit()
    }

    /// Rows in the dead-letter table for this forwarder.
    pub fn dead_letters(&self) -> rusqlite::Result<i64> {
        self.conn.query_row(
            "SELECT count(*) FROM dead_letters WHERE forwarder = ?1",
            [&self.name],
            |r| r.get(0),
        )
    }
}

/// Reads committed rows after a position, in id order, straight into a batch.
#[derive(Debug)]
pub struct Reader {
    conn: Connection,
    readings_sql: String,
    tags: Vec<String>,
}

/// What is waiting to be forwarded.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    /// Rows committed after the cursor (`max(id) - cursor` of both tables; ids are only
    /// ever deleted below the cursor, so this is exact).
    pub points: i64,
    /// How long ago the oldest of them was received (0 when none).
    pub age_s: f64,
}

impl Reader {
    /// `tags` are the label names written as tags (`[influxdb] tags`).
    pub fn open(path: &Path, tags: &[String]) -> Result<Reader, StoreError> {
        let conn = open(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        // One LEFT JOIN per label tag: a lookup in device_labels' primary key each.
        let mut cols = String::new();
        let mut joins = String::new();
        for i in 0..tags.len() {
            cols.push_str(&format!(", l{i}.value"));
            joins.push_str(&format!(
                " LEFT JOIN device_labels l{i} ON l{i}.device_id = r.device AND l{i}.key = ?{}",
                i + 3
            ));
        }
        let readings_sql = format!(
            "SELECT r.id, r.measurement, r.device, r.profile, r.time_s, r.fields{cols} \
             FROM readings r{joins} WHERE r.id > ?1 ORDER BY r.id LIMIT ?2"
        );
        Ok(Reader {
            conn,
            readings_sql,
            tags: tags.to_vec(),
        })
    }

    /// Appends up to `limit` readings after `b.reading_to` to the batch, stopping early
    /// once its text reaches `max_bytes`. Returns the rows taken.
    pub fn read_readings(
        &self,
        enc: &Encoder,
        b: &mut BatchBuilder,
        limit: usize,
        max_bytes: usize,
    ) -> rusqlite::Result<usize> {
        let mut stmt = self.conn.prepare_cached(&self.readings_sql)?;
        let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(2 + self.tags.len());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = b.reading_to;
        values.push(&after);
        values.push(&limit);
        for t in &self.tags {
            values.push(t);
        }
        let mut rows = stmt.query(values.as_slice())?;
        let mut labels: Vec<Option<String>> = vec![None; self.tags.len()];
        let mut taken = 0;
        while b.text.len() < max_bytes {
            let Some(row) = rows.next()? else { break };
            let id: i64 = row.get(0)?;
            for (i, slot) in labels.iter_mut().enumerate() {
                *slot = row.get(6 + i)?;
            }
            let fields = row.get_ref(5)?.as_str()?;
            let r = ReadingRow {
                measurement: row.get_ref(1)?.as_str()?,
                device: row.get_ref(2)?.as_str()?,
                profile: row.get_ref(3)?.as_str()?,
                labels: &labels,
                time_s: row.get(4)?,
                fields,
            };
            match enc.reading(&r, &mut b.text) {
                Ok(()) => b.push_line(Source::Reading, id),
                Err(e) => b.unencodable.push(DeadLetter {
                    source: Source::Reading,
                    row_id: id,
                    line: fields.to_owned(),
                    status: 0,
                    error: e.to_string(),
                }),
            }
            b.reading_to = id;
            taken += 1;
        }
        Ok(taken)
    }

    /// Appends up to `limit` alert transitions after `b.alert_to` to the batch.
    pub fn read_alerts(
        &self,
        enc: &Encoder,
        b: &mut BatchBuilder,
        limit: usize,
        max_bytes: usize,
    ) -> rusqlite::Result<usize> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, device, profile, rule, severity, state, time_ms, value \
             FROM alert_transitions WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = stmt.query(params![b.alert_to, limit])?;
        let mut taken = 0;
        while b.text.len() < max_bytes {
            let Some(row) = rows.next()? else { break };
            let id: i64 = row.get(0)?;
            let a = AlertRow {
                device: row.get_ref(1)?.as_str()?,
                profile: row.get_ref(2)?.as_str()?,
                rule: row.get_ref(3)?.as_str()?,
                severity: row.get_ref(4)?.as_str()?,
                state: row.get_ref(5)?.as_str()?,
                time_ms: row.get(6)?,
                value: row.get(7)?,
            };
            match enc.alert(&a, &mut b.text) {
                Ok(()) => b.push_line(Source::Alert, id),
                Err(e) => b.unencodable.push(DeadLetter {
                    source: Source::Alert,
                    row_id: id,
                    line: format!("{a:?}"),
                    status: 0,
                    error: e.to_string(),
                }),
            }
            b.alert_to = id;
            taken += 1;
        }
        Ok(taken)
    }

    /// What is committed and not yet delivered behind `cursor`.
    pub fn backlog(&self, cursor: Cursor, now_ms: i64) -> rusqlite::Result<Backlog> {
        let (max_reading, max_alert): (i64, i64) = self
            .conn
            .prepare_cached(
                "SELECT coalesce((SELECT max(id) FROM readings), 0), \
                        coalesce((SELECT max(id) FROM alert_transitions), 0)",
            )?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let points =
            (max_reading - cursor.reading_id).max(0) + (max_alert - cursor.alert_id).max(0);
        if points == 0 {
            return Ok(Backlog::default());
        }
        let oldest_reading: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT coalesce(u.received_at_ms, r.time_s * 1000) FROM readings r \
                 LEFT JOIN uplinks u ON u.id = r.uplink_id WHERE r.id > ?1 ORDER BY r.id LIMIT 1",
            )?
            .query_row([cursor.reading_id], |r| r.get(0))
            .optional()?;
        let oldest_alert: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT time_ms FROM alert_transitions WHERE id > ?1 ORDER BY id LIMIT 1",
            )?
            .query_row([cursor.alert_id], |r| r.get(0))
            .optional()?;
        let oldest = match (oldest_reading, oldest_alert) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Ok(Backlog {
            points,
            age_s: oldest.map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0),
        })
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn store() -> (TempDir, std::path::PathBuf, Store) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nbiot-forward-store-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("gateway.db");
        let store = Store::open(&path).unwrap();
        (TempDir(dir), path, store)
    }

    #[test]
    fn reads_in_id_order_with_labels_and_settles_once() {
        let (_dir, path, store) = store();
        {
            let c = store.lock();
            c.execute_batch(
                "INSERT INTO devices (id, profile, created_at, updated_at) VALUES ('d1', 'p', 0, 0);
                 INSERT INTO device_labels VALUES ('d1', 'district', 'north'), ('d1', 'site', 'x y');
                 INSERT INTO uplinks (device, profile, codec, transport, received_at_ms, payload) VALUES ('d1', 'p', 'c', 'coap', 1000, x'00');
                 INSERT INTO readings (uplink_id, device, profile, measurement, time_s, device_time, fields) VALUES
                   (1, 'd1', 'p', 'env', 10, 0, '{\"t\":1.5}'),
                   (1, 'd2', 'p', 'env', 11, 0, '{\"n\":2}'),
                   (1, 'd1', 'p', 'env', 12, 0, '{\"x\":null}');
                 INSERT INTO alert_transitions (device, profile, rule, severity, state, time_ms, value, summary) VALUES
                   ('d1', 'p', 'hot', 'warning', 'firing', 12500, 40.0, 's');",
            )
            .unwrap();
        }
        let (mut ledger, cursor) = Ledger::open(&path, "influxdb").unwrap();
        assert_eq!(cursor, Cursor::default());
        let reader = Reader::open(&path, &["site".into(), "district".into()]).unwrap();
        let enc = Encoder::new(&["site".into(), "district".into()]);

        let backlog = reader.backlog(cursor, 4000).unwrap();
        assert_eq!(backlog.points, 4);
        assert!((backlog.age_s - 3.0).abs() < 1e-9, "{backlog:?}");

        let mut b = BatchBuilder::new(cursor.reading_id, cursor.alert_id);
        assert_eq!(reader.read_alerts(&enc, &mut b, 10, 1 << 20).unwrap(), 1);
        assert_eq!(reader.read_readings(&enc, &mut b, 2, 1 << 20).unwrap(), 2);
        assert_eq!(reader.read_readings(&enc, &mut b, 10, 1 << 20).unwrap(), 1);
        let batch = b.finish(false);
        assert_eq!(
            std::str::from_utf8(&batch.text).unwrap(),
            "alerts,device=d1,profile=p,rule=hot,severity=warning state=\"firing\",firing=true,value=40 12\n\
             env,device=d1,district=north,profile=p,site=x\\ y t=1.5 10\n\
             env,device=d2,profile=p n=2i 11\n"
        );
        assert_eq!(batch.unencodable.len(), 1);
        assert_eq!(batch.unencodable[0].row_id, 3);
        assert_eq!((batch.reading_to, batch.alert_to), (3, 1));

        let to = Cursor {
            reading_id: batch.reading_to,
            alert_id: batch.alert_to,
        };
        ledger.settle(to, &batch.unencodable).unwrap();
        // Never backwards.
        ledger.settle(Cursor::default(), &[]).unwrap();
        assert_eq!(ledger.dead_letters().unwrap(), 1);
        drop(ledger);
        let (_, cursor) = Ledger::open(&path, "influxdb").unwrap();
        assert_eq!(cursor, to);
        assert_eq!(reader.backlog(cursor, 4000).unwrap(), Backlog::default());
        let mut b = BatchBuilder::new(cursor.reading_id, cursor.alert_id);
        assert_eq!(reader.read_readings(&enc, &mut b, 10, 1 << 20).unwrap(), 0);
    }

    #[test]
    fn the_byte_cap_stops_before_the_next_row() {
        let (_dir, path, store) = store();
        store
            .lock()
            .execute_batch(
                "INSERT INTO readings (uplink_id, device, profile, measurement, time_s, device_time, fields) VALUES
                   (1, 'd', 'p', 'm', 1, 0, '{\"a\":1}'), (1, 'd', 'p', 'm', 2, 0, '{\"a\":2}'), (1, 'd', 'p', 'm', 3, 0, '{\"a\":3}');",
            )
            .unwrap();
        let reader = Reader::open(&path, &[]).unwrap();
        let enc = Encoder::new(&[]);
        let mut b = BatchBuilder::new(0, 0);
        // Each line is 25 bytes: the first fills 20 bytes, so the second row is not taken.
        assert_eq!(reader.read_readings(&enc, &mut b, 10, 20).unwrap(), 1);
        assert_eq!(b.reading_to, 1);
        assert_eq!(reader.read_readings(&enc, &mut b, 10, 1000).unwrap(), 2);
        assert_eq!(b.reading_to, 3);
    }
}
