//! Level-triggered repairs of the Kubernetes backend, on the status interval: re-issues deletes
//! that did not take (a pod still there long after its delete) and keeps holding the
//! provisioning deadline of pods that cannot be scheduled.

use std::collections::HashMap;
use std::sync::Arc;

use super::{AgentView, KubeBackend, REDELETE_AFTER};
use crate::backend::Backend;

/// Runs the repairs until dropped.
pub async fn repair(view: Arc<dyn AgentView>, backend: Arc<KubeBackend>) {
    let mut iv = tokio::time::interval(backend.cfg.status_interval);
    let mut redeleted: HashMap<String, std::time::Instant> = HashMap::new();
    loop {
        iv.tick().await;
        // Level-triggered: a pod still there long after its delete (a failed DELETE, a lost
        // event) is deleted again; a 404 reports it gone.
        let stuck: Vec<String> = view
            .terminating()
            .into_iter()
            .filter(|(_, since)| *since > REDELETE_AFTER)
            .map(|(a, _)| a)
            .collect();
        redeleted.retain(|a, _| stuck.contains(a));
        for agent in stuck {
            let due = redeleted
                .get(&agent)
                .is_none_or(|t| t.elapsed() > REDELETE_AFTER);
            if due {
                redeleted.insert(agent.clone(), std::time::Instant::now());
                backend.terminate(&agent, view.events());
            }
        }
        // Level-triggered: pods still unschedulable keep their provisioning deadline held.
        let pending: Vec<(String, String, String)> = backend
            .pending
            .iter()
            .map(|e| (e.key().clone(), e.value().0.clone(), e.value().1.clone()))
            .collect();
        for (agent, _, _) in &pending {
            if view.knows(agent) {
                view.hold_pending(agent);
            } else {
                backend.pending.remove(agent);
            }
        }
    }
}
