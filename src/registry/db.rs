//! The registry's SQL. Every function runs on a connection (or transaction) the caller
//! holds; none of them touches the in-memory index.

use std::collections::BTreeMap;
use std::sync::Arc;

use rusqlite::{params, Connection};

use super::{Device, Interner, ListFilter, ParamValue, RegistryError, TokenHash};

const UPSERT_DEVICE: &str = "
    INSERT INTO devices (id, profile, params, token_salt, token_hash, created_at, updated_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
    ON CONFLICT (id) DO UPDATE SET
        profile = excluded.profile,
        params = excluded.params,
        token_salt = excluded.token_salt,
        token_hash = excluded.token_hash,
        created_at = excluded.created_at,
        updated_at = excluded.updated_at";

/// Writes `d` whole (row and labels). `existed` says whether old labels may need removing.
pub(super) fn write(conn: &Connection, d: &Device, existed: bool) -> Result<(), RegistryError> {
    let params_json = params_to_json(d);
    let (salt, hash) = match &d.token {
        Some(t) => (Some(&t.salt()[..]), Some(&t.hash()[..])),
        None => (None, None),
    };
    conn.prepare_cached(UPSERT_DEVICE)?.execute(params![
        &*d.id,
        &*d.profile,
        params_json,
        salt,
        hash,
        d.created_at,
        d.updated_at
    ])?;
    if existed {
        conn.prepare_cached("DELETE FROM device_labels WHERE device_id = ?1")?
            .execute([&*d.id])?;
    }
    if !d.labels.is_empty() {
        let mut insert = conn.prepare_cached(
            "INSERT INTO device_labels (device_id, key, value) VALUES (?1, ?2, ?3)",
        )?;
        for (k, v) in d.labels.iter() {
            insert.execute(params![&*d.id, &**k, &**v])?;
        }
    }
    Ok(())
}

fn params_to_json(d: &Device) -> String {
    let map: BTreeMap<&str, &ParamValue> = d.params.iter().map(|(k, v)| (&**k, v)).collect();
    // Serializing a map of strings to numbers/bools/strings cannot fail.
    serde_json::to_string(&map).unwrap_or_else(|_| "{}".to_owned())
}

/// True when a device was removed.
pub(super) fn delete(conn: &Connection, id: &str) -> Result<bool, RegistryError> {
    // Labels go with it (ON DELETE CASCADE; the store enables foreign keys).
    Ok(conn.execute("DELETE FROM devices WHERE id = ?1", [id])? > 0)
}

/// Every device, with labels, in id order. Labels are merge-joined (both tables are
/// clustered by device id), so loading needs no per-device query and no temporary map.
pub(super) fn load_all(
    conn: &Connection,
    interner: &mut Interner,
) -> Result<Vec<Device>, RegistryError> {
    let count: i64 = conn.query_row("SELECT count(*) FROM devices", [], |r| r.get(0))?;
    let mut devices = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut labels_stmt =
        conn.prepare("SELECT device_id, key, value FROM device_labels ORDER BY device_id, key")?;
    let mut labels = labels_stmt.query([])?;
    let mut pending: Option<(String, String, String)> = next_label(&mut labels)?;
    let mut stmt = conn.prepare(
        "SELECT id, profile, params, token_salt, token_hash, created_at, updated_at
         FROM devices ORDER BY id",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        let profile: String = row.get(1)?;
        let params_json: String = row.get(2)?;
        let salt: Option<Vec<u8>> = row.get(3)?;
        let hash: Option<Vec<u8>> = row.get(4)?;
        let corrupt = |reason: String| RegistryError::Corrupt {
            id: id.clone(),
            reason,
        };
        let params: BTreeMap<String, ParamValue> = serde_json::from_str(&params_json)
            .map_err(|e| corrupt(format!("params are not a JSON object of values: {e}")))?;
        let token = match (salt, hash) {
            (Some(s), Some(h)) => Some(Box::new(
                TokenHash::from_parts(&s, &h)
                    .ok_or_else(|| corrupt("token hash has the wrong size".into()))?,
            )),
            _ => None,
        };
        // Labels of ids that sort before this one belong to no device (cannot happen with
        // the foreign key; skipped rather than trusted).
        let mut device_labels = Vec::new();
        while let Some((dev, key, value)) = pending.take() {
            match dev.as_str().cmp(id.as_str()) {
                std::cmp::Ordering::Less => pending = next_label(&mut labels)?,
                std::cmp::Ordering::Equal => {
                    device_labels.push((interner.get(&key), interner.get(&value)));
                    pending = next_label(&mut labels)?;
                }
                std::cmp::Ordering::Greater => {
                    pending = Some((dev, key, value));
                    break;
                }
            }
        }
        devices.push(Device {
            id: Arc::from(id.as_str()),
            profile: interner.get(&profile),
            labels: device_labels.into_boxed_slice(),
            params: params
                .into_iter()
                .map(|(k, v)| (interner.get(&k), v))
                .collect(),
            token,
            created_at: row.get(5)?,
            updated_at: row.get(6)?,
        });
    }
    Ok(devices)
}

fn next_label(
    rows: &mut rusqlite::Rows<'_>,
) -> Result<Option<(String, String, String)>, RegistryError> {
    Ok(rows
        .next()?
        .map(|r| Ok::<_, rusqlite::Error>((r.get(0)?, r.get(1)?, r.get(2)?)))
        .transpose()?)
}

/// The ids of one page of devices matching `filter`, and how many match in all.
pub(super) fn list_ids(
    conn: &Connection,
    filter: &ListFilter,
) -> Result<(Vec<String>, u64), RegistryError> {
    let mut sql = String::from(" FROM devices d WHERE 1 = 1");
    let mut args: Vec<&dyn rusqlite::ToSql> = Vec::new();
    if let Some(p) = &filter.profile {
        sql.push_str(" AND d.profile = ?");
        args.push(p);
    }
    for (k, v) in &filter.labels {
        sql.push_str(
            // IN (not EXISTS) lets SQLite drive the query from the (key, value) index.
            " AND d.id IN (SELECT device_id FROM device_labels WHERE key = ? AND value = ?)",
        );
        args.push(k);
        args.push(v);
    }
    let total: i64 = conn
        .prepare(&format!("SELECT count(*){sql}"))?
        .query_row(args.as_slice(), |r| r.get(0))?;
    let limit = i64::from(filter.limit);
    let offset = i64::try_from(filter.offset).unwrap_or(i64::MAX);
    args.push(&limit);
    args.push(&offset);
    let mut stmt = conn.prepare(&format!("SELECT d.id{sql} ORDER BY d.id LIMIT ? OFFSET ?"))?;
    let ids = stmt
        .query_map(args.as_slice(), |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ids, u64::try_from(total).unwrap_or(0)))
}
