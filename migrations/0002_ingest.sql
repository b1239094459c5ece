-- 0002: the ingest path — raw uplinks, decoded readings, per-device state, forward cursor.
--
-- Applied by src/store/mod.rs inside one transaction together with `PRAGMA user_version = 2`.
-- Never edit a migration that has shipped: add the next numbered file instead.
--
-- Written by one connection only, the pipeline's group-commit writer thread
-- (src/pipeline/writer.rs, SQL in src/store/ingest.rs): one transaction per group commit
-- holds every uplink of the batch, its readings and its device's state.
--
-- Ids are AUTOINCREMENT on purpose: plain rowids are max(rowid) + 1, so after retention has
-- deleted every row (an idle gateway, a long outage) ids would start again from 1 and a
-- forwarder's cursor (`readings.id <= cursor` = already sent) would skip the new rows.
-- AUTOINCREMENT never reuses an id, so `id` order is commit order, forever.
--
-- No FOREIGN KEY from readings to uplinks: both are written and pruned together by the same
-- code, and a per-row foreign-key probe would only slow down the hot insert path.

-- Every uplink a registered device sent that the pipeline accepted, decoded or not. The
-- payload is kept exactly as received (transport encoding still applied), with the profile
-- and codec that decoded it, so a fixed codec can decode undecodable rows again later.
CREATE TABLE uplinks (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    device         TEXT    NOT NULL,
    profile        TEXT    NOT NULL,
    codec          TEXT    NOT NULL,
    -- 'coap' | 'mqtt'
    transport      TEXT    NOT NULL,
    -- 'ip:port' of the CoAP peer; NULL for MQTT (the broker is the peer).
    peer           TEXT,
    -- Receive time, milliseconds since the Unix epoch (UTC).
    received_at_ms INTEGER NOT NULL,
    payload        BLOB    NOT NULL,
    -- NULL when the payload decoded; else DecodeError::code() ('checksum', 'truncated', …)
    -- and its one-sentence message.
    error_code     TEXT,
    error_message  TEXT,
    -- The frame counter / sequence number the payload carries (Identity.sequence), if any.
    sequence       INTEGER,
    -- How many readings the uplink decoded to (0 when undecodable).
    readings       INTEGER NOT NULL DEFAULT 0
);

-- One row per decoded reading. `id` is monotonic in commit order: the forwarder reads
-- `WHERE id > cursor ORDER BY id`.
CREATE TABLE readings (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    uplink_id   INTEGER NOT NULL,
    device      TEXT    NOT NULL,
    profile     TEXT    NOT NULL,
    measurement TEXT    NOT NULL,
    -- Seconds since the Unix epoch (UTC): the device's own time when the payload carries a
    -- plausible one (device_time = 1), else the receive time (device_time = 0).
    time_s      INTEGER NOT NULL,
    device_time INTEGER NOT NULL,
    -- The fields as one JSON object, in payload order:
    -- {"volume_m3":123.45,"valve_open":true,"status":33825,"motion":"moving"}.
    -- Int → JSON integer, Float → JSON number with a fraction or exponent (556677.0), Bool →
    -- true/false, Text → string, non-finite Float → null. Compact (names once per row, no
    -- schema per field), readable with SQLite's json_extract(), and parsed back losslessly.
    fields      TEXT    NOT NULL
);

-- The query API's access path: one device, a time range.
CREATE INDEX readings_by_device_time ON readings (device, time_s);

-- What the gateway knows about each device's traffic; updated in the same transaction as
-- the uplink it describes, so it never disagrees with the uplinks committed.
CREATE TABLE device_state (
    device             TEXT    NOT NULL PRIMARY KEY,
    first_seen_ms      INTEGER,
    last_seen_ms       INTEGER,
    last_transport     TEXT,
    last_peer          TEXT,
    uplinks            INTEGER NOT NULL DEFAULT 0,
    -- Retransmissions the sources recognised and did not process again.
    duplicates         INTEGER NOT NULL DEFAULT 0,
    -- Frames missing according to the device's frame counter, and counter resets seen.
    gaps               INTEGER NOT NULL DEFAULT 0,
    resets             INTEGER NOT NULL DEFAULT 0,
    last_sequence      INTEGER,
    last_uplink_id     INTEGER,
    -- readings.id range of the most recent uplink that decoded to at least one reading.
    last_readings_from INTEGER,
    last_readings_to   INTEGER,
    -- The most recent decode error.
    last_error_code    TEXT,
    last_error_message TEXT,
    last_error_ms      INTEGER
) WITHOUT ROWID;

-- Where each forwarder is: every reading with id <= reading_id has been delivered. Written
-- by the forwarder; retention deletes no reading above the smallest cursor when forwarding
-- is configured.
CREATE TABLE forward_cursor (
    name       TEXT    NOT NULL PRIMARY KEY,
    reading_id INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
