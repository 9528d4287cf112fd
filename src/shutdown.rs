//! One drain primitive for every server: a cloneable signal that fires once.

use tokio::sync::watch;

/// Held by whoever decides when to stop.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Held by each server; `wait` returns once the trigger fires (or is dropped).
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}

/// Fires the trigger on Ctrl-C or SIGTERM.
pub fn on_signals(trigger: Trigger) {
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        trigger.fire();
    });
}
