//! The WebSocket remoting protocol (version 1): messages between the hub and agents, and
//! between the lease API's exec socket and `warmpool run`. Documented in docs/PROTOCOL.md.
//!
//! Control messages are JSON text frames tagged by `type`; process output travels in binary
//! frames `[stream: u8][execId: u64 big-endian][bytes]`. This module only encodes and decodes;
//! it owns no sockets.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::Health;

/// Protocol version spoken by this build. Agents with another version are refused.
pub const PROTOCOL_VERSION: u32 = 1;
/// Default largest frame or message accepted, in bytes.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Largest output chunk an agent puts in one binary frame.
pub const OUTPUT_CHUNK_BYTES: usize = 32 * 1024;
/// Bytes of header in a binary output frame.
pub const OUTPUT_HEADER_BYTES: usize = 9;

/// Close codes the hub uses (4000-4999 are application codes in RFC 6455).
pub mod close {
    /// A message that is not valid for the current state, or not understood.
    pub const PROTOCOL_VIOLATION: u16 = 4400;
    /// The token does not match the agent id.
    pub const INVALID_TOKEN: u16 = 4401;
    /// The agent id is not one the service provisioned.
    pub const UNKNOWN_AGENT: u16 = 4404;
    /// No hello within the handshake timeout.
    pub const HELLO_TIMEOUT: u16 = 4408;
    /// A live connection already exists for this agent id.
    pub const DUPLICATE_AGENT: u16 = 4409;
    /// The agent is being terminated by the service.
    pub const TERMINATED: u16 = 4410;
    /// The agent speaks another protocol version.
    pub const UNSUPPORTED_VERSION: u16 = 4426;
    /// The agent did not read its messages fast enough; its send queue filled.
    pub const SLOW_CONSUMER: u16 = 4429;
    /// An external pool has `maxTotal` agents already, or a join names no external pool.
    pub const POOL_FULL: u16 = 4503;
    /// Standard code: message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Standard code: going away (service shutting down, agent drained).
    pub const GOING_AWAY: u16 = 1001;
    /// Standard code: try again later. This instance is a standby or is still adopting the
    /// pods a previous one left (a takeover is under way): reconnect soon, without backing off.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Messages an agent sends to the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum AgentMessage {
    /// First message on every connection.
    Hello {
        /// Protocol version the agent speaks.
        protocol: u32,
        /// The agent id the service gave it.
        agent_id: String,
        /// The pool it believes it belongs to.
        #[serde(default)]
        pool: Option<String>,
        /// HMAC-SHA256(server key, agent id), hex; or, for an agent joining an external
        /// pool, that pool's join token (then `pool` is required and `agentId` is the
        /// machine's own name).
        token: String,
        /// Labels the agent reports (informational; the pool's labels are authoritative).
        #[serde(default)]
        labels: Vec<String>,
        /// A lease the agent is still serving (reconnect, restart adoption). Restored only
        /// with a valid `leaseToken`; otherwise ignored (the agent registers without it).
        #[serde(default)]
        lease: Option<String>,
        /// The token the hub sent with `leased` for that lease.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease_token: Option<String>,
        /// Leases this agent has served since it started (restart adoption: `maxUses` keeps
        /// counting across a service restart without patching pods on the lease path).
        #[serde(default)]
        uses: u32,
        /// Health at connect time.
        #[serde(default)]
        health: Health,
        /// The execs this agent still holds (running, or finished with output or an exit the
        /// hub may not have received). Present, even empty, when the agent keeps execs across
        /// connections and answers `attach`; absent from agents that do not (they stop their
        /// execs when the connection drops): the hub tells the two apart by this field.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        execs: Option<Vec<ExecReport>>,
        /// The agent acts on a `release` with `quiet` (drops the lease, answers nothing unless
        /// it finds something to clean after all). Absent: the hub sends every `release`
        /// without it and waits for `ready`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quiet_release: bool,
    },
    /// Periodic liveness with health.
    Heartbeat {
        /// Current health.
        #[serde(default)]
        health: Health,
        /// Whether the hub should answer with its own `heartbeat` (absent: yes, as agents
        /// before this field expect). An agent asks only when it has heard nothing from the
        /// hub for a while ([`wants_answer`]): an idle agent's heartbeats cost the hub one
        /// message per interval instead of two, most of them unanswered.
        #[serde(default = "yes")]
        answer: bool,
    },
    /// An exec finished. Sent after all its output frames.
    Exit {
        /// The exec.
        exec_id: u64,
        /// How it ended.
        #[serde(flatten)]
        status: ExitStatus,
    },
    /// The answer to `attach`: the exec's output follows from `offset` (then its `exit`).
    /// Sent only to a hub that sent `attach`.
    Attached {
        /// The exec.
        exec_id: u64,
        /// Where the output resumes: the offset asked for, or the oldest byte still buffered.
        #[serde(default)]
        offset: u64,
        /// Bytes between the offset asked for and `offset` that the buffer no longer holds.
        #[serde(default, skip_serializing_if = "is_zero")]
        dropped: u64,
        /// Set when the agent has no such exec; nothing follows.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Cleanup after a release finished; the agent is ready for the next lease.
    Ready {
        /// The lease that was released.
        #[serde(default)]
        lease: Option<String>,
        /// Health after cleanup.
        #[serde(default)]
        health: Health,
        /// How the pool's hooks ran, in order (absent when the pool has none); the service
        /// recycles the agent when one failed.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        hooks: Vec<crate::hooks::HookResult>,
    },
}

fn yes() -> bool {
    true
}

/// Whether an agent's next heartbeat asks the hub for an answer, given how long it has heard
/// nothing from the hub: after more than 1.5 intervals of silence. An idle agent then asks on
/// every second heartbeat (the answer comes within an interval), and one that hears the hub
/// otherwise (leases, execs) does not ask at all. A hub that does not answer is still found
/// silent after 3 intervals, as before: an ask goes out after 1.5 to 2.5 intervals of silence,
/// leaving the hub at least half an interval to answer.
pub fn wants_answer(silence: std::time::Duration, interval: std::time::Duration) -> bool {
    silence * 2 > interval * 3
}

/// Messages the hub sends to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum HubMessage {
    /// Registration accepted.
    Welcome {
        /// Protocol version of the hub.
        protocol: u32,
        /// The agent id, echoed.
        agent_id: String,
        /// How often to send heartbeats.
        heartbeat_interval_ms: u64,
        /// Largest frame the hub accepts.
        max_frame_bytes: usize,
    },
    /// Hub liveness: the answer to an agent's `heartbeat` that asks for one.
    Heartbeat {},
    /// Run a command.
    Exec {
        /// Identifies the exec's output frames and exit.
        exec_id: u64,
        /// What to run.
        #[serde(flatten)]
        spec: ExecSpec,
    },
    /// Send an exec's output again from byte `offset` of its output (stdout and stderr counted
    /// together, in the order written), then its exit. Sent to agents whose `hello` had
    /// `execs`, after a reconnect or when an exec client re-attaches.
    Attach {
        /// The exec.
        exec_id: u64,
        /// Bytes of output the hub already has.
        offset: u64,
    },
    /// The client's terminal changed size: resize the exec's pseudo-terminal.
    Resize {
        /// The exec.
        exec_id: u64,
        /// New size.
        #[serde(flatten)]
        size: TtySize,
    },
    /// Stop a running exec (its whole process group).
    Cancel {
        /// The exec.
        exec_id: u64,
    },
    /// The agent now serves this lease; it reports it in `hello` if it reconnects (so a
    /// restarted service restores the lease instead of losing it).
    Leased {
        /// The lease.
        lease: String,
        /// HMAC-SHA256(server key, lease id + agent id + pool), hex: returned in `hello` to
        /// prove the lease was granted to this agent (see [`crate::auth::AgentKey::lease_token`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease_token: Option<String>,
    },
    /// The lease ended: kill leftover processes, clean the workspace, run the pool's hooks,
    /// then send `ready`. With `quiet` (only to an agent whose `hello` had `quietRelease`):
    /// nothing ran during the lease, the hub counts the agent idle already and may lease it
    /// again in the next message; the agent drops the lease and sends nothing, unless it finds
    /// something left after all: then it cleans before reading on and sends `ready` for this
    /// lease (docs/PROTOCOL.md).
    Release {
        /// The lease.
        lease: String,
        /// The pool's current hooks (absent when it has none).
        #[serde(default, skip_serializing_if = "crate::hooks::Hooks::is_empty")]
        hooks: crate::hooks::Hooks,
        /// Nothing to clean as far as the hub knows; no `ready` expected.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quiet: bool,
    },
    /// Finish current work, then disconnect and exit.
    Drain {
        /// Why.
        reason: String,
    },
}

/// What to run: exactly one of `argv` or `script` (run by `sh -c`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecSpec {
    /// Program and arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// A shell script.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Extra environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory, relative to the workspace and inside it (see [`check_cwd`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Kill the process group after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The client sends stdin (binary frames of stream 0; an empty one is the end): the command
    /// reads it from a pipe. Otherwise its stdin is empty (`/dev/null`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size (stdout and stderr are then one stream, stdout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl ExecSpec {
    /// Checks the spec is runnable; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.argv, &self.script) {
            (Some(_), Some(_)) => Err("give either argv or script, not both".into()),
            (None, None) => Err("give argv or script".into()),
            (Some(a), None) if a.is_empty() || a[0].is_empty() => {
                Err("argv must name a program".into())
            }
            _ => match &self.cwd {
                Some(c) => check_cwd(c),
                None => Ok(()),
            },
        }
    }
}

/// Checks a working directory stays inside the workspace as written: relative, and no `..`
/// climbing above it. (The agent also resolves symlinks before running.)
pub fn check_cwd(cwd: &str) -> Result<(), String> {
    use std::path::Component;
    let mut depth: i32 = 0;
    for c in std::path::Path::new(cwd).components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "cwd {cwd} is absolute; give a directory relative to the agent's workspace"
                ));
            }
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!(
                        "cwd {cwd} leads outside the agent's workspace; give a directory inside it"
                    ));
                }
            }
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
        }
    }
    Ok(())
}

/// How an exec ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExitStatus {
    /// Exit code, when the process exited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Signal number, when the process was killed by one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Killed because `timeoutMs` passed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// Killed because of a `cancel`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cancelled: bool,
    /// The command could not be started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ExitStatus {
    /// The shell-style exit code: the code, 128 + signal, or 127 when it could not start.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            _ => 127,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One exec an agent holds, as reported in `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecReport {
    /// The exec.
    pub exec_id: u64,
    /// The lease it runs for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// Still running (otherwise its exit is kept until the next exec or the release).
    #[serde(default)]
    pub running: bool,
    /// Offset of the oldest output byte still buffered.
    #[serde(default)]
    pub first: u64,
    /// Offset of the next output byte (bytes written so far).
    #[serde(default)]
    pub next: u64,
}

/// Messages `warmpool run` sends on the exec socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum ClientMessage {
    /// Start the command.
    Exec(ExecSpec),
    /// Re-attach to a command started earlier on this lease (after the service restarted or
    /// the socket broke): its output follows from byte `offset`, then its exit.
    Attach {
        /// The exec id from `started`.
        exec_id: u64,
        /// Bytes of output already received (stdout and stderr together).
        offset: u64,
    },
    /// The terminal changed size (with `tty`).
    Resize(TtySize),
    /// Stop it.
    Cancel,
}

/// Messages the exec socket sends to `warmpool run`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum ServerMessage {
    /// The command was handed to the agent.
    Started {
        /// The exec id in output frames.
        exec_id: u64,
        /// The agent running it.
        agent: String,
    },
    /// The answer to `attach`: output follows from `offset`.
    Attached {
        /// The exec.
        exec_id: u64,
        /// The agent running it.
        agent: String,
        /// Where the output resumes.
        offset: u64,
        /// Bytes between the client's offset and `offset` that are lost (the agent's buffer
        /// overflowed while nobody read it).
        dropped: u64,
    },
    /// Output was lost here: the agent's buffer overflowed while its connection was down.
    Dropped {
        /// The exec.
        exec_id: u64,
        /// How many bytes.
        bytes: u64,
    },
    /// The command finished.
    Exit(ExitStatus),
    /// Something went wrong; the socket closes after this.
    Error {
        /// Machine code.
        code: String,
        /// Human message naming the lease and agent.
        message: String,
    },
}

/// Stream of a binary frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard input, from the exec client to the command (an empty frame ends it).
    Stdin = 0,
    /// Standard output.
    Stdout = 1,
    /// Standard error.
    Stderr = 2,
}

/// Problems decoding a binary frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than the header.
    #[error("binary frame of {0} bytes is shorter than the {OUTPUT_HEADER_BYTES}-byte header")]
    Short(usize),
    /// Unknown stream byte.
    #[error("binary frame names unknown stream {0}")]
    UnknownStream(u8),
}

/// Encodes one frame (output, or stdin from a client).
pub fn encode_output(stream: Stream, exec_id: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUTPUT_HEADER_BYTES + data.len());
    out.push(stream as u8);
    out.extend_from_slice(&exec_id.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Decodes one output frame.
pub fn decode_output(frame: &[u8]) -> Result<(Stream, u64, &[u8]), FrameError> {
    if frame.len() < OUTPUT_HEADER_BYTES {
        return Err(FrameError::Short(frame.len()));
    }
    let stream = match frame[0] {
        0 => Stream::Stdin,
        1 => Stream::Stdout,
        2 => Stream::Stderr,
        other => return Err(FrameError::UnknownStream(other)),
    };
    let id = u64::from_be_bytes(frame[1..9].try_into().expect("8 bytes"));
    Ok((stream, id, &frame[9..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_frames_round_trip() {
        let f = encode_output(Stream::Stderr, 7, b"hi");
        assert_eq!(decode_output(&f).unwrap(), (Stream::Stderr, 7, &b"hi"[..]));
        assert_eq!(decode_output(&f[..3]), Err(FrameError::Short(3)));
        let mut bad = f.clone();
        bad[0] = 9;
        assert_eq!(decode_output(&bad), Err(FrameError::UnknownStream(9)));
    }

    /// An idle agent that hears only the answers it asks for asks on every second heartbeat;
    /// a heartbeat without `answer` (an agent from before the field) asks.
    #[test]
    fn an_idle_agent_asks_for_every_second_answer() {
        let iv = std::time::Duration::from_secs(30);
        let ms = std::time::Duration::from_millis;
        // Welcome heard at 0; heartbeats every interval (a few ms late, as timers fire).
        let mut heard = std::time::Duration::ZERO;
        let mut asks = Vec::new();
        for beat in 1..=8u32 {
            let now = iv * beat + ms(3);
            let ask = wants_answer(now - heard, iv);
            if ask {
                heard = now + ms(1);
            }
            asks.push(ask);
        }
        assert_eq!(
            asks,
            [false, true, false, true, false, true, false, true],
            "one answer per two intervals"
        );
        // The longest silence in that pattern stays under the 3 intervals after which an agent
        // gives the hub up.
        assert!(!wants_answer(iv * 3 / 2, iv));
        assert!(wants_answer(iv * 3 / 2 + ms(1), iv));
        let old: AgentMessage =
            serde_json::from_str(r#"{"type":"heartbeat","health":{}}"#).unwrap();
        assert!(matches!(old, AgentMessage::Heartbeat { answer: true, .. }));
        let quiet = AgentMessage::Heartbeat {
            health: Health::default(),
            answer: false,
        };
        assert_eq!(
            serde_json::to_string(&quiet).unwrap(),
            r#"{"type":"heartbeat","health":{"workspaceBytes":0,"leftoverProcesses":0},"answer":false}"#
        );
    }

    #[test]
    fn json_shapes_are_stable() {
        let m = HubMessage::Exec {
            exec_id: 3,
            spec: ExecSpec {
                argv: Some(vec!["true".into()]),
                timeout_ms: Some(5),
                ..Default::default()
            },
        };
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(
            j,
            r#"{"type":"exec","execId":3,"argv":["true"],"timeoutMs":5}"#
        );
        assert_eq!(serde_json::from_str::<HubMessage>(&j).unwrap(), m);
        let e: AgentMessage =
            serde_json::from_str(r#"{"type":"exit","execId":3,"code":0}"#).unwrap();
        assert_eq!(
            e,
            AgentMessage::Exit {
                exec_id: 3,
                status: ExitStatus {
                    code: Some(0),
                    ..Default::default()
                }
            }
        );
        let c: ClientMessage =
            serde_json::from_str(r#"{"type":"exec","script":"echo hi"}"#).unwrap();
        assert!(matches!(
            c,
            ClientMessage::Exec(ExecSpec {
                script: Some(_),
                ..
            })
        ));
        assert!(serde_json::from_str::<AgentMessage>(r#"{"type":"launch"}"#).is_err());
    }

    #[test]
    fn exec_spec_validation() {
        assert!(ExecSpec::default().validate().is_err());
        let both = ExecSpec {
            argv: Some(vec!["a".into()]),
            script: Some("b".into()),
            ..Default::default()
        };
        assert!(both.validate().unwrap_err().contains("not both"));
        let empty = ExecSpec {
            argv: Some(vec![]),
            ..Default::default()
        };
        assert!(empty.validate().is_err());
        let cwd = |c: &str| {
            ExecSpec {
                script: Some("true".into()),
                cwd: Some(c.into()),
                ..Default::default()
            }
            .validate()
        };
        assert!(cwd("src/a/../b").is_ok());
        assert!(cwd("./src").is_ok());
        assert!(cwd("/etc").unwrap_err().contains("absolute"));
        assert!(cwd("../../..").unwrap_err().contains("outside"));
        assert!(cwd("src/../../x").unwrap_err().contains("outside"));
    }

    #[test]
    fn shell_codes() {
        let s = |code, signal| ExitStatus {
            code,
            signal,
            ..Default::default()
        };
        assert_eq!(s(Some(3), None).shell_code(), 3);
        assert_eq!(s(None, Some(9)).shell_code(), 137);
        assert_eq!(s(None, None).shell_code(), 127);
    }
}
