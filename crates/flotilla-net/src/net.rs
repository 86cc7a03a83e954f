//! [`Net`]: a netlink handle bound to one network namespace.

use std::path::{Path, PathBuf};

use rtnetlink::Handle;

use crate::{netns, Error, Result};

/// A netlink connection to one network namespace, plus how to run blocking work there.
///
/// The connection task runs on the tokio runtime it was created on and ends when the
/// `Net` (and its clones) are dropped. Holding a `Net` keeps its namespace alive.
#[derive(Clone, Debug)]
pub struct Net {
    handle: Handle,
    netns: Option<PathBuf>,
}

impl Net {
    /// The namespace of the calling thread (normally the agent's own). Needs a tokio runtime.
    pub fn current() -> Result<Self> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::io("open netlink socket", e))?;
        rt.spawn(conn);
        Ok(Self {
            handle,
            netns: None,
        })
    }

    /// The namespace mounted at `path`. Needs a tokio runtime.
    pub fn open(path: &Path) -> Result<Self> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let rt2 = rt.clone();
        let (conn, handle, _) = netns::run_in(path, move || {
            let _guard = rt2.enter();
            rtnetlink::new_connection()
        })?
        .map_err(|e| Error::io(format!("open netlink socket in {}", path.display()), e))?;
        rt.spawn(conn);
        Ok(Self {
            handle,
            netns: Some(path.to_path_buf()),
        })
    }

    /// The rtnetlink handle, for requests this crate does not wrap.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The namespace file, or `None` for the namespace [`Net::current`] was called in.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// Runs blocking `f` on a thread inside this namespace (sysctls, iptables, sockets).
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = self.netns.clone();
        tokio::task::spawn_blocking(move || match path {
            Some(p) => netns::run_in(&p, f),
            None => Ok(f()),
        })
        .await
        .map_err(|e| Error::Panicked(e.to_string()))?
    }
}
