//! Who owns the container's stdout/stderr pipes.
//!
//! A pipe belongs to whoever created it (host root, here) with mode 0600. A process that reopens
//! its own stdout by path (`/dev/stdout`, `/dev/stderr`, `/proc/self/fd/1`: nginx's and most
//! official images' logs are symlinks to them) goes through a permission check on that inode, so
//! inside a user namespace it fails with `EACCES`. The shim therefore gives both pipes to the
//! host ids of the container's process user, read from the bundle's `config.json` and mapped
//! through its user-namespace mappings, as containerd does for the container's root; for a
//! non-root `process.user` it hands them to that user, so its reopen works too.

use serde_json::Value;
use std::path::Path;

/// The host `(uid, gid)` the container's process runs as, from an OCI `config.json`.
/// `None` when the file is unreadable or the ids fall outside the mappings (then the pipes
/// stay root's, as before).
pub fn process_host_ids(bundle: &Path) -> Option<(u32, u32)> {
    let text = std::fs::read(bundle.join("config.json")).ok()?;
    let spec: Value = serde_json::from_slice(&text).ok()?;
    let user = spec.pointer("/process/user")?;
    let uid = id_of(user.get("uid"))?;
    let gid = id_of(user.get("gid"))?;
    let linux = spec.get("linux");
    Some((
        map_id(uid, linux.and_then(|l| l.get("uidMappings")))?,
        map_id(gid, linux.and_then(|l| l.get("gidMappings")))?,
    ))
}

/// Whether the bundle's process asks for a terminal (`process.terminal`): the shim then
/// receives the pty master from the runtime and logs it as stdout.
pub fn wants_terminal(bundle: &Path) -> bool {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
        .and_then(|v| v.pointer("/process/terminal").and_then(Value::as_bool))
        .unwrap_or(false)
}

fn id_of(v: Option<&Value>) -> Option<u32> {
    v.and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
}

/// Maps a container id to the host through OCI id mappings; identity without mappings.
fn map_id(id: u32, mappings: Option<&Value>) -> Option<u32> {
    let Some(list) = mappings.and_then(Value::as_array).filter(|l| !l.is_empty()) else {
        return Some(id);
    };
    list.iter().find_map(|m| {
        let inside = id_of(m.get("containerID"))?;
        let host = id_of(m.get("hostID"))?;
        let size = id_of(m.get("size"))?;
        let offset = id.checked_sub(inside).filter(|o| *o < size)?;
        host.checked_add(offset)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("config.json"), config).expect("write");
        d
    }

    #[test]
    fn maps_the_process_user_through_the_user_namespace() {
        let d = bundle(
            r#"{"process":{"user":{"uid":1000,"gid":33}},"linux":{
                "uidMappings":[{"containerID":0,"hostID":100000,"size":65536}],
                "gidMappings":[{"containerID":0,"hostID":200000,"size":65536}]}}"#,
        );
        assert_eq!(process_host_ids(d.path()), Some((101000, 200033)));
    }

    #[test]
    fn without_mappings_the_ids_are_the_hosts() {
        let d = bundle(r#"{"process":{"user":{"uid":0,"gid":0}}}"#);
        assert_eq!(process_host_ids(d.path()), Some((0, 0)));
    }

    #[test]
    fn ids_outside_the_mappings_or_garbage_give_none() {
        for cfg in [
            r#"{"process":{"user":{"uid":70000,"gid":0}},"linux":{"uidMappings":[{"containerID":0,"hostID":100000,"size":65536}]}}"#,
            r#"{"process":{"user":{"uid":-1,"gid":0}}}"#,
            r#"{"process":{"user":{"uid":4294967296,"gid":0}}}"#,
            r#"{"process":{"user":{"uid":5,"gid":0}},"linux":{"uidMappings":[{"containerID":4294967295,"hostID":4294967295,"size":4294967295}]}}"#,
            r#"{"process":{}}"#,
            "not json",
        ] {
            assert_eq!(process_host_ids(bundle(cfg).path()), None, "{cfg}");
        }
        assert_eq!(process_host_ids(Path::new("/nonexistent")), None);
    }
}
