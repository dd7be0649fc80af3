//! What the connector shows of a Jenkins pool (`GET /v1/jenkins/pools`, the AgentPool status):
//! its nodes by state, demand and leaks read from the engine, its poll interval, and the
//! `Ready` and `Degraded` conditions (Degraded: the pool's Jenkins problems). Read-only.

use std::collections::HashMap;

use serde::Serialize;

use super::{Connector, Problem};

/// The condition view of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConditionView {
    /// `Ready` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// For people.
    pub message: String,
}

/// Nodes of a Jenkins pool by state (the engine's agents of the pool).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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
    /// Idle nodes wanted now: the engine's desired idle count (docs/SIZING.md: `minIdle`, a
    /// schedule window or the forecast, plus queue demand, at most the cap).
    pub target: u32,
    /// 1 when the rate limit held creations back on the engine's last pass.
    pub throttled: u32,
}

/// What `GET /v1/jenkins/pools` shows for one pool.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JenkinsPoolStatus {
    /// Pool key.
    pub name: String,
    /// Controller root URL.
    pub url: String,
    /// Node name prefix.
    pub node_name_prefix: String,
    /// Node label string.
    pub labels: String,
    /// Nodes by state, target and throttling.
    pub nodes: Counts,
    /// Queued builds waiting for this pool's labels.
    pub demand: u32,
    /// Nodes deleted for `connectTimeout`.
    pub leaks_total: u64,
    /// Current poll interval of the controller (seconds).
    pub poll_interval_seconds: f64,
    /// `Ready` and `Degraded`.
    pub conditions: Vec<ConditionView>,
    /// Kubernetes: the AgentPool generation the status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Connector {
    /// Statuses of every pool, from the engine's view of it.
    pub fn statuses(&self) -> Vec<JenkinsPoolStatus> {
        let Some(svc) = self.svc.upgrade() else {
            return Vec::new();
        };
        let (engine, demand): (
            HashMap<String, crate::engine::PoolStatus>,
            HashMap<String, u32>,
        ) = svc.read(|e| {
            let st = e.pool_status();
            let d = st
                .iter()
                .map(|p| (p.name.clone(), e.external_demand(&p.name)))
                .collect();
            (st.into_iter().map(|p| (p.name.clone(), p)).collect(), d)
        });
        let pools = self.pools.lock().expect("lock");
        let ctls = self.controllers.lock().expect("lock");
        pools
            .values()
            .map(|e| {
                let key = &e.cfg.key;
                let spec = &e.cfg.spec;
                let demand = demand.get(key).copied().unwrap_or(0);
                let counts = engine.get(key).map_or(Counts::default(), |p| Counts {
                    creating: p.provisioning,
                    connecting: p.connecting,
                    idle: p.idle + p.cleaning,
                    busy: p.leased,
                    deleting: p.terminating,
                    target: p.desired_idle,
                    throttled: u32::from(p.throttled),
                });
                let leaks_total = engine.get(key).map_or(0, |p| p.leaks_total);
                let interval = ctls
                    .get(&e.root)
                    .map(|c| *c.interval.lock().expect("lock"))
                    .unwrap_or(e.cfg.jenkins.poll_interval.0);
                let problems: Vec<&Problem> = e.problems.values().collect();
                let degraded = match problems.as_slice() {
                    [] => ConditionView {
                        type_: "Degraded".into(),
                        status: "False".into(),
                        reason: "AsExpected".into(),
                        // Never empty: a 1.20 apiserver turns "" into null and rejects it.
                        message: "Jenkins answers; no provisioning errors".into(),
                    },
                    ps => ConditionView {
                        type_: "Degraded".into(),
                        status: "True".into(),
                        reason: ps[0].reason.clone(),
                        message: ps
                            .iter()
                            .map(|p| p.message.as_str())
                            .collect::<Vec<_>>()
                            .join("; "),
                    },
                };
                let ready = counts.idle >= spec.min_idle.min(spec.max_total);
                let ready = ConditionView {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    reason: if ready {
                        "MinIdleOnline"
                    } else {
                        "BelowMinIdle"
                    }
                    .into(),
                    message: format!(
                        "{} of minIdle {} nodes online and idle",
                        counts.idle, spec.min_idle
                    ),
                };
                JenkinsPoolStatus {
                    name: key.clone(),
                    url: e.root.clone(),
                    node_name_prefix: e.cfg.jenkins.prefix(key),
                    labels: e.cfg.jenkins.labels.clone(),
                    nodes: counts,
                    demand,
                    leaks_total,
                    poll_interval_seconds: interval.as_secs_f64(),
                    conditions: vec![ready, degraded],
                    observed_generation: e.generation,
                }
            })
            .collect()
    }
}
