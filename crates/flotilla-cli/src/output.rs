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

pub fn print_table(t: &Table) {
    for line in t.to_string().lines() {
        println!("{}", line.trim_end().trim_start_matches(' '));
    }
}

pub fn print_json<T: serde::Serialize>(v: &T) -> Result<(), crate::CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| crate::CliError::new(e.to_string()))?;
    println!("{s}");
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
