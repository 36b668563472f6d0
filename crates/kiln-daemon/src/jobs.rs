//! Progress of builds by `Ref`, for `Control.Status`.
//!
//! A client may call `Status` before or after `Solve` registers the build, so
//! either side creates the entry. Every event is kept for the life of the
//! build so a late subscriber sees the whole history; the entry is dropped a
//! while after the build ends.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kiln_proto::moby::buildkit::v1::StatusResponse;
use kiln_solver::ProgressWriter;
use tokio::sync::{mpsc, Notify};

/// How long a finished build's progress stays available.
const KEEP_AFTER_DONE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct JobState {
    events: Vec<StatusResponse>,
    done: bool,
}

/// One build's progress.
#[derive(Default)]
pub struct Job {
    state: Mutex<JobState>,
    changed: Notify,
}

impl Job {
    fn push(&self, event: StatusResponse) {
        if let Ok(mut state) = self.state.lock() {
            state.events.push(event);
        }
        self.changed.notify_waiters();
    }

    fn finish(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.done = true;
        }
        self.changed.notify_waiters();
    }

    /// Events from index `from` on, and whether the job is done.
    fn since(&self, from: usize) -> (Vec<StatusResponse>, bool) {
        match self.state.lock() {
            Ok(state) => (
                state.events.get(from..).unwrap_or_default().to_vec(),
                state.done,
            ),
            Err(_) => (Vec::new(), true),
        }
    }
}

/// All builds' progress.
#[derive(Default, Clone)]
pub struct Jobs {
    jobs: Arc<Mutex<HashMap<String, Arc<Job>>>>,
}

/// The stream type `Control.Status` returns.
pub type StatusStream = Pin<Box<dyn Stream<Item = Result<StatusResponse, tonic::Status>> + Send>>;

impl Jobs {
    fn get_or_create(&self, reference: &str) -> Arc<Job> {
        let mut jobs = match self.jobs.lock() {
            Ok(j) => j,
            Err(poisoned) => poisoned.into_inner(),
        };
        jobs.entry(reference.to_string()).or_default().clone()
    }

    /// Registers a build and returns the writer its progress goes to, and a
    /// guard that marks it finished when dropped (also when the solve is
    /// cancelled).
    pub fn start(&self, reference: &str) -> (ProgressWriter, JobGuard) {
        let job = self.get_or_create(reference);
        let (tx, mut rx) = mpsc::unbounded_channel::<StatusResponse>();
        let forward_job = job.clone();
        let forwarder = tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                forward_job.push(event);
            }
        });
        (
            ProgressWriter::new(tx),
            JobGuard {
                jobs: self.clone(),
                reference: reference.to_string(),
                job,
                forwarder: Some(forwarder),
            },
        )
    }

    /// A stream of the build's progress, from the beginning, ending when the
    /// build ends.
    pub fn subscribe(&self, reference: &str) -> StatusStream {
        let job = self.get_or_create(reference);
        let stream =
            futures::stream::unfold((job, 0usize, false), |(job, next, finished)| async move {
                if finished {
                    return None;
                }
                loop {
                    let (events, done) = {
                        let notified = job.changed.notified();
                        tokio::pin!(notified);
                        // Register interest before reading, so a push between
                        // the read and the wait is not missed.
                        notified.as_mut().enable();
                        let (events, done) = job.since(next);
                        if events.is_empty() && !done {
                            notified.await;
                            continue;
                        }
                        (events, done)
                    };
                    if !events.is_empty() {
                        // Events go out one by one, in the order they happened:
                        // merging them would put a vertex's completion before
                        // the statuses sent while it ran.
                        let count = events.len();
                        let batch: Vec<Result<StatusResponse, tonic::Status>> =
                            events.into_iter().map(Ok).collect();
                        return Some((futures::stream::iter(batch), (job, next + count, false)));
                    }
                    if done {
                        return None;
                    }
                }
            });
        Box::pin(stream.flatten())
    }
}

/// Marks a build finished when dropped.
pub struct JobGuard {
    jobs: Jobs,
    reference: String,
    job: Arc<Job>,
    forwarder: Option<tokio::task::JoinHandle<()>>,
}

impl JobGuard {
    /// Waits until every event sent so far is stored, then finishes.
    pub async fn finish(mut self, writer: ProgressWriter) {
        drop(writer);
        if let Some(forwarder) = self.forwarder.take() {
            let _ = forwarder.await;
        }
        // Drop does the rest.
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.job.finish();
        let jobs = self.jobs.clone();
        let reference = std::mem::take(&mut self.reference);
        let job = self.job.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                tokio::time::sleep(KEEP_AFTER_DONE).await;
                if let Ok(mut map) = jobs.jobs.lock() {
                    if map.get(&reference).is_some_and(|j| Arc::ptr_eq(j, &job)) {
                        map.remove(&reference);
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use kiln_proto::moby::buildkit::v1::Vertex;

    #[tokio::test]
    async fn late_subscriber_sees_history_and_end() {
        let jobs = Jobs::default();
        let early = jobs.subscribe("r1");
        let (writer, guard) = jobs.start("r1");
        writer.send(StatusResponse {
            vertexes: vec![Vertex {
                name: "one".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        guard.finish(writer).await;
        let late = jobs.subscribe("r1");
        for stream in [early, late] {
            let all: Vec<_> = stream.collect().await;
            let names: Vec<String> = all
                .into_iter()
                .flat_map(|r| r.unwrap().vertexes)
                .map(|v| v.name)
                .collect();
            assert_eq!(names, vec!["one".to_string()]);
        }
    }
}
