-- 0004: alert rules — per (device, rule) state and every transition.
--
-- Written by the pipeline's group-commit writer in the same transaction as the uplink whose
-- reading caused the transition (or, for `kind = "inactive"` rules, in a transaction of its
-- own when the silence deadline passes). So the state on disk never disagrees with the
-- readings committed, and a restart resumes exactly where the gateway stopped.
-- Never edit a migration that has shipped: add the next numbered file instead.

-- The rules of a device that are not inactive, one row per (device, rule). A rule whose
-- condition does not hold has no row (the common case costs nothing).
CREATE TABLE alert_state (
    device          TEXT    NOT NULL,
    rule            TEXT    NOT NULL,
    profile         TEXT    NOT NULL,
    -- 'pending' | 'firing'
    state           TEXT    NOT NULL,
    -- 'critical' | 'warning' | 'info'
    severity        TEXT    NOT NULL,
    -- When the condition started to hold (pending since), ms since the Unix epoch.
    active_since_ms INTEGER NOT NULL,
    -- When the rule fired; NULL while pending.
    firing_since_ms INTEGER,
    -- The value that made it fire (the left side of the comparison, or 1/0), if numeric.
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
    -- When the transition happened, ms since the Unix epoch (the uplink's receive time, or
    -- the silence deadline for inactive rules).
    time_ms   INTEGER NOT NULL,
    -- When the alert started firing (firing and resolved rows; NULL for pending).
    starts_ms INTEGER,
    value     REAL,
    summary   TEXT    NOT NULL
);

CREATE INDEX alert_transitions_by_device ON alert_transitions (device, id);
