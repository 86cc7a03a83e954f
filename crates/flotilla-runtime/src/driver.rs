//! The runtime driver trait the agent's task executor programs against.

use crate::error::Result;
use crate::spec::ContainerSpec;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Lifecycle status of a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerStatus {
    Created,
    Running,
    Stopped,
    /// The shim is gone and the outcome is not recorded.
    Unknown,
}

/// Observed state of a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub status: ContainerStatus,
    /// Host pid of the container's init (0 when unknown).
    pub pid: i32,
    pub exit_code: Option<i32>,
    pub oom_killed: bool,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Whether the container's shim answers.
    pub shim_alive: bool,
    /// Pid of the shim (0 when unknown).
    pub shim_pid: i32,
}

/// How a container ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code; 128+signal when killed by a signal.
    pub code: i32,
    pub oom_killed: bool,
}

/// A container as created (persisted as `meta.json` in its state dir).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    /// Manifest digest of the image.
    pub image: String,
    pub spec: ContainerSpec,
    pub created_at: String,
    /// OCI bundle directory.
    pub bundle: PathBuf,
    /// Live log file.
    pub log_path: PathBuf,
    pub cgroups_path: String,
    /// The user-namespace range, or None when the container opted out (visible in inspect).
    pub userns: Option<crate::config::IdRange>,
    /// Human-readable list of security opt-outs (empty for the secure default).
    pub security_opt_outs: Vec<String>,
    /// OCI runtime binary used.
    pub runtime: PathBuf,
    /// What `stop` sends first: the spec's stop signal, else the image's, else SIGTERM.
    #[serde(default = "sigterm")]
    pub stop_signal: i32,
}

fn sigterm() -> i32 {
    flotilla_types::SIGTERM
}

/// Result of re-attaching to the shims after an agent restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptReport {
    /// Containers whose shim answered.
    pub adopted: Vec<ContainerState>,
    /// Containers whose shim is dead: their last recorded state (status `stopped` if the exit
    /// was recorded before the shim died, else `unknown`).
    pub dead_shims: Vec<ContainerState>,
    /// Containers whose create was interrupted (no metadata): their leftovers were removed.
    pub cleaned_up: Vec<String>,
}

/// A container runtime driver. Every method is safe to call from any task; long operations run
/// off the async executor.
pub trait RuntimeDriver: Send + Sync {
    /// Prepares the rootfs and bundle and creates the container (not started).
    fn create(&self, spec: ContainerSpec) -> BoxFuture<'_, Result<ContainerInfo>>;
    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>>;
    fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ContainerState>>;
    /// Resolves when the container has exited and its output is in the log.
    fn wait<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ExitStatus>>;
    fn signal<'a>(&'a self, id: &'a str, signal: i32) -> BoxFuture<'a, Result<()>>;
    /// The container's stop signal (SIGTERM unless its spec or image names another), then
    /// SIGKILL after `grace`; resolves once exited.
    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> BoxFuture<'a, Result<ExitStatus>>;
    /// Kills if needed and frees everything (overlay, bundle, cgroup, shim, state); the log is
    /// deleted unless `keep_log`.
    fn remove<'a>(&'a self, id: &'a str, keep_log: bool) -> BoxFuture<'a, Result<()>>;
    fn list(&self) -> BoxFuture<'_, Result<Vec<ContainerInfo>>>;
    /// Re-attaches to every shim in the state dir after an agent restart, and removes the leftovers
    /// of creates interrupted by a crash. Call it at agent start, before creating containers.
    fn adopt(&self) -> BoxFuture<'_, Result<AdoptReport>>;
    fn log_path(&self, id: &str) -> PathBuf;
}
