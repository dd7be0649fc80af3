//! The one builder of AgentPool status conditions, for engine pools and Jenkins pools alike.
//!
//! A condition is a `metav1.Condition`: `type`, `status`, `reason`, `message` and
//! `lastTransitionTime` are set on every one, and `observedGeneration` names the spec it was
//! computed for. `lastTransitionTime` is the time the condition's `status` last changed: it is
//! kept from the previous status while the status stays, and set to now when it flips (or when
//! the condition is new). Reasons and messages may change without a transition.
//!
//! Pure: the previous conditions and the clock are passed in.

use std::time::SystemTime;

use crate::k8s::crd::Condition;

/// What one condition should say now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// `Ready`, `Throttled`, `Degraded`...
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: String,
    /// For people.
    pub message: String,
}

/// A condition that is `True` when `on`, with `reason` and `message`.
pub fn desired(type_: &str, on: bool, reason: &str, message: impl Into<String>) -> Desired {
    Desired {
        type_: type_.into(),
        status: if on { "True" } else { "False" },
        reason: reason.into(),
        message: message.into(),
    }
}

/// `t` as a `metav1.Time`: RFC 3339, whole seconds, UTC.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The conditions for `desired`, in that order, each with `observed_generation` and the
/// `lastTransitionTime` of the same type in `previous` when its status is unchanged, else
/// `now`.
pub fn build(
    previous: &[Condition],
    observed_generation: Option<i64>,
    now: SystemTime,
    desired: Vec<Desired>,
) -> Vec<Condition> {
    let now = timestamp(now);
    desired
        .into_iter()
        .map(|d| {
            let last_transition_time = previous
                .iter()
                .find(|p| p.type_ == d.type_ && p.status == d.status)
                .map(|p| p.last_transition_time.clone())
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| now.clone());
            Condition {
                // Never empty: a 1.20 apiserver turns "" into null and rejects it.
                message: if d.message.is_empty() {
                    d.reason.clone()
                } else {
                    d.message
                },
                type_: d.type_,
                status: d.status.into(),
                reason: d.reason,
                last_transition_time,
                observed_generation,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn the_transition_time_stays_while_the_status_stays_and_moves_when_it_flips() {
        let first = build(
            &[],
            Some(1),
            at(0),
            vec![
                desired("Ready", false, "BelowMinIdle", "0 of 1"),
                desired("Degraded", false, "Healthy", ""),
            ],
        );
        assert_eq!(first[0].last_transition_time, timestamp(at(0)));
        assert_eq!(first[1].message, "Healthy", "never empty");
        assert_eq!(first[0].observed_generation, Some(1));
        // Same statuses, new reasons, messages and generation: no transition.
        let second = build(
            &first,
            Some(2),
            at(10),
            vec![
                desired("Ready", false, "BelowMinIdle", "0 of 2"),
                desired("Degraded", false, "Healthy", "ok"),
            ],
        );
        assert_eq!(second[0].last_transition_time, timestamp(at(0)));
        assert_eq!(second[1].last_transition_time, timestamp(at(0)));
        assert_eq!(second[0].observed_generation, Some(2));
        // Ready flips: only Ready moves.
        let third = build(
            &second,
            Some(2),
            at(20),
            vec![
                desired("Ready", true, "MinIdleReached", "2 of 2"),
                desired("Degraded", false, "Healthy", "ok"),
            ],
        );
        assert_eq!(third[0].last_transition_time, timestamp(at(20)));
        assert_eq!(third[1].last_transition_time, timestamp(at(0)));
        // A condition without a time (written by an older warmpool) gets one.
        let mut old = third.clone();
        old[1].last_transition_time.clear();
        let fourth = build(
            &old,
            Some(2),
            at(30),
            vec![desired("Degraded", false, "Healthy", "ok")],
        );
        assert_eq!(fourth[0].last_transition_time, timestamp(at(30)));
    }
}
