//! The alert tables (`migrations/0004_alerts.sql`): writing a transition together with the
//! state it leaves, and what the pipeline reads back at start (the state, the devices'
//! last uplink) or on a device's first reading (the recent values `delta`/`rate` need).
//!
//! Writes run on the pipeline's writer connection inside the transaction of the group
//! commit that holds the uplink which caused them ([`insert_transition`] never begins or
//! commits). Reads at start run on the writer connection before the writer thread starts;
//! history reads run on a read-only connection ([`super::query::ReadPool`]).

use rusqlite::{params, Connection, OptionalExtension};

/// One transition to write (borrowed from the pipeline's job).
#[derive(Debug, Clone, Copy)]
pub struct NewTransition<'a> {
    pub device: &'a str,
    pub profile: &'a str,
    pub rule: &'a str,
    /// `critical` | `warning` | `info`
    pub severity: &'a str,
    /// `pending` | `firing` | `resolved`
    pub state: &'a str,
    /// When it happened, ms since the Unix epoch.
    pub at_ms: i64,
    /// Since when the condition held (or the device was silent).
    pub since_ms: i64,
    /// When the alert started firing (None: it never fired).
    pub starts_ms: Option<i64>,
    pub value: Option<f64>,
    pub summary: &'a str,
}

const INSERT_TRANSITION: &str = "INSERT INTO alert_transitions \
     (device, profile, rule, severity, state, time_ms, starts_ms, value, summary) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

const UPSERT_STATE: &str = "INSERT INTO alert_state (device, rule, profile, state, severity, \
     active_since_ms, firing_since_ms, value, summary, updated_ms) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
     ON CONFLICT (device, rule) DO UPDATE SET profile = excluded.profile, \
       state = excluded.state, severity = excluded.severity, \
       active_since_ms = excluded.active_since_ms, firing_since_ms = excluded.firing_since_ms, \
       value = excluded.value, summary = excluded.summary, updated_ms = excluded.updated_ms";

const DELETE_STATE: &str = "DELETE FROM alert_state WHERE device = ?1 AND rule = ?2";

/// Appends the transition to `alert_transitions` and makes `alert_state` say what it
/// left: a row for pending and firing, none once resolved. Returns the transition's id.
pub fn insert_transition(conn: &Connection, t: &NewTransition<'_>) -> rusqlite::Result<i64> {
    let id = conn.prepare_cached(INSERT_TRANSITION)?.insert(params![
        t.device,
        t.profile,
        t.rule,
        t.severity,
        t.state,
        t.at_ms,
        t.starts_ms,
        t.value,
        t.summary,
    ])?;
    if t.state == "resolved" {
        conn.prepare_cached(DELETE_STATE)?
            .execute(params![t.device, t.rule])?;
    } else {
        conn.prepare_cached(UPSERT_STATE)?.execute(params![
            t.device,
            t.rule,
            t.profile,
            t.state,
            t.severity,
            t.since_ms,
            t.starts_ms,
            t.value,
            t.summary,
            t.at_ms,
        ])?;
    }
    Ok(id)
}

/// A row of `alert_state`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAlert {
    pub device: String,
    pub rule: String,
    pub profile: String,
    /// `pending` | `firing`
    pub state: String,
    pub severity: String,
    pub active_since_ms: i64,
    pub firing_since_ms: Option<i64>,
    pub value: Option<f64>,
    pub summary: String,
}

/// Every pending and firing alert, for the shards at start.
pub fn load_state(conn: &Connection) -> rusqlite::Result<Vec<StoredAlert>> {
    let mut stmt = conn.prepare(
        "SELECT device, rule, profile, state, severity, active_since_ms, firing_since_ms, \
         value, summary FROM alert_state ORDER BY device, rule",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(StoredAlert {
            device: r.get(0)?,
            rule: r.get(1)?,
            profile: r.get(2)?,
            state: r.get(3)?,
            severity: r.get(4)?,
            active_since_ms: r.get(5)?,
            firing_since_ms: r.get(6)?,
            value: r.get(7)?,
            summary: r.get(8)?,
        })
    })?;
    rows.collect()
}

/// Every registered device's last uplink (ms since the Unix epoch), for the silence
/// timers at start. Devices that never sent anything are not listed.
pub fn load_last_seen(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare(
        "SELECT s.device, s.last_seen_ms FROM device_state s \
         JOIN devices d ON d.id = s.device WHERE s.last_seen_ms IS NOT NULL",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// At most this many stored readings are read back per field and device: thinning keeps
/// few of them anyway (`rules::expr::FieldHistory`).
const HISTORY_ROWS: i64 = 4096;

/// A device's stored values of `fields` for `delta`/`rate`, each with its longest window
/// in seconds: per field, oldest first, the readings timed in `[before_s - window,
/// before_s)` plus the newest one before that (the baseline). Values that are not numbers
/// (JSON text, null) are skipped; booleans read as 0/1.
pub fn load_history(
    conn: &Connection,
    device: &str,
    fields: &[(String, i64)],
    before_s: i64,
) -> rusqlite::Result<Vec<Vec<(i64, f64)>>> {
    let mut out = Vec::with_capacity(fields.len());
    for (field, window) in fields {
        let path = format!("$.{field}");
        let from = before_s.saturating_sub(*window);
        let mut samples = Vec::new();
        let baseline: Option<(i64, Option<f64>)> = conn
            .prepare_cached(
                "SELECT time_s, json_extract(fields, ?2) AS v FROM readings \
                 WHERE device = ?1 AND time_s < ?3 AND v IS NOT NULL \
                 ORDER BY time_s DESC, id DESC LIMIT 1",
            )?
            .query_row(params![device, path, from], |r| {
                Ok((r.get(0)?, number(r.get_ref(1)?)))
            })
            .optional()?;
        if let Some((t, Some(v))) = baseline {
            samples.push((t, v));
        }
        let mut stmt = conn.prepare_cached(
            "SELECT time_s, json_extract(fields, ?2) AS v FROM readings \
             WHERE device = ?1 AND time_s >= ?3 AND time_s < ?4 AND v IS NOT NULL \
             ORDER BY time_s, id LIMIT ?5",
        )?;
        let mut rows = stmt.query(params![device, path, from, before_s, HISTORY_ROWS])?;
        while let Some(row) = rows.next()? {
            if let Some(v) = number(row.get_ref(1)?) {
                samples.push((row.get(0)?, v));
            }
        }
        out.push(samples);
    }
    Ok(out)
}

fn number(v: rusqlite::types::ValueRef<'_>) -> Option<f64> {
    match v {
        rusqlite::types::ValueRef::Integer(i) => Some(i as f64),
        rusqlite::types::ValueRef::Real(f) if f.is_finite() => Some(f),
        _ => None,
    }
}

/// At start: resolves the alerts of devices that are no longer registered (a `resolved`
/// transition each, the state row deleted), in one transaction. Returns how many.
pub fn resolve_unregistered(conn: &mut Connection, now_ms: i64) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let n = tx.execute(
        "INSERT INTO alert_transitions \
         (device, profile, rule, severity, state, time_ms, starts_ms, value, summary) \
         SELECT device, profile, rule, severity, 'resolved', max(?1, active_since_ms), \
                firing_since_ms, NULL, 'device ' || device || ' is no longer registered' \
         FROM alert_state WHERE device NOT IN (SELECT id FROM devices) ORDER BY device, rule",
        [now_ms],
    )?;
    tx.execute(
        "DELETE FROM alert_state WHERE device NOT IN (SELECT id FROM devices)",
        [],
    )?;
    tx.commit()?;
    Ok(n)
}

/// Retention for `alert_transitions` (inside the caller's transaction, like
/// [`super::ingest::prune_batch`]): deletes at most `max` of the oldest transitions that
/// happened before `cutoff_ms`, walking in id order and stopping at the first that did
/// not; with `forwarding`, none the slowest forwarder has not delivered
/// (`forward_cursor.alert_id`; no cursor yet = nothing delivered). `alert_state`, the
/// current state, is never pruned. Returns how many were deleted.
pub fn prune_transitions(
    conn: &Connection,
    cutoff_ms: i64,
    max: usize,
    forwarding: bool,
) -> rusqlite::Result<usize> {
    let delivered: i64 = if forwarding {
        conn.prepare_cached("SELECT coalesce(min(alert_id), 0) FROM forward_cursor")?
            .query_row([], |r| r.get(0))?
    } else {
        i64::MAX
    };
    let limit = i64::try_from(max.max(1)).unwrap_or(i64::MAX);
    let mut last_old: Option<i64> = None;
    {
        let mut stmt = conn.prepare_cached(
            "SELECT id, time_ms FROM alert_transitions WHERE id <= ?1 ORDER BY id LIMIT ?2",
        )?;
        let mut rows = stmt.query(params![delivered, limit])?;
        while let Some(row) = rows.next()? {
            let (id, at): (i64, i64) = (row.get(0)?, row.get(1)?);
            if at >= cutoff_ms {
                break;
            }
            last_old = Some(id);
        }
    }
    match last_old {
        Some(upto) => conn
            .prepare_cached("DELETE FROM alert_transitions WHERE id <= ?1")?
            .execute([upto]),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn transition(conn: &Connection, at_ms: i64) -> i64 {
        insert_transition(
            conn,
            &NewTransition {
                device: "d1",
                profile: "p",
                rule: "r",
                severity: "warning",
                state: "pending",
                at_ms,
                since_ms: at_ms,
                starts_ms: None,
                value: None,
                summary: "s",
            },
        )
        .expect("insert")
    }

    fn ids(conn: &Connection) -> Vec<i64> {
        let mut stmt = conn
            .prepare("SELECT id FROM alert_transitions ORDER BY id")
            .expect("prepare");
        let rows = stmt.query_map([], |r| r.get(0)).expect("query");
        rows.map(|r| r.expect("row")).collect()
    }

    #[test]
    fn retention_deletes_old_delivered_transitions_in_id_order() {
        let dir = std::env::temp_dir().join(format!("nbiot-alert-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("gateway.db");
        drop(Store::open(&path).expect("store"));
        let conn = Connection::open(&path).expect("open");
        // Times: 100, 200, 900 (new), 300 (old, but after a new one in id order).
        let a = transition(&conn, 100);
        let b = transition(&conn, 200);
        let c = transition(&conn, 900);
        let d = transition(&conn, 300);

        // Forwarding without a cursor: nothing was delivered, nothing goes.
        assert_eq!(prune_transitions(&conn, 500, 10, true).expect("prune"), 0);
        // Delivered up to `a`: only `a`.
        conn.execute(
            "INSERT INTO forward_cursor (name, reading_id, updated_ms, alert_id) VALUES ('influxdb', 0, 0, ?1)",
            [a],
        )
        .expect("cursor");
        assert_eq!(prune_transitions(&conn, 500, 10, true).expect("prune"), 1);
        assert_eq!(ids(&conn), vec![b, c, d]);
        // Without forwarding: the walk stops at the first new one (`c`), so `d` waits.
        assert_eq!(prune_transitions(&conn, 500, 10, false).expect("prune"), 1);
        assert_eq!(ids(&conn), vec![c, d]);
        // Bounded per batch, and everything goes once old enough.
        assert_eq!(prune_transitions(&conn, 1000, 1, false).expect("prune"), 1);
        assert_eq!(prune_transitions(&conn, 1000, 10, false).expect("prune"), 1);
        assert!(ids(&conn).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
