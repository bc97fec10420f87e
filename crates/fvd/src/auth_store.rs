//! Where authorization state lives: the policy (one JSON row) and the audit log, in
//! fvd's SQLite database. A connection of its own (WAL allows several), so the policy
//! and audit code stays apart from the registry's.
use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Audit rows kept; older ones are deleted as new ones arrive.
pub const AUDIT_RETENTION: i64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("authorization database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("authorization record: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// One audited call: every mutating call and every refusal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuditEntry {
    pub seq: i64,
    /// RFC 3339, UTC.
    pub time: String,
    /// `uid:N`, `token:ID`, or `anonymous` when authentication failed.
    pub principal: String,
    /// User name or token name, when known.
    pub principal_name: Option<String>,
    /// The operation name from the API table (`api.route` when none matched).
    pub operation: String,
    pub method: String,
    pub path: String,
    /// What the call was about: `vm:ID (name)`, `job:ID`, `role:NAME`, ...
    pub target: Option<String>,
    /// HTTP status of the answer.
    pub status: u16,
    /// `ok`, or the error code of the answer (`forbidden`, `not_found`, ...).
    pub result: String,
    /// The refusal or error message.
    pub message: Option<String>,
}

pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS authz (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, principal TEXT NOT NULL,
    principal_name TEXT, operation TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL,
    target TEXT, status INTEGER NOT NULL, result TEXT NOT NULL, message TEXT);
";

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // A policy change is acknowledged only once it is on disk.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    pub fn policy<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>> {
        let v: Option<String> = self
            .conn
            .lock()
            .query_row("SELECT value FROM authz WHERE key='policy'", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(match v {
            Some(s) => Some(serde_json::from_str(&s)?),
            None => None,
        })
    }

    pub fn put_policy<T: Serialize>(&self, p: &T) -> Result<()> {
        let v = serde_json::to_string(p)?;
        self.conn.lock().execute(
            "INSERT INTO authz(key, value) VALUES('policy', ?1)
             ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            params![v],
        )?;
        Ok(())
    }

    pub fn add_audit(&self, e: &AuditEntry) -> Result<i64> {
        let c = self.conn.lock();
        c.execute(
            "INSERT INTO audit(time, principal, principal_name, operation, method, path,
                               target, status, result, message)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                e.time,
                e.principal,
                e.principal_name,
                e.operation,
                e.method,
                e.path,
                e.target,
                e.status,
                e.result,
                e.message
            ],
        )?;
        let seq = c.last_insert_rowid();
        c.execute(
            "DELETE FROM audit WHERE seq <= ?1",
            params![seq - AUDIT_RETENTION],
        )?;
        Ok(seq)
    }

    /// Rows after `since`, oldest first; without `since`, the newest `limit` rows.
    pub fn audit(&self, since: Option<i64>, limit: u32) -> Result<Vec<AuditEntry>> {
        let c = self.conn.lock();
        let sql = "SELECT seq, time, principal, principal_name, operation, method, path,
                          target, status, result, message FROM audit";
        let (q, arg) = match since {
            Some(s) => (format!("{sql} WHERE seq > ?1 ORDER BY seq LIMIT ?2"), s),
            None => (
                format!(
                    "SELECT * FROM ({sql} WHERE seq > ?1 ORDER BY seq DESC LIMIT ?2) ORDER BY seq"
                ),
                0,
            ),
        };
        let mut st = c.prepare(&q)?;
        let rows = st.query_map(params![arg, limit], |r| {
            Ok(AuditEntry {
                seq: r.get(0)?,
                time: r.get(1)?,
                principal: r.get(2)?,
                principal_name: r.get(3)?,
                operation: r.get(4)?,
                method: r.get(5)?,
                path: r.get(6)?,
                target: r.get(7)?,
                status: r.get(8)?,
                result: r.get(9)?,
                message: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
    }
}
