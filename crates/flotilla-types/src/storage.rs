//! What a task mounts: volumes, host binds and tmpfs (`--mount`), secrets and configs
//! (`--secret`, `--config`), and the cluster objects behind them (volumes with a home node,
//! secrets, configs). The `--mount`/`--secret`/`--config` parsers live here so the CLI and the
//! manager refuse the same inputs with the same words.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Meta;

/// Most a secret or config may hold (Swarm's limit).
pub const MAX_SECRET_BYTES: usize = 500 * 1024;

/// The kind of a [`Mount`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// A named volume on the task's node (created on first use, kept after the task).
    #[default]
    Volume,
    /// A host directory, only under a path the cluster allows (`cluster update --bind-allow`).
    Bind,
    /// A memory-backed filesystem that ends with the task.
    Tmpfs,
}

impl MountKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            MountKind::Volume => "volume",
            MountKind::Bind => "bind",
            MountKind::Tmpfs => "tmpfs",
        }
    }
}

/// One `--mount` of a task (Docker's mount, in snake_case).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    #[serde(rename = "type", default)]
    pub kind: MountKind,
    /// Volume name (may hold `{{.Task.Slot}}`, `{{.Task.ID}}`, `{{.Node.ID}}`,
    /// `{{.Service.Name}}`, `{{.Service.ID}}`; filled in when the task is made) or host path; empty for tmpfs and for an
    /// anonymous volume.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
    /// Volume only: don't fill a new volume with the image's content at `target`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nocopy: bool,
    /// Volume only: labels of a volume this mount creates.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volume_labels: BTreeMap<String, String>,
    /// Volume only: several running tasks may mount it at once (otherwise never: a new task
    /// mounts it only after the one before has stopped).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// Volume only: size limit in bytes of a volume this mount creates (`volume-opt=size=`;
    /// the volume gets a file system of its own). Unlimited when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_size: Option<u64>,
    /// Tmpfs only: size limit in bytes (unlimited when unset, as Docker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs_size: Option<u64>,
    /// Tmpfs only: permission bits (1777 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmpfs_mode: Option<u32>,
}

/// The template placeholders a volume source may hold.
pub const MOUNT_TEMPLATES: &[&str] = &[
    "{{.Task.Slot}}",
    "{{.Task.ID}}",
    "{{.Node.ID}}",
    "{{.Service.Name}}",
    "{{.Service.ID}}",
];

/// What a volume name's placeholders stand for, for one task.
#[derive(Debug, Clone, Copy)]
pub struct MountVars<'a> {
    pub service_id: &'a str,
    pub service_name: &'a str,
    pub task_id: &'a str,
    pub slot: Option<u64>,
    pub node_id: Option<&'a str>,
}

impl Mount {
    /// The volume name for one task: the placeholders replaced (an unknown value, such as the
    /// slot of a global task, becomes empty).
    pub fn volume_name_for(&self, v: MountVars<'_>) -> String {
        self.source
            .replace(
                "{{.Task.Slot}}",
                &v.slot.map(|s| s.to_string()).unwrap_or_default(),
            )
            .replace("{{.Task.ID}}", v.task_id)
            .replace("{{.Node.ID}}", v.node_id.unwrap_or_default())
            .replace("{{.Service.Name}}", v.service_name)
            .replace("{{.Service.ID}}", v.service_id)
    }

    /// Checks one mount as given by a user. `Err` says what is wrong and the accepted form.
    pub fn validate(&self) -> Result<(), String> {
        validate_target(&self.target)?;
        match self.kind {
            MountKind::Volume => {
                if let Some(size) = self.volume_size {
                    if !(VOLUME_SIZE_MIN..=VOLUME_SIZE_MAX).contains(&size) {
                        return Err(format!(
                            "volume-opt=size={size}: give 8m to 16t (the volume gets a file \
                             system of that size)"
                        ));
                    }
                }
                if !self.source.is_empty() {
                    let mut probe = self.source.clone();
                    for t in MOUNT_TEMPLATES {
                        probe = probe.replace(t, "x");
                    }
                    if probe.contains("{{") || probe.contains("}}") {
                        return Err(format!(
                            "volume source {:?}: the only templates are {}",
                            self.source,
                            MOUNT_TEMPLATES.join(", ")
                        ));
                    }
                    crate::validate_name(&probe)
                        .map_err(|e| format!("volume source {:?}: {e}", self.source))?;
                }
                if self.tmpfs_size.is_some() || self.tmpfs_mode.is_some() {
                    return Err("tmpfs-size and tmpfs-mode need type=tmpfs".into());
                }
            }
            MountKind::Bind => {
                if !self.source.starts_with('/') {
                    return Err(format!(
                        "bind source {:?} must be an absolute host path",
                        self.source
                    ));
                }
                validate_path(&self.source, "bind source")?;
                if self.nocopy || !self.volume_labels.is_empty() || self.shared {
                    return Err("volume-nocopy, volume-label and shared need type=volume".into());
                }
                if self.volume_size.is_some() {
                    return Err("volume-opt needs type=volume".into());
                }
                if self.tmpfs_size.is_some() || self.tmpfs_mode.is_some() {
                    return Err("tmpfs-size and tmpfs-mode need type=tmpfs".into());
                }
            }
            MountKind::Tmpfs => {
                if self.volume_size.is_some() {
                    return Err("volume-opt needs type=volume".into());
                }
                if !self.source.is_empty() {
                    return Err("a tmpfs mount takes no source".into());
                }
                if self.nocopy || !self.volume_labels.is_empty() || self.shared {
                    return Err("volume-nocopy, volume-label and shared need type=volume".into());
                }
                if self.tmpfs_mode.is_some_and(|m| m > 0o7777) {
                    return Err("tmpfs-mode is octal permission bits, at most 7777".into());
                }
                if self.tmpfs_size == Some(0) {
                    return Err("tmpfs-size must be above 0".into());
                }
            }
        }
        Ok(())
    }
}

fn validate_path(p: &str, what: &str) -> Result<(), String> {
    if p.len() > 4096 || p.contains('\0') || p.chars().any(|c| c.is_control()) {
        return Err(format!("{what} {p:?}: control characters or too long"));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(format!("{what} {p:?} must not contain `..`"));
    }
    Ok(())
}

fn validate_target(t: &str) -> Result<(), String> {
    if !t.starts_with('/') {
        return Err(format!(
            "mount target {t:?} must be an absolute path in the container (dst=/data)"
        ));
    }
    validate_path(t, "mount target")?;
    if t.trim_end_matches('/').is_empty() {
        return Err("mount target cannot be /".into());
    }
    Ok(())
}

/// Parses Docker's `--mount` syntax: comma-separated `key=value` (or bare flags), e.g.
/// `type=volume,src=data,dst=/data,readonly`, `type=bind,source=/srv/x,target=/x`,
/// `type=tmpfs,dst=/cache,tmpfs-size=64m,tmpfs-mode=1770`.
pub fn parse_mount(s: &str) -> Result<Mount, String> {
    let mut m = Mount::default();
    let mut target = None;
    for field in s.split(',') {
        let field = field.trim();
        if field.is_empty() {
            continue;
        }
        let (k, v) = match field.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v)),
            None => (field, None),
        };
        let need = |v: Option<&str>| {
            v.map(str::to_string)
                .ok_or_else(|| format!("mount option {k:?} needs a value ({k}=…)"))
        };
        match k {
            "type" => {
                m.kind = match need(v)?.as_str() {
                    "volume" => MountKind::Volume,
                    "bind" => MountKind::Bind,
                    "tmpfs" => MountKind::Tmpfs,
                    other => {
                        return Err(format!("mount type {other:?}: use volume, bind or tmpfs"))
                    }
                }
            }
            "source" | "src" => m.source = need(v)?,
            "target" | "dst" | "destination" => target = Some(need(v)?),
            "readonly" | "ro" => m.readonly = parse_flag(k, v)?,
            "volume-nocopy" => m.nocopy = parse_flag(k, v)?,
            "shared" => m.shared = parse_flag(k, v)?,
            "volume-label" => {
                let kv = need(v)?;
                let (lk, lv) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
                if lk.is_empty() {
                    return Err("volume-label needs a key (volume-label=KEY=VALUE)".into());
                }
                m.volume_labels.insert(lk.to_string(), lv.to_string());
            }
            "volume-opt" => {
                let kv = need(v)?;
                match kv.split_once('=') {
                    Some(("size", size)) => {
                        // The range is checked with the rest of the mount, below.
                        m.volume_size = Some(parse_size(size)?);
                    }
                    _ => {
                        return Err(format!(
                            "volume-opt {kv:?}: the local driver takes only size=SIZE (e.g. \
                             volume-opt=size=512m)"
                        ))
                    }
                }
            }
            "tmpfs-size" => m.tmpfs_size = Some(parse_size(&need(v)?)?),
            "tmpfs-mode" => {
                let raw = need(v)?;
                m.tmpfs_mode = Some(u32::from_str_radix(&raw, 8).map_err(|_| {
                    format!("tmpfs-mode {raw:?}: give octal permission bits, e.g. 1770")
                })?)
            }
            other => {
                return Err(format!(
                    "unknown mount option {other:?}: use type, source/src, target/dst, readonly, \
                     volume-nocopy, volume-label, volume-opt, shared, tmpfs-size, tmpfs-mode"
                ))
            }
        }
    }
    m.target = target.ok_or_else(|| {
        "a mount needs a target: --mount type=volume,src=NAME,dst=/path".to_string()
    })?;
    m.validate()?;
    Ok(m)
}

fn parse_flag(k: &str, v: Option<&str>) -> Result<bool, String> {
    match v {
        None | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(format!("mount option {k}={other:?}: use true or false")),
    }
}

/// The smallest `volume-opt=size=` (the node's volume store checks the same bounds).
pub const VOLUME_SIZE_MIN: u64 = 8 << 20;
/// The largest `volume-opt=size=` (the volume's image is sparse: a cap, not space taken).
pub const VOLUME_SIZE_MAX: u64 = 16 << 40;

/// `1024`, `64k`, `64m`, `1g`, `2t` (binary units, as Docker).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("size {s:?}: give bytes or a number with k, m, g or t, e.g. 64m"))
}

/// A task's reference to a secret or config (`--secret src=NAME,target=…,uid=,gid=,mode=`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReference {
    /// The object's name as the user gave it.
    pub source: String,
    /// The object's id, filled in by the manager when the service is written (names can be
    /// reused after `rm`; the id pins the object the service was made with).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// Where the file appears: a relative name is under `/run/secrets/` for secrets, `/` for
    /// configs; an absolute path is taken as is. Defaults to the source name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// Owner in the container (0 when unset).
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    /// Permission bits (0444 when unset).
    #[serde(default = "default_file_mode")]
    pub mode: u32,
}

fn default_file_mode() -> u32 {
    0o444
}

/// Which kind of object a [`FileReference`] points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Secret,
    Config,
}

impl FileKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            FileKind::Secret => "secret",
            FileKind::Config => "config",
        }
    }
}

impl FileReference {
    /// The absolute path in the container.
    pub fn target_path(&self, kind: FileKind) -> String {
        let t = if self.target.is_empty() {
            &self.source
        } else {
            &self.target
        };
        if t.starts_with('/') {
            t.clone()
        } else if kind == FileKind::Secret {
            format!("/run/secrets/{t}")
        } else {
            format!("/{t}")
        }
    }

    pub fn validate(&self, kind: FileKind) -> Result<(), String> {
        crate::validate_name(&self.source)
            .map_err(|e| format!("{} name {:?}: {e}", kind.as_str(), self.source))?;
        validate_target(&self.target_path(kind))?;
        if self.mode > 0o777 {
            return Err(format!(
                "{} mode {:o}: give octal permission bits up to 0777",
                kind.as_str(),
                self.mode
            ));
        }
        Ok(())
    }
}

/// Parses `--secret`/`--config`: `NAME` or `src=NAME[,target=PATH][,uid=N][,gid=N][,mode=0440]`.
pub fn parse_file_reference(s: &str, kind: FileKind) -> Result<FileReference, String> {
    let mut r = FileReference {
        mode: default_file_mode(),
        ..Default::default()
    };
    if !s.contains('=') {
        r.source = s.trim().to_string();
    } else {
        for field in s.split(',') {
            let field = field.trim();
            if field.is_empty() {
                continue;
            }
            let Some((k, v)) = field.split_once('=') else {
                return Err(format!(
                    "--{} option {field:?} needs a value: src=NAME,target=PATH,uid=N,gid=N,mode=0440",
                    kind.as_str()
                ));
            };
            let num = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("--{} {k}={v:?}: give a number", kind.as_str()))
            };
            match k {
                "source" | "src" => r.source = v.to_string(),
                "target" | "dst" => r.target = v.to_string(),
                "uid" => r.uid = num(v)?,
                "gid" => r.gid = num(v)?,
                "mode" => {
                    r.mode = u32::from_str_radix(v, 8).map_err(|_| {
                        format!("--{} mode={v:?}: give octal bits, e.g. 0440", kind.as_str())
                    })?
                }
                other => {
                    return Err(format!(
                        "unknown --{} option {other:?}: use src, target, uid, gid, mode",
                        kind.as_str()
                    ))
                }
            }
        }
    }
    if r.source.is_empty() {
        return Err(format!(
            "--{} needs a name: --{} NAME or src=NAME,target=PATH",
            kind.as_str(),
            kind.as_str()
        ));
    }
    r.validate(kind)?;
    Ok(r)
}

/// A named volume: a directory on one node (its home), created on first use or by
/// `volume create`, kept until `volume rm`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// The volume's name (also its key: names are unique in the cluster).
    pub name: String,
    #[serde(flatten)]
    pub meta: Meta,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `local` (a directory on the home node).
    #[serde(default = "local_driver")]
    pub driver: String,
    /// The node holding the data; unset until a task or `volume create --node` places it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Filled in on reads: bytes used on the home node (absent when the node did not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Filled in on reads: the size limit the home node gave the volume (`volume-opt=size=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<u64>,
    /// Filled in on reads: services whose tasks mount it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
    /// Filled in on reads (by the leader): the move under way, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<VolumeMoving>,
    /// The last move that gave the volume its present home (written with the new home).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_move: Option<VolumeLastMove>,
}

/// A volume move under way (`volume inspect` while it runs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMoving {
    /// Node id the volume goes to.
    pub to: String,
    /// `pre-copy` (the first pass, the task still running), `final` (what changed since,
    /// the task stopped), `copy` (one full pass, nothing running) or `pre-copied` (waiting for
    /// the task to stop).
    pub pass: String,
    /// Bytes of this pass's stream relayed so far, and the volume's size on its node when
    /// the pass started (the stream is a little larger: tar headers).
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// One pass of a move: the stream relayed from the old node to the new one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumePass {
    /// `pre-copy`, `final` or `copy` (see [`VolumeMoving::pass`]).
    pub pass: String,
    /// Bytes of the stream, and its SHA-256 as the new node received it (checked against
    /// what the leader relayed).
    pub bytes: u64,
    pub sha256: String,
    /// Milliseconds from the pass's first request to its check.
    pub ms: u64,
}

/// [`Volume::last_move`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeLastMove {
    /// Node ids.
    pub from: String,
    pub to: String,
    /// When the new home was recorded (ms since the epoch).
    pub at: u64,
    pub passes: Vec<VolumePass>,
}

fn local_driver() -> String {
    "local".into()
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeCreate {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Node id or hostname to hold the volume; the first task's node when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// `POST /v1/volumes/{name}/move`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMove {
    /// Node id or hostname to move the volume to.
    pub to: String,
}

/// What `POST /v1/volumes/{name}/move` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMoved {
    pub name: String,
    /// Node ids.
    pub from: String,
    pub to: String,
    /// Bytes of the streams copied (all passes), and the SHA-256 of the last pass's stream
    /// as sent and as the target received it.
    pub bytes: u64,
    pub sha256: String,
    /// Time from the start of the copy done in this call (the final pass, after a pre-copy)
    /// to the new home being recorded, in milliseconds.
    pub copy_ms: u64,
    /// The passes, in order: `pre-copy` then `final`, or one `copy`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passes: Vec<VolumePass>,
    /// Whether the copy on the old node was deleted (once a task runs on the new node, or at
    /// once when no task wants to run on the volume); otherwise why it was kept.
    pub source_removed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_kept_because: Option<String>,
}

/// A volume as its home node's agent sees it (`GET /v1/agent/volumes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalVolumeInfo {
    pub name: String,
    pub size_bytes: u64,
    /// The volume's size limit in bytes, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<u64>,
    /// Tasks on this node whose containers mount it now.
    #[serde(default)]
    pub in_use_by: Vec<String>,
}

/// A secret or a config: immutable named bytes handed to tasks as files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileObject {
    pub id: String,
    #[serde(flatten)]
    pub meta: Meta,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `sha256:…` of the data: shown instead of a secret's data.
    #[serde(default)]
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    /// Base64; never returned for secrets except to the node running a task that uses it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data: String,
}

/// `POST /v1/secrets`, `POST /v1/configs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileObjectCreate {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Base64 of the content (at most [`MAX_SECRET_BYTES`] decoded).
    pub data: String,
}

/// The files a node gets for one of its tasks (`GET /v1/nodes/{id}/tasks/{task}/files`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFiles {
    pub secrets: Vec<FileObject>,
    pub configs: Vec<FileObject>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_like_docker() {
        let m = parse_mount("type=volume,src=data,dst=/data,readonly").expect("volume");
        assert_eq!(
            (m.kind, m.source.as_str(), m.target.as_str(), m.readonly),
            (MountKind::Volume, "data", "/data", true)
        );
        let m = parse_mount(
            "source=db-{{.Task.Slot}},target=/var/lib/db,volume-nocopy,volume-label=a=b",
        )
        .expect("template");
        assert!(m.nocopy);
        assert_eq!(m.volume_labels.get("a").map(String::as_str), Some("b"));
        let vars = MountVars {
            service_id: "sid",
            service_name: "db",
            task_id: "tid",
            slot: Some(3),
            node_id: None,
        };
        assert_eq!(m.volume_name_for(vars), "db-3");
        let m = parse_mount("type=tmpfs,dst=/cache,tmpfs-size=64m,tmpfs-mode=1770").expect("tmpfs");
        assert_eq!((m.tmpfs_size, m.tmpfs_mode), (Some(64 << 20), Some(0o1770)));
        let m = parse_mount("type=bind,src=/srv/data,dst=/data,ro=false").expect("bind");
        assert!(!m.readonly);
        let m = parse_mount("dst=/anon").expect("anonymous volume");
        assert_eq!(m.source, "");
    }

    #[test]
    fn a_volume_size_limit_comes_from_volume_opt() {
        let m = parse_mount("src=db,dst=/data,volume-opt=size=512m").expect("size");
        assert_eq!(m.volume_size, Some(512 << 20));
        let m = parse_mount("dst=/data,volume-opt=size=2t").expect("anonymous, terabytes");
        assert_eq!(m.volume_size, Some(2 << 40));
        assert_eq!(
            parse_mount("src=db,dst=/data").expect("none").volume_size,
            None
        );
    }

    #[test]
    fn hostile_or_wrong_mounts_are_refused_with_the_form() {
        for (input, says) in [
            ("type=volume,src=data", "needs a target"),
            ("type=nfs,dst=/x", "use volume, bind or tmpfs"),
            ("src=../etc,dst=/x", "volume source"),
            ("src=a/b,dst=/x", "volume source"),
            ("src={{.Node.Hostname}},dst=/x", "the only templates"),
            ("src=data,dst=relative", "absolute"),
            ("src=data,dst=/", "cannot be /"),
            ("src=data,dst=/a/../../etc", "`..`"),
            ("type=bind,src=relative,dst=/x", "absolute host path"),
            ("type=bind,src=/srv/../etc,dst=/x", "`..`"),
            (
                "type=bind,src=/srv,dst=/x,volume-nocopy",
                "need type=volume",
            ),
            ("type=tmpfs,src=x,dst=/x", "no source"),
            ("type=tmpfs,dst=/x,tmpfs-mode=9", "octal"),
            ("type=tmpfs,dst=/x,tmpfs-size=lots", "64m"),
            ("type=tmpfs,dst=/x,tmpfs-size=99999999999999g", "64m"),
            ("src=data,dst=/x,readonly=maybe", "true or false"),
            ("src=data,dst=/x,propagation=shared", "unknown mount option"),
            ("src=data,dst=/x\ny,ro", "control characters"),
            ("src=data,dst=/x\0", "control characters"),
            ("type", "needs a value"),
            ("src=data,dst=/x,volume-opt=size=1m", "8m to 16t"),
            ("src=data,dst=/x,volume-opt=size=17t", "8m to 16t"),
            ("src=data,dst=/x,volume-opt=size=99999999999999999t", "64m"),
            ("src=data,dst=/x,volume-opt=size=", "64m"),
            ("src=data,dst=/x,volume-opt=type=nfs", "only size=SIZE"),
            ("src=data,dst=/x,volume-opt=size", "only size=SIZE"),
            ("type=tmpfs,dst=/x,volume-opt=size=64m", "needs type=volume"),
            (
                "type=bind,src=/srv,dst=/x,volume-opt=size=64m",
                "needs type=volume",
            ),
        ] {
            let e = parse_mount(input).expect_err(input);
            assert!(e.contains(says), "{input:?}: {e}");
        }
    }

    #[test]
    fn file_references_parse_like_swarm() {
        let r = parse_file_reference("db_pass", FileKind::Secret).expect("short");
        assert_eq!(r.target_path(FileKind::Secret), "/run/secrets/db_pass");
        assert_eq!(r.mode, 0o444);
        let r = parse_file_reference(
            "src=app,target=/etc/app.conf,uid=1000,gid=2,mode=0440",
            FileKind::Config,
        )
        .expect("long");
        assert_eq!(
            (
                r.target_path(FileKind::Config).as_str(),
                r.uid,
                r.gid,
                r.mode
            ),
            ("/etc/app.conf", 1000, 2, 0o440)
        );
        let r = parse_file_reference("src=app", FileKind::Config).expect("config default");
        assert_eq!(r.target_path(FileKind::Config), "/app");
        for (input, says) in [
            ("", "needs a name"),
            ("target=/x", "needs a name"),
            ("src=../x", "secret name"),
            ("src=a,target=../../etc/passwd", "`..`"),
            ("src=a,mode=999", "octal"),
            ("src=a,mode=7777", "0777"),
            ("src=a,uid=-1", "number"),
            ("src=a,colour=red", "unknown --secret option"),
            ("src=a,uid", "needs a value"),
        ] {
            let e = parse_file_reference(input, FileKind::Secret).expect_err(input);
            assert!(e.contains(says), "{input:?}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1mb"), Ok(1 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
    }
}
