//! Signal names as Docker accepts them (`STOPSIGNAL`, `--stop-signal`): `SIGQUIT`, `QUIT`,
//! `quit`, `3`, `SIGRTMIN+3`, `RTMAX-1`. Linux x86-64/arm64 numbering (the generic ABI).

/// The standard signals by number (index = number; 0 is not a signal).
const NAMES: [&str; 32] = [
    "", "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
    "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
    "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
];
/// glibc's SIGRTMIN: the kernel's 32 and 33 are taken by the C library's threads.
pub const SIGRTMIN: i32 = 34;
pub const SIGRTMAX: i32 = 64;
/// SIGTERM, what `stop` sends when neither the service nor the image names a signal.
pub const SIGTERM: i32 = 15;

/// Parses a signal name or number; the error says what is accepted.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    let bad = || {
        format!(
            "invalid signal {s:?}: give a name such as SIGTERM, QUIT or SIGRTMIN+3, \
             or a number from 1 to {SIGRTMAX}"
        )
    };
    let t = s.trim();
    if t.is_empty() || t.len() > 16 {
        return Err(bad());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<i32>()
            .ok()
            .filter(|n| (1..=SIGRTMAX).contains(n))
            .ok_or_else(bad);
    }
    let up = t.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    if let Some(n) = NAMES.iter().position(|n| !n.is_empty() && *n == name) {
        return i32::try_from(n).map_err(|_| bad());
    }
    let offset = |rest: &str| -> Option<i32> {
        if rest.is_empty() {
            return Some(0);
        }
        let (sign, digits) = rest.split_at(1);
        let n: i32 = digits
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| digits.parse().ok())??;
        match sign {
            "+" => Some(n),
            "-" => Some(-n),
            _ => None,
        }
    };
    let n = if let Some(rest) = name.strip_prefix("RTMIN") {
        offset(rest).filter(|o| *o >= 0).map(|o| SIGRTMIN + o)
    } else if let Some(rest) = name.strip_prefix("RTMAX") {
        offset(rest).filter(|o| *o <= 0).map(|o| SIGRTMAX + o)
    } else {
        None
    };
    n.filter(|n| (SIGRTMIN..=SIGRTMAX).contains(n))
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_parse_like_docker() {
        for (s, n) in [
            ("SIGTERM", 15),
            ("TERM", 15),
            ("sigquit", 3),
            ("SIGINT", 2),
            ("9", 9),
            ("SIGKILL", 9),
            ("SIGWINCH", 28),
            ("SIGRTMIN", 34),
            ("SIGRTMIN+3", 37),
            ("RTMAX-1", 63),
            ("SIGRTMAX", 64),
            (" SIGUSR1 ", 10),
        ] {
            assert_eq!(parse_signal(s), Ok(n), "{s}");
        }
    }

    #[test]
    fn hostile_or_wrong_input_is_refused_with_the_accepted_forms() {
        for s in [
            "",
            "0",
            "65",
            "-1",
            "+5",
            "SIG",
            "SIGFOO",
            "SIGRTMIN-1",
            "SIGRTMAX+1",
            "SIGRTMIN+31",
            "SIGRTMIN+",
            "SIGRTMIN++3",
            "SIGRTMIN+-3",
            "RTMIN+99999999999999999999",
            "99999999999999999999",
            "SIGTERM\0",
            "ＳＩＧＴＥＲＭ",
            "SIGTÉRM",
            "TERM TERM",
        ] {
            let e = parse_signal(s).expect_err(s);
            assert!(e.contains("SIGTERM"), "{s}: {e}");
        }
        let long = "SIGRTMIN+".to_string() + &"1".repeat(10_000);
        assert!(parse_signal(&long).is_err());
    }
}
