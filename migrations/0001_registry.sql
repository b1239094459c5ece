-- 0001: the device registry.
--
-- Applied by src/store/mod.rs inside one transaction together with `PRAGMA user_version = 1`.
-- Never edit a migration that has shipped: add the next numbered file instead.

-- One row per registered device. `id` is what the device sends (IMEI or another id);
-- validation happens in the registry, not here.
CREATE TABLE devices (
    id          TEXT    NOT NULL PRIMARY KEY,
    profile     TEXT    NOT NULL,
    -- JSON object: parameter name -> number | boolean | string (used by alert rules as `$name`).
    params      TEXT    NOT NULL DEFAULT '{}',
    -- The device token is never stored: only a random salt and SHA-256(salt || token).
    token_salt  BLOB,
    token_hash  BLOB,
    -- Unix seconds, UTC.
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    CHECK ((token_salt IS NULL) = (token_hash IS NULL))
) WITHOUT ROWID;

CREATE INDEX devices_by_profile ON devices (profile, id);

-- Labels in their own table so `GET /api/v1/devices?label.district=north` is an index lookup.
CREATE TABLE device_labels (
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    key       TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (device_id, key)
) WITHOUT ROWID;

CREATE INDEX device_labels_by_value ON device_labels (key, value, device_id);

-- A single row the readiness probe rewrites: proves the database still takes writes.
CREATE TABLE store_probe (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at INTEGER NOT NULL
);
