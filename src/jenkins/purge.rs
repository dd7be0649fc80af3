//! Purging a Jenkins pool that is gone: every node of the pool on its controller is deleted and
//! every agent the runner started for it is stopped, through the public APIs of [`Client`] and
//! [`Runner`] only. The Kubernetes AgentPool controller calls it from its finalizer, so a
//! deleted AgentPool's nodes go even when warmpool was down when it was deleted.
//!
//! It keeps no state and decides nothing else: a failure is returned, typed and naming the
//! pool, the node and the controller, and the caller retries (the purge is idempotent: a node
//! or an agent already gone counts as done).

use super::client::{Client, JenkinsError};
use super::runner::{Runner, RunnerError};

/// Why a purge could not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The controller's node list could not be read.
    #[error("pool {pool}: listing the nodes of Jenkins {controller} failed: {source}")]
    ListNodes {
        /// Pool key.
        pool: String,
        /// The controller's root URL.
        controller: String,
        /// What Jenkins answered.
        #[source]
        source: JenkinsError,
    },
    /// A node could not be deleted.
    #[error("pool {pool}: deleting node {node} on Jenkins {controller} failed: {source}")]
    DeleteNode {
        /// Pool key.
        pool: String,
        /// Node name.
        node: String,
        /// The controller's root URL.
        controller: String,
        /// What Jenkins answered.
        #[source]
        source: JenkinsError,
    },
    /// The runner could not list the controller's agents.
    #[error("pool {pool}: listing the agents of Jenkins {controller} failed: {source}")]
    ListAgents {
        /// Pool key.
        pool: String,
        /// The controller's root URL.
        controller: String,
        /// Why.
        source: RunnerError,
    },
    /// An agent could not be stopped.
    #[error(
        "pool {pool}: stopping the agent of node {node} (Jenkins {controller}) failed: {source}"
    )]
    StopAgent {
        /// Pool key.
        pool: String,
        /// Node name.
        node: String,
        /// The controller's root URL.
        controller: String,
        /// Why.
        source: RunnerError,
    },
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Nodes deleted on the controller.
    pub nodes: usize,
    /// Agents stopped.
    pub agents: usize,
}

/// True when `node` is a node of the pool with node name prefix `prefix`: the prefix and
/// 8 hex digits, as the connector names them (so pool `ci` never takes `ci-big-0123abcd`).
pub fn is_pool_node(prefix: &str, node: &str) -> bool {
    node.strip_prefix(prefix)
        .is_some_and(|rest| rest.len() == 8 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Deletes every node of pool `pool` (node name prefix `prefix`) on the controller of
/// `client` (and the nodes its agents run), and stops every agent `runner` started for that
/// pool there. The nodes go first,
/// so Jenkins gives them no new build while their agents stop.
pub async fn purge(
    client: &Client,
    runner: &dyn Runner,
    pool: &str,
    prefix: &str,
) -> Result<Purged, Error> {
    let controller = client.root().to_string();
    let (nodes, _) = client
        .computers()
        .await
        .map_err(|source| Error::ListNodes {
            pool: pool.to_string(),
            controller: controller.clone(),
            source,
        })?;
    let agents = runner
        .list(&controller)
        .await
        .map_err(|source| Error::ListAgents {
            pool: pool.to_string(),
            controller: controller.clone(),
            source,
        })?;
    let mut purged = Purged::default();
    // The pool's nodes: by prefix, and those its agents run (even after a prefix change).
    let ours = |name: &str| {
        is_pool_node(prefix, name) || agents.iter().any(|a| a.pool == pool && a.node == name)
    };
    for node in nodes.iter().filter(|n| ours(&n.name)) {
        match client.delete_node(&node.name).await {
            Ok(true) => purged.nodes += 1,
            Ok(false) => {}
            Err(source) => {
                return Err(Error::DeleteNode {
                    pool: pool.to_string(),
                    node: node.name.clone(),
                    controller,
                    source,
                });
            }
        }
    }
    for agent in agents.iter().filter(|a| a.pool == pool) {
        runner
            .stop(&controller, pool, &agent.node)
            .await
            .map_err(|source| Error::StopAgent {
                pool: pool.to_string(),
                node: agent.node.clone(),
                controller: controller.clone(),
                source,
            })?;
        purged.agents += 1;
    }
    tracing::info!(
        nodes = purged.nodes,
        agents = purged.agents,
        "purged the Jenkins pool"
    );
    Ok(purged)
}

#[cfg(test)]
mod tests {
    use super::is_pool_node;

    #[test]
    fn a_pool_owns_its_prefix_and_eight_hex_digits_only() {
        assert!(is_pool_node("ci-", "ci-0123abcd"));
        assert!(!is_pool_node("ci-", "ci-big-0123abcd"));
        assert!(!is_pool_node("ci-", "ci-0123abc"));
        assert!(!is_pool_node("ci-", "ci-0123abcz"));
        assert!(!is_pool_node("ci-", "other-0123abcd"));
    }
}
