//! The pure, level-triggered planner of one Jenkins pool: from one observation (the pool's
//! nodes in the batched poll, the live agent processes or pods, the queue demand) and the
//! pool's memory of earlier polls, it decides what to create, recycle and clean up.
//!
//! No I/O and no clock: `now` is passed in, the rate limiter is a callback. Each pass recomputes
//! desired against actual, so a lost answer or a crashed task is repaired by the next poll.
//!
//! Node states: in flight (being created, or being deleted) -> connecting (offline, agent
//! started) -> idle (online, free) -> busy (online, running a build: the build URL is the lease
//! holder) -> idle again (a finished build, counted in `uses`) -> recycled at `maxUses`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::model::NodeObs;
use crate::spec::PoolSpec;

/// Why a node (and its agent) is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// It ran `maxUses` builds.
    MaxUses,
    /// Idle and older than `maxAge`.
    MaxAge,
    /// Idle above the pool's target for longer than `idleTtl`.
    IdleTtl,
    /// Offline past `connectTimeout` although its agent was started: a leak.
    ConnectTimeout,
    /// A node with the pool's prefix and no agent process or pod.
    OrphanNode,
    /// An agent process or pod whose node is gone.
    OrphanAgent,
    /// The pool was removed.
    PoolRemoved,
    /// Provisioning failed half-way (node created, agent not started).
    ProvisionFailed,
}

impl Reason {
    /// The `reason` label (`warmpool_recycles_total`) and log text.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MaxUses => "max-uses",
            Reason::MaxAge => "max-age",
            Reason::IdleTtl => "idle-ttl",
            Reason::ConnectTimeout => "connect-timeout",
            Reason::OrphanNode => "orphan-node",
            Reason::OrphanAgent => "orphan-agent",
            Reason::PoolRemoved => "pool-removed",
            Reason::ProvisionFailed => "provision-failed",
        }
    }
}

/// Work being done on a node outside the planner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inflight {
    /// Node being created, secret read, agent started.
    Creating,
    /// Node and agent being deleted.
    Deleting,
}

/// What the connector remembers of one node between polls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeMem {
    /// Created by this instance, or first seen (adopted).
    pub since: Instant,
    /// Work in progress.
    pub inflight: Option<Inflight>,
    /// When this instance started its agent.
    pub agent_started: Option<Instant>,
    /// Offline since (first poll that saw it offline, or the agent's start).
    pub offline_since: Option<Instant>,
    /// Builds seen running on it (absolute URLs).
    pub builds: BTreeSet<String>,
    /// Builds it ran.
    pub uses: u32,
    /// Busy at the last poll.
    pub busy: bool,
    /// Idle (online and free) since.
    pub idle_since: Option<Instant>,
    /// Drained (labels taken away, description marked, by this or an earlier instance), so
    /// Jenkins gives it no further build: deleted once idle.
    pub drained: bool,
}

impl NodeMem {
    /// A node this instance is creating.
    pub fn creating(now: Instant) -> NodeMem {
        NodeMem {
            since: now,
            inflight: Some(Inflight::Creating),
            agent_started: None,
            offline_since: None,
            builds: BTreeSet::new(),
            uses: 0,
            busy: false,
            idle_since: None,
            drained: false,
        }
    }
}

/// The pool's memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolMem {
    /// By node name.
    pub nodes: BTreeMap<String, NodeMem>,
    /// Nodes deleted for `connectTimeout` since start.
    pub leaks_total: u64,
}

/// One poll's view of the pool.
#[derive(Debug, Clone)]
pub struct Observation {
    /// Now.
    pub now: Instant,
    /// When the agent list was taken (before the node poll).
    pub agents_listed_at: Instant,
    /// When the node poll was sent: work finished after it is not in `nodes` yet.
    pub polled_at: Instant,
    /// The pool's nodes (name has the pool's prefix).
    pub nodes: Vec<NodeObs>,
    /// Nodes with a live agent process or pod.
    pub agents: BTreeSet<String>,
    /// Queued builds waiting for this pool.
    pub demand: u32,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create this many nodes (names are chosen by the caller).
    Create(u32),
    /// Take the node's labels away: it is running its last allowed build (`maxUses`), and
    /// Jenkins must not give it another before it is deleted.
    Drain(String),
    /// Delete the node (if it exists) and stop its agent (if any).
    Delete {
        /// Node name.
        node: String,
        /// Why.
        reason: Reason,
        /// The node is in Jenkins.
        node_exists: bool,
        /// An agent process or pod is alive.
        agent_exists: bool,
    },
}

/// Nodes of the pool by state, after a pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Being created (node, secret, agent start).
    pub creating: u32,
    /// Agent started, node offline.
    pub connecting: u32,
    /// Online and free.
    pub idle: u32,
    /// Running a build.
    pub busy: u32,
    /// Being deleted.
    pub deleting: u32,
    /// Idle nodes wanted now: `minIdle` + queue demand, at most `maxTotal`.
    pub target: u32,
    /// Creations the rate limit held back in this pass.
    pub throttled: u32,
}

/// One pass over a pool. Marks deletions and creations in `mem` as in flight; the caller
/// executes the steps and clears the marks.
pub fn plan(
    spec: &PoolSpec,
    mem: &mut PoolMem,
    obs: &Observation,
    pace: &mut dyn FnMut() -> bool,
) -> (Vec<Step>, Counts) {
    let now = obs.now;
    let mut steps = Vec::new();
    let mut c = Counts::default();
    let seen: BTreeSet<&str> = obs.nodes.iter().map(|n| n.name.as_str()).collect();
    // Nodes that vanished without us: forget them (their agents are orphans below).
    // Work finished after the poll was sent is kept for the next poll to see.
    mem.nodes.retain(|name, m| {
        m.inflight.is_some()
            || seen.contains(name.as_str())
            || m.since >= obs.polled_at
            || m.agent_started.is_some_and(|t| t >= obs.polled_at)
    });
    let mut idle: Vec<(Instant, String)> = Vec::new();
    let connect_timeout = spec.connect_timeout.0;
    for n in &obs.nodes {
        let m = mem.nodes.entry(n.name.clone()).or_insert_with(|| NodeMem {
            inflight: None,
            ..NodeMem::creating(now)
        });
        match m.inflight {
            Some(Inflight::Deleting) => {
                c.deleting += 1;
                continue;
            }
            Some(Inflight::Creating) => {
                c.creating += 1;
                continue;
            }
            None => {}
        }
        let has_agent = obs.agents.contains(&n.name)
            || m.agent_started.is_some_and(|t| t >= obs.agents_listed_at);
        // Builds are counted when first seen running.
        if n.busy {
            match &n.build {
                Some(url) if m.builds.insert(url.clone()) => m.uses += 1,
                Some(_) => {}
                None if !m.busy => m.uses += 1,
                None => {}
            }
        }
        m.busy = n.busy;
        // Drained by this or an earlier instance: Jenkins says so (the description's marker),
        // never inferred from labels (a label added to the pool is no drain).
        if n.drained {
            m.drained = true;
        }
        let mut delete = |m: &mut NodeMem, reason: Reason| {
            m.inflight = Some(Inflight::Deleting);
            steps.push(Step::Delete {
                node: n.name.clone(),
                reason,
                node_exists: true,
                agent_exists: has_agent,
            });
        };
        if n.offline {
            m.idle_since = None;
            if n.busy {
                // Jenkins still lists a build on a lost agent: leave it to Jenkins.
                c.busy += 1;
                continue;
            }
            if !has_agent {
                delete(m, Reason::OrphanNode);
                c.deleting += 1;
                continue;
            }
            let since = *m.offline_since.get_or_insert(now);
            let from = m.agent_started.map_or(since, |t| t.max(since));
            if now.saturating_duration_since(from) > connect_timeout {
                // Counted in `leaks_total` once the deletion is done.
                delete(m, Reason::ConnectTimeout);
                c.deleting += 1;
                continue;
            }
            c.connecting += 1;
            continue;
        }
        m.offline_since = None;
        if n.busy {
            m.idle_since = None;
            c.busy += 1;
            if spec.max_uses > 0 && m.uses >= spec.max_uses && !m.drained {
                m.drained = true;
                steps.push(Step::Drain(n.name.clone()));
            }
            continue;
        }
        if m.drained || (spec.max_uses > 0 && m.uses >= spec.max_uses) {
            delete(m, Reason::MaxUses);
            c.deleting += 1;
            continue;
        }
        if !has_agent {
            // Online without a process or pod of ours: someone else's agent with our prefix,
            // or a list that missed it. Idle, so nothing is lost by removing it.
            delete(m, Reason::OrphanNode);
            c.deleting += 1;
            continue;
        }
        if now.saturating_duration_since(m.since) > spec.max_age.0 {
            delete(m, Reason::MaxAge);
            c.deleting += 1;
            continue;
        }
        let since = *m.idle_since.get_or_insert(now);
        idle.push((since, n.name.clone()));
    }
    // In-flight entries whose node is not (or no longer) listed.
    for (name, m) in &mem.nodes {
        if seen.contains(name.as_str()) {
            continue;
        }
        match m.inflight {
            Some(Inflight::Creating) => c.creating += 1,
            Some(Inflight::Deleting) => c.deleting += 1,
            // Provisioned after the poll was sent: connecting until a poll lists it.
            None => c.connecting += 1,
        }
    }
    // Agents without a node.
    for a in &obs.agents {
        if seen.contains(a.as_str()) {
            continue;
        }
        if mem.nodes.get(a).is_some_and(|m| m.inflight.is_some()) {
            continue;
        }
        mem.nodes.insert(
            a.clone(),
            NodeMem {
                inflight: Some(Inflight::Deleting),
                ..NodeMem::creating(now)
            },
        );
        c.deleting += 1;
        steps.push(Step::Delete {
            node: a.clone(),
            reason: Reason::OrphanAgent,
            node_exists: false,
            agent_exists: true,
        });
    }
    // Sizing.
    let want = (spec.min_idle.saturating_add(obs.demand)).min(spec.max_total);
    c.target = want;
    // Idle above the target past idleTtl: oldest idle first.
    idle.sort();
    let mut idle_left = idle.len() as u32;
    for (since, name) in &idle {
        if idle_left <= want || now.saturating_duration_since(*since) <= spec.idle_ttl.0 {
            continue;
        }
        idle_left -= 1;
        if let Some(m) = mem.nodes.get_mut(name) {
            m.inflight = Some(Inflight::Deleting);
        }
        c.deleting += 1;
        steps.push(Step::Delete {
            node: name.clone(),
            reason: Reason::IdleTtl,
            node_exists: true,
            agent_exists: true,
        });
    }
    c.idle = idle_left;
    let available = c.creating + c.connecting + c.idle;
    let total = c.creating + c.connecting + c.idle + c.busy + c.deleting;
    let mut n = want
        .saturating_sub(available)
        .min(spec.max_total.saturating_sub(total))
        .min(
            spec.provisioning
                .max_concurrent
                .saturating_sub(c.creating + c.connecting),
        );
    let mut granted = 0;
    while n > 0 {
        if pace() {
            granted += 1;
        } else {
            c.throttled = n;
            break;
        }
        n -= 1;
    }
    if granted > 0 {
        steps.push(Step::Create(granted));
        c.creating += granted;
    }
    (steps, c)
}

#[cfg(test)]
mod tests;
