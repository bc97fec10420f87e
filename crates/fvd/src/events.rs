//! Events: stored in the database (queryable with `since`) and broadcast for SSE.
use crate::db::Db;
use fv_model::api::EventView;
use fv_model::VmState;
use std::sync::Arc;
use tokio::sync::broadcast;
use uuid::Uuid;

#[derive(Clone)]
pub struct Events {
    db: Arc<Db>,
    tx: broadcast::Sender<EventView>,
}

impl Events {
    pub fn new(db: Arc<Db>) -> Events {
        let (tx, _) = broadcast::channel(1024);
        Events { db, tx }
    }

    pub fn emit(
        &self,
        kind: &str,
        vm: Option<Uuid>,
        job: Option<Uuid>,
        message: String,
        state: Option<VmState>,
    ) {
        let e = EventView {
            seq: 0,
            time: crate::util::now(),
            kind: kind.to_string(),
            vm_id: vm,
            job_id: job,
            message,
            state,
        };
        match self.db.add_event(e) {
            Ok(e) => {
                tracing::info!(kind = %e.kind, vm = ?e.vm_id, "{}", e.message);
                let _ = self.tx.send(e);
            }
            Err(err) => tracing::error!("cannot store event: {err}"),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<EventView> {
        self.tx.subscribe()
    }
}
