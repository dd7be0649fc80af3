//! Cleanup and health hooks: commands a pool's agents run between leases.
//!
//! Owns the pool spec's `hooks` block (its fields, defaults and validation), the result an agent reports for each hook in `ready` ([`HookResult`]), and the one
//! decision made from those results: whether the agent is reused or recycled, and why
//! ([`verdict`]). Pure: the agent runs the commands (`agent/hooks.rs`), the engine acts on the
//! verdict; nothing here spawns a process or does I/O.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::Dur;

/// Bytes of a hook's stdout and of its stderr kept for the report (the last ones written).
pub const EXCERPT_BYTES: usize = 2048;

/// Default `hooks.cleanup.timeout`.
pub const DEFAULT_CLEANUP_TIMEOUT: Dur = Dur::secs(300);
/// Default `hooks.health.timeout`.
pub const DEFAULT_HEALTH_TIMEOUT: Dur = Dur::secs(60);

/// Commands the agent runs after every lease it is reused after, once leftover processes are
/// killed and the workspace is wiped: first `cleanup`, then `health`. A hook that fails recycles
/// the agent instead of returning it to idle.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Hooks {
    /// Cleans what the workspace wipe cannot reach (a sidecar Docker daemon's containers and
    /// images, caches outside the workspace). Failing (non-zero exit, timeout) recycles the agent
    /// with reason `cleanup-failed`; the health hook is then not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cleanup: Option<CleanupHook>,
    /// Decides whether the agent is fit for another lease. Failing (non-zero exit, timeout, or
    /// more than `maxOutputBytes` on stdout) recycles the agent with reason `health-check-failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthHook>,
}

/// `hooks.cleanup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CleanupHook {
    /// Program and arguments (no shell: write `[sh, -c, "..."]` for one), run in the workspace
    /// in its own process group.
    pub command: Vec<String>,
    /// The hook's whole process group is killed after this long, and the hook has failed.
    #[serde(default = "cleanup_timeout")]
    pub timeout: Dur,
}

/// `hooks.health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthHook {
    /// Program and arguments (no shell: write `[sh, -c, "..."]` for one), run in the workspace
    /// in its own process group.
    pub command: Vec<String>,
    /// The hook's whole process group is killed after this long, and the check has failed.
    #[serde(default = "health_timeout")]
    pub timeout: Dur,
    /// The check fails when the command writes more than this many bytes to stdout, whatever
    /// its exit code (0: it must print nothing, like `find /cache -newer ...`). No limit when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
}

fn cleanup_timeout() -> Dur {
    DEFAULT_CLEANUP_TIMEOUT
}

fn health_timeout() -> Dur {
    DEFAULT_HEALTH_TIMEOUT
}

/// Which hook a result is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    /// `hooks.cleanup`.
    Cleanup,
    /// `hooks.health`.
    Health,
}

impl HookKind {
    /// Lowercase name (`WARMPOOL_HOOK` in the hook's environment).
    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::Cleanup => "cleanup",
            HookKind::Health => "health",
        }
    }
}

/// How one hook run ended, as the agent reports it in `ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookResult {
    /// The hook.
    pub hook: HookKind,
    /// Exit code, when the command exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal number, when it was killed by one (also after a timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Killed because its timeout passed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// The command could not be started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long it ran, in milliseconds.
    #[serde(default)]
    pub duration_ms: u64,
    /// Bytes it wrote to stdout in all.
    #[serde(default)]
    pub stdout_bytes: u64,
    /// Bytes it wrote to stderr in all.
    #[serde(default)]
    pub stderr_bytes: u64,
    /// The last [`EXCERPT_BYTES`] of its stdout (lossy UTF-8).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stdout: String,
    /// The last [`EXCERPT_BYTES`] of its stderr (lossy UTF-8).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr: String,
}

impl HookResult {
    /// True when the command ran and exited 0 within its timeout.
    pub fn exited_zero(&self) -> bool {
        self.error.is_none() && !self.timed_out && self.exit_code == Some(0)
    }

    /// How the command ended, in words: `exit code 3`, `timed out after 5s (killed by signal
    /// 9)`, `could not start: ...`.
    pub fn ending(&self) -> String {
        if let Some(e) = &self.error {
            return format!("could not start: {e}");
        }
        let took = Dur(Duration::from_millis(self.duration_ms));
        match (self.timed_out, self.exit_code, self.signal) {
            (true, _, _) => format!("timed out after {took}; its process group was killed"),
            (false, Some(c), _) => format!("exit code {c}"),
            (false, None, Some(s)) => format!("killed by signal {s}"),
            (false, None, None) => "ended without a status".into(),
        }
    }

    /// The excerpt worth showing a person: stderr, or stdout when stderr is empty.
    pub fn excerpt(&self) -> &str {
        let e = self.stderr.trim();
        if e.is_empty() { self.stdout.trim() } else { e }
    }
}

/// Why the hooks an agent ran after a lease mean it must not be reused, or None when it may.
/// `spec` is the pool's current `hooks`; a configured hook the agent reported no result for
/// (an agent that predates hooks) fails too, so an unchecked agent is never reused.
pub fn verdict(spec: &Hooks, results: &[HookResult]) -> Option<(HookKind, String)> {
    let result = |kind| results.iter().find(|r| r.hook == kind);
    let with_excerpt = |msg: String, r: &HookResult| match r.excerpt() {
        "" => msg,
        x => format!("{msg}: {x}"),
    };
    if spec.cleanup.is_some() {
        match result(HookKind::Cleanup) {
            None => return Some((HookKind::Cleanup, "agent reported no cleanup result".into())),
            Some(r) if !r.exited_zero() => {
                let msg = format!("cleanup hook {}", r.ending());
                return Some((HookKind::Cleanup, with_excerpt(msg, r)));
            }
            Some(_) => {}
        }
    }
    if let Some(h) = &spec.health {
        match result(HookKind::Health) {
            None => return Some((HookKind::Health, "agent reported no health result".into())),
            Some(r) if !r.exited_zero() => {
                let msg = format!("health hook {}", r.ending());
                return Some((HookKind::Health, with_excerpt(msg, r)));
            }
            Some(r) if h.max_output_bytes.is_some_and(|max| r.stdout_bytes > max) => {
                let msg = format!(
                    "health hook printed {} bytes (maxOutputBytes {})",
                    r.stdout_bytes,
                    h.max_output_bytes.unwrap_or_default()
                );
                return Some((HookKind::Health, with_excerpt(msg, r)));
            }
            Some(_) => {}
        }
    }
    None
}

impl Hooks {
    /// True when no hook is configured.
    pub fn is_empty(&self) -> bool {
        self.cleanup.is_none() && self.health.is_none()
    }

    /// The longest the hooks can take together (their timeouts): added to the engine's cleanup
    /// deadline, so a slow but working hook is not mistaken for a stuck agent.
    pub fn budget(&self) -> Duration {
        self.cleanup
            .as_ref()
            .map_or(Duration::ZERO, |h| h.timeout.0)
            + self.health.as_ref().map_or(Duration::ZERO, |h| h.timeout.0)
    }

    /// Semantic checks; one message per bad field, each prefixed with `prefix` (`pools[0].`).
    pub fn validate(&self, prefix: &str) -> Vec<String> {
        let mut p = Vec::new();
        let mut check = |name: &str, command: &[String], timeout: Dur| {
            if command.first().is_none_or(|c| c.is_empty()) {
                p.push(format!("{prefix}hooks.{name}.command: must name a program"));
            }
            if timeout.0.is_zero() {
                p.push(format!(
                    "{prefix}hooks.{name}.timeout: must be longer than 0s"
                ));
            }
        };
        if let Some(c) = &self.cleanup {
            check("cleanup", &c.command, c.timeout);
        }
        if let Some(h) = &self.health {
            check("health", &h.command, h.timeout);
        }
        p
    }
}

#[cfg(test)]
mod tests;
