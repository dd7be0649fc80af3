//! Exec routes: where the output and exit of each agent's exec go (the exec socket that started
//! or re-attached to it), kept by agent id across the agent's connections, with the offset
//! routed so far so a reconnecting agent resumes exactly there (`attach`).
//!
//! A map and its rules only: the hub sends the messages and owns the connections.

use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::protocol::{ExecReport, ExitStatus};

/// What an exec socket receives from the agent running its command.
#[derive(Debug)]
pub enum ExecEvent {
    /// The agent (re)attached: output follows from `offset`; `dropped` bytes before it are
    /// lost (its buffer overflowed while nobody read).
    Attached {
        /// Where the output resumes.
        offset: u64,
        /// Bytes lost.
        dropped: u64,
    },
    /// A binary output frame, as the agent sent it.
    Output(bytes::Bytes),
    /// The command finished.
    Exit(ExitStatus),
    /// The agent does not hold the exec a client re-attached to.
    NotFound(String),
    /// The agent went away or the lease ended; the message says which.
    Lost(String),
}

/// Where one agent's exec output goes. Kept by agent id, across the agent's connections.
pub(crate) struct ExecRoute {
    pub(crate) exec_id: u64,
    pub(crate) lease: String,
    pub(crate) tx: mpsc::Sender<ExecEvent>,
    /// Bytes of output handed to `tx` so far (the offset to resume from).
    pub(crate) offset: u64,
    /// An `attach` was sent; frames and exits are ignored until the agent's `attached`.
    pub(crate) pending: bool,
}

/// Routes by agent id (at most one exec per agent).
#[derive(Default)]
pub(crate) struct ExecRoutes {
    pub(crate) map: DashMap<String, ExecRoute>,
}

impl ExecRoutes {
    /// The route for the exit of an exec (removed). Nothing while an `attach` is pending.
    pub(crate) fn exit(&self, agent: &str, exec_id: u64) -> Option<mpsc::Sender<ExecEvent>> {
        self.map
            .remove_if(agent, |_, r| r.exec_id == exec_id && !r.pending)
            .map(|(_, r)| r.tx)
    }

    /// The route for an output frame of `len` payload bytes (counted in its offset). Nothing
    /// while an `attach` is pending.
    pub(crate) fn output(
        &self,
        agent: &str,
        exec_id: u64,
        len: usize,
    ) -> Option<mpsc::Sender<ExecEvent>> {
        let mut r = self.map.get_mut(agent)?;
        if r.exec_id != exec_id || r.pending {
            return None;
        }
        r.offset += len as u64;
        Some(r.tx.clone())
    }

    /// The agent answered an `attach`.
    pub(crate) fn attached(
        &self,
        agent: &str,
        exec_id: u64,
        offset: u64,
        dropped: u64,
        error: Option<String>,
    ) -> Option<(mpsc::Sender<ExecEvent>, ExecEvent)> {
        if let Some(error) = error {
            let (_, r) = self
                .map
                .remove_if(agent, |_, r| r.exec_id == exec_id && r.pending)?;
            return Some((r.tx, ExecEvent::NotFound(error)));
        }
        let mut r = self.map.get_mut(agent)?;
        if r.exec_id != exec_id || !r.pending {
            return None;
        }
        r.pending = false;
        r.offset = offset;
        Some((r.tx.clone(), ExecEvent::Attached { offset, dropped }))
    }

    /// An agent registered reporting `execs` (None: a build that does not keep them): the
    /// exec to ask it to resume, and from where; or, when it no longer holds the routed exec,
    /// the route ends (its client hears why).
    pub(crate) fn resume(&self, agent: &str, execs: Option<&[ExecReport]>) -> Option<(u64, u64)> {
        {
            let mut r = self.map.get_mut(agent)?;
            if execs.is_some_and(|e| e.iter().any(|x| x.exec_id == r.exec_id)) {
                r.pending = true;
                return Some((r.exec_id, r.offset));
            }
        }
        if let Some((_, r)) = self.map.remove(agent) {
            let _ = r.tx.try_send(ExecEvent::Lost(format!(
                "agent {agent} reconnected without exec {}: it was stopped",
                r.exec_id
            )));
        }
        None
    }
}
