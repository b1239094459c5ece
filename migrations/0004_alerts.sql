-- 0004: alert rules — per (device, rule) state and every transition.
--
-- Written by the pipeline's group-commit writer in the same transaction as the uplink whose
-- reading caused the transition (or, for `kind = "inactive"` rules, in a transaction of its
-- own when the silence deadline passes). So the state on disk never disagrees with the
-- readings committed, and a restart resumes exactly where the gateway stopped.
-- Never edit a migration that has shipped: add the next numbered file instead.

-- The rules of a device that are not inactive, one row per (device, rule). A rule whose
-- condition does not hold has no row (the common case costs nothing). The pipeline loads
-- this table at start, so `for` keeps counting from active_since_ms across a restart and a
-- firing alert stays firing. For `kind = "inactive"` rules, active_since_ms is the device's
-- last uplink and firing_since_ms the silence deadline.
CREATE TABLE alert_state (
    device          TEXT    NOT NULL,
    rule            TEXT    NOT NULL,
    profile         TEXT    NOT NULL,
    -- 'pending' | 'firing'
    state           TEXT    NOT NULL,
    -- 'critical' | 'warning' | 'info'
    severity        TEXT    NOT NULL,
    -- When the condition started to hold (pending since), ms since the Unix epoch, on the
    -- rule clock (the reading's time: the device's clock when plausible, else receipt).
    active_since_ms INTEGER NOT NULL,
    -- When the rule fired; NULL while pending.
    firing_since_ms INTEGER,
    -- The value that decided the last transition (the left side of the deciding comparison,
    -- 1/0 for a boolean field, the seconds of silence for inactive rules), if numeric.
    value           REAL,
    -- The summary, interpolated when the state was entered.
    summary         TEXT    NOT NULL,
    updated_ms      INTEGER NOT NULL,
    PRIMARY KEY (device, rule)
) WITHOUT ROWID;

-- Every transition in commit order; `id` is the forwarder's cursor for the `alerts`
-- measurement and the order `GET /api/v1/alerts` reports in. AUTOINCREMENT for the same
-- reason as `readings` (ids never reused after retention).
CREATE TABLE alert_transitions (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    device    TEXT    NOT NULL,
    profile   TEXT    NOT NULL,
    rule      TEXT    NOT NULL,
    severity  TEXT    NOT NULL,
    -- 'pending' | 'firing' | 'resolved'
    state     TEXT    NOT NULL,
    -- When the transition happened, ms since the Unix epoch: the rule clock of the reading
    -- that caused it (the reading's time: the device's clock when plausible, else the
    -- receive time); for inactive rules the silence deadline (firing) or the receive time of
    -- the uplink that ended it (resolved).
    time_ms   INTEGER NOT NULL,
    -- When the alert started firing (firing and resolved rows). NULL for pending, and for a
    -- pending rule whose condition stopped holding before it fired (resolved, never fired:
    -- nothing to tell Alertmanager).
    starts_ms INTEGER,
    value     REAL,
    summary   TEXT    NOT NULL
);

CREATE INDEX alert_transitions_by_device ON alert_transitions (device, id);
