//! Schedule windows of a pool spec (`schedules:`): a 5-field cron expression that starts a
//! window, how long the window lasts, the IANA time zone the cron is read in, and the `minIdle`
//! (and optionally `maxTotal`) that apply while it is open.
//!
//! Owns the field names, their validation (one message per bad field, with its full path:
//! `pools[0].schedules[1].cron`) and compiling a window into the form the engine evaluates
//! ([`Window`]). Evaluating windows against a wall clock is pure and lives here too
//! ([`Window::last_start`], [`Window::next_start`]); when windows apply to sizing is the engine's
//! business (`engine/policy.rs`). Nothing here reads the clock.

use std::time::{Duration, SystemTime};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Dur, MAX_POOL_AGENTS};

/// The time zone a window's cron is read in when `timeZone` is not given.
pub const DEFAULT_TIME_ZONE: &str = "UTC";

fn default_time_zone() -> String {
    DEFAULT_TIME_ZONE.to_string()
}

fn is_default_time_zone(tz: &str) -> bool {
    tz == DEFAULT_TIME_ZONE
}

/// One schedule window: from each start the cron names, for `duration`, the pool keeps
/// `minIdle` idle agents (instead of the pool's `minIdle`) and, when given, at most `maxTotal`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Schedule {
    /// When the window starts: a 5-field cron expression (minute hour day-of-month month
    /// day-of-week), read in `timeZone`. Example: `0 8 * * 1-5` (08:00 Monday to Friday).
    pub cron: String,
    /// How long the window stays open after each start (elapsed time: `10h`).
    pub duration: Dur,
    /// IANA time zone the cron is read in (`Europe/Berlin`); default `UTC`.
    #[serde(
        default = "default_time_zone",
        skip_serializing_if = "is_default_time_zone"
    )]
    pub time_zone: String,
    /// Idle agents kept while the window is open (replaces the pool's `minIdle`).
    pub min_idle: u32,
    /// Cap on the pool's agents while the window is open (replaces the pool's `maxTotal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_total: Option<u32>,
}

/// A compiled schedule window, ready to be evaluated at a wall-clock time.
#[derive(Debug, Clone)]
pub struct Window {
    cron: croner::Cron,
    tz: jiff::tz::TimeZone,
    /// How long the window stays open after a start.
    pub duration: Duration,
    /// `minIdle` while open.
    pub min_idle: u32,
    /// `maxTotal` while open, when the window sets one.
    pub max_total: Option<u32>,
}

/// Parses a 5-field cron expression (no seconds, no year field).
fn parse_cron(text: &str) -> Result<croner::Cron, String> {
    if text.split_whitespace().count() != 5 && !text.trim_start().starts_with('@') {
        return Err(format!(
            "{text:?} is not a 5-field cron expression (minute hour day-of-month month day-of-week)"
        ));
    }
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Disallowed)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| format!("{text:?} is not a valid cron expression: {e}"))
}

/// A wall-clock time as a `jiff` timestamp (saturating far outside the supported range).
fn timestamp(t: SystemTime) -> jiff::Timestamp {
    jiff::Timestamp::try_from(t).unwrap_or(jiff::Timestamp::MAX)
}

impl Schedule {
    /// Compiles the window; the message names what is wrong (without the field path).
    pub fn compile(&self) -> Result<Window, (&'static str, String)> {
        let cron = parse_cron(&self.cron).map_err(|m| ("cron", m))?;
        let tz = jiff::tz::TimeZone::get(&self.time_zone).map_err(|_| {
            (
                "timeZone",
                format!(
                    "{:?} is not a known IANA time zone (like UTC or Europe/Berlin)",
                    self.time_zone
                ),
            )
        })?;
        let w = Window {
            cron,
            tz,
            duration: self.duration.0,
            min_idle: self.min_idle,
            max_total: self.max_total,
        };
        // A pattern that names no real day (`0 0 30 2 *`) never opens.
        let probe = std::time::UNIX_EPOCH + Duration::from_secs(946_684_800); // 2000-01-01
        if w.next_start(probe).is_none() {
            return Err((
                "cron",
                format!("{:?} never starts (it names no existing date)", self.cron),
            ));
        }
        Ok(w)
    }

    /// Semantic checks; one message per bad field, each prefixed with `prefix`
    /// (`pools[0].schedules[1].`). `pool_max_total` is the pool's own `maxTotal`.
    pub fn validate(&self, prefix: &str, pool_max_total: u32) -> Vec<String> {
        let mut p = Vec::new();
        if let Err((field, msg)) = self.compile() {
            p.push(format!("{prefix}{field}: {msg}"));
            // A bad cron hides a bad zone: check the zone on its own too.
            if field == "cron" && jiff::tz::TimeZone::get(&self.time_zone).is_err() {
                p.push(format!(
                    "{prefix}timeZone: {:?} is not a known IANA time zone (like UTC or Europe/Berlin)",
                    self.time_zone
                ));
            }
        }
        if self.duration.0.is_zero() {
            p.push(format!("{prefix}duration: must be longer than 0s"));
        }
        let cap = match self.max_total {
            Some(0) => {
                p.push(format!("{prefix}maxTotal: must be at least 1"));
                None
            }
            Some(m) if m > MAX_POOL_AGENTS => {
                p.push(format!(
                    "{prefix}maxTotal: {m} is above the limit of {MAX_POOL_AGENTS} agents a pool"
                ));
                None
            }
            Some(m) => Some(m),
            None => Some(pool_max_total),
        };
        if let Some(cap) = cap
            && self.min_idle > cap
        {
            let whose = if self.max_total.is_some() {
                "the window's maxTotal"
            } else {
                "the pool's maxTotal"
            };
            p.push(format!(
                "{prefix}minIdle: {} is above {whose} {cap}",
                self.min_idle
            ));
        }
        p
    }
}

impl Window {
    /// The latest start at or before `t`, if any.
    pub fn last_start(&self, t: SystemTime) -> Option<SystemTime> {
        let z = timestamp(t).to_zoned(self.tz.clone());
        self.cron
            .find_previous_occurrence(&z, true)
            .ok()
            .map(|z| SystemTime::from(z.timestamp()))
    }

    /// The first start strictly after `t`, if any.
    pub fn next_start(&self, t: SystemTime) -> Option<SystemTime> {
        let z = timestamp(t).to_zoned(self.tz.clone());
        self.cron
            .find_next_occurrence(&z, false)
            .ok()
            .map(|z| SystemTime::from(z.timestamp()))
    }

    /// When the window open at `t` closes (`None`: it is closed at `t`). A window is open from
    /// a start `s` while `s <= t < s + duration`; the latest start decides.
    pub fn open_until(&self, t: SystemTime) -> Option<SystemTime> {
        let end = self.last_start(t)? + self.duration;
        (end > t).then_some(end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        SystemTime::from(rfc3339.parse::<jiff::Timestamp>().unwrap())
    }

    fn window(cron: &str, dur: &str, tz: &str) -> Window {
        Schedule {
            cron: cron.into(),
            duration: Dur::parse(dur).unwrap(),
            time_zone: tz.into(),
            min_idle: 3,
            max_total: None,
        }
        .compile()
        .unwrap()
    }

    #[test]
    fn office_hours_in_berlin_follow_the_dst_change() {
        // Europe/Berlin moves to summer time on Sunday 2026-03-29 (02:00 CET -> 03:00 CEST).
        let w = window("0 8 * * 1-5", "10h", "Europe/Berlin");
        // Friday before: 08:00 CET = 07:00 UTC.
        assert_eq!(w.open_until(at("2026-03-27T06:59:59Z")), None);
        assert_eq!(
            w.open_until(at("2026-03-27T07:00:00Z")),
            Some(at("2026-03-27T17:00:00Z"))
        );
        assert_eq!(w.open_until(at("2026-03-27T17:00:00Z")), None);
        // The weekend: closed; the next start is Monday 08:00 CEST = 06:00 UTC.
        assert_eq!(w.open_until(at("2026-03-28T12:00:00Z")), None);
        assert_eq!(
            w.next_start(at("2026-03-28T12:00:00Z")),
            Some(at("2026-03-30T06:00:00Z"))
        );
        assert_eq!(w.open_until(at("2026-03-30T05:59:00Z")), None);
        assert_eq!(
            w.open_until(at("2026-03-30T06:00:00Z")),
            Some(at("2026-03-30T16:00:00Z"))
        );
        // Back to winter time on Sunday 2026-10-25: Monday 08:00 CET = 07:00 UTC again.
        assert_eq!(
            w.next_start(at("2026-10-24T12:00:00Z")),
            Some(at("2026-10-26T07:00:00Z"))
        );
    }

    #[test]
    fn a_window_starting_in_the_skipped_hour_still_opens() {
        // 02:30 does not exist in Berlin on 2026-03-29: the window opens once that night (at
        // the first instant after the gap: 03:00 CEST = 01:00 UTC), and on other nights at 02:30.
        let w = window("30 2 * * *", "1h", "Europe/Berlin");
        let s = w.last_start(at("2026-03-29T01:45:00Z")).unwrap();
        assert!(
            s >= at("2026-03-29T00:30:00Z") && s <= at("2026-03-29T01:30:00Z"),
            "{:?}",
            jiff::Timestamp::try_from(s)
        );
        assert!(w.open_until(at("2026-03-29T01:45:00Z")).is_some());
        assert_eq!(
            w.last_start(at("2026-03-30T01:00:00Z")),
            Some(at("2026-03-30T00:30:00Z"))
        );
    }

    #[test]
    fn a_window_longer_than_its_period_stays_open() {
        let w = window("0 * * * *", "90m", "UTC");
        assert_eq!(
            w.open_until(at("2026-01-01T10:20:00Z")),
            Some(at("2026-01-01T11:30:00Z"))
        );
    }

    #[test]
    fn validation_names_each_bad_field() {
        let bad = Schedule {
            cron: "0 8 * *".into(),
            duration: Dur::secs(0),
            time_zone: "Mars/Olympus".into(),
            min_idle: 20,
            max_total: Some(10),
        };
        let p = bad.validate("pools[0].schedules[1].", 5).join("\n");
        assert!(
            p.contains("pools[0].schedules[1].cron: \"0 8 * *\" is not a 5-field cron"),
            "{p}"
        );
        assert!(
            p.contains("pools[0].schedules[1].timeZone: \"Mars/Olympus\""),
            "{p}"
        );
        assert!(
            p.contains("pools[0].schedules[1].duration: must be longer than 0s"),
            "{p}"
        );
        assert!(
            p.contains("pools[0].schedules[1].minIdle: 20 is above the window's maxTotal 10"),
            "{p}"
        );
        let never = Schedule {
            cron: "0 0 30 2 *".into(),
            duration: Dur::secs(60),
            time_zone: "UTC".into(),
            min_idle: 1,
            max_total: None,
        };
        let p = never.validate("spec.schedules[0].", 5).join("\n");
        assert!(
            p.contains("spec.schedules[0].cron: \"0 0 30 2 *\" never starts"),
            "{p}"
        );
        let junk = Schedule {
            cron: "61 8 * * *".into(),
            ..never.clone()
        };
        let p = junk.validate("spec.schedules[0].", 5).join("\n");
        assert!(
            p.contains("spec.schedules[0].cron: \"61 8 * * *\" is not a valid cron"),
            "{p}"
        );
        let big = Schedule {
            cron: "0 8 * * *".into(),
            min_idle: 6,
            ..never
        };
        let p = big.validate("spec.schedules[0].", 5).join("\n");
        assert!(
            p.contains("spec.schedules[0].minIdle: 6 is above the pool's maxTotal 5"),
            "{p}"
        );
    }
}
