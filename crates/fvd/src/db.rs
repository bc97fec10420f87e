//! fvd's database (SQLite, WAL): host settings, VM registrations with their last known
//! state, dynamic MAC allocations, jobs and events.
use fv_model::api::{EventView, HostSettings, JobView};
use fv_model::VmState;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database record: {0}")]
    Json(#[from] serde_json::Error),
}

impl DbError {
    /// SQLite could not write because the file system is full (SQLITE_FULL).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, DbError::Sql(rusqlite::Error::SqliteFailure(f, _))
            if f.code == rusqlite::ErrorCode::DiskFull)
    }
}

pub type Result<T> = std::result::Result<T, DbError>;

/// A registration: the link from the host to a VM's config file, plus what fvd must
/// remember about the VM across its own restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRow {
    pub id: Uuid,
    pub config_path: PathBuf,
    pub state: VmState,
    pub state_reason: Option<String>,
    /// Saved-state directory when the VM is Saved.
    pub saved_dir: Option<PathBuf>,
    /// The VM was running when fvd (or the host) stopped: drives "start if it was running".
    pub was_running: bool,
}

pub struct Db {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY, config_path TEXT NOT NULL, state TEXT NOT NULL,
    state_reason TEXT, saved_dir TEXT, was_running INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS mac_allocations (
    mac TEXT PRIMARY KEY, vm_id TEXT NOT NULL, nic_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vm_uids (slot INTEGER PRIMARY KEY, vm_id TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, created TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, vm_id TEXT, body TEXT NOT NULL);
";

fn state_str(s: VmState) -> String {
    s.to_string()
}

fn parse_state(s: &str) -> VmState {
    serde_json::from_value(serde_json::Value::String(s.to_string())).unwrap_or(VmState::Off)
}

impl Db {
    pub fn open(path: &Path) -> Result<Db> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    pub fn settings(&self) -> Result<Option<HostSettings>> {
        let c = self.conn.lock();
        let v: Option<String> = c
            .query_row("SELECT value FROM settings WHERE key='host'", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(match v {
            Some(s) => Some(serde_json::from_str(&s)?),
            None => None,
        })
    }

    pub fn put_settings(&self, s: &HostSettings) -> Result<()> {
        let v = serde_json::to_string(s)?;
        self.conn.lock().execute(
            "INSERT INTO settings(key, value) VALUES('host', ?1)
             ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            params![v],
        )?;
        Ok(())
    }

    pub fn vms(&self) -> Result<Vec<VmRow>> {
        let c = self.conn.lock();
        let mut st = c.prepare(
            "SELECT id, config_path, state, state_reason, saved_dir, was_running FROM vms",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, path, state, reason, saved, was) = row?;
            let Ok(id) = Uuid::parse_str(&id) else {
                continue;
            };
            out.push(VmRow {
                id,
                config_path: PathBuf::from(path),
                state: parse_state(&state),
                state_reason: reason,
                saved_dir: saved.map(PathBuf::from),
                was_running: was != 0,
            });
        }
        Ok(out)
    }

    pub fn put_vm(&self, r: &VmRow) -> Result<()> {
        self.conn.lock().execute(
            "INSERT INTO vms(id, config_path, state, state_reason, saved_dir, was_running)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(id) DO UPDATE SET config_path=excluded.config_path,
               state=excluded.state, state_reason=excluded.state_reason,
               saved_dir=excluded.saved_dir, was_running=excluded.was_running",
            params![
                r.id.to_string(),
                r.config_path.to_string_lossy(),
                state_str(r.state),
                r.state_reason,
                r.saved_dir
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
                r.was_running as i64
            ],
        )?;
        Ok(())
    }

    /// Unregister a VM and release its dynamic MACs.
    pub fn delete_vm(&self, id: Uuid) -> Result<()> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        tx.execute("DELETE FROM vms WHERE id=?1", params![id.to_string()])?;
        tx.execute(
            "DELETE FROM mac_allocations WHERE vm_id=?1",
            params![id.to_string()],
        )?;
        tx.execute(
            "DELETE FROM vm_uids WHERE vm_id=?1",
            params![id.to_string()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The VM's isolation slot (its QEMU runs as uid base + slot): the one it was
    /// given at first start, else the lowest free one. None when `range` is used up.
    pub fn vm_uid_slot(&self, vm: Uuid, range: u32) -> Result<Option<u32>> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        let have: Option<u32> = tx
            .query_row(
                "SELECT slot FROM vm_uids WHERE vm_id=?1",
                params![vm.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        if have.is_some() {
            return Ok(have);
        }
        // Lowest slot not taken: 0 if free, else the first gap after a taken slot.
        let free: Option<u32> = tx
            .query_row(
                "SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM vm_uids WHERE slot=0)
                 UNION ALL
                 SELECT MIN(a.slot + 1) FROM vm_uids a
                 WHERE NOT EXISTS (SELECT 1 FROM vm_uids b WHERE b.slot = a.slot + 1)
                 LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?
            .filter(|s| *s < range);
        if let Some(slot) = free {
            tx.execute(
                "INSERT INTO vm_uids(slot, vm_id) VALUES(?1, ?2)",
                params![slot, vm.to_string()],
            )?;
            tx.commit()?;
        }
        Ok(free)
    }

    /// All allocated dynamic MACs: (mac, vm, nic).
    pub fn macs(&self) -> Result<Vec<(String, Uuid, Uuid)>> {
        let c = self.conn.lock();
        let mut st = c.prepare("SELECT mac, vm_id, nic_id FROM mac_allocations")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (m, v, n) = row?;
            if let (Ok(v), Ok(n)) = (Uuid::parse_str(&v), Uuid::parse_str(&n)) {
                out.push((m, v, n));
            }
        }
        Ok(out)
    }

    pub fn allocate_mac(&self, mac: &str, vm: Uuid, nic: Uuid) -> Result<()> {
        self.conn.lock().execute(
            "INSERT INTO mac_allocations(mac, vm_id, nic_id) VALUES(?1, ?2, ?3)",
            params![mac, vm.to_string(), nic.to_string()],
        )?;
        Ok(())
    }

    pub fn release_nic_mac(&self, nic: Uuid) -> Result<()> {
        self.conn.lock().execute(
            "DELETE FROM mac_allocations WHERE nic_id=?1",
            params![nic.to_string()],
        )?;
        Ok(())
    }

    pub fn put_job(&self, j: &JobView) -> Result<()> {
        let body = serde_json::to_string(j)?;
        self.conn.lock().execute(
            "INSERT INTO jobs(id, created, body) VALUES(?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET body=excluded.body",
            params![j.id.to_string(), j.created, body],
        )?;
        Ok(())
    }

    /// The newest `limit` jobs, newest first; with `since` (an RFC 3339 time in the
    /// form jobs are stored with), only those created after it.
    pub fn jobs(&self, limit: u32, since: Option<&str>) -> Result<Vec<JobView>> {
        let c = self.conn.lock();
        let mut st = c.prepare(
            "SELECT body FROM jobs WHERE (?2 IS NULL OR created > ?2) ORDER BY rowid DESC LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit, since], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for b in rows {
            out.push(serde_json::from_str(&b?)?);
        }
        Ok(out)
    }

    pub fn job(&self, id: Uuid) -> Result<Option<JobView>> {
        let c = self.conn.lock();
        let b: Option<String> = c
            .query_row(
                "SELECT body FROM jobs WHERE id=?1",
                params![id.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match b {
            Some(b) => Some(serde_json::from_str(&b)?),
            None => None,
        })
    }

    /// Store an event; returns it with its sequence number.
    pub fn add_event(&self, mut e: EventView) -> Result<EventView> {
        let c = self.conn.lock();
        let body = serde_json::to_string(&e)?;
        c.execute(
            "INSERT INTO events(vm_id, body) VALUES(?1, ?2)",
            params![e.vm_id.map(|v| v.to_string()), body],
        )?;
        e.seq = c.last_insert_rowid();
        Ok(e)
    }

    /// Events after `since`, oldest first (a stream's replay).
    pub fn events(&self, since: i64, vm: Option<Uuid>, limit: u32) -> Result<Vec<EventView>> {
        self.events_query(since, None, vm, limit, "ASC")
    }

    /// Events after `since` and before `before`, newest first (`GET /events`).
    pub fn events_newest_first(
        &self,
        since: i64,
        before: Option<i64>,
        vm: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<EventView>> {
        self.events_query(since, before, vm, limit, "DESC")
    }

    fn events_query(
        &self,
        since: i64,
        before: Option<i64>,
        vm: Option<Uuid>,
        limit: u32,
        order: &'static str,
    ) -> Result<Vec<EventView>> {
        let c = self.conn.lock();
        let mut st = c.prepare(&format!(
            "SELECT seq, body FROM events WHERE seq > ?1 AND (?2 IS NULL OR vm_id = ?2)
             AND (?4 IS NULL OR seq < ?4) ORDER BY seq {order} LIMIT ?3"
        ))?;
        let rows = st.query_map(
            params![since, vm.map(|v| v.to_string()), limit, before],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, body) = row?;
            let mut e: EventView = serde_json::from_str(&body)?;
            e.seq = seq;
            out.push(e);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_uid_slots_are_kept_reused_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let db = Db::open(&d.path().join("t.db")).unwrap();
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(db.vm_uid_slot(a, 3).unwrap(), Some(0));
        assert_eq!(db.vm_uid_slot(b, 3).unwrap(), Some(1));
        // Kept: asking again gives the same slot.
        assert_eq!(db.vm_uid_slot(a, 3).unwrap(), Some(0));
        assert_eq!(db.vm_uid_slot(c, 3).unwrap(), Some(2));
        assert_eq!(db.vm_uid_slot(Uuid::new_v4(), 3).unwrap(), None);
        // Released with the registration, then handed out again (lowest first).
        db.delete_vm(a).unwrap();
        let e = Uuid::new_v4();
        assert_eq!(db.vm_uid_slot(e, 3).unwrap(), Some(0));
        db.delete_vm(b).unwrap();
        assert_eq!(db.vm_uid_slot(Uuid::new_v4(), 3).unwrap(), Some(1));
    }
}
