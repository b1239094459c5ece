//! The ingest path's writes (schema: `migrations/0002_ingest.sql`): one uplink with its
//! readings and its device's state, a duplicate note, a retention batch.
//!
//! Everything here runs on the pipeline's writer connection ([`open_writer`]), inside the
//! transaction the writer opened: this module never begins or commits. Statements go
//! through rusqlite's prepared-statement cache (`prepare_cached`), so the hot path parses
//! SQL once per connection, not once per uplink.
//!
//! It does not decide anything: what a reading's time is, whether a frame counter jumped,
//! which batch to commit — the pipeline does; this module only writes what it is given.

use std::path::Path;
use std::time::Duration;

use nbiot_codecs::{Name, Value};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::StoreError;

/// The schema version that has the ingest tables.
const INGEST_SCHEMA: u32 = 2;

/// One uplink to commit, borrowed from the pipeline's job.
#[derive(Debug)]
pub struct NewUplink<'a> {
    pub device: &'a str,
    pub profile: &'a str,
    pub codec: &'a str,
    /// `coap` | `mqtt`
    pub transport: &'a str,
    /// `ip:port`, None for MQTT.
    pub peer: Option<&'a str>,
    pub received_at_ms: i64,
    pub payload: &'a [u8],
    /// `(DecodeError::code(), message)` when the payload did not decode.
    pub error: Option<(&'a str, &'a str)>,
    pub sequence: Option<u32>,
    /// Frames missing before this one according to its frame counter.
    pub gaps: u32,
    /// Whether its frame counter went backwards (a device restart).
    pub reset: bool,
    pub readings: &'a [NewReading],
}

/// One decoded reading, ready to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewReading {
    pub measurement: Name,
    /// Seconds since the Unix epoch, UTC.
    pub time_s: i64,
    /// Whether `time_s` is the device's own clock (else the receive time).
    pub device_time: bool,
    /// The fields as a JSON object (see [`encode_fields`]).
    pub fields: String,
}

/// What [`insert_uplink`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub uplink_id: i64,
    /// `readings.id` of the first and last reading inserted, if any.
    pub readings: Option<(i64, i64)>,
}

/// Opens the writer's own connection to an existing, migrated database (the registry keeps
/// its own connection: the writer never waits on a registry write's mutex, only on SQLite's
/// write lock, for at most `busy_timeout`).
pub fn open_writer(path: &Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    // No CREATE: `Store::open` created and migrated the file; a missing file here means it
    // was removed under us, which should fail rather than start an empty database.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(busy_timeout).map_err(open_err)?;
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NoWal {
            path: path.to_owned(),
            mode,
        });
    }
    // Per connection, not stored in the file: every commit of this connection fsyncs the
    // WAL before it returns, which is what lets the pipeline acknowledge after COMMIT.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    let version: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(open_err)?;
    if version < INGEST_SCHEMA {
        return Err(StoreError::Foreign {
            path: path.to_owned(),
            reason: "its schema has no ingest tables (open it with Store::open first)",
        });
    }
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

const INSERT_UPLINK: &str = "INSERT INTO uplinks (device, profile, codec, transport, peer, \
     received_at_ms, payload, error_code, error_message, sequence, readings) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// Readings go in with one multi-row INSERT per uplink (up to this many rows per
/// statement): one statement execution, one `sqlite_sequence` update, instead of one per
/// reading.
const READINGS_PER_INSERT: usize = 16;

/// `INSERT INTO readings … VALUES (…), (…)` with `rows` rows (1..=READINGS_PER_INSERT),
/// built once per size.
fn insert_readings_sql(rows: usize) -> &'static str {
    static SQL: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        (1..=READINGS_PER_INSERT)
            .map(|n| {
                let values = vec!["(?, ?, ?, ?, ?, ?, ?)"; n].join(", ");
                format!(
                    "INSERT INTO readings (uplink_id, device, profile, measurement, time_s, \
                     device_time, fields) VALUES {values}"
                )
            })
            .collect()
    });
    let i = rows.clamp(1, READINGS_PER_INSERT) - 1;
    all.get(i).map_or("", String::as_str)
}

/// Counters add up; "last" columns take the uplink's values; the last readings and the last
/// error keep their previous values when this uplink has none.
const UPSERT_STATE: &str = "INSERT INTO device_state (device, first_seen_ms, last_seen_ms, \
     last_transport, last_peer, uplinks, gaps, resets, last_sequence, last_uplink_id, \
     last_readings_from, last_readings_to, last_error_code, last_error_message, last_error_ms) \
     VALUES (?1, ?2, ?2, ?3, ?4, 1, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
             CASE WHEN ?11 IS NULL THEN NULL ELSE ?2 END) \
     ON CONFLICT (device) DO UPDATE SET \
       first_seen_ms = coalesce(first_seen_ms, excluded.first_seen_ms), \
       last_seen_ms = max(coalesce(last_seen_ms, 0), excluded.last_seen_ms), \
       last_transport = excluded.last_transport, \
       last_peer = excluded.last_peer, \
       uplinks = uplinks + 1, \
       gaps = gaps + excluded.gaps, \
       resets = resets + excluded.resets, \
       last_sequence = coalesce(excluded.last_sequence, last_sequence), \
       last_uplink_id = excluded.last_uplink_id, \
       last_readings_from = coalesce(excluded.last_readings_from, last_readings_from), \
       last_readings_to = coalesce(excluded.last_readings_to, last_readings_to), \
       last_error_code = coalesce(excluded.last_error_code, last_error_code), \
       last_error_message = CASE WHEN excluded.last_error_code IS NULL \
                            THEN last_error_message ELSE excluded.last_error_message END, \
       last_error_ms = coalesce(excluded.last_error_ms, last_error_ms)";

const ADD_DUPLICATE: &str = "INSERT INTO device_state (device, duplicates) VALUES (?1, 1) \
     ON CONFLICT (device) DO UPDATE SET duplicates = duplicates + 1";

/// Writes one uplink, its readings and its device's state (inside the caller's transaction).
pub fn insert_uplink(conn: &Connection, u: &NewUplink<'_>) -> rusqlite::Result<Inserted> {
    let (error_code, error_message) = match u.error {
        Some((c, m)) => (Some(c), Some(m)),
        None => (None, None),
    };
    let uplink_id = conn.prepare_cached(INSERT_UPLINK)?.insert(params![
        u.device,
        u.profile,
        u.codec,
        u.transport,
        u.peer,
        u.received_at_ms,
        u.payload,
        error_code,
        error_message,
        u.sequence,
        u.readings.len() as i64,
    ])?;
    let mut range: Option<(i64, i64)> = None;
    for chunk in u.readings.chunks(READINGS_PER_INSERT) {
        let mut stmt = conn.prepare_cached(insert_readings_sql(chunk.len()))?;
        let mut i = 1;
        for r in chunk {
            stmt.raw_bind_parameter(i, uplink_id)?;
            stmt.raw_bind_parameter(i + 1, u.device)?;
            stmt.raw_bind_parameter(i + 2, u.profile)?;
            stmt.raw_bind_parameter(i + 3, r.measurement.as_str())?;
            stmt.raw_bind_parameter(i + 4, r.time_s)?;
            stmt.raw_bind_parameter(i + 5, r.device_time)?;
            stmt.raw_bind_parameter(i + 6, r.fields.as_str())?;
            i += 7;
        }
        stmt.raw_execute()?;
        // One statement by the only writer: its rows got consecutive ids (AUTOINCREMENT
        // takes max + 1 row by row), the last of which is the connection's last rowid.
        let last = conn.last_insert_rowid();
        let first = last - (chunk.len() as i64 - 1);
        range = Some(range.map_or((first, last), |(f, _)| (f, last)));
    }
    conn.prepare_cached(UPSERT_STATE)?.execute(params![
        u.device,
        u.received_at_ms,
        u.transport,
        u.peer,
        u.gaps,
        u.reset,
        u.sequence,
        uplink_id,
        range.map(|r| r.0),
        range.map(|r| r.1),
        error_code,
        error_message,
    ])?;
    Ok(Inserted {
        uplink_id,
        readings: range,
    })
}

/// Counts one retransmission a source recognised for `device`.
pub fn add_duplicate(conn: &Connection, device: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(ADD_DUPLICATE)?.execute([device])?;
    Ok(())
}

/// Every device's last frame counter, for the pipeline's shards at start.
pub fn load_sequences(conn: &Connection) -> rusqlite::Result<Vec<(String, u32)>> {
    let mut stmt = conn.prepare(
        "SELECT device, last_sequence FROM device_state WHERE last_sequence IS NOT NULL",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (device, seq) = row?;
        // Written from a u32; anything else was edited by hand: forget it (no gap counted).
        if let Ok(seq) = u32::try_from(seq) {
            out.push((device, seq));
        }
    }
    Ok(out)
}

/// What one retention batch deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub uplinks: usize,
    pub readings: usize,
    /// Alert transitions ([`super::alerts::prune_transitions`]).
    pub alert_transitions: usize,
    /// The batch was full: there may be more to delete.
    pub more: bool,
}

/// Deletes, inside the caller's transaction, the oldest uplinks received before `cutoff_ms`
/// (at most `max_uplinks` of them) and their readings. With `forwarding`, nothing at or
/// after the first reading the slowest forwarder has not delivered is deleted
/// (`forward_cursor`; no cursor yet = nothing delivered).
///
/// Uplinks are walked in id (= commit) order and the walk stops at the first one that is
/// not old enough, so an uplink committed late with an early receive time only waits for
/// the next batch's cutoff. Readings are deleted as an id prefix: the readings of uplinks
/// `<= U` are exactly the readings before the first one whose `uplink_id > U`, because
/// readings are inserted right after their uplink by one writer (ids in commit order). A
/// reading inserted later for an old uplink (a future re-decode) stops the prefix early and
/// is deleted by a later batch, never skipped forever.
pub fn prune_batch(
    conn: &Connection,
    cutoff_ms: i64,
    max_uplinks: usize,
    forwarding: bool,
) -> rusqlite::Result<Pruned> {
    let limit = i64::try_from(max_uplinks.max(1)).unwrap_or(i64::MAX);
    let mut last_old: Option<i64> = None;
    let mut scanned = 0usize;
    let mut full = true;
    {
        let mut stmt =
            conn.prepare_cached("SELECT id, received_at_ms FROM uplinks ORDER BY id LIMIT ?1")?;
        let mut rows = stmt.query([limit])?;
        while let Some(row) = rows.next()? {
            let (id, at): (i64, i64) = (row.get(0)?, row.get(1)?);
            if at >= cutoff_ms {
                full = false;
                break;
            }
            last_old = Some(id);
            scanned += 1;
        }
    }
    if scanned < max_uplinks.max(1) {
        full = false;
    }
    let Some(mut upto) = last_old else {
        return Ok(Pruned::default());
    };
    if forwarding {
        let cursor: i64 = conn
            .prepare_cached("SELECT coalesce(min(reading_id), 0) FROM forward_cursor")?
            .query_row([], |r| r.get(0))?;
        let first_unsent: Option<i64> = conn
            .prepare_cached("SELECT uplink_id FROM readings WHERE id > ?1 ORDER BY id LIMIT 1")?
            .query_row([cursor], |r| r.get(0))
            .optional()?;
        if let Some(u) = first_unsent {
            if u <= upto {
                upto = u - 1;
                full = false;
            }
        }
    }
    let first_kept: Option<i64> = conn
        .prepare_cached("SELECT id FROM readings WHERE uplink_id > ?1 ORDER BY id LIMIT 1")?
        .query_row([upto], |r| r.get(0))
        .optional()?;
    let readings = match first_kept {
        Some(end) => conn
            .prepare_cached("DELETE FROM readings WHERE id < ?1")?
            .execute([end])?,
        None => conn
            .prepare_cached("DELETE FROM readings WHERE uplink_id <= ?1")?
            .execute([upto])?,
    };
    let uplinks = conn
        .prepare_cached("DELETE FROM uplinks WHERE id <= ?1")?
        .execute([upto])?;
    Ok(Pruned {
        uplinks,
        readings,
        alert_transitions: 0,
        more: full,
    })
}

/// Appends `fields` as one JSON object (the `readings.fields` encoding, see the migration):
/// `{"volume_m3":556677.0,"valve_open":false}`. Floats keep a fraction or exponent so they
/// read back as floats; non-finite floats become `null`.
pub fn encode_fields(fields: &[(Name, Value)], out: &mut String) {
    struct Fields<'a>(&'a [(Name, Value)]);
    impl serde::Serialize for Fields<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().map(|(k, v)| (k.as_str(), v)))
        }
    }
    // Serializing strings, numbers and bools into a String cannot fail; if it ever did,
    // an empty object is stored rather than a half-written one.
    match serde_json::to_string(&Fields(fields)) {
        Ok(s) => out.push_str(&s),
        Err(_) => out.push_str("{}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_encode_as_typed_json() {
        let mut s = String::new();
        encode_fields(
            &[
                (Name::Static("volume_m3"), Value::Float(556677.0)),
                (Name::Static("status"), Value::Int(33825)),
                (Name::Static("valve_open"), Value::Bool(false)),
                (Name::Static("motion"), Value::Text("mov\"ing".into())),
                (Name::Static("bad"), Value::Float(f64::NAN)),
            ],
            &mut s,
        );
        assert_eq!(
            s,
            r#"{"volume_m3":556677.0,"status":33825,"valve_open":false,"motion":"mov\"ing","bad":null}"#
        );
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert!(back["volume_m3"].is_f64());
        assert!(back["status"].is_i64());
    }
}
