//! Health probes of a running task: exec probes inside the container through the OCI runtime,
//! HTTP and TCP probes from the node to the task's address.

use std::time::Duration;

use flotilla_types::{HealthCheck, HealthProbe};

use super::ports::NodeRuntime;

/// The most of a probe's output kept for the task's status (Docker keeps 4 KiB; a status
/// message is a summary).
const MAX_OUTPUT: usize = 512;

/// One probe's outcome: healthy or not, and what it printed or why it failed (for the task's
/// status message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub ok: bool,
    pub output: String,
}

impl ProbeResult {
    fn fail(output: impl Into<String>) -> ProbeResult {
        ProbeResult {
            ok: false,
            output: output.into(),
        }
    }
}

/// Runs one health probe. Exec probes run inside the container through the OCI runtime.
pub async fn probe(
    rt: &dyn NodeRuntime,
    id: &str,
    addr: Option<&str>,
    h: &flotilla_types::HealthCheck,
) -> ProbeResult {
    let timeout = Duration::from_nanos(h.timeout).max(Duration::from_millis(100));
    let timed_out = || ProbeResult::fail(format!("timed out after {}", fmt_duration(timeout)));
    match &h.probe {
        HealthProbe::Exec { cmd } => {
            let (runtime, root) = rt.oci_runtime(id);
            let child = match tokio::process::Command::new(runtime)
                .arg("--root")
                .arg(root)
                .args(["exec", id, "/bin/sh", "-c", cmd])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
            {
                Ok(c) => c,
                Err(e) => return ProbeResult::fail(format!("exec: {e}")),
            };
            match tokio::time::timeout(timeout, child.wait_with_output()).await {
                Ok(Ok(out)) => {
                    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                    text.push_str(&String::from_utf8_lossy(&out.stderr));
                    let mut text = clip(text.trim());
                    if !out.status.success() && text.is_empty() {
                        text = match out.status.code() {
                            Some(c) => format!("exit status {c}"),
                            None => "killed by a signal".into(),
                        };
                    }
                    ProbeResult {
                        ok: out.status.success(),
                        output: text,
                    }
                }
                Ok(Err(e)) => ProbeResult::fail(format!("exec: {e}")),
                Err(_) => timed_out(),
            }
        }
        // Network probes go from the node to the task's address.
        HealthProbe::Http { path, port } => match addr {
            Some(a) => match tokio::time::timeout(timeout, http_probe(a, *port, path)).await {
                Ok(r) => r,
                Err(_) => timed_out(),
            },
            None => ProbeResult::fail("the task has no address"),
        },
        HealthProbe::Tcp { port } => match addr {
            Some(a) => {
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((a, *port)))
                    .await
                {
                    Ok(Ok(_)) => ProbeResult {
                        ok: true,
                        output: String::new(),
                    },
                    Ok(Err(e)) => ProbeResult::fail(format!("connect {a}:{port}: {e}")),
                    Err(_) => timed_out(),
                }
            }
            None => ProbeResult::fail("the task has no address"),
        },
    }
}

/// `GET path` over HTTP/1.0; a 2xx or 3xx status is healthy (as Kubernetes' httpGet probe).
async fn http_probe(addr: &str, port: u16, path: &str) -> ProbeResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = match tokio::net::TcpStream::connect((addr, port)).await {
        Ok(s) => s,
        Err(e) => return ProbeResult::fail(format!("connect {addr}:{port}: {e}")),
    };
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}:{port}\r\nUser-Agent: flotilla-health\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return ProbeResult::fail(format!("GET {path}: {e}"));
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return ProbeResult::fail(format!("GET {path}: {e}")),
        }
    }
    // "HTTP/1.x NNN"
    let code = std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(|l| l.get(9..12))
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(c) => ProbeResult {
            ok: (200..400).contains(&c),
            output: format!("GET {path}: HTTP {c}"),
        },
        None => ProbeResult::fail(format!("GET {path}: not an HTTP response")),
    }
}

/// At most [`MAX_OUTPUT`] bytes of `s`, cut at a character boundary.
fn clip(s: &str) -> String {
    if s.len() <= MAX_OUTPUT {
        return s.to_string();
    }
    let mut end = MAX_OUTPUT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn fmt_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Docker's defaults for an image health check's missing fields.
const IMAGE_DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const IMAGE_DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const IMAGE_DEFAULT_RETRIES: u32 = 3;
/// Longest command an image may declare as its health check.
const MAX_TEST_LEN: usize = 4096;

/// Reads an image config's `Healthcheck` (untrusted: it comes with the image). `["CMD-SHELL",
/// cmd]` runs with `sh -c`; `["CMD", arg...]` runs the arguments, each quoted for the shell;
/// `["NONE"]`, an empty or malformed test gives `None`. Durations are nanoseconds; zero or
/// missing ones take Docker's defaults.
pub fn from_image(v: &serde_json::Value) -> Option<HealthCheck> {
    let test: Vec<&str> = v
        .get("Test")?
        .as_array()?
        .iter()
        .map(|a| a.as_str())
        .collect::<Option<_>>()?;
    let cmd = match test.split_first()? {
        (&"CMD-SHELL", [cmd]) => cmd.to_string(),
        (&"CMD", args) if !args.is_empty() => args
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" "),
        _ => return None,
    };
    if cmd.trim().is_empty() || cmd.len() > MAX_TEST_LEN || cmd.contains('\0') {
        return None;
    }
    let nanos = |key: &str, default: Duration| {
        v.get(key)
            .and_then(|n| n.as_u64())
            .filter(|n| *n > 0)
            .unwrap_or(default.as_nanos() as u64)
    };
    Some(HealthCheck {
        probe: HealthProbe::Exec { cmd },
        interval: nanos("Interval", IMAGE_DEFAULT_INTERVAL),
        timeout: nanos("Timeout", IMAGE_DEFAULT_TIMEOUT),
        retries: v
            .get("Retries")
            .and_then(|n| n.as_u64())
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .unwrap_or(IMAGE_DEFAULT_RETRIES),
        start_period: v.get("StartPeriod").and_then(|n| n.as_u64()).unwrap_or(0),
        start_interval: v.get("StartInterval").and_then(|n| n.as_u64()).unwrap_or(0),
    })
}

/// Quotes one argument for `sh -c` (single quotes; a quote inside is closed, escaped, reopened).
fn shell_quote(a: &str) -> String {
    format!("'{}'", a.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cmd_of(h: &HealthCheck) -> &str {
        match &h.probe {
            HealthProbe::Exec { cmd } => cmd,
            _ => "",
        }
    }

    #[test]
    fn image_health_checks_read_like_docker() {
        let h = from_image(
            &json!({"Test": ["CMD", "redis-cli", "ping"], "Interval": 2_000_000_000u64,
            "Timeout": 1_000_000_000u64, "Retries": 5, "StartPeriod": 3_000_000_000u64}),
        )
        .expect("CMD");
        assert_eq!(cmd_of(&h), "'redis-cli' 'ping'");
        assert_eq!(
            (h.interval, h.timeout, h.retries, h.start_period),
            (2_000_000_000, 1_000_000_000, 5, 3_000_000_000)
        );
        let h = from_image(&json!({"Test": ["CMD-SHELL", "pg_isready || exit 1"]})).expect("shell");
        assert_eq!(cmd_of(&h), "pg_isready || exit 1");
        assert_eq!(
            (h.interval, h.timeout, h.retries),
            (30_000_000_000, 30_000_000_000, 3)
        );
        let h = from_image(&json!({"Test": ["CMD", "echo", "it's"]})).expect("quote");
        assert_eq!(cmd_of(&h), "'echo' 'it'\\''s'");
    }

    #[test]
    fn an_image_start_interval_is_kept_and_long_output_clipped() {
        let h = from_image(&json!({"Test": ["CMD", "true"], "StartInterval": 1_000_000_000u64}))
            .expect("CMD");
        assert_eq!(h.start_interval, 1_000_000_000);
        let h = from_image(&json!({"Test": ["CMD", "true"]})).expect("CMD");
        assert_eq!(h.start_interval, 0, "0 = the agent's default");
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(MAX_OUTPUT);
        let c = clip(&long);
        assert!(
            c.len() <= MAX_OUTPUT + "…".len() && c.ends_with('…'),
            "{}",
            c.len()
        );
    }

    #[tokio::test]
    async fn network_probes_say_why_they_failed() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        let got = http_probe("127.0.0.1", port, "/").await;
        assert!(!got.ok);
        assert!(
            got.output
                .starts_with(&format!("connect 127.0.0.1:{port}: ")),
            "{got:?}"
        );
    }

    #[test]
    fn hostile_or_disabled_image_health_checks_are_ignored() {
        let long = "x".repeat(MAX_TEST_LEN + 1);
        for v in [
            json!(null),
            json!("CMD true"),
            json!({}),
            json!({"Test": []}),
            json!({"Test": ["NONE"]}),
            json!({"Test": ["CMD"]}),
            json!({"Test": ["CMD-SHELL"]}),
            json!({"Test": ["CMD-SHELL", "a", "b"]}),
            json!({"Test": ["CMD-SHELL", "   "]}),
            json!({"Test": ["CMD-SHELL", long]}),
            json!({"Test": ["CMD-SHELL", "a\u{0}b"]}),
            json!({"Test": ["CMD", 1, 2]}),
            json!({"Test": ["EXEC", "true"]}),
            json!({"Test": "CMD-SHELL true"}),
        ] {
            assert!(from_image(&v).is_none(), "{v}");
        }
        let h = from_image(
            &json!({"Test": ["CMD", "true"], "Interval": -5, "Timeout": "1s",
            "Retries": 99_999_999_999u64, "StartPeriod": 1.5}),
        )
        .expect("bad numbers fall back to the defaults");
        assert_eq!(
            (h.interval, h.timeout, h.retries, h.start_period),
            (30_000_000_000, 30_000_000_000, 3, 0)
        );
    }
}
