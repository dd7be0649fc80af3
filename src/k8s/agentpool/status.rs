//! The AgentPool status loop: on a short interval, level-triggered, for every AgentPool in the
//! store, computes its status (engine pools: counts by state and Ready/Throttled/Degraded;
//! Jenkins pools: counts of nodes and Ready/Degraded from the connector; invalid specs:
//! Degraded/InvalidSpec; deleted pools whose cleanup has not finished: Degraded with why; the
//! sizing policy's desired idle count, its source, arrival rate, refill time and warm-hit ratio
//! for every pool the engine sizes; waiting requests, the total, the label expression and the pod
//! selector that `kubectl get` and the scale subresource read) with
//! the one condition builder, and writes it through the status subresource when it changed.
//! It also removes from the engine and the connector every pool the store no longer holds
//! (deleted without our finalizer, or while it was forced away), and publishes an Event when a
//! written Ready condition flips: `Ready` (Normal) or `NotReady` (Normal while refilling,
//! Warning when the pool is also Degraded; with the
//! condition's reason and message); a pool first written not Ready publishes nothing.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::Instrument;

use super::conditions::{Desired, build, desired};
use super::{Ctx, problems_of};
use crate::backend::kubernetes::Occurrence;
use crate::k8s::crd::{AgentPool, AgentPoolStatus, Condition};

/// Writes each AgentPool's status when it changed, every `status_interval`.
pub(super) async fn write_statuses(ctx: Arc<Ctx>) {
    // What was last written, by pool and uid (a recreated AgentPool is written again).
    let mut last: BTreeMap<String, AgentPoolStatus> = BTreeMap::new();
    let mut iv = tokio::time::interval(ctx.backend.status_interval());
    loop {
        iv.tick().await;
        let pools = ctx.store.state();
        let keys: HashSet<String> = pools.iter().map(|ap| ctx.backend.key_of(ap)).collect();
        forget_gone(&ctx, &keys);
        last.retain(|k, _| keys.contains(k.rsplit_once('/').map_or(k.as_str(), |(p, _)| p)));
        let engine = ctx.svc.pools();
        let jenkins = ctx
            .svc
            .jenkins
            .get()
            .map(|c| c.statuses())
            .unwrap_or_default();
        for ap in pools {
            let key = ctx.backend.key_of(&ap);
            let cache_key = format!("{key}/{}", ap.uid().unwrap_or_default());
            let previous = last
                .get(&cache_key)
                .cloned()
                .or_else(|| ap.status.clone())
                .unwrap_or_default();
            let problems = problems_of(&ctx.backend, &key, &ap);
            let invalid = (!problems.is_empty())
                .then(|| format!("latest spec not applied: {}", problems.join("; ")));
            let generation = ap.metadata.generation;
            let mut status = if ap.metadata.deletion_timestamp.is_some() {
                let Some(why) = ctx.cleanup.get(&key).map(|e| e.value().clone()) else {
                    continue;
                };
                AgentPoolStatus {
                    conditions: conditions(
                        &previous.conditions,
                        generation,
                        vec![
                            desired("Ready", false, "Deleting", "the AgentPool is being deleted"),
                            desired("Degraded", true, why.0, why.1),
                        ],
                    ),
                    ..previous.clone()
                }
            } else if let Some(js) = jenkins.iter().find(|s| s.name == key) {
                let mut want: Vec<Desired> = js
                    .conditions
                    .iter()
                    .map(|c| Desired {
                        type_: c.type_.clone(),
                        status: if c.status == "True" { "True" } else { "False" },
                        reason: c.reason.clone(),
                        message: c.message.clone(),
                    })
                    .collect();
                if let Some(message) = &invalid {
                    for c in want.iter_mut().filter(|c| c.type_ == "Degraded") {
                        *c = desired("Degraded", true, "InvalidSpec", message.clone());
                    }
                }
                let mut st = AgentPoolStatus {
                    provisioning: js.nodes.creating,
                    connecting: js.nodes.connecting,
                    idle: js.nodes.idle,
                    leased: js.nodes.busy,
                    terminating: js.nodes.deleting,
                    observed_generation: js.observed_generation,
                    conditions: conditions(&previous.conditions, generation, want),
                    leaks_total: js.leaks_total,
                    ..AgentPoolStatus::default()
                };
                // The engine sizes the Jenkins pool: its policy says what and why.
                if let Some(p) = engine.iter().find(|p| p.name == key) {
                    st.waiting = p.waiting;
                    st.set_policy(p);
                }
                st
            } else if let Some(p) = engine.iter().find(|p| p.name == key) {
                engine_status(&ctx, p, &previous, generation, invalid)
            } else if let Some(message) = invalid {
                // A spec that was never valid: only the Degraded condition to report.
                AgentPoolStatus {
                    observed_generation: None,
                    conditions: conditions(
                        &previous.conditions,
                        generation,
                        vec![desired(
                            "Degraded",
                            true,
                            "InvalidSpec",
                            message.trim_start_matches("latest spec not applied: "),
                        )],
                    ),
                    ..Default::default()
                }
            } else {
                continue;
            };
            status.set_view(&ap.name_any(), &ap.spec);
            if last.get(&cache_key) == Some(&status) {
                continue;
            }
            let api: Api<AgentPool> =
                Api::namespaced(ctx.client.clone(), &ap.namespace().unwrap_or_default());
            let patch = Patch::Merge(serde_json::json!({ "status": status }));
            let span = tracing::info_span!("agentpool", pool = %key);
            let written = async {
                match api
                    .patch_status(&ap.name_any(), &PatchParams::default(), &patch)
                    .await
                {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "writing AgentPool status failed");
                        false
                    }
                }
            }
            .instrument(span)
            .await;
            if written {
                ctx.counters.status_writes.with_label_values(&[&key]).inc();
                tell_ready_flip(&ctx, &key, &ap, &previous.conditions, &status.conditions);
                last.insert(cache_key, status);
            }
        }
    }
}

/// Publishes `Ready` or `NotReady` when the Ready condition's status differs from the one
/// written before (none counts as not Ready).
fn tell_ready_flip(ctx: &Ctx, key: &str, ap: &AgentPool, before: &[Condition], now: &[Condition]) {
    let ready = |cs: &[Condition]| {
        cs.iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| (c.status == "True", c.reason.clone(), c.message.clone()))
    };
    // A pool being deleted is not Ready, as its owner asked: no Event.
    let Some((on, reason, message)) = ready(now).filter(|_| ap.meta().deletion_timestamp.is_none())
    else {
        return;
    };
    let was = ready(before).is_some_and(|(on, ..)| on);
    if on == was {
        return;
    }
    // Below minIdle while refilling is how a busy pool works (a lease takes an idle agent):
    // Normal. A Warning only when the pool is also Degraded (its agents fail to come).
    let degraded = now
        .iter()
        .any(|c| c.type_ == "Degraded" && c.status == "True");
    let (type_, event_reason) = match (on, degraded) {
        (true, _) => (EventType::Normal, "Ready"),
        (false, false) => (EventType::Normal, "NotReady"),
        (false, true) => (EventType::Warning, "NotReady"),
    };
    ctx.backend.publish(
        key,
        ap.object_ref(&()),
        Occurrence {
            type_,
            reason: event_reason,
            action: "UpdateStatus",
            note: format!(
                "Ready is {}: {reason}: {message}",
                if on { "True" } else { "False" }
            ),
            // Repeats of one condition reason fold, whatever the counts in the message.
            fold: Some(reason),
        },
    );
}

fn conditions(
    previous: &[Condition],
    generation: Option<i64>,
    want: Vec<Desired>,
) -> Vec<Condition> {
    build(previous, generation, SystemTime::now(), want)
}

/// Pools the store no longer holds leave the engine and the connector, and what the
/// controller and the backend remember of them goes.
fn forget_gone(ctx: &Ctx, keys: &HashSet<String>) {
    ctx.backend.forget_all_but(keys);
    ctx.told_invalid.retain(|k, _| keys.contains(k));
    ctx.min_idle.retain(|k, _| keys.contains(k));
    for p in ctx.svc.pools() {
        if !keys.contains(&p.name) {
            tracing::info!(pool = %p.name, "AgentPool gone; removing its pool");
            ctx.backend.forget(&p.name);
            ctx.svc.remove_pool(&p.name);
        }
    }
    if let Some(c) = ctx.svc.jenkins.get() {
        for key in c.pool_keys() {
            if !keys.contains(&key) {
                tracing::info!(pool = %key, "AgentPool gone; removing its Jenkins pool");
                c.remove(&key);
            }
        }
    }
}

/// The status of an engine pool: counts by state, Ready, Throttled and Degraded.
fn engine_status(
    ctx: &Ctx,
    p: &crate::engine::PoolStatus,
    previous: &AgentPoolStatus,
    generation: Option<i64>,
    invalid: Option<String>,
) -> AgentPoolStatus {
    let stuck = ctx.backend.unschedulable(&p.name);
    // The spec applied last: an invalid newer spec does not advance it.
    let applied = ctx.backend.applied_generation(&p.name);
    let ready = p.idle >= p.min_idle;
    let degraded = match invalid {
        Some(message) => desired("Degraded", true, "InvalidSpec", message),
        None if !stuck.is_empty() => desired(
            "Degraded",
            true,
            "Unschedulable",
            format!("pods pending, not deleted: {}", stuck.join("; ")),
        ),
        None if p.last_error.is_none() && p.last_hook_failure.is_some() => desired(
            "Degraded",
            true,
            "HooksFailing",
            format!(
                "{} agents recycled for a failed hook; last: {}",
                p.hook_failures_total,
                p.last_hook_failure.clone().unwrap_or_default()
            ),
        ),
        None => match &p.last_error {
            Some(e) => desired("Degraded", true, "AgentsFailing", e.clone()),
            None => desired("Degraded", false, "Healthy", "no provisioning errors"),
        },
    };
    let mut st = AgentPoolStatus {
        provisioning: p.provisioning,
        connecting: p.connecting,
        idle: p.idle,
        leased: p.leased + p.cleaning,
        terminating: p.terminating,
        observed_generation: applied,
        conditions: conditions(
            &previous.conditions,
            generation,
            vec![
                desired(
                    "Ready",
                    ready,
                    if ready {
                        "MinIdleReached"
                    } else {
                        "BelowMinIdle"
                    },
                    format!("{} of {} idle agents", p.idle, p.min_idle),
                ),
                desired(
                    "Throttled",
                    p.throttled,
                    if p.throttled {
                        "RateLimited"
                    } else {
                        "NotThrottled"
                    },
                    format!("{} provisioning passes held back", p.throttled_total),
                ),
                degraded,
            ],
        ),
        leaks_total: p.leaks_total,
        waiting: p.waiting,
        ..AgentPoolStatus::default()
    };
    st.set_policy(p);
    st
}
