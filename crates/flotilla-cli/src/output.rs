use std::borrow::Cow;
use std::fmt::Write as _;

use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};

/// A borderless, left-aligned table like the Docker CLI's.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().map(|h| h.to_string()));
    t
}

/// Adds a row, every cell passed through [`escape`]: cells hold what nodes and containers
/// reported (task messages, hostnames, names), which must not reach the terminal raw.
pub fn add_row<S: AsRef<str>>(t: &mut Table, cells: impl IntoIterator<Item = S>) {
    t.add_row(
        cells
            .into_iter()
            .map(|c| escape(c.as_ref()).into_owned())
            .collect::<Vec<String>>(),
    );
}

/// The table as printed: one line each, trailing blanks removed.
pub fn render_table(t: &Table) -> String {
    let mut out = String::new();
    for line in t.to_string().lines() {
        out.push_str(line.trim_end().trim_start_matches(' '));
        out.push('\n');
    }
    out
}

pub fn print_table(t: &Table) {
    print!("{}", render_table(t));
}

/// Whether `c` can change what a terminal shows beyond printing itself: C0 and C1 control
/// characters (ESC, CSI, BEL, CR, newline, backspace, …) and DEL, plus the bidirectional
/// overrides and isolates that reorder the text around them.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every character that could drive the terminal written out instead: `\x1b` for
/// ASCII control characters, `\u{9b}` for the others. Everything printed in human-readable
/// form that came from a node or a container goes through this (log lines of `service logs`
/// excepted: those are the container's output, printed raw like `docker logs`).
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !is_unsafe(c) {
            out.push(c);
        } else if c.is_ascii() {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

/// Like [`escape`] on each line, keeping the line breaks (for multi-line messages).
pub fn escape_lines(s: &str) -> String {
    s.split('\n')
        .map(|l| escape(l).into_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// JSON text with the control characters serde_json leaves raw (DEL, the C1 range, the bidi
/// controls) written as `\uXXXX` escapes: the same JSON value, safe on a terminal. Such
/// characters can only occur inside strings, where the escape means the same character.
pub fn json_safe(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        // Newlines of pretty-printed JSON are layout; inside strings serde escapes them.
        if is_unsafe(c) && c != '\n' {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

pub fn print_json<T: serde::Serialize>(v: &T) -> Result<(), crate::CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| crate::CliError::new(e.to_string()))?;
    println!("{}", json_safe(&s));
    Ok(())
}

/// "3 seconds ago" style age of a Unix-millisecond timestamp.
pub fn ago(ts_ms: u64) -> String {
    if ts_ms == 0 {
        return "never".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let secs = now.saturating_sub(ts_ms) / 1000;
    let d = std::time::Duration::from_secs(secs);
    format!("{} ago", humantime::format_duration(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_written_out() {
        assert_eq!(escape("plain text, ünïcode ✓"), "plain text, ünïcode ✓");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(escape("\u{1b}]0;pwned\u{7}"), "\\x1b]0;pwned\\x07");
        assert_eq!(escape("a\r\nb\tc\u{7f}"), "a\\x0d\\x0ab\\x09c\\x7f");
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(escape_lines("one\u{1b}[2J\ntwo"), "one\\x1b[2J\ntwo");
    }

    #[test]
    fn json_keeps_its_meaning() {
        let v = serde_json::json!({"m": "\u{1b}]0;x\u{7}\u{9b}2J\u{202e}"});
        let pretty = serde_json::to_string_pretty(&v).expect("json");
        let safe = json_safe(&pretty);
        assert!(!safe.chars().any(|c| is_unsafe(c) && c != '\n'), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).expect("still json");
        assert_eq!(back, v);
    }

    #[test]
    fn table_cells_are_escaped() {
        let mut t = table(&["A", "B"]);
        add_row(&mut t, ["x\u{1b}[31m", "two\nlines"]);
        let out = render_table(&t);
        assert!(!out.contains('\u{1b}'), "{out:?}");
        assert!(out.contains("x\\x1b[31m"), "{out}");
        assert!(out.contains("two\\x0alines"), "{out}");
        assert_eq!(out.lines().count(), 2, "{out}");
    }
}
