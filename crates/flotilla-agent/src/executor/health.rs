//! Health probes of a running task: exec probes inside the container through the OCI runtime,
//! HTTP and TCP probes from the node to the task's address.

use std::time::Duration;

use flotilla_types::HealthProbe;

use super::ports::NodeRuntime;

/// Runs one health probe. Exec probes run inside the container through the OCI runtime.
pub async fn probe(
    rt: &dyn NodeRuntime,
    id: &str,
    addr: Option<&str>,
    h: &flotilla_types::HealthCheck,
) -> bool {
    let timeout = Duration::from_nanos(h.timeout).max(Duration::from_millis(100));
    match &h.probe {
        HealthProbe::Exec { cmd } => {
            let (runtime, root) = rt.oci_runtime(id);
            let mut child = match tokio::process::Command::new(runtime)
                .arg("--root")
                .arg(root)
                .args(["exec", id, "/bin/sh", "-c", cmd])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
            {
                Ok(c) => c,
                Err(_) => return false,
            };
            matches!(
                tokio::time::timeout(timeout, child.wait()).await,
                Ok(Ok(st)) if st.success()
            )
        }
        // Network probes go from the node to the task's address.
        HealthProbe::Http { path, port } => match addr {
            Some(a) => http_probe(a, *port, path, timeout).await,
            None => false,
        },
        HealthProbe::Tcp { port } => match addr {
            Some(a) => matches!(
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect((a, *port))).await,
                Ok(Ok(_))
            ),
            None => false,
        },
    }
}

/// `GET path` over HTTP/1.0; a 2xx or 3xx status is healthy (as Kubernetes' httpGet probe).
async fn http_probe(addr: &str, port: u16, path: &str, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let run = async {
        let mut s = tokio::net::TcpStream::connect((addr, port)).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: {addr}:{port}\r\nUser-Agent: flotilla-health\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let k = s.read(&mut buf[n..]).await.ok()?;
            if k == 0 {
                break;
            }
            n += k;
        }
        // "HTTP/1.x NNN"
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        let code: u16 = line.get(9..12)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    matches!(tokio::time::timeout(timeout, run).await, Ok(Some(true)))
}
