//! The shim's unix-socket protocol: one JSON request per line, one JSON response per line.
//! A connection may carry several requests in sequence. `wait` and `stop` answer only once the
//! container has exited (and its output is drained into the log).

use serde::{Deserialize, Serialize};

/// A request to the shim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Current state.
    State,
    /// `runc start`.
    Start,
    /// Answer once the container has exited.
    Wait,
    /// Send a signal to the container's init process.
    Signal { signal: i32 },
    /// `signal` (SIGTERM when absent), then SIGKILL after `grace_ms`; answers once exited.
    Stop {
        grace_ms: u64,
        #[serde(default = "sigterm")]
        signal: i32,
    },
    /// `runc delete --force`, then the shim exits.
    Delete,
}

fn sigterm() -> i32 {
    libc::SIGTERM
}

/// Lifecycle status as seen by the shim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Created,
    Running,
    Stopped,
}

/// What the shim knows about its container. Also persisted as `status.json` in the shim's state
/// dir whenever it changes, so it survives the shim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    pub id: String,
    pub status: Status,
    /// Host pid of the container's init process.
    pub pid: i32,
    /// Pid of the shim itself.
    pub shim_pid: i32,
    /// Exit code; 128+signal when killed by a signal.
    pub exit_code: Option<i32>,
    /// The signal that killed the init process, if any.
    pub exit_signal: Option<i32>,
    /// The memory cgroup recorded an OOM kill.
    pub oom_killed: bool,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// The shim's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok { state: ShimState },
    Error { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() -> Result<(), serde_json::Error> {
        assert_eq!(
            serde_json::to_string(&Request::Stop {
                grace_ms: 5,
                signal: 3
            })?,
            r#"{"op":"stop","grace_ms":5,"signal":3}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"stop","grace_ms":5}"#)?,
            Request::Stop {
                grace_ms: 5,
                signal: libc::SIGTERM
            },
            "an agent that names no signal asks for SIGTERM"
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"state"}"#)?,
            Request::State
        );
        let e = Response::Error {
            message: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&e)?,
            r#"{"result":"error","message":"x"}"#
        );
        Ok(())
    }
}
