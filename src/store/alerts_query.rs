//! The alert tables as their readers see them: `GET /api/v1/alerts` (current state and
//! recent resolutions) and the Alertmanager notifier, which reloads the firing set when it
//! starts and whenever its event queue overflowed.
//!
//! Both read on read-only connections of their own (a [`ReadPool`](super::query::ReadPool)),
//! never on the pipeline writer's: in WAL mode a reader sees the last committed snapshot and
//! neither waits for the writer nor makes it wait. What the rows mean, and who writes them,
//! is in `migrations/0004_alerts.sql`.
//!
//! The notifier's [`snapshot`] reads the firing set, the resolutions it may have missed and
//! the highest transition id in one read transaction, so the three agree: every transition
//! with an id up to that watermark is reflected in the firing set, and any event the
//! notifier receives later with a smaller id is older than what it loaded.

use rusqlite::types::Value as SqlValue;
use rusqlite::{params_from_iter, Connection, Row};

use super::StoreError;

/// One row of `alert_state`: a rule of a device that is pending or firing.
#[derive(Debug, Clone, PartialEq)]
pub struct StateRow {
    pub device: String,
    pub rule: String,
    pub profile: String,
    /// `pending` | `firing`
    pub state: String,
    /// `critical` | `warning` | `info`
    pub severity: String,
    pub active_since_ms: i64,
    pub firing_since_ms: Option<i64>,
    pub value: Option<f64>,
    pub summary: String,
    pub updated_ms: i64,
}

/// One row of `alert_transitions`.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionRow {
    pub id: i64,
    pub device: String,
    pub profile: String,
    pub rule: String,
    pub severity: String,
    /// `pending` | `firing` | `resolved`
    pub state: String,
    pub time_ms: i64,
    pub starts_ms: Option<i64>,
    pub value: Option<f64>,
    pub summary: String,
}

/// What a listing is narrowed to; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertFilter {
    pub device: Option<String>,
    pub profile: Option<String>,
    pub rule: Option<String>,
    pub severity: Option<String>,
}

impl AlertFilter {
    /// `AND column = ?` for every condition given, with its parameters.
    fn clauses(&self, sql: &mut String, params: &mut Vec<SqlValue>) {
        for (column, value) in [
            ("device", &self.device),
            ("profile", &self.profile),
            ("rule", &self.rule),
            ("severity", &self.severity),
        ] {
            if let Some(v) = value {
                params.push(SqlValue::Text(v.clone()));
                sql.push_str(&format!(" AND {column} = ?{}", params.len()));
            }
        }
    }
}

const STATE_COLUMNS: &str = "device, rule, profile, state, severity, active_since_ms, \
                             firing_since_ms, value, summary, updated_ms";

fn state_row(r: &Row<'_>) -> rusqlite::Result<StateRow> {
    Ok(StateRow {
        device: r.get(0)?,
        rule: r.get(1)?,
        profile: r.get(2)?,
        state: r.get(3)?,
        severity: r.get(4)?,
        active_since_ms: r.get(5)?,
        firing_since_ms: r.get(6)?,
        value: r.get(7)?,
        summary: r.get(8)?,
        updated_ms: r.get(9)?,
    })
}

const TRANSITION_COLUMNS: &str =
    "id, device, profile, rule, severity, state, time_ms, starts_ms, value, summary";

fn transition_row(r: &Row<'_>) -> rusqlite::Result<TransitionRow> {
    Ok(TransitionRow {
        id: r.get(0)?,
        device: r.get(1)?,
        profile: r.get(2)?,
        rule: r.get(3)?,
        severity: r.get(4)?,
        state: r.get(5)?,
        time_ms: r.get(6)?,
        starts_ms: r.get(7)?,
        value: r.get(8)?,
        summary: r.get(9)?,
    })
}

/// Runs `sql` with `params` and keeps at most `limit` rows; true when more matched.
fn limited<T>(
    conn: &Connection,
    sql: &str,
    params: Vec<SqlValue>,
    limit: usize,
    map: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<(Vec<T>, bool), StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query(params_from_iter(params))?;
    let mut out = Vec::with_capacity(limit.min(1024));
    while let Some(row) = rows.next()? {
        if out.len() == limit {
            return Ok((out, true));
        }
        out.push(map(row)?);
    }
    Ok((out, false))
}

/// Current alerts (rows of `alert_state`), in `state` (`pending` or `firing`; `None` =
/// both), newest first (by when they fired, or started pending), at most `limit`; true when
/// more matched.
pub fn current(
    conn: &Connection,
    state: Option<&str>,
    filter: &AlertFilter,
    limit: usize,
) -> Result<(Vec<StateRow>, bool), StoreError> {
    let mut sql = format!("SELECT {STATE_COLUMNS} FROM alert_state WHERE 1");
    let mut params = Vec::new();
    if let Some(s) = state {
        params.push(SqlValue::Text(s.to_owned()));
        sql.push_str(&format!(" AND state = ?{}", params.len()));
    }
    filter.clauses(&mut sql, &mut params);
    params.push(limit_param(limit));
    sql.push_str(&format!(
        " ORDER BY coalesce(firing_since_ms, active_since_ms) DESC, device, rule LIMIT ?{}",
        params.len()
    ));
    limited(conn, &sql, params, limit, state_row)
}

/// The most recent resolutions (`alert_transitions` rows in state `resolved`), newest first
/// (commit order), at most `limit`; true when more matched.
pub fn resolved(
    conn: &Connection,
    filter: &AlertFilter,
    limit: usize,
) -> Result<(Vec<TransitionRow>, bool), StoreError> {
    let mut sql =
        format!("SELECT {TRANSITION_COLUMNS} FROM alert_transitions WHERE state = 'resolved'");
    let mut params = Vec::new();
    filter.clauses(&mut sql, &mut params);
    params.push(limit_param(limit));
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", params.len()));
    limited(conn, &sql, params, limit, transition_row)
}

/// One more than `limit`, so [`limited`] can tell whether more matched.
fn limit_param(limit: usize) -> SqlValue {
    SqlValue::Integer(
        i64::try_from(limit)
            .unwrap_or(i64::MAX - 1)
            .saturating_add(1),
    )
}

/// What the notifier reloads: see the module documentation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Every firing alert (at most `max_firing`).
    pub firing: Vec<StateRow>,
    /// True when more than `max_firing` alerts were firing.
    pub firing_truncated: bool,
    /// Resolutions with an id above `after_id` and a time at or after `since_ms`, newest
    /// first, at most `max_resolved`.
    pub resolved: Vec<TransitionRow>,
    /// The highest transition id committed (0 when none).
    pub watermark: i64,
}

/// Reads the firing set, recent resolutions and the watermark in one read transaction.
pub fn snapshot(
    conn: &Connection,
    after_id: i64,
    since_ms: i64,
    max_firing: usize,
    max_resolved: usize,
) -> Result<Snapshot, StoreError> {
    // A read transaction: all three statements see the same committed state.
    let tx = conn.unchecked_transaction()?;
    let (firing, firing_truncated) = limited(
        &tx,
        &format!(
            "SELECT {STATE_COLUMNS} FROM alert_state WHERE state = 'firing' \
             ORDER BY device, rule LIMIT ?1"
        ),
        vec![limit_param(max_firing)],
        max_firing,
        state_row,
    )?;
    let (resolved, _) = limited(
        &tx,
        &format!(
            "SELECT {TRANSITION_COLUMNS} FROM alert_transitions \
             WHERE state = 'resolved' AND id > ?1 AND time_ms >= ?2 ORDER BY id DESC LIMIT ?3"
        ),
        vec![
            SqlValue::Integer(after_id),
            SqlValue::Integer(since_ms),
            limit_param(max_resolved),
        ],
        max_resolved,
        transition_row,
    )?;
    let watermark: i64 = tx.query_row(
        "SELECT coalesce(max(id), 0) FROM alert_transitions",
        [],
        |r| r.get(0),
    )?;
    tx.finish()?;
    Ok(Snapshot {
        firing,
        firing_truncated,
        resolved,
        watermark,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(include_str!("../../migrations/0004_alerts.sql"))
            .unwrap();
        conn
    }

    fn state(conn: &Connection, device: &str, rule: &str, state: &str, since: i64) {
        conn.execute(
            "INSERT INTO alert_state (device, rule, profile, state, severity, active_since_ms,
               firing_since_ms, value, summary, updated_ms)
             VALUES (?1, ?2, 'p', ?3, 'critical', ?4, ?5, 1.5, 's', ?4)",
            rusqlite::params![
                device,
                rule,
                state,
                since,
                (state == "firing").then_some(since + 10)
            ],
        )
        .unwrap();
    }

    fn transition(conn: &Connection, device: &str, state: &str, time: i64) -> i64 {
        conn.execute(
            "INSERT INTO alert_transitions (device, profile, rule, severity, state, time_ms,
               starts_ms, value, summary) VALUES (?1, 'p', 'r', 'warning', ?2, ?3, 5, NULL, 'x')",
            rusqlite::params![device, state, time],
        )
        .unwrap();
        conn.last_insert_rowid()
    }

    #[test]
    fn current_filters_orders_and_truncates() {
        let conn = db();
        state(&conn, "a", "r1", "firing", 100);
        state(&conn, "b", "r1", "pending", 300);
        state(&conn, "c", "r2", "firing", 200);
        let all = AlertFilter::default();
        let (rows, more) = current(&conn, None, &all, 10).unwrap();
        let order: Vec<_> = rows.iter().map(|r| r.device.as_str()).collect();
        // By firing time (or pending start): b 300, c 210, a 110.
        assert_eq!((order, more), (vec!["b", "c", "a"], false));
        assert_eq!(rows[1].firing_since_ms, Some(210));
        assert_eq!(rows[0].firing_since_ms, None);
        let (rows, more) = current(&conn, Some("firing"), &all, 1).unwrap();
        assert_eq!((rows.len(), rows[0].device.as_str(), more), (1, "c", true));
        let f = AlertFilter {
            device: Some("a".into()),
            rule: Some("r1".into()),
            ..AlertFilter::default()
        };
        let (rows, more) = current(&conn, Some("firing"), &f, 10).unwrap();
        assert_eq!((rows.len(), more), (1, false));
        assert_eq!(rows[0].value, Some(1.5));
        let f = AlertFilter {
            profile: Some("other".into()),
            ..AlertFilter::default()
        };
        assert!(current(&conn, None, &f, 10).unwrap().0.is_empty());
    }

    #[test]
    fn resolved_newest_first_and_snapshot_agrees() {
        let conn = db();
        let t1 = transition(&conn, "a", "firing", 1_000);
        let t2 = transition(&conn, "a", "resolved", 2_000);
        let t3 = transition(&conn, "b", "resolved", 3_000);
        let t4 = transition(&conn, "b", "pending", 4_000);
        let (rows, more) = resolved(&conn, &AlertFilter::default(), 10).unwrap();
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![t3, t2]);
        assert!(!more);
        let (rows, more) = resolved(&conn, &AlertFilter::default(), 1).unwrap();
        assert_eq!((rows[0].id, more), (t3, true));
        assert_eq!(rows[0].starts_ms, Some(5));

        state(&conn, "c", "r", "firing", 50);
        state(&conn, "d", "r", "pending", 60);
        let s = snapshot(&conn, t1, 0, 100, 100).unwrap();
        assert_eq!(s.watermark, t4);
        assert_eq!(s.firing.len(), 1, "pending rows are not firing");
        assert_eq!(s.firing[0].device, "c");
        assert_eq!(
            s.resolved.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![t3, t2]
        );
        // After id t2 and since a time: only the later resolution.
        let s = snapshot(&conn, t2, 0, 100, 100).unwrap();
        assert_eq!(s.resolved.len(), 1);
        let s = snapshot(&conn, 0, 2_500, 100, 100).unwrap();
        assert_eq!(s.resolved.len(), 1);
        let s = snapshot(&conn, 0, 0, 0, 100).unwrap();
        assert!(s.firing.is_empty() && s.firing_truncated);
        let empty = db();
        assert_eq!(snapshot(&empty, 0, 0, 10, 10).unwrap(), Snapshot::default());
    }
}
