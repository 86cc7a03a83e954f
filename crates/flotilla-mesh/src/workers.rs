//! Proxy worker threads: one current-thread tokio runtime per thread.
//!
//! Giving a TCP frontend several workers ([`crate::TcpOptions::runtimes`]) binds one
//! `SO_REUSEPORT` listener per worker on the same address; the kernel spreads connections over
//! them and each connection then lives on one thread, with no work stealing or cross-thread
//! wake-ups, like nginx's worker processes. On the benchmark machine this proxies ~1.4x the
//! requests per second of one multi-thread runtime with the same number of threads.

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Running worker threads. Frontends bound on them stop working when this is dropped, so keep it
/// for as long as the [`crate::Mesh`] that uses it.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl Workers {
    /// Starts `n` worker threads (at least one), named `mesh-0`, `mesh-1`, …
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("mesh-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = stop_rx.await;
                    });
                })?;
            threads.push((stop_tx, thread));
        }
        Ok(Workers { handles, threads })
    }

    /// Handles of the workers' runtimes, to put in [`crate::TcpOptions::runtimes`].
    pub fn handles(&self) -> Vec<Handle> {
        self.handles.clone()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (stop, thread) in self.threads.drain(..) {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}
