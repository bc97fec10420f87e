//! Authorization: operations -> roles -> assignments in scopes.
//!
//! Every API operation has a stable name such as `vm.start`. A principal may perform
//! an operation on a target when some assignment of theirs binds a role containing
//! the operation to the target's scope, or to the global scope `*` (which also
//! covers host-level operations that have no target scope).
#![forbid(unsafe_code)]

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

/// The scope every VM/switch belongs to unless placed elsewhere.
pub const DEFAULT_SCOPE: &str = "default";
/// An assignment in this scope applies everywhere, including host-level operations.
pub const GLOBAL_SCOPE: &str = "*";

pub const ADMINISTRATOR: &str = "Administrator";
pub const MONITOR: &str = "Monitor";
pub const NETWORK_MANAGER: &str = "Network Manager";
pub const VM_OPERATOR: &str = "VM Operator";

/// Operations a VM Operator may perform beyond viewing VMs, their jobs and events:
/// Hyper-V's start, stop, pause and restart. Only names fvd's API has: shut down, turn
/// off and save are all `vm.stop` (its body picks); console input and output;
/// checkpoints join this list when the API gains them. Names missing from the
/// catalogue are ignored, so the list never grants an operation that does not exist.
const VM_OPERATOR_OPS: &[&str] = &[
    "vm.start",
    "vm.stop",
    "vm.save",
    "vm.pause",
    "vm.resume",
    "vm.reset",
    "vm.discard_saved_state",
    "vm.console.input",
    "vm.console.output",
    "job.cancel",
];

/// Prefixes of the view operations a VM Operator gets (VMs, their jobs and events,
/// the API description).
const VM_OPERATOR_VIEW_PREFIXES: &[&str] = &["vm.", "job.", "event.", "api."];

/// One entry of fvd's operation catalogue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OperationInfo {
    pub name: String,
    /// True for operations that only read.
    pub view: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Principal {
    /// A local Unix user, from the API socket's peer credentials.
    Unix { uid: u32 },
    /// A remote caller identified by an API token id.
    Token { id: String },
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Unix { uid } => write!(f, "uid:{uid}"),
            Principal::Token { id } => write!(f, "token:{id}"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Role {
    pub name: String,
    pub builtin: bool,
    /// Explicit operations (custom roles; built-ins are computed from the catalogue).
    pub operations: BTreeSet<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Assignment {
    pub principal: Principal,
    pub role: String,
    pub scope: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub name: String,
    /// SHA-256 of the secret, hex. The secret itself is never stored.
    pub secret_sha256: String,
    /// Unix seconds; None = never expires.
    pub expires_at: Option<u64>,
    pub revoked: bool,
    pub created_at: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthzError {
    #[error("{principal} may not perform {operation} in scope {scope}")]
    Denied {
        principal: String,
        operation: String,
        scope: String,
    },
    #[error("unknown operation {0}")]
    UnknownOperation(String),
    #[error("unknown role {0}")]
    UnknownRole(String),
    #[error("unknown scope {0}")]
    UnknownScope(String),
    #[error("role {0} is built in and cannot be changed")]
    BuiltinRole(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("scope {0} still holds VMs or switches")]
    ScopeInUse(String),
    #[error("invalid token")]
    InvalidToken,
    #[error("token expired")]
    TokenExpired,
    #[error("token revoked")]
    TokenRevoked,
}

/// The whole policy. fvd keeps it behind a lock and persists it after each change,
/// so changes take effect on the next request without a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Policy {
    pub operations: Vec<OperationInfo>,
    pub custom_roles: BTreeMap<String, Role>,
    pub scopes: BTreeSet<String>,
    /// Object (VM or switch id) -> scope; absent = default scope.
    pub members: BTreeMap<String, String>,
    pub assignments: BTreeSet<Assignment>,
    pub tokens: BTreeMap<String, Token>,
    /// uid 0 is Administrator everywhere unless this is false.
    pub root_is_admin: bool,
}

impl Policy {
    pub fn new(operations: Vec<OperationInfo>) -> Self {
        Policy {
            operations,
            custom_roles: BTreeMap::new(),
            scopes: [DEFAULT_SCOPE.to_string()].into_iter().collect(),
            members: BTreeMap::new(),
            assignments: BTreeSet::new(),
            tokens: BTreeMap::new(),
            root_is_admin: true,
        }
    }

    fn op(&self, name: &str) -> Option<&OperationInfo> {
        self.operations.iter().find(|o| o.name == name)
    }

    /// Operations of a role (built-ins derived from the catalogue).
    pub fn role_operations(&self, role: &str) -> Result<BTreeSet<String>, AuthzError> {
        let all = self.operations.iter();
        let pick = |f: &dyn Fn(&OperationInfo) -> bool| -> BTreeSet<String> {
            self.operations
                .iter()
                .filter(|o| f(o))
                .map(|o| o.name.clone())
                .collect()
        };
        Ok(match role {
            ADMINISTRATOR => all.map(|o| o.name.clone()).collect(),
            MONITOR => pick(&|o| o.view),
            NETWORK_MANAGER => pick(&|o| o.view || o.name.starts_with("switch.")),
            VM_OPERATOR => pick(&|o| {
                (o.view
                    && VM_OPERATOR_VIEW_PREFIXES
                        .iter()
                        .any(|p| o.name.starts_with(p)))
                    || VM_OPERATOR_OPS.contains(&o.name.as_str())
            }),
            other => self
                .custom_roles
                .get(other)
                .map(|r| r.operations.clone())
                .ok_or_else(|| AuthzError::UnknownRole(other.to_string()))?,
        })
    }

    pub fn roles(&self) -> Vec<Role> {
        let mut v: Vec<Role> = [ADMINISTRATOR, MONITOR, NETWORK_MANAGER, VM_OPERATOR]
            .iter()
            .map(|n| Role {
                name: n.to_string(),
                builtin: true,
                operations: self.role_operations(n).unwrap_or_default(),
            })
            .collect();
        v.extend(self.custom_roles.values().cloned());
        v
    }

    pub fn add_role(&mut self, name: &str, operations: &[String]) -> Result<(), AuthzError> {
        if [ADMINISTRATOR, MONITOR, NETWORK_MANAGER, VM_OPERATOR].contains(&name) {
            return Err(AuthzError::BuiltinRole(name.to_string()));
        }
        for o in operations {
            if self.op(o).is_none() {
                return Err(AuthzError::UnknownOperation(o.clone()));
            }
        }
        self.custom_roles.insert(
            name.to_string(),
            Role {
                name: name.to_string(),
                builtin: false,
                operations: operations.iter().cloned().collect(),
            },
        );
        Ok(())
    }

    pub fn remove_role(&mut self, name: &str) -> Result<(), AuthzError> {
        if self.custom_roles.remove(name).is_none() {
            return Err(if self.role_operations(name).is_ok() {
                AuthzError::BuiltinRole(name.to_string())
            } else {
                AuthzError::UnknownRole(name.to_string())
            });
        }
        self.assignments.retain(|a| a.role != name);
        Ok(())
    }

    pub fn add_scope(&mut self, name: &str) -> Result<(), AuthzError> {
        if name == GLOBAL_SCOPE || !self.scopes.insert(name.to_string()) {
            return Err(AuthzError::Exists(name.to_string()));
        }
        Ok(())
    }

    pub fn remove_scope(&mut self, name: &str) -> Result<(), AuthzError> {
        if name == DEFAULT_SCOPE || !self.scopes.contains(name) {
            return Err(AuthzError::UnknownScope(name.to_string()));
        }
        if self.members.values().any(|s| s == name) {
            return Err(AuthzError::ScopeInUse(name.to_string()));
        }
        self.scopes.remove(name);
        self.assignments.retain(|a| a.scope != name);
        Ok(())
    }

    /// Place a VM or switch in a scope (exactly one at a time).
    pub fn set_scope(&mut self, object: &str, scope: &str) -> Result<(), AuthzError> {
        if !self.scopes.contains(scope) {
            return Err(AuthzError::UnknownScope(scope.to_string()));
        }
        if scope == DEFAULT_SCOPE {
            self.members.remove(object);
        } else {
            self.members.insert(object.to_string(), scope.to_string());
        }
        Ok(())
    }

    pub fn scope_of(&self, object: &str) -> &str {
        self.members
            .get(object)
            .map(String::as_str)
            .unwrap_or(DEFAULT_SCOPE)
    }

    pub fn assign(
        &mut self,
        principal: Principal,
        role: &str,
        scope: &str,
    ) -> Result<(), AuthzError> {
        self.role_operations(role)?;
        if scope != GLOBAL_SCOPE && !self.scopes.contains(scope) {
            return Err(AuthzError::UnknownScope(scope.to_string()));
        }
        self.assignments.insert(Assignment {
            principal,
            role: role.to_string(),
            scope: scope.to_string(),
        });
        Ok(())
    }

    pub fn unassign(&mut self, a: &Assignment) -> bool {
        self.assignments.remove(a)
    }

    /// May `who` perform `operation` on `target` (a VM/switch id; None = host-level)?
    pub fn check(
        &self,
        who: &Principal,
        operation: &str,
        target: Option<&str>,
    ) -> Result<(), AuthzError> {
        self.check_in_scope(who, operation, target.map(|t| self.scope_of(t)))
    }

    /// May `who` perform `operation` in `scope` (None = host-level, which only the
    /// global scope covers)? For objects that do not exist yet (a VM being created
    /// lands in a known scope) and for moves between scopes.
    pub fn check_in_scope(
        &self,
        who: &Principal,
        operation: &str,
        scope: Option<&str>,
    ) -> Result<(), AuthzError> {
        if self.op(operation).is_none() {
            return Err(AuthzError::UnknownOperation(operation.to_string()));
        }
        if self.is_root_admin(who) {
            return Ok(());
        }
        for a in self.assignments.iter().filter(|a| a.principal == *who) {
            let applies = a.scope == GLOBAL_SCOPE || Some(a.scope.as_str()) == scope;
            if applies
                && self
                    .role_operations(&a.role)
                    .is_ok_and(|ops| ops.contains(operation))
            {
                return Ok(());
            }
        }
        Err(AuthzError::Denied {
            principal: who.to_string(),
            operation: operation.to_string(),
            scope: scope.unwrap_or(GLOBAL_SCOPE).to_string(),
        })
    }

    fn is_root_admin(&self, who: &Principal) -> bool {
        self.root_is_admin && *who == (Principal::Unix { uid: 0 })
    }

    /// Does `who` hold `operation` in at least one scope? List operations are refused
    /// outright without it, and filtered per object with it.
    pub fn holds_anywhere(&self, who: &Principal, operation: &str) -> bool {
        if self.op(operation).is_none() {
            return false;
        }
        self.is_root_admin(who)
            || self.assignments.iter().any(|a| {
                a.principal == *who
                    && self
                        .role_operations(&a.role)
                        .is_ok_and(|ops| ops.contains(operation))
            })
    }

    /// Objects `who` may view with `operation` among `objects` (for list filtering).
    pub fn visible<'a>(
        &self,
        who: &Principal,
        operation: &str,
        objects: &'a [String],
    ) -> Vec<&'a String> {
        objects
            .iter()
            .filter(|o| self.check(who, operation, Some(o)).is_ok())
            .collect()
    }

    /// Create a token; returns the secret (shown once) in the form `<id>.<secret>`.
    pub fn create_token(&mut self, name: &str, expires_at: Option<u64>, now: u64) -> String {
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        let mut idb = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut idb);
        let id = hex::encode(idb);
        let secret = hex::encode(raw);
        self.tokens.insert(
            id.clone(),
            Token {
                id: id.clone(),
                name: name.to_string(),
                secret_sha256: sha256_hex(&secret),
                expires_at,
                revoked: false,
                created_at: now,
            },
        );
        format!("{id}.{secret}")
    }

    pub fn revoke_token(&mut self, id: &str) -> bool {
        match self.tokens.get_mut(id) {
            Some(t) => {
                t.revoked = true;
                true
            }
            None => false,
        }
    }

    /// Resolve a presented bearer token to its principal.
    pub fn authenticate_token(&self, presented: &str, now: u64) -> Result<Principal, AuthzError> {
        let (id, secret) = presented.split_once('.').ok_or(AuthzError::InvalidToken)?;
        let t = self.tokens.get(id).ok_or(AuthzError::InvalidToken)?;
        if !constant_time_eq(sha256_hex(secret).as_bytes(), t.secret_sha256.as_bytes()) {
            return Err(AuthzError::InvalidToken);
        }
        if t.revoked {
            return Err(AuthzError::TokenRevoked);
        }
        if t.expires_at.is_some_and(|e| now >= e) {
            return Err(AuthzError::TokenExpired);
        }
        Ok(Principal::Token { id: id.to_string() })
    }
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue() -> Vec<OperationInfo> {
        [
            ("vm.view", true),
            ("vm.start", false),
            ("vm.reconfigure", false),
            ("vm.delete", false),
            ("vm.stop", false),
            ("switch.create", false),
            ("switch.view", true),
            ("host.view", true),
            ("host.reconfigure", false),
            ("job.view", true),
        ]
        .iter()
        .map(|(n, v)| OperationInfo {
            name: n.to_string(),
            view: *v,
        })
        .collect()
    }

    #[test]
    fn builtin_roles_and_scopes() {
        let mut p = Policy::new(catalogue());
        p.add_scope("a").unwrap();
        p.add_scope("b").unwrap();
        p.set_scope("vm1", "a").unwrap();
        p.set_scope("vm2", "b").unwrap();
        let alice = Principal::Unix { uid: 1000 };
        p.assign(alice.clone(), VM_OPERATOR, "a").unwrap();
        assert!(p.check(&alice, "vm.start", Some("vm1")).is_ok());
        assert!(p.check(&alice, "vm.stop", Some("vm1")).is_ok());
        let e = p.check(&alice, "vm.reconfigure", Some("vm1")).unwrap_err();
        assert!(e.to_string().contains("vm.reconfigure"));
        assert!(p.check(&alice, "vm.view", Some("vm2")).is_err());
        assert!(p.check(&alice, "host.view", None).is_err());
        assert!(p.holds_anywhere(&alice, "vm.view"));
        assert!(!p.holds_anywhere(&alice, "host.reconfigure"));
        assert!(p.check_in_scope(&alice, "vm.start", Some("b")).is_err());
        assert!(p
            .check(&Principal::Unix { uid: 0 }, "host.reconfigure", None)
            .is_ok());
        assert!(p.check(&alice, "no.such", None).is_err());
        let ops = p.role_operations(NETWORK_MANAGER).unwrap();
        assert!(ops.contains("switch.create") && !ops.contains("vm.start"));
        let op = p.role_operations(VM_OPERATOR).unwrap();
        assert!(!op.contains("switch.view") && !op.contains("host.view"));
        let mon = p.role_operations(MONITOR).unwrap();
        assert!(mon.iter().all(|o| o.ends_with(".view")));
        p.root_is_admin = false;
        assert!(p
            .check(&Principal::Unix { uid: 0 }, "host.view", None)
            .is_err());
    }

    #[test]
    fn tokens_hash_expire_revoke() {
        let mut p = Policy::new(catalogue());
        let secret = p.create_token("ci", Some(100), 0);
        let id = secret.split('.').next().unwrap().to_string();
        assert!(!serde_json::to_string(&p)
            .unwrap()
            .contains(secret.split('.').nth(1).unwrap()));
        assert_eq!(
            p.authenticate_token(&secret, 50).unwrap(),
            Principal::Token { id: id.clone() }
        );
        assert_eq!(
            p.authenticate_token(&secret, 100),
            Err(AuthzError::TokenExpired)
        );
        assert_eq!(
            p.authenticate_token(&format!("{id}.00"), 50),
            Err(AuthzError::InvalidToken)
        );
        p.revoke_token(&id);
        assert_eq!(
            p.authenticate_token(&secret, 50),
            Err(AuthzError::TokenRevoked)
        );
    }

    #[test]
    fn custom_roles_change_immediately() {
        let mut p = Policy::new(catalogue());
        let bob = Principal::Token { id: "t".into() };
        p.add_role("Starter", &["vm.start".to_string()]).unwrap();
        assert!(p.add_role("Bad", &["vm.fly".to_string()]).is_err());
        assert!(p.add_role(ADMINISTRATOR, &[]).is_err());
        p.assign(bob.clone(), "Starter", GLOBAL_SCOPE).unwrap();
        assert!(p.check(&bob, "vm.start", Some("x")).is_ok());
        p.remove_role("Starter").unwrap();
        assert!(p.check(&bob, "vm.start", Some("x")).is_err());
    }
}
