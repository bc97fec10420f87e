//! `fv auth role|scope|assign|token|audit|settings …`: fvd's authorization policy.
use crate::client::{enc, socket_path, Client, HttpResponse};
use crate::output::{check, emit, Usage};
use crate::OutputFormat;
use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Args)]
pub struct AuthArgs {
    /// fvd's API socket (env FV_SOCKET; default /run/ferrovisor/fvd.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: AuthCmd,
}

#[derive(Subcommand)]
enum AuthCmd {
    /// Roles: built-in (Administrator, Monitor, Network Manager, VM Operator) and custom.
    Role {
        #[command(subcommand)]
        cmd: RoleCmd,
    },
    /// Scopes: groups of VMs (every VM is in exactly one; `default` otherwise).
    Scope {
        #[command(subcommand)]
        cmd: ScopeCmd,
    },
    /// Role assignments: a principal holds a role in a scope (`*` = everywhere).
    Assign {
        #[command(subcommand)]
        cmd: AssignCmd,
    },
    /// API tokens for remote callers (and tools on the socket).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// The audit log: every mutating call and every refusal.
    Audit {
        /// Newest N entries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only entries after this sequence number (oldest first).
        #[arg(long)]
        since: Option<i64>,
    },
    /// Show or change authorization settings.
    Settings {
        /// Whether uid 0 is Administrator everywhere (turning it off needs another
        /// Administrator in scope *).
        #[arg(long)]
        root_is_admin: Option<bool>,
    },
}

#[derive(Subcommand)]
enum RoleCmd {
    List,
    Show {
        name: String,
    },
    /// Create a custom role.
    Add {
        name: String,
        /// An operation name (repeatable), e.g. vm.start; `fv auth role show Administrator` lists all.
        #[arg(long = "operation", required = true)]
        operations: Vec<String>,
    },
    /// Delete a custom role (and its assignments).
    Remove {
        name: String,
    },
}

#[derive(Subcommand)]
enum ScopeCmd {
    List,
    Add {
        name: String,
    },
    /// Delete an empty scope (and its assignments).
    Remove {
        name: String,
    },
    /// Move a VM (name or id) to a scope.
    Set {
        vm: String,
        scope: String,
    },
}

#[derive(Args)]
struct AssignmentArgs {
    /// uid:N, user:NAME or token:ID.
    #[arg(long)]
    principal: String,
    #[arg(long)]
    role: String,
    /// A scope name, or * for everywhere (host-level operations need *).
    #[arg(long)]
    scope: String,
}

#[derive(Subcommand)]
enum AssignCmd {
    List,
    Add(AssignmentArgs),
    Remove(AssignmentArgs),
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token; its secret is printed once.
    Create {
        name: String,
        /// Lifetime: N followed by s, m, h or d (e.g. 30d); default: never expires.
        #[arg(long)]
        expires: Option<String>,
    },
    List,
    /// Revoke a token (effective at once).
    Revoke {
        id: String,
    },
}

/// `30d` -> seconds.
fn parse_duration(s: &str) -> Result<u64> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().map_err(|_| {
        Usage(format!(
            "duration {s:?}: expected N followed by s, m, h or d"
        ))
    })?;
    let mul = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(Usage(format!("duration {s:?}: unit must be s, m, h or d")).into()),
    };
    n.checked_mul(mul)
        .ok_or_else(|| Usage(format!("duration {s:?} is too long")).into())
}

struct Api {
    c: Client,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<HttpResponse> {
        let r = self
            .c
            .request(method, path, body.as_ref())
            .map_err(|e| anyhow!("{e}"))?;
        check(r)
    }

    fn json(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let r = self.call(method, path, body)?;
        if r.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&r.body)
            .with_context(|| format!("decoding the answer to {method} {path}"))
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn list(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn done(out: OutputFormat, v: &Value, msg: String) {
    emit(out, v, || vec![vec![msg]]);
}

pub fn run(a: AuthArgs, out: OutputFormat) -> Result<()> {
    let api = Api {
        c: Client::new(&socket_path(a.socket)),
    };
    match a.cmd {
        AuthCmd::Role { cmd } => match cmd {
            RoleCmd::List => {
                let v = api.json("GET", "/auth/roles", None)?;
                emit(out, &v, || {
                    let mut rows =
                        vec![vec!["ROLE".into(), "BUILT-IN".into(), "OPERATIONS".into()]];
                    for r in list(&v) {
                        rows.push(vec![
                            s(&r["name"]),
                            if r["builtin"] == true { "yes" } else { "no" }.into(),
                            list(&r["operations"]).len().to_string(),
                        ]);
                    }
                    rows
                });
            }
            RoleCmd::Show { name } => {
                let v = api.json("GET", &format!("/auth/roles/{}", enc(&name)), None)?;
                emit(out, &v, || {
                    let mut rows = vec![vec!["OPERATION".into()]];
                    rows.extend(list(&v["operations"]).iter().map(|o| vec![s(o)]));
                    rows
                });
            }
            RoleCmd::Add { name, operations } => {
                let v = api.json(
                    "POST",
                    "/auth/roles",
                    Some(json!({"name": name, "operations": operations})),
                )?;
                done(out, &v, format!("role {name} created"));
            }
            RoleCmd::Remove { name } => {
                api.call("DELETE", &format!("/auth/roles/{}", enc(&name)), None)?;
                done(
                    out,
                    &json!({"removed": name}),
                    format!("role {name} removed"),
                );
            }
        },
        AuthCmd::Scope { cmd } => match cmd {
            ScopeCmd::List => {
                let v = api.json("GET", "/auth/scopes", None)?;
                emit(out, &v, || {
                    let mut rows = vec![vec!["SCOPE".into(), "VMS".into()]];
                    for sc in list(&v) {
                        let vms: Vec<String> = list(&sc["vms"]).iter().map(s).collect();
                        let vms = if sc["name"] == "default" {
                            "(every VM not placed elsewhere)".to_string()
                        } else {
                            vms.join(", ")
                        };
                        rows.push(vec![s(&sc["name"]), vms]);
                    }
                    rows
                });
            }
            ScopeCmd::Add { name } => {
                let v = api.json("POST", "/auth/scopes", Some(json!({"name": name})))?;
                done(out, &v, format!("scope {name} created"));
            }
            ScopeCmd::Remove { name } => {
                api.call("DELETE", &format!("/auth/scopes/{}", enc(&name)), None)?;
                done(
                    out,
                    &json!({"removed": name}),
                    format!("scope {name} removed"),
                );
            }
            ScopeCmd::Set { vm, scope } => {
                let v = api.json(
                    "PUT",
                    &format!("/vms/{}/scope", enc(&vm)),
                    Some(json!({"scope": scope})),
                )?;
                done(out, &v, format!("VM {vm} is in scope {scope}"));
            }
        },
        AuthCmd::Assign { cmd } => match cmd {
            AssignCmd::List => {
                let v = api.json("GET", "/auth/assignments", None)?;
                emit(out, &v, || {
                    let mut rows = vec![vec![
                        "PRINCIPAL".into(),
                        "NAME".into(),
                        "ROLE".into(),
                        "SCOPE".into(),
                    ]];
                    for a in list(&v) {
                        rows.push(vec![
                            s(&a["principal"]),
                            s(&a["principal_name"]),
                            s(&a["role"]),
                            s(&a["scope"]),
                        ]);
                    }
                    rows
                });
            }
            AssignCmd::Add(a) => {
                let v = api.json(
                    "POST",
                    "/auth/assignments",
                    Some(json!({"principal": a.principal, "role": a.role, "scope": a.scope})),
                )?;
                done(
                    out,
                    &v,
                    format!("{} holds {} in {}", s(&v["principal"]), a.role, a.scope),
                );
            }
            AssignCmd::Remove(a) => {
                api.call(
                    "DELETE",
                    &format!(
                        "/auth/assignments?principal={}&role={}&scope={}",
                        enc(&a.principal),
                        enc(&a.role),
                        enc(&a.scope)
                    ),
                    None,
                )?;
                done(
                    out,
                    &json!({"removed": {"principal": a.principal, "role": a.role, "scope": a.scope}}),
                    format!(
                        "assignment removed: {} {} in {}",
                        a.principal, a.role, a.scope
                    ),
                );
            }
        },
        AuthCmd::Token { cmd } => match cmd {
            TokenCmd::Create { name, expires } => {
                let exp = expires.as_deref().map(parse_duration).transpose()?;
                let v = api.json(
                    "POST",
                    "/auth/tokens",
                    Some(json!({"name": name, "expires_in_s": exp})),
                )?;
                emit(out, &v, || {
                    vec![
                        vec!["FIELD".into(), "VALUE".into()],
                        vec!["id".into(), s(&v["id"])],
                        vec!["name".into(), s(&v["name"])],
                        vec!["expires".into(), s(&v["expires"])],
                        vec!["token".into(), s(&v["token"])],
                        vec![
                            "".into(),
                            "(shown only now: use as FV_TOKEN / --token; assign it a role with `fv auth assign add --principal token:ID`)".into(),
                        ],
                    ]
                });
            }
            TokenCmd::List => {
                let v = api.json("GET", "/auth/tokens", None)?;
                emit(out, &v, || {
                    let mut rows = vec![vec![
                        "ID".into(),
                        "NAME".into(),
                        "CREATED".into(),
                        "EXPIRES".into(),
                        "STATUS".into(),
                    ]];
                    for t in list(&v) {
                        let st = if t["revoked"] == true {
                            "revoked"
                        } else if t["expired"] == true {
                            "expired"
                        } else {
                            "active"
                        };
                        rows.push(vec![
                            s(&t["id"]),
                            s(&t["name"]),
                            s(&t["created"]),
                            s(&t["expires"]),
                            st.into(),
                        ]);
                    }
                    rows
                });
            }
            TokenCmd::Revoke { id } => {
                let v = api.json("POST", &format!("/auth/tokens/{}/revoke", enc(&id)), None)?;
                done(out, &v, format!("token {id} revoked"));
            }
        },
        AuthCmd::Audit { limit, since } => {
            let q = match since {
                Some(sq) => format!("/audit?since={sq}&limit={limit}"),
                None => format!("/audit?limit={limit}"),
            };
            let v = api.json("GET", &q, None)?;
            emit(out, &v, || {
                let mut rows = vec![vec![
                    "SEQ".into(),
                    "TIME".into(),
                    "PRINCIPAL".into(),
                    "OPERATION".into(),
                    "TARGET".into(),
                    "RESULT".into(),
                ]];
                for e in list(&v) {
                    let who = match e["principal_name"].as_str() {
                        Some(n) => format!("{} ({n})", s(&e["principal"])),
                        None => s(&e["principal"]),
                    };
                    rows.push(vec![
                        s(&e["seq"]),
                        s(&e["time"]),
                        who,
                        s(&e["operation"]),
                        s(&e["target"]),
                        format!("{} {}", s(&e["status"]), s(&e["result"])),
                    ]);
                }
                rows
            });
        }
        AuthCmd::Settings { root_is_admin } => {
            let v = match root_is_admin {
                Some(b) => {
                    api.json("PATCH", "/auth/settings", Some(json!({"root_is_admin": b})))?
                }
                None => api.json("GET", "/auth/settings", None)?,
            };
            emit(out, &v, || {
                vec![
                    vec!["FIELD".into(), "VALUE".into()],
                    vec!["root is administrator".into(), s(&v["root_is_admin"])],
                ]
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::parse_duration("30d").unwrap(), 30 * 86400);
        assert_eq!(super::parse_duration("90").unwrap(), 90);
        assert!(super::parse_duration("3w").is_err());
    }
}
