//! The trace format `warmpool simulate` replays: CSV with the header
//! `at_seconds,selector,duration_seconds`, one lease request per line, `at_seconds` from the
//! trace's start, the job holding its agent for `duration_seconds`. Lines starting with `#` are
//! comments; `# start: <RFC 3339>` gives the wall time of the trace's start (the default of
//! `--start`). Blank lines are ignored.
//!
//! Owns parsing (every bad line named by its number) and writing. Pure: no engine, no I/O
//! beyond reading and writing the text handed to it.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use super::{Error, Result};

/// The header line of a trace.
pub const HEADER: &str = "at_seconds,selector,duration_seconds";

/// One lease request of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceLease {
    /// When the request arrives, from the trace's start.
    pub at: Duration,
    /// The label expression (Jenkins syntax); empty matches any pool.
    pub selector: String,
    /// How long the job holds its agent once granted.
    pub duration: Duration,
}

/// A parsed trace, sorted by arrival.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// The leases, by `at`.
    pub leases: Vec<TraceLease>,
    /// The wall time of the trace's start, from a `# start:` comment.
    pub start: Option<SystemTime>,
}

impl Trace {
    /// When the last job ends (the end of the replay).
    pub fn end(&self) -> Duration {
        self.leases
            .iter()
            .map(|l| l.at + l.duration)
            .max()
            .unwrap_or_default()
    }

    /// The distinct selectors, in order of first appearance.
    pub fn selectors(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for l in &self.leases {
            if !out.contains(&l.selector) {
                out.push(l.selector.clone());
            }
        }
        out
    }
}

/// Reads a trace; `source` names it in errors.
pub fn load(path: &std::path::Path) -> Result<Trace> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    parse(&text, &path.display().to_string())
}

fn seconds(field: &str, what: &str) -> std::result::Result<Duration, String> {
    let v: f64 = field
        .trim()
        .parse()
        .map_err(|_| format!("{what} {:?} is not a number of seconds", field.trim()))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{what} {v} must be a finite number >= 0"));
    }
    if v > 10.0 * 365.0 * 86_400.0 {
        return Err(format!("{what} {v} is longer than 10 years"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Splits one CSV line into fields; a field may be quoted with `"` (a selector with a comma),
/// `""` inside quotes being one quote.
fn fields(line: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' if quoted => quoted = false,
            '"' if cur.trim().is_empty() && !was_quoted => {
                cur.clear();
                quoted = true;
                was_quoted = true;
            }
            ',' if !quoted => {
                out.push(std::mem::take(&mut cur));
                was_quoted = false;
            }
            c => cur.push(c),
        }
    }
    if quoted {
        return Err("a quoted field is not closed".into());
    }
    out.push(cur);
    Ok(out)
}

/// Parses a trace's text; `source` names it in errors. Every bad line is reported (up to 20),
/// each with its line number.
pub fn parse(text: &str, source: &str) -> Result<Trace> {
    let mut trace = Trace::default();
    let mut problems = Vec::new();
    let mut header = false;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            if let Some(v) = c.trim().strip_prefix("start:") {
                match humantime::parse_rfc3339_weak(v.trim()) {
                    Ok(t) => trace.start = Some(t),
                    Err(e) => problems.push(format!(
                        "line {n}: start {:?} is not an RFC 3339 time ({e})",
                        v.trim()
                    )),
                }
            }
            continue;
        }
        if !header {
            let cols: Vec<String> = line.split(',').map(|c| c.trim().to_string()).collect();
            if cols.join(",") != HEADER {
                problems.push(format!(
                    "line {n}: the header must be {HEADER:?}, found {line:?}"
                ));
                break;
            }
            header = true;
            continue;
        }
        let f = match fields(line) {
            Ok(f) => f,
            Err(e) => {
                problems.push(format!("line {n}: {e}"));
                continue;
            }
        };
        if f.len() != 3 {
            problems.push(format!(
                "line {n}: expected 3 fields ({HEADER}), found {}",
                f.len()
            ));
            continue;
        }
        let selector = f[1].trim().to_string();
        let parsed = (
            seconds(&f[0], "at_seconds"),
            crate::labels::Expr::parse(&selector),
            seconds(&f[2], "duration_seconds"),
        );
        match parsed {
            (Ok(at), Ok(_), Ok(duration)) => trace.leases.push(TraceLease {
                at,
                selector,
                duration,
            }),
            (a, s, d) => {
                let mut why = Vec::new();
                if let Err(e) = a {
                    why.push(e);
                }
                if let Err(e) = s {
                    why.push(format!("selector {selector:?}: {e}"));
                }
                if let Err(e) = d {
                    why.push(e);
                }
                problems.push(format!("line {n}: {}", why.join("; ")));
            }
        }
        if problems.len() >= 20 {
            problems.push("(stopped after 20 problems)".into());
            break;
        }
    }
    if !header && problems.is_empty() {
        problems.push(format!("the trace is empty: no header line {HEADER:?}"));
    }
    if !problems.is_empty() {
        return Err(Error::Trace {
            source_name: source.to_string(),
            problems,
        });
    }
    // Stable: leases at the same instant keep the file's order.
    trace.leases.sort_by_key(|l| l.at);
    Ok(trace)
}

fn quote(selector: &str) -> String {
    if selector.contains(',') || selector.contains('"') {
        format!("\"{}\"", selector.replace('"', "\"\""))
    } else {
        selector.to_string()
    }
}

/// Writes a trace as text (with a `# start:` comment when its start is known).
pub fn write(trace: &Trace) -> String {
    let mut out = String::with_capacity(32 * trace.leases.len() + 64);
    if let Some(s) = trace.start {
        let _ = writeln!(out, "# start: {}", humantime::format_rfc3339_seconds(s));
    }
    out.push_str(HEADER);
    out.push('\n');
    for l in &trace.leases {
        let _ = writeln!(
            out,
            "{},{},{}",
            secs_text(l.at),
            quote(&l.selector),
            secs_text(l.duration)
        );
    }
    out
}

/// Seconds with at most 3 decimals, trailing zeros dropped.
fn secs_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}", ms / 1000)
    } else {
        let s = format!("{}.{:03}", ms / 1000, ms % 1000);
        s.trim_end_matches('0').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_sorts() {
        let t = parse(
            "# a comment\n# start: 2026-01-05T00:00:00Z\nat_seconds,selector,duration_seconds\n5,linux && go,60\n0,\"linux || \"\"a,b\"\"\",1.5\n\n",
            "t.csv",
        )
        .unwrap();
        assert_eq!(t.leases.len(), 2);
        assert_eq!(t.leases[0].selector, "linux || \"a,b\"");
        assert_eq!(t.leases[0].duration, Duration::from_millis(1500));
        assert_eq!(t.leases[1].at, Duration::from_secs(5));
        assert!(t.start.is_some());
        assert_eq!(t.end(), Duration::from_secs(65));
        let again = parse(&write(&t), "again").unwrap();
        assert_eq!(again, t);
    }

    #[test]
    fn every_bad_line_is_named_by_its_number() {
        let e = parse(
            "at_seconds,selector,duration_seconds\n1,linux,10\nsoon,linux,10\n2,linux &&,10\n3,linux\n4,linux,-1\n",
            "bad.csv",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bad.csv"), "{e}");
        assert!(
            e.contains("line 3: at_seconds \"soon\" is not a number"),
            "{e}"
        );
        assert!(e.contains("line 4: selector \"linux &&\""), "{e}");
        assert!(e.contains("line 5: expected 3 fields"), "{e}");
        assert!(
            e.contains("line 6: duration_seconds -1 must be a finite number >= 0"),
            "{e}"
        );
        assert!(!e.contains("line 2"), "{e}");
    }

    #[test]
    fn header_required() {
        let e = parse("1,linux,10\n", "x").unwrap_err().to_string();
        assert!(e.contains("line 1: the header must be"), "{e}");
        let e = parse("", "x").unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }
}
