//! Envoy's threading model: a main thread (xDS, admin, accepting) and N worker threads, each
//! with its own single-threaded runtime. A connection is handed to the worker serving the
//! fewest at accept and lives there until it closes, with the worker's own upstream pools
//! (see `upstream::Host`), so a request never leaves its thread.
//!
//! Why not tokio's multi-threaded runtime: on a machine where the proxy shares its cores with
//! the load and the app, a worker that is preempted keeps the task in its LIFO slot (which
//! others cannot steal) and requests wait for it to run again; work stealing also moves a
//! connection's tasks between cores. Under wrk at saturation that showed as a p99 2-3x the
//! single-threaded proxy's (docs/measurements.md has the figures).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

thread_local! {
    /// 0 on the main runtime (and wherever no worker runs), 1..=N on the workers.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker this code runs on (0: the main runtime).
pub fn current() -> usize {
    WORKER.with(|w| w.get())
}

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    /// Connections it serves now.
    load: Arc<AtomicUsize>,
}

/// The worker threads; none when the proxy runs on one thread.
#[derive(Default)]
pub struct Workers {
    workers: Mutex<Vec<Worker>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Workers({})", self.workers.lock().unwrap().len())
    }
}

/// Decrements a worker's connection count when the connection ends.
struct Served(Arc<AtomicUsize>);

impl Drop for Served {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Workers {
    /// Starts `n` worker threads (none for `n <= 1`: connections are served where accepted).
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut workers = Vec::new();
        for i in 1..=n.max(1) {
            if n <= 1 {
                break;
            }
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            std::thread::Builder::new()
                .name(format!("worker-{}", i - 1))
                .spawn(move || {
                    WORKER.with(|w| w.set(i));
                    // Ends when the senders are gone; dropping the runtime then ends the
                    // connections still open on it.
                    rt.block_on(async move {
                        while let Some(job) = rx.recv().await {
                            tokio::spawn(job());
                        }
                    });
                })?;
            workers.push(Worker {
                jobs: tx,
                load: Arc::default(),
            });
        }
        Ok(Workers {
            workers: Mutex::new(workers),
        })
    }

    /// Runs `serve` on the least busy worker, or here when there are none. `serve` is built
    /// on the worker (so what it creates belongs to that worker's runtime).
    pub fn dispatch<F, Fut>(&self, serve: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static + Send,
    {
        let workers = self.workers.lock().unwrap();
        let Some(w) = workers.iter().min_by_key(|w| w.load.load(Relaxed)) else {
            drop(workers);
            tokio::spawn(serve());
            return;
        };
        w.load.fetch_add(1, Relaxed);
        let served = Served(w.load.clone());
        let job: Job = Box::new(move || {
            Box::pin(async move {
                let _served = served;
                serve().await
            })
        });
        // A worker that is gone (it cannot be, short of a panic) gives its job back.
        if let Err(mpsc::error::SendError(job)) = w.jobs.send(job) {
            drop(workers);
            tokio::spawn(job());
        }
    }

    /// Stops the workers: each ends with the connections it serves.
    pub fn stop(&self) {
        self.workers.lock().unwrap().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections go to the least busy worker and run there for their whole life.
    #[test]
    fn jobs_spread_over_the_workers_and_stay_on_their_thread() {
        let workers = Workers::start(2).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (release, hold) = tokio::sync::watch::channel(false);
        for _ in 0..6 {
            let (tx, mut hold) = (tx.clone(), hold.clone());
            workers.dispatch(move || async move {
                let before = (current(), std::thread::current().id());
                // Held open like a connection, across an await.
                let _ = hold.wait_for(|go| *go).await;
                tx.send((before, (current(), std::thread::current().id())))
                    .unwrap();
            });
        }
        release.send(true).unwrap();
        let mut per_worker = std::collections::BTreeMap::new();
        for _ in 0..6 {
            let (before, after) = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
            assert_eq!(before, after, "a job moved between threads");
            *per_worker.entry(before.0).or_insert(0) += 1;
        }
        assert_eq!(per_worker, [(1, 3), (2, 3)].into());
        workers.stop();
    }

    #[test]
    fn one_worker_means_serving_where_accepted() {
        let workers = Workers::start(1).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        rt.block_on(async {
            workers.dispatch(move || async move { tx.send(current()).unwrap() });
            tokio::task::yield_now().await;
        });
        assert_eq!(rx.recv().unwrap(), 0);
    }
}
