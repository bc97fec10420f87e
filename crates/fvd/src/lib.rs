//! fvd, the Ferrovisor host service (Hyper-V's VMMS): VM registry, state machine,
//! admission control, jobs, events and the REST API on a Unix socket.
#![forbid(unsafe_code)]

pub mod access;
pub mod api;
pub mod auth;
pub mod auth_store;
pub mod client;
pub mod console;
pub mod db;
pub mod events;
pub mod host;
pub mod jobs;
pub mod manager;
pub mod server;
pub mod tls;
pub mod util;
pub mod vm_peers;
pub mod worker;
