//! Container log files: JSON lines, size-rotated.
//!
//! Format, one object per line:
//! `{"ts":"2026-11-27T06:00:00.123456789Z","stream":"stdout","line":"hello"}`.
//! `ts` is RFC 3339 in UTC with exactly nine fractional digits, so timestamps compare as strings.
//! `line` has the trailing newline stripped; output that is not UTF-8 is converted lossily; a
//! line longer than [`MAX_LINE`] is split into several records.
//!
//! Rotation: the live file is `container.log` (whatever path the shim was given); when writing a
//! record would push it past `max_bytes`, it is renamed to `container.log.1`, the previous `.1`
//! becomes `.2`, and so on. At most `max_files` files are kept in total (the live one included),
//! the oldest being `container.log.<max_files-1>`.

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// A partial line is flushed as its own record once it reaches this many bytes.
pub const MAX_LINE: usize = 16 * 1024;

/// One record of a container log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// RFC 3339 UTC timestamp with nanoseconds.
    pub ts: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The line, without its trailing newline.
    pub line: String,
}

/// A `--since` value that is neither an RFC 3339 time nor a duration.
#[derive(Debug)]
pub struct BadSince(pub String);

impl std::fmt::Display for BadSince {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--since {:?}: use an RFC 3339 time (2026-01-02T15:04:05Z) or a duration like 10m",
            self.0
        )
    }
}

impl std::error::Error for BadSince {}

/// A `--since` value as the RFC 3339 time log records are compared with: an RFC 3339 time is
/// kept as it is, a duration (`10m`) counts back from `now`.
pub fn since_to_rfc3339(s: &str, now: SystemTime) -> Result<String, BadSince> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(rfc3339_nanos(
            now.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH),
        ));
    }
    // A time is kept as the client wrote it (records compare as text), but it must start
    // with a date: `YYYY-MM-DD`.
    let b = s.as_bytes();
    let date = b.len() >= 10
        && b[..10].iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        });
    if date {
        return Ok(s.to_string());
    }
    Err(BadSince(s.to_string()))
}

/// Formats a time as RFC 3339 UTC with nanoseconds (`YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`).
pub fn rfc3339_nanos(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// The current time, formatted by [`rfc3339_nanos`].
pub fn now_rfc3339() -> String {
    rfc3339_nanos(SystemTime::now())
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Path of rotated file number `n` (0 is the live file).
pub fn rotated_path(path: &Path, n: u32) -> PathBuf {
    if n == 0 {
        return path.to_path_buf();
    }
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Rotation policy: whether a record of `add` bytes must go to a fresh file.
pub fn needs_rotation(current: u64, add: u64, max_bytes: u64) -> bool {
    max_bytes > 0 && current > 0 && current + add > max_bytes
}

/// Writes JSON-lines records to a size-rotated file.
pub struct LogWriter {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    file: File,
    size: u64,
}

impl LogWriter {
    /// Opens (appending to) the live log file.
    pub fn open(path: &Path, max_bytes: u64, max_files: u32) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            // Container output may carry secrets: 0700 dir, 0600 files (for root only).
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let file = open_private(path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            path: path.to_path_buf(),
            max_bytes,
            max_files: max_files.max(1),
            file,
            size,
        })
    }

    /// Appends one record, rotating first if needed.
    pub fn write_record(&mut self, stream: &str, line: &[u8]) -> io::Result<()> {
        let rec = LogLine {
            ts: now_rfc3339(),
            stream: stream.to_string(),
            line: String::from_utf8_lossy(line).into_owned(),
        };
        let mut buf = serde_json::to_vec(&rec).map_err(io::Error::other)?;
        buf.push(b'\n');
        if needs_rotation(self.size, buf.len() as u64, self.max_bytes) {
            self.rotate()?;
        }
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.max_files > 1 {
            let _ = fs::remove_file(rotated_path(&self.path, self.max_files - 1));
            for n in (1..self.max_files - 1).rev() {
                let from = rotated_path(&self.path, n);
                if from.exists() {
                    fs::rename(&from, rotated_path(&self.path, n + 1))?;
                }
            }
            fs::rename(&self.path, rotated_path(&self.path, 1))?;
        } else {
            fs::remove_file(&self.path)?;
        }
        self.file = open_private(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// Opens a log file for appending, creating it 0600.
fn open_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Splits a stream of bytes into lines, keeping the partial tail between reads.
#[derive(Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes; calls `emit` for each complete line (without `\n`) and for each
    /// [`MAX_LINE`]-sized chunk of an overlong line.
    pub fn feed(&mut self, data: &[u8], mut emit: impl FnMut(&[u8])) {
        self.buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|b| *b == b'\n') {
            emit(&self.buf[start..start + pos]);
            start += pos + 1;
        }
        while self.buf.len() - start >= MAX_LINE {
            emit(&self.buf[start..start + MAX_LINE]);
            start += MAX_LINE;
        }
        self.buf.drain(..start);
    }

    /// Emits the unterminated tail, if any.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.buf.is_empty() {
            emit(&self.buf);
            self.buf.clear();
        }
    }
}

fn parse_lines(text: &str, out: &mut Vec<LogLine>) {
    for l in text.lines() {
        if let Ok(rec) = serde_json::from_str::<LogLine>(l) {
            out.push(rec);
        }
    }
}

/// Reads a container log, oldest record first, across rotated files.
///
/// `since` keeps records whose timestamp is at or after it (RFC 3339, as written by the shim);
/// `tail` keeps only the last N records after that filter. A missing log reads as empty.
pub fn read_logs(
    path: &Path,
    since: Option<&str>,
    tail: Option<usize>,
) -> io::Result<Vec<LogLine>> {
    let mut out = Vec::new();
    let mut n = 1;
    while rotated_path(path, n).exists() {
        n += 1;
    }
    for i in (0..n).rev() {
        match fs::read_to_string(rotated_path(path, i)) {
            Ok(text) => parse_lines(&text, &mut out),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if let Some(since) = since {
        out.retain(|l| l.ts.as_str() >= since);
    }
    if let Some(tail) = tail {
        let skip = out.len().saturating_sub(tail);
        out.drain(..skip);
    }
    Ok(out)
}

/// Follows the live log file, surviving rotation: call [`LogFollower::poll`] periodically.
pub struct LogFollower {
    path: PathBuf,
    reader: Option<(u64, BufReader<File>)>,
    partial: String,
}

impl LogFollower {
    /// Starts following at the current end of the live file (records already written are
    /// available through [`read_logs`]).
    pub fn from_end(path: &Path) -> io::Result<Self> {
        let mut f = LogFollower {
            path: path.to_path_buf(),
            reader: None,
            partial: String::new(),
        };
        if let Ok(file) = File::open(path) {
            let ino = inode(&file)?;
            let mut r = BufReader::new(file);
            r.seek(SeekFrom::End(0))?;
            f.reader = Some((ino, r));
        }
        Ok(f)
    }

    /// Returns records appended since the last call.
    pub fn poll(&mut self) -> io::Result<Vec<LogLine>> {
        let mut out = Vec::new();
        loop {
            if self.reader.is_none() {
                match File::open(&self.path) {
                    Ok(file) => self.reader = Some((inode(&file)?, BufReader::new(file))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                    Err(e) => return Err(e),
                }
            }
            let Some((ino, r)) = self.reader.as_mut() else {
                return Ok(out);
            };
            let mut chunk = String::new();
            r.read_to_string(&mut chunk)?;
            self.partial.push_str(&chunk);
            if let Some(pos) = self.partial.rfind('\n') {
                let complete: String = self.partial.drain(..=pos).collect();
                parse_lines(&complete, &mut out);
            }
            // Rotated away? Switch to the new live file once the old one is drained.
            let rotated = match fs::metadata(&self.path) {
                Ok(m) => std::os::unix::fs::MetadataExt::ino(&m) != *ino,
                Err(_) => false,
            };
            if !rotated {
                return Ok(out);
            }
            self.reader = None;
            self.partial.clear();
        }
    }
}

fn inode(f: &File) -> io::Result<u64> {
    Ok(std::os::unix::fs::MetadataExt::ino(&f.metadata()?))
}

/// Reads a whole file's lines (helper for tests and tools).
pub fn read_lines(path: &Path) -> io::Result<Vec<String>> {
    BufReader::new(File::open(path)?).lines().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn since_values_from_clients_parse_or_are_refused_without_panicking() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ten_min = rfc3339_nanos(now - Duration::from_secs(600));
        assert_eq!(since_to_rfc3339("10m", now).expect("duration"), ten_min);
        assert_eq!(
            since_to_rfc3339("0s", now).expect("zero"),
            rfc3339_nanos(now)
        );
        for t in [
            "2026-01-02T15:04:05Z",
            "2026-01-02T15:04:05+02:00",
            "2026-01-02",
        ] {
            assert_eq!(since_to_rfc3339(t, now).expect("rfc 3339"), t);
        }
        // Longer than the clock goes back: the epoch, not an underflow.
        let epoch = rfc3339_nanos(UNIX_EPOCH);
        assert_eq!(since_to_rfc3339("100years", now).expect("long ago"), epoch);
        for bad in [
            "",
            "abc",
            "-10m",
            "10",
            "é",
            "20é6-01-02T00:00:00Z",
            "\u{0}\u{0}\u{0}\u{0}-\u{0}\u{0}",
            "99999999999999999999999999y",
            "abcd-efghijkl",
            "2026-1-02T00:00:00Z",
        ] {
            let got = since_to_rfc3339(bad, now);
            assert!(got.is_err(), "{bad:?} gave {got:?}");
            let msg = got.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains("RFC 3339") && msg.contains("10m"), "{msg}");
        }
    }

    #[test]
    fn formats_rfc3339_with_nanos() {
        assert_eq!(rfc3339_nanos(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 5); // 2024-02-29T23:59:59
        assert_eq!(rfc3339_nanos(t), "2024-02-29T23:59:59.000000005Z");
        let t = UNIX_EPOCH + Duration::new(951_782_400, 0); // 2000-02-29
        assert_eq!(rfc3339_nanos(t), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn splits_lines_and_long_chunks() {
        let mut s = LineSplitter::default();
        let mut got: Vec<Vec<u8>> = Vec::new();
        s.feed(b"a\nbc", |l| got.push(l.to_vec()));
        s.feed(b"d\n\n", |l| got.push(l.to_vec()));
        assert_eq!(got, vec![b"a".to_vec(), b"bcd".to_vec(), b"".to_vec()]);
        got.clear();
        s.feed(&vec![b'x'; MAX_LINE + 3], |l| got.push(l.to_vec()));
        assert_eq!(got.len(), 1);
        s.finish(|l| got.push(l.to_vec()));
        assert_eq!(got[1], b"xxx".to_vec());
    }

    #[test]
    fn rotation_policy() {
        assert!(
            !needs_rotation(0, 500, 100),
            "an empty file always takes the record"
        );
        assert!(!needs_rotation(50, 50, 100));
        assert!(needs_rotation(51, 50, 100));
        assert!(!needs_rotation(1 << 40, 50, 0), "0 means unlimited");
    }

    #[test]
    fn rotates_and_reads_back_in_order() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("container.log");
        let mut w = LogWriter::open(&path, 200, 3)?;
        for i in 0..20 {
            w.write_record(
                if i % 2 == 0 { "stdout" } else { "stderr" },
                format!("line {i}").as_bytes(),
            )?;
        }
        assert!(rotated_path(&path, 1).exists());
        assert!(rotated_path(&path, 2).exists());
        assert!(!rotated_path(&path, 3).exists(), "at most max_files files");
        let all = read_logs(&path, None, None)?;
        let nums: Vec<usize> = all
            .iter()
            .filter_map(|l| l.line.strip_prefix("line ")?.parse().ok())
            .collect();
        assert!(
            nums.windows(2).all(|w| w[1] == w[0] + 1),
            "ordered: {nums:?}"
        );
        assert_eq!(*nums.last().unwrap_or(&0), 19);
        let tail = read_logs(&path, None, Some(2))?;
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[1].line, "line 19");
        let since = read_logs(&path, Some(&tail[1].ts), None)?;
        assert!(since.iter().all(|l| l.ts >= tail[1].ts));
        Ok(())
    }

    #[test]
    fn follower_sees_appends_across_rotation() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("container.log");
        let mut w = LogWriter::open(&path, 120, 2)?;
        w.write_record("stdout", b"before")?;
        let mut f = LogFollower::from_end(&path)?;
        assert!(f.poll()?.is_empty());
        let mut seen = Vec::new();
        for i in 0..6 {
            w.write_record("stdout", format!("n{i}").as_bytes())?;
            seen.extend(f.poll()?.into_iter().map(|l| l.line));
        }
        assert_eq!(seen, vec!["n0", "n1", "n2", "n3", "n4", "n5"]);
        Ok(())
    }
}
