//! The ingest tables as the HTTP API reads them: a device's state and last readings, its
//! readings over a time range, and the same range downsampled into fixed buckets.
//!
//! Reads go through a [`ReadPool`] of read-only connections of their own: in WAL mode a
//! reader sees the last committed snapshot and neither waits for the pipeline's writer nor
//! makes it wait, and it never queues behind a registry write on the store's shared
//! connection. Queries run on tokio's blocking pool.
//!
//! A range is `from_s <= time_s <= to_s` (both inclusive), in time order (ties in commit
//! order), served by the `(device, time_s)` index without a sort. Downsampling buckets are
//! aligned to multiples of the step since the Unix epoch (a 1 h step starts buckets on the
//! hour, UTC); a bucket is labelled with its start and only buckets holding a value appear.
//!
//! Aggregates per field: `mean`, `min`, `max` over numeric values (Bool counts as 0/1;
//! Text and null are skipped, so a field with only text values does not appear); `min` and
//! `max` of integers stay integers, `mean` is always a float; `last` is the last value of
//! any type; `count` is the number of values of any type (nulls excluded).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde_json::{Map, Value as Json};

use super::StoreError;

/// How long a read waits for a lock: readers in WAL mode only wait during recovery or a
/// checkpoint reset, which take milliseconds.
const READ_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle read connections kept for reuse (more may be open while requests overlap).
const MAX_IDLE: usize = 4;

/// Read-only connections to the store file, opened on demand and reused.
#[derive(Debug)]
pub struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    /// Opens nothing yet: the first query opens the first connection.
    pub fn new(path: &Path) -> ReadPool {
        ReadPool {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> Result<Connection, StoreError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        if let Some(conn) = idle {
            return Ok(conn);
        }
        let open_err = |source| StoreError::Open {
            path: self.path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_err)?;
        conn.busy_timeout(READ_BUSY_TIMEOUT).map_err(open_err)?;
        Ok(conn)
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// Runs `f` with a read connection on the blocking pool.
    pub async fn run<F, R>(self: &Arc<Self>, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let conn = pool.take()?;
            let result = f(&conn);
            // A connection whose query failed is dropped, not reused: it may be the cause.
            if result.is_ok() {
                pool.give_back(conn);
            }
            result
        })
        .await?
    }
}

/// A reading as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReading {
    pub id: i64,
    pub measurement: String,
    pub time_s: i64,
    pub device_time: bool,
    /// The fields as stored: one JSON object.
    pub fields: String,
}

/// The most recent decode error of a device.
#[derive(Debug, Clone, PartialEq)]
pub struct LastError {
    pub code: String,
    pub message: String,
    pub at_ms: i64,
}

/// What `GET /api/v1/devices/{id}/latest` shows about a device's traffic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceStatus {
    pub first_seen_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    pub last_transport: Option<String>,
    pub last_peer: Option<String>,
    pub uplinks: i64,
    pub duplicates: i64,
    pub gaps: i64,
    pub resets: i64,
    pub last_sequence: Option<i64>,
    pub last_error: Option<LastError>,
    /// The readings of the most recent uplink that decoded (empty if none did, or if
    /// retention has deleted them).
    pub readings: Vec<StoredReading>,
}

/// The device's state, or `None` when nothing was ever committed for it.
pub fn device_status(conn: &Connection, device: &str) -> Result<Option<DeviceStatus>, StoreError> {
    type Row = (DeviceStatus, Option<(i64, i64)>);
    let row: Option<Row> = conn
        .prepare_cached(
            "SELECT first_seen_ms, last_seen_ms, last_transport, last_peer, uplinks, duplicates, \
             gaps, resets, last_sequence, last_error_code, last_error_message, last_error_ms, \
             last_readings_from, last_readings_to FROM device_state WHERE device = ?1",
        )?
        .query_row([device], |r| {
            let last_error = match (r.get(9)?, r.get(10)?, r.get(11)?) {
                (Some(code), Some(message), Some(at_ms)) => Some(LastError {
                    code,
                    message,
                    at_ms,
                }),
                _ => None,
            };
            let range = match (r.get(12)?, r.get(13)?) {
                (Some(a), Some(b)) => Some((a, b)),
                _ => None,
            };
            Ok((
                DeviceStatus {
                    first_seen_ms: r.get(0)?,
                    last_seen_ms: r.get(1)?,
                    last_transport: r.get(2)?,
                    last_peer: r.get(3)?,
                    uplinks: r.get(4)?,
                    duplicates: r.get(5)?,
                    gaps: r.get(6)?,
                    resets: r.get(7)?,
                    last_sequence: r.get(8)?,
                    last_error,
                    readings: Vec::new(),
                },
                range,
            ))
        })
        .optional()?;
    let Some((mut status, range)) = row else {
        return Ok(None);
    };
    if let Some((first, last)) = range {
        let mut stmt = conn.prepare_cached(
            "SELECT id, measurement, time_s, device_time, fields FROM readings \
             WHERE id BETWEEN ?1 AND ?2 AND device = ?3 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![first, last, device], |r| {
            Ok(StoredReading {
                id: r.get(0)?,
                measurement: r.get(1)?,
                time_s: r.get(2)?,
                device_time: r.get(3)?,
                fields: r.get(4)?,
            })
        })?;
        for row in rows {
            status.readings.push(row?);
        }
    }
    Ok(Some(status))
}

/// Which readings of one device.
#[derive(Debug, Clone, PartialEq)]
pub struct Range<'a> {
    pub device: &'a str,
    /// Inclusive, Unix seconds.
    pub from_s: i64,
    /// Inclusive, Unix seconds.
    pub to_s: i64,
    /// Only these fields (readings holding none of them are left out); `None` = all.
    pub fields: Option<&'a [String]>,
}

/// Readings in time order: `(time_s, fields JSON)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadingsPage {
    pub readings: Vec<(i64, String)>,
    /// More readings matched than `limit`: the page holds the oldest `limit`.
    pub truncated: bool,
}

/// Calls `f(time_s, fields)` for every reading in the range, in time order, until it
/// returns false.
fn scan(
    conn: &Connection,
    range: &Range<'_>,
    mut f: impl FnMut(i64, &str) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT time_s, fields FROM readings \
         WHERE device = ?1 AND time_s BETWEEN ?2 AND ?3 ORDER BY time_s, id",
    )?;
    let mut rows = stmt.query(params![range.device, range.from_s, range.to_s])?;
    while let Some(row) = rows.next()? {
        let time_s: i64 = row.get(0)?;
        let fields = row.get_ref(1)?.as_str().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
        })?;
        if !f(time_s, fields)? {
            break;
        }
    }
    Ok(())
}

/// A stored `fields` object. Only a hand-edited row can fail to parse; that is reported as
/// the column failing conversion, like any other unreadable column.
fn parse_fields(text: &str) -> Result<Map<String, Json>, StoreError> {
    serde_json::from_str(text).map_err(|e| {
        StoreError::Sqlite(rusqlite::Error::FromSqlConversionFailure(
            1,
            rusqlite::types::Type::Text,
            Box::new(e),
        ))
    })
}

/// Up to `limit` readings of the range, oldest first.
pub fn readings(
    conn: &Connection,
    range: &Range<'_>,
    limit: usize,
) -> Result<ReadingsPage, StoreError> {
    let mut page = ReadingsPage::default();
    scan(conn, range, |time_s, text| {
        let fields = match range.fields {
            // Stored text is already the JSON object to serve: no parse, no re-encode.
            None => text.to_owned(),
            Some(wanted) => {
                let mut all = parse_fields(text)?;
                let mut kept = Map::new();
                for name in wanted {
                    if let Some(v) = all.remove(name.as_str()) {
                        kept.insert(name.clone(), v);
                    }
                }
                if kept.is_empty() {
                    return Ok(true);
                }
                Json::Object(kept).to_string()
            }
        };
        if page.readings.len() == limit {
            page.truncated = true;
            return Ok(false);
        }
        page.readings.push((time_s, fields));
        Ok(true)
    })?;
    Ok(page)
}

/// How a bucket's values of one field become one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    Mean,
    Min,
    Max,
    Last,
    Count,
}

impl Agg {
    pub const NAMES: &'static str = "mean, min, max, last, count";

    pub fn parse(s: &str) -> Option<Agg> {
        Some(match s {
            "mean" => Agg::Mean,
            "min" => Agg::Min,
            "max" => Agg::Max,
            "last" => Agg::Last,
            "count" => Agg::Count,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Agg::Mean => "mean",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Last => "last",
            Agg::Count => "count",
        }
    }
}

/// One field's values in one bucket.
#[derive(Debug, Clone)]
struct Acc {
    /// Values of any type (for `count`).
    count: u64,
    /// Numeric values (for `mean`, `min`, `max`).
    numeric: u64,
    sum: f64,
    min: f64,
    max: f64,
    all_int: bool,
    last: Json,
}

impl Acc {
    fn new() -> Acc {
        Acc {
            count: 0,
            numeric: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            all_int: true,
            last: Json::Null,
        }
    }

    fn add(&mut self, v: Json) {
        let number = match &v {
            Json::Null => return,
            Json::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Json::Number(n) => {
                if !(n.is_i64() || n.is_u64()) {
                    self.all_int = false;
                }
                n.as_f64()
            }
            _ => None,
        };
        self.count += 1;
        if let Some(x) = number {
            self.numeric += 1;
            self.sum += x;
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
        self.last = v;
    }

    fn number(&self, x: f64) -> Json {
        if self.all_int && x.fract() == 0.0 && x.abs() < 9.0e15 {
            Json::from(x as i64)
        } else {
            Json::from(x)
        }
    }

    fn finish(self, agg: Agg) -> Option<Json> {
        match agg {
            Agg::Count => Some(Json::from(self.count)),
            Agg::Last => Some(self.last),
            _ if self.numeric == 0 => None,
            Agg::Mean => Some(Json::from(self.sum / self.numeric as f64)),
            Agg::Min => Some(self.number(self.min)),
            Agg::Max => Some(self.number(self.max)),
        }
    }
}

/// Downsampled readings: `(bucket start, fields)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BucketsPage {
    pub buckets: Vec<(i64, Map<String, Json>)>,
    /// More buckets than `limit`: the page holds the oldest `limit`.
    pub truncated: bool,
}

/// The range in buckets of `step_s` seconds, each field aggregated with `agg`; at most
/// `limit` buckets, oldest first.
pub fn downsample(
    conn: &Connection,
    range: &Range<'_>,
    step_s: i64,
    agg: Agg,
    limit: usize,
) -> Result<BucketsPage, StoreError> {
    let step_s = step_s.max(1);
    let mut page = BucketsPage::default();
    let mut current: Option<i64> = None;
    // Fields in first-seen order; a bucket rarely has more than a dozen.
    let mut accs: Vec<(String, Acc)> = Vec::new();
    let flush = |start: i64, accs: &mut Vec<(String, Acc)>, page: &mut BucketsPage| {
        let mut fields = Map::new();
        for (name, acc) in accs.drain(..) {
            if let Some(v) = acc.finish(agg) {
                fields.insert(name, v);
            }
        }
        if !fields.is_empty() {
            page.buckets.push((start, fields));
        }
    };
    scan(conn, range, |time_s, text| {
        let bucket = time_s.div_euclid(step_s) * step_s;
        if current != Some(bucket) {
            if let Some(start) = current {
                flush(start, &mut accs, &mut page);
                if page.buckets.len() > limit {
                    return Ok(false);
                }
            }
            current = Some(bucket);
        }
        for (name, value) in parse_fields(text)? {
            if let Some(wanted) = range.fields {
                if !wanted.contains(&name) {
                    continue;
                }
            }
            match accs.iter_mut().find(|(n, _)| *n == name) {
                Some((_, acc)) => acc.add(value),
                None => {
                    let mut acc = Acc::new();
                    acc.add(value);
                    accs.push((name, acc));
                }
            }
        }
        Ok(true)
    })?;
    if let Some(start) = current {
        if page.buckets.len() <= limit {
            flush(start, &mut accs, &mut page);
        }
    }
    if page.buckets.len() > limit {
        page.buckets.truncate(limit);
        page.truncated = true;
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn acc(values: &[Json]) -> Acc {
        let mut a = Acc::new();
        for v in values {
            a.add(v.clone());
        }
        a
    }

    #[test]
    fn aggregates_keep_types_where_they_can() {
        let ints = acc(&[json!(3), json!(1), json!(2)]);
        assert_eq!(ints.clone().finish(Agg::Mean), Some(json!(2.0)));
        assert_eq!(ints.clone().finish(Agg::Min), Some(json!(1)));
        assert_eq!(ints.clone().finish(Agg::Max), Some(json!(3)));
        assert_eq!(ints.clone().finish(Agg::Last), Some(json!(2)));
        assert_eq!(ints.finish(Agg::Count), Some(json!(3)));

        let floats = acc(&[json!(1.5), json!(2.0), json!(null)]);
        assert_eq!(floats.clone().finish(Agg::Min), Some(json!(1.5)));
        assert_eq!(floats.clone().finish(Agg::Max), Some(json!(2.0)));
        assert_eq!(floats.clone().finish(Agg::Count), Some(json!(2)));
        assert_eq!(floats.finish(Agg::Mean), Some(json!(1.75)));

        let bools = acc(&[json!(true), json!(false), json!(true), json!(true)]);
        assert_eq!(bools.clone().finish(Agg::Mean), Some(json!(0.75)));
        assert_eq!(bools.finish(Agg::Last), Some(json!(true)));

        let text = acc(&[json!("moving"), json!("still")]);
        assert_eq!(text.clone().finish(Agg::Mean), None);
        assert_eq!(text.clone().finish(Agg::Max), None);
        assert_eq!(text.clone().finish(Agg::Last), Some(json!("still")));
        assert_eq!(text.finish(Agg::Count), Some(json!(2)));
    }

    #[test]
    fn agg_names_round_trip() {
        for a in [Agg::Mean, Agg::Min, Agg::Max, Agg::Last, Agg::Count] {
            assert_eq!(Agg::parse(a.as_str()), Some(a));
        }
        assert_eq!(Agg::parse("avg"), None);
    }
}
