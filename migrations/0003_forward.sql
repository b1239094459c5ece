-- 0003: forwarding to the TSDB — the alert cursor and the dead-letter table.
--
-- Written by the forwarder (src/forward/). Never edit a migration that has shipped: add the
-- next numbered file instead.

-- Every alert transition with id <= alert_id has been delivered (the `alerts` measurement,
-- from `alert_transitions`, migration 0004). Same row as the readings cursor.
ALTER TABLE forward_cursor ADD COLUMN alert_id INTEGER NOT NULL DEFAULT 0;

-- Lines the TSDB refused for good (400 after bisection isolated them, 422 partial writes),
-- with the server's message. Nothing is dropped silently: they stay here until an operator
-- fixes the cause and replays or deletes them.
CREATE TABLE dead_letters (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    forwarder  TEXT    NOT NULL,
    -- 'reading' | 'alert': which table `row_id` points into.
    source     TEXT    NOT NULL,
    row_id     INTEGER NOT NULL,
    -- The line protocol as sent.
    line       TEXT    NOT NULL,
    -- The HTTP status and the server's message.
    status     INTEGER NOT NULL,
    error      TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
);
