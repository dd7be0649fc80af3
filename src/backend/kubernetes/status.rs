//! The status writer of the Kubernetes backend: patches each AgentPool's status subresource
//! when it changed (counts by state, observedGeneration, Ready/Throttled/Degraded, leaksTotal),
//! holds unschedulable pods' deadlines and re-issues deletes that did not take, level-triggered
//! on a short interval.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use super::{KubeBackend, REDELETE_AFTER};
use crate::backend::Backend;
use crate::k8s::crd::{AgentPool, AgentPoolStatus, Condition};
use crate::service::Service;

/// Writes each pool's status when it changed: counts by state, observedGeneration, conditions.
pub(super) async fn write_statuses(svc: Arc<Service>, backend: Arc<KubeBackend>) {
    let api_for = |ap: &AgentPool| -> Api<AgentPool> {
        Api::namespaced(backend.client.clone(), &ap.namespace().unwrap_or_default())
    };
    let mut last: BTreeMap<String, AgentPoolStatus> = BTreeMap::new();
    let mut iv = tokio::time::interval(backend.cfg.status_interval);
    let mut redeleted: HashMap<String, std::time::Instant> = HashMap::new();
    loop {
        iv.tick().await;
        // Level-triggered: a pod still there long after its delete (a failed DELETE, a lost
        // event) is deleted again; a 404 reports it gone.
        let stuck: Vec<String> = svc.read(|e| {
            let now = std::time::Instant::now();
            e.agents()
                .filter(|a| a.state == crate::engine::AgentState::Terminating)
                .filter(|a| now.duration_since(a.since) > REDELETE_AFTER)
                .map(|a| a.id.clone())
                .collect()
        });
        redeleted.retain(|a, _| stuck.contains(a));
        for agent in stuck {
            let due = redeleted
                .get(&agent)
                .is_none_or(|t| t.elapsed() > REDELETE_AFTER);
            if due {
                redeleted.insert(agent.clone(), std::time::Instant::now());
                backend.terminate(&agent, svc.backend_sink());
            }
        }
        // Level-triggered: pods still unschedulable keep their provisioning deadline held.
        let pending: Vec<(String, String, String)> = backend
            .pending
            .iter()
            .map(|e| (e.key().clone(), e.value().0.clone(), e.value().1.clone()))
            .collect();
        for (agent, _, _) in &pending {
            let known = svc.read(|e| e.agent(agent).is_some());
            if known {
                svc.apply(|e, now| e.hold_pending(agent, now));
            } else {
                backend.pending.remove(agent);
            }
        }
        // Pools whose spec was never valid: only the Degraded condition to report.
        let invalid: Vec<(String, AgentPool, Vec<String>)> = backend
            .invalid
            .iter()
            .map(|e| (e.key().clone(), e.value().0.clone(), e.value().1.clone()))
            .collect();
        let engine_pools = svc.pools();
        for (name, ap, problems) in &invalid {
            let generation = &ap.metadata.generation;
            if engine_pools.iter().any(|p| &p.name == name)
                || svc.jenkins.get().is_some_and(|c| c.has_pool(name))
            {
                continue;
            }
            let status = AgentPoolStatus {
                observed_generation: None,
                conditions: vec![Condition {
                    type_: "Degraded".into(),
                    status: "True".into(),
                    reason: "InvalidSpec".into(),
                    message: problems.join("; "),
                    last_transition_time: None,
                    observed_generation: *generation,
                }],
                ..Default::default()
            };
            write_if_changed(&api_for(ap), ap, name, status, &mut last).await;
        }
        for p in engine_pools {
            let Some(ap) = backend.pools.get(&p.name).map(|a| a.clone()) else {
                continue;
            };
            let invalid_spec = backend.invalid.get(&p.name).map(|e| e.value().1.join("; "));
            let stuck: Vec<String> = pending
                .iter()
                .filter(|(_, pool, _)| pool == &p.name)
                .map(|(agent, _, why)| format!("{agent}: {why}"))
                .collect();
            let ready = p.idle >= p.min_idle;
            let cond = |type_: &str, on: bool, reason: &str, message: String| Condition {
                type_: type_.into(),
                status: if on { "True" } else { "False" }.into(),
                reason: reason.into(),
                message,
                last_transition_time: None,
                observed_generation: ap.metadata.generation,
            };
            let status = AgentPoolStatus {
                provisioning: p.provisioning,
                connecting: p.connecting,
                idle: p.idle,
                leased: p.leased + p.cleaning,
                terminating: p.terminating,
                observed_generation: ap.metadata.generation,
                conditions: vec![
                    cond(
                        "Ready",
                        ready,
                        if ready {
                            "MinIdleReached"
                        } else {
                            "BelowMinIdle"
                        },
                        format!("{} of {} idle agents", p.idle, p.min_idle),
                    ),
                    cond(
                        "Throttled",
                        p.throttled,
                        if p.throttled {
                            "RateLimited"
                        } else {
                            "NotThrottled"
                        },
                        format!("{} provisioning passes held back", p.throttled_total),
                    ),
                    match &invalid_spec {
                        Some(problems) => cond(
                            "Degraded",
                            true,
                            "InvalidSpec",
                            format!("latest spec not applied: {problems}"),
                        ),
                        None if !stuck.is_empty() => cond(
                            "Degraded",
                            true,
                            "Unschedulable",
                            format!("pods pending, not deleted: {}", stuck.join("; ")),
                        ),
                        None if p.last_error.is_none() && p.last_hook_failure.is_some() => cond(
                            "Degraded",
                            true,
                            "HooksFailing",
                            format!(
                                "{} agents recycled for a failed hook; last: {}",
                                p.hook_failures_total,
                                p.last_hook_failure.clone().unwrap_or_default()
                            ),
                        ),
                        None => cond(
                            "Degraded",
                            p.last_error.is_some(),
                            if p.last_error.is_some() {
                                "AgentsFailing"
                            } else {
                                "Healthy"
                            },
                            // Never empty: a 1.20 apiserver turns "" into null and rejects it.
                            p.last_error
                                .clone()
                                .unwrap_or_else(|| "no provisioning errors".into()),
                        ),
                    },
                ],
                leaks_total: p.leaks_total,
            };
            write_if_changed(&api_for(&ap), &ap, &p.name, status, &mut last).await;
        }
        // Jenkins pools: counts of nodes by state, Ready/Degraded from the connector.
        for js in svc.jenkins.get().map(|c| c.statuses()).unwrap_or_default() {
            let Some(ap) = svc.jenkins.get().and_then(|c| c.agent_pool(&js.name)) else {
                continue;
            };
            let invalid_spec = backend
                .invalid
                .get(&js.name)
                .map(|e| e.value().1.join("; "));
            let mut conditions: Vec<Condition> = js
                .conditions
                .iter()
                .map(|c| Condition {
                    type_: c.type_.clone(),
                    status: c.status.clone(),
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                    last_transition_time: None,
                    observed_generation: ap.metadata.generation,
                })
                .collect();
            if let Some(problems) = invalid_spec {
                for c in conditions.iter_mut().filter(|c| c.type_ == "Degraded") {
                    c.status = "True".into();
                    c.reason = "InvalidSpec".into();
                    c.message = format!("latest spec not applied: {problems}");
                }
            }
            let status = AgentPoolStatus {
                provisioning: js.nodes.creating,
                connecting: js.nodes.connecting,
                idle: js.nodes.idle,
                leased: js.nodes.busy,
                terminating: js.nodes.deleting,
                observed_generation: ap.metadata.generation,
                conditions,
                leaks_total: js.leaks_total,
            };
            write_if_changed(&api_for(&ap), &ap, &js.name, status, &mut last).await;
        }
    }
}

/// Patches `ap`'s status subresource unless `last` says it already holds `status` (keyed by
/// pool and uid, so a recreated AgentPool is written again).
async fn write_if_changed(
    api: &Api<AgentPool>,
    ap: &AgentPool,
    pool: &str,
    status: AgentPoolStatus,
    last: &mut BTreeMap<String, AgentPoolStatus>,
) {
    let cache_key = format!("{pool}/{}", ap.uid().unwrap_or_default());
    if last.get(&cache_key) == Some(&status) {
        return;
    }
    let patch = Patch::Merge(serde_json::json!({ "status": status }));
    match api
        .patch_status(&ap.name_any(), &PatchParams::default(), &patch)
        .await
    {
        Ok(_) => {
            last.insert(cache_key, status);
        }
        Err(e) => tracing::warn!(pool = %pool, error = %e, "writing AgentPool status failed"),
    }
}
