//! Jobs: every long operation is one. Kept in memory while fvd runs (for long polls and
//! cancellation) and in the database (for listing and across restarts).
use crate::db::Db;
use crate::events::Events;
use fv_model::api::{JobState, JobView};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

/// Cancellation flag a job's task checks at its waiting points.
#[derive(Default)]
pub struct CancelToken {
    flag: AtomicBool,
    notify: Notify,
}

impl CancelToken {
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    pub async fn cancelled(&self) {
        loop {
            let n = self.notify.notified();
            if self.is_cancelled() {
                return;
            }
            n.await;
        }
    }
}

struct Entry {
    tx: watch::Sender<JobView>,
    cancel: Option<Arc<CancelToken>>,
}

pub struct Jobs {
    db: Arc<Db>,
    events: Events,
    map: Mutex<HashMap<Uuid, Entry>>,
}

#[derive(Clone)]
pub struct JobHandle {
    pub id: Uuid,
    jobs: Arc<Jobs>,
    pub cancel: Option<Arc<CancelToken>>,
}

impl Jobs {
    pub fn new(db: Arc<Db>, events: Events) -> Arc<Jobs> {
        Arc::new(Jobs {
            db,
            events,
            map: Mutex::new(HashMap::new()),
        })
    }

    pub fn create(
        self: &Arc<Self>,
        operation: &str,
        vm: Option<(Uuid, String)>,
        cancellable: bool,
        detail: Option<String>,
    ) -> JobHandle {
        let id = Uuid::new_v4();
        let view = JobView {
            id,
            operation: operation.to_string(),
            vm_id: vm.as_ref().map(|v| v.0),
            vm_name: vm.map(|v| v.1),
            state: JobState::New,
            percent_complete: 0,
            error_code: None,
            error_description: None,
            created: crate::util::now(),
            started: None,
            ended: None,
            cancellable,
            detail,
        };
        if let Err(e) = self.db.put_job(&view) {
            tracing::error!("cannot store job: {e}");
        }
        let cancel = cancellable.then(|| Arc::new(CancelToken::default()));
        let (tx, _) = watch::channel(view);
        self.map.lock().insert(
            id,
            Entry {
                tx,
                cancel: cancel.clone(),
            },
        );
        JobHandle {
            id,
            jobs: self.clone(),
            cancel,
        }
    }

    pub fn get(&self, id: Uuid) -> Option<JobView> {
        if let Some(e) = self.map.lock().get(&id) {
            return Some(e.tx.borrow().clone());
        }
        self.db.job(id).ok().flatten()
    }

    /// The newest `limit` jobs (created after `since`, an RFC 3339 time), newest first.
    pub fn list(&self, limit: u32, since: Option<&str>) -> Vec<JobView> {
        let mut v = match self.db.jobs(limit, since) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("cannot list jobs: {e}");
                Vec::new()
            }
        };
        let map = self.map.lock();
        for j in v.iter_mut() {
            if let Some(e) = map.get(&j.id) {
                *j = e.tx.borrow().clone();
            }
        }
        v
    }

    /// Wait until the job ends or `timeout` passes; returns its view then.
    pub async fn wait(&self, id: Uuid, timeout: Duration) -> Option<JobView> {
        let rx = self.map.lock().get(&id).map(|e| e.tx.subscribe());
        let Some(mut rx) = rx else {
            return self.get(id);
        };
        let _ = tokio::time::timeout(timeout, rx.wait_for(|j| j.state.is_final())).await;
        let v = rx.borrow().clone();
        Some(v)
    }

    /// Request cancellation. Err(state) when the job is not cancellable or already over.
    pub fn cancel(&self, id: Uuid) -> Result<(), String> {
        let map = self.map.lock();
        let Some(e) = map.get(&id) else {
            return Err("the job is not running".into());
        };
        let st = e.tx.borrow().state;
        if st.is_final() {
            return Err(format!("the job is already {st}"));
        }
        match &e.cancel {
            Some(c) => {
                c.cancel();
                Ok(())
            }
            None => Err("this job cannot be cancelled".into()),
        }
    }

    fn update(&self, id: Uuid, f: impl FnOnce(&mut JobView)) -> Option<JobView> {
        let map = self.map.lock();
        let e = map.get(&id)?;
        let mut v = e.tx.borrow().clone();
        if v.state.is_final() {
            return None;
        }
        f(&mut v);
        if let Err(err) = self.db.put_job(&v) {
            tracing::error!("cannot store job: {err}");
        }
        e.tx.send_replace(v.clone());
        Some(v)
    }

    /// Mark jobs left unfinished by a previous fvd (called before anything else runs).
    pub fn db(&self) -> &Db {
        &self.db
    }
}

impl JobHandle {
    pub fn start(&self) {
        self.jobs.update(self.id, |j| {
            j.state = JobState::Running;
            j.started = Some(crate::util::now());
        });
    }

    pub fn progress(&self, percent: u8) {
        self.jobs.update(self.id, |j| {
            if j.state == JobState::New {
                j.state = JobState::Running;
                j.started = Some(crate::util::now());
            }
            j.percent_complete = percent.min(99);
        });
    }

    pub fn complete(&self) {
        if let Some(v) = self.jobs.update(self.id, |j| {
            j.state = JobState::Completed;
            j.percent_complete = 100;
            j.ended = Some(crate::util::now());
        }) {
            self.jobs.events.emit(
                "job.completed",
                v.vm_id,
                Some(v.id),
                format!("{} completed", v.operation),
                None,
            );
        }
    }

    pub fn fail(&self, code: &str, message: String) {
        if let Some(v) = self.jobs.update(self.id, |j| {
            j.state = JobState::Failed;
            j.error_code = Some(code.to_string());
            j.error_description = Some(message.clone());
            j.ended = Some(crate::util::now());
        }) {
            self.jobs.events.emit(
                "job.failed",
                v.vm_id,
                Some(v.id),
                format!("{} failed: {message}", v.operation),
                None,
            );
        }
    }

    pub fn cancelled(&self, message: String) {
        if let Some(v) = self.jobs.update(self.id, |j| {
            j.state = JobState::Cancelled;
            j.error_code = Some("cancelled".into());
            j.error_description = Some(message.clone());
            j.ended = Some(crate::util::now());
        }) {
            self.jobs.events.emit(
                "job.cancelled",
                v.vm_id,
                Some(v.id),
                format!("{} cancelled: {message}", v.operation),
                None,
            );
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.is_cancelled())
    }

    pub fn view(&self) -> Option<JobView> {
        self.jobs.get(self.id)
    }
}

/// Re-create the in-memory entry of a job found unfinished in the database, so it can
/// be finished (resumed or failed) by the new fvd.
pub fn adopt(jobs: &Arc<Jobs>, view: JobView) -> JobHandle {
    let id = view.id;
    let (tx, _) = watch::channel(view);
    jobs.map.lock().insert(id, Entry { tx, cancel: None });
    JobHandle {
        id,
        jobs: jobs.clone(),
        cancel: None,
    }
}
