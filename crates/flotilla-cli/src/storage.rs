//! `flotilla secret|config create|ls|inspect|rm` and
//! `flotilla volume create|ls|inspect|rm|prune|export`.

use std::io::{Read, Write};

use base64::Engine;
use http_body_util::BodyExt;
use hyper::Method;

use flotilla_api::Client;
use flotilla_types::{
    FileKind, FileObject, FileObjectCreate, Node, Volume, VolumeCreate, MAX_SECRET_BYTES,
};

use crate::client::{enc, get};
use crate::output::{add_row, ago, escape, print_json, print_table, table};
use crate::{CliError, FileCmd, Format, VolumeCmd};

pub(crate) fn labels(
    list: &[String],
) -> Result<std::collections::BTreeMap<String, String>, CliError> {
    let mut m = std::collections::BTreeMap::new();
    for kv in list {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        if k.is_empty() {
            return Err(CliError::usage(format!("--label {kv:?}: give KEY=VALUE")));
        }
        m.insert(k.to_string(), v.to_string());
    }
    Ok(m)
}

/// Reads at most the size limit (and one byte more, to tell the user it is too big).
fn read_data(file: &std::path::Path, kind: FileKind) -> Result<Vec<u8>, CliError> {
    let mut data = Vec::new();
    let limit = MAX_SECRET_BYTES as u64 + 1;
    let res = if file.as_os_str() == "-" {
        std::io::stdin().take(limit).read_to_end(&mut data)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(limit).read_to_end(&mut data))
    };
    res.map_err(|e| CliError::usage(format!("{}: {e}", file.display())))?;
    if data.len() > MAX_SECRET_BYTES {
        return Err(CliError::usage(format!(
            "{}: a {} holds at most 500 KiB",
            file.display(),
            kind.as_str()
        )));
    }
    if data.is_empty() {
        return Err(CliError::usage(format!(
            "{}: empty; a {} needs content",
            file.display(),
            kind.as_str()
        )));
    }
    Ok(data)
}

pub async fn files(client: &Client, kind: FileKind, cmd: FileCmd) -> Result<(), CliError> {
    let base = format!("/v1/{}s", kind.as_str());
    match cmd {
        FileCmd::Create { name, file, label } => {
            let data = read_data(&file, kind)?;
            let body = FileObjectCreate {
                name,
                labels: labels(&label)?,
                data: base64::engine::general_purpose::STANDARD.encode(&data),
            };
            let v: serde_json::Value = client.post_json(&base, &body).await?;
            println!("{}", v["id"].as_str().unwrap_or_default());
            Ok(())
        }
        FileCmd::Ls(f) => {
            let all: Vec<FileObject> = get(client, &base).await?;
            if f.format == Format::Json {
                return print_json(&all);
            }
            let mut t = table(&["ID", "NAME", "SIZE", "DIGEST", "CREATED"]);
            for o in &all {
                add_row(
                    &mut t,
                    vec![
                        o.id.clone(),
                        escape(&o.name).to_string(),
                        o.size.to_string(),
                        o.digest.chars().take(19).collect(),
                        ago(o.meta.created_at),
                    ],
                );
            }
            print_table(&t);
            Ok(())
        }
        FileCmd::Inspect { name, format: _ } => {
            let o: FileObject = get(client, &format!("{base}/{}", enc(&name))).await?;
            print_json(&o)
        }
        FileCmd::Rm { names } => {
            for n in names {
                client
                    .request(Method::DELETE, &format!("{base}/{}", enc(&n)), None)
                    .await?;
                println!("{n}");
            }
            Ok(())
        }
    }
}

/// A move under way in a few words: `pre-copy to m1: 512.0 MiB of 1.0 GiB (50%)`.
fn moving_line(m: &flotilla_types::VolumeMoving, to: &str) -> String {
    let pct = (m.bytes_done.min(m.bytes_total).saturating_mul(100))
        .checked_div(m.bytes_total)
        .map(|p| format!(" ({p}%)"))
        .unwrap_or_default();
    format!(
        "{} to {to}: {} of {}{pct}",
        m.pass,
        human(m.bytes_done),
        human(m.bytes_total)
    )
}

/// How often `volume move` asks how its move stands.
const MOVE_POLL: std::time::Duration = std::time::Duration::from_millis(250);
/// How often a line of progress is printed when stderr is not a terminal.
const MOVE_LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Shows the progress of volume `name`'s move until the caller drops this future: a bar on
/// stderr when it is a terminal, else a line when the pass changes and every
/// [`MOVE_LINE_EVERY`]. Never returns by itself (a failed poll just skips a beat).
async fn show_move_progress(client: &Client, name: &str, to: &str) {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    /// Clears the bar when the move's answer drops the future.
    struct Bar(Option<indicatif::ProgressBar>);
    impl Drop for Bar {
        fn drop(&mut self) {
            if let Some(b) = &self.0 {
                b.finish_and_clear();
            }
        }
    }
    let bar = Bar(tty.then(|| {
        let b = indicatif::ProgressBar::with_draw_target(
            Some(0),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b
    }));
    let mut last: Option<(String, std::time::Instant)> = None;
    let path = format!("/v1/volumes/{}", enc(name));
    loop {
        tokio::time::sleep(MOVE_POLL).await;
        let Ok(v) = get::<Volume>(client, &path).await else {
            continue;
        };
        let Some(m) = v.moving else { continue };
        match &bar.0 {
            Some(b) => {
                b.set_message(format!("{} to {}", m.pass, escape(to)));
                b.set_length(m.bytes_total.max(m.bytes_done));
                b.set_position(m.bytes_done);
            }
            None => {
                let due = match &last {
                    Some((pass, at)) => *pass != m.pass || at.elapsed() >= MOVE_LINE_EVERY,
                    None => true,
                };
                if due {
                    eprintln!("{}", escape(&moving_line(&m, to)));
                    last = Some((m.pass.clone(), std::time::Instant::now()));
                }
            }
        }
    }
}

/// `1.5 MiB`-style sizes.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub async fn volumes(client: &Client, cmd: VolumeCmd) -> Result<(), CliError> {
    match cmd {
        VolumeCmd::Create { name, node, label } => {
            let body = VolumeCreate {
                name,
                labels: labels(&label)?,
                node,
            };
            let v: Volume = client.post_json("/v1/volumes", &body).await?;
            println!("{}", v.name);
            Ok(())
        }
        VolumeCmd::Ls(f) => {
            let all: Vec<Volume> = get(client, "/v1/volumes").await?;
            if f.format == Format::Json {
                return print_json(&all);
            }
            let nodes: Vec<Node> = get(client, "/v1/nodes").await.unwrap_or_default();
            let node_name = |id: &Option<String>| match id {
                None => "-".to_string(),
                Some(id) => nodes
                    .iter()
                    .find(|n| &n.id == id)
                    .map(|n| n.spec.name.clone())
                    .unwrap_or_else(|| id.clone()),
            };
            let mut t = table(&["NAME", "DRIVER", "NODE", "SIZE", "USED BY", "MOVE"]);
            for v in &all {
                add_row(
                    &mut t,
                    vec![
                        escape(&v.name).to_string(),
                        v.driver.clone(),
                        escape(&node_name(&v.node_id)).to_string(),
                        match (v.size_bytes, v.size_limit) {
                            (Some(used), Some(limit)) => {
                                format!("{} / {}", human(used), human(limit))
                            }
                            (Some(used), None) => human(used),
                            (None, _) => "-".into(),
                        },
                        escape(&v.used_by.join(", ")).to_string(),
                        v.moving.as_ref().map_or_else(
                            || "-".to_string(),
                            |m| {
                                escape(&moving_line(m, &node_name(&Some(m.to.clone())))).to_string()
                            },
                        ),
                    ],
                );
            }
            print_table(&t);
            Ok(())
        }
        VolumeCmd::Inspect { name, format: _ } => {
            let v: Volume = get(client, &format!("/v1/volumes/{}", enc(&name))).await?;
            print_json(&v)
        }
        VolumeCmd::Rm { names, force } => {
            for n in names {
                let q = if force { "?force=true" } else { "" };
                client
                    .request(Method::DELETE, &format!("/v1/volumes/{}{q}", enc(&n)), None)
                    .await?;
                println!("{n}");
            }
            Ok(())
        }
        VolumeCmd::Prune => {
            let v: serde_json::Value = client.post_json("/v1/volumes/prune", &()).await?;
            let removed: Vec<String> =
                serde_json::from_value(v["removed"].clone()).unwrap_or_default();
            for n in &removed {
                println!("{}", escape(n));
            }
            if let Some(failed) = v["failed"].as_object().filter(|f| !f.is_empty()) {
                for (n, why) in failed {
                    eprintln!("{}: {}", escape(n), escape(why.as_str().unwrap_or("?")));
                }
                return Err(CliError::new("some volumes could not be removed"));
            }
            println!("Removed {} volumes", removed.len());
            Ok(())
        }
        VolumeCmd::Import { name, file } => {
            use futures::StreamExt;
            let reader: Box<dyn tokio::io::AsyncRead + Send + Unpin> = if file.as_os_str() == "-" {
                Box::new(tokio::io::stdin())
            } else {
                Box::new(
                    tokio::fs::File::open(&file)
                        .await
                        .map_err(|e| CliError::usage(format!("{}: {e}", file.display())))?,
                )
            };
            let frames = tokio_util::io::ReaderStream::with_capacity(reader, 256 << 10).map(|r| {
                r.map(hyper::body::Frame::data)
                    .map_err(|e| Box::new(e) as flotilla_api::upload::BoxError)
            });
            let body = http_body_util::StreamBody::new(frames);
            let resp = client
                .send_stream(
                    Method::POST,
                    &format!("/v1/volumes/{}/import", enc(&name)),
                    "application/x-tar",
                    Box::pin(body),
                )
                .await?;
            client.finish(resp).await?;
            println!("{name}");
            Ok(())
        }
        VolumeCmd::Move { name, to } => {
            // The copy takes as long as the data needs; then up to 2 minutes for a task.
            let long = client
                .clone()
                .with_timeout(std::time::Duration::from_secs(24 * 3600));
            let path = format!("/v1/volumes/{}/move", enc(&name));
            let req = flotilla_types::VolumeMove { to: to.clone() };
            let moved = long.post_json::<_, flotilla_types::VolumeMoved>(&path, &req);
            let shown = show_move_progress(client, &name, &to);
            tokio::pin!(moved);
            let m = tokio::select! {
                m = &mut moved => m,
                () = shown => moved.await,
            }?;
            for p in &m.passes {
                println!(
                    "{} pass: {} in {:.1} s, sha256 {} checked on both nodes",
                    escape(&p.pass),
                    human(p.bytes),
                    p.ms as f64 / 1000.0,
                    p.sha256
                );
            }
            println!(
                "moved volume {} from {} to {}: {} in {:.1} s, sha256 {} checked on both nodes",
                escape(&m.name),
                escape(&m.from),
                escape(&m.to),
                human(m.bytes),
                m.copy_ms as f64 / 1000.0,
                m.sha256
            );
            match m.source_kept_because {
                None => println!("the copy on the old node is deleted"),
                Some(why) => eprintln!("warning: {}", escape(&why)),
            }
            Ok(())
        }
        VolumeCmd::Export { name, output } => {
            let resp = client
                .send(
                    Method::GET,
                    &format!("/v1/volumes/{}/export", enc(&name)),
                    None,
                )
                .await?;
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                let bytes = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["message"].as_str().map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).to_string());
                return Err(CliError::new(format!("export {name}: {msg}")));
            }
            let mut out: Box<dyn Write> = match &output {
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .map_err(|e| CliError::usage(format!("{}: {e}", p.display())))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            while let Some(frame) = body.frame().await {
                let frame = frame
                    .map_err(|e| CliError::new(format!("export {name}: the stream broke: {e}")))?;
                if let Some(chunk) = frame.data_ref() {
                    out.write_all(chunk)
                        .map_err(|e| CliError::new(format!("writing the archive: {e}")))?;
                }
            }
            out.flush()
                .map_err(|e| CliError::new(format!("writing the archive: {e}")))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(5 << 30), "5.0 GiB");
    }

    #[test]
    fn a_move_in_a_few_words() {
        let m = |pass: &str, done: u64, total: u64| flotilla_types::VolumeMoving {
            to: "id".into(),
            pass: pass.into(),
            bytes_done: done,
            bytes_total: total,
        };
        assert_eq!(
            moving_line(&m("pre-copy", 512 << 20, 1 << 30), "m1"),
            "pre-copy to m1: 512.0 MiB of 1.0 GiB (50%)"
        );
        // tar headers make the stream a little larger than the volume: never over 100 %
        assert_eq!(
            moving_line(&m("final", 3 << 10, 2 << 10), "m1"),
            "final to m1: 3.0 KiB of 2.0 KiB (100%)"
        );
        assert_eq!(
            moving_line(&m("copy", 0, 0), "w1"),
            "copy to w1: 0 B of 0 B"
        );
    }
}
