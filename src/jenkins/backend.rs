//! The backend of Jenkins pools: what the engine's actions mean for a Jenkins agent.
//! - Provision: take a connecting permit of the controller (`maxConnecting`), create the node,
//!   read its secret, start its agent on the [`Runner`]; `Started` once it runs. The permit is
//!   held until the poll sees the node online.
//! - Terminate: delete the node and stop the agent; `Exited` once both are done.
//! - Drain: take the node's labels before its last allowed build, so Jenkins gives it no other.
//!
//! Never blocks the service's dispatcher: every call is spawned, outcomes come back on the
//! [`EventSink`]. Failures are recorded as the pool's `Degraded` problems and reported to the
//! engine (`Failed`), which backs the pool off.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::Instrument;

use super::runner::Launch;
use super::*;
use crate::backend::{Backend, BackendEvent, BoxFuture, EventSink, PoolEvent, ProvisionRequest};

/// The span of the work on one Jenkins agent: its logs carry the pool, the node and the
/// controller.
fn agent_span(pool: &str, node: &str, controller: &str) -> tracing::Span {
    tracing::info_span!("jenkins_agent", pool = %pool, node = %node, controller = %controller)
}

/// The description of every node warmpool creates.
fn description(pool: &str) -> String {
    format!("warmpool pool {pool} (managed: do not edit)")
}

impl Connector {
    /// Registers an agent the connector will handle (provisioned here, or adopted or found as
    /// an orphan by the poll) so its termination reaches the right controller.
    pub(super) fn track(&self, agent: &str, pool: &str) {
        let pools = self.pools.lock().expect("lock");
        let Some(e) = pools.get(pool) else { return };
        let entry = AgentEntry {
            pool: pool.to_string(),
            root: e.root.clone(),
            client: e.client.clone(),
            remote_fs: self.runner.workdir(&e.cfg.jenkins, agent),
            permit: None,
        };
        drop(pools);
        self.agents
            .lock()
            .expect("lock")
            .entry(agent.to_string())
            .or_insert(entry);
    }

    /// The node is online: its connecting permit goes back to the controller.
    pub(super) fn connected(&self, agent: &str) {
        let (permit, pool) = {
            let mut agents = self.agents.lock().expect("lock");
            match agents.get_mut(agent) {
                Some(a) => (a.permit.take(), Some(a.pool.clone())),
                None => (None, None),
            }
        };
        // An agent of the pool came online: its agents do connect.
        if permit.is_some()
            && let Some(pool) = pool
        {
            self.set_problem(&pool, PROBLEM_CONNECT, None);
        }
        drop(permit);
    }

    /// Takes the labels of a node running its last allowed build (engine `Drain`).
    pub fn drain(&self, pool: &str, agent: &str) {
        let Some((client, remote_fs)) = self
            .agents
            .lock()
            .expect("lock")
            .get(agent)
            .map(|a| (a.client.clone(), a.remote_fs.clone()))
        else {
            return;
        };
        let Some(client) = client else { return };
        let (me, pool, node) = (self.this(), pool.to_string(), agent.to_string());
        let span = agent_span(&pool, &node, client.root());
        self.tasks.spawn(
            async move {
                match client
                    .drain_node(&node, &remote_fs, &description(&pool))
                    .await
                {
                    Ok(()) => {
                        tracing::info!(
                            "Jenkins node drained: its last allowed build runs, then it is deleted"
                        );
                        me.set_problem(&pool, PROBLEM_DRAIN, None);
                    }
                    Err(e) => {
                        // Not fatal: the node is still deleted when the build ends, but Jenkins may
                        // give it one more build first.
                        tracing::warn!(error = %e, "draining a Jenkins node failed");
                        let p = Problem::from_error(&pool, Some(&node), "draining the node", &e);
                        me.set_problem(&pool, PROBLEM_DRAIN, Some(p));
                    }
                }
            }
            .instrument(span),
        );
    }

    async fn provision_agent(
        self: Arc<Self>,
        req: ProvisionRequest,
        ctl: Arc<Controller>,
        cfg: Arc<PoolCfg>,
        client: Arc<Client>,
        cancel: CancellationToken,
        events: EventSink,
    ) {
        let node = req.agent.clone();
        let failed = |error: String| {
            let _ = events.send(BackendEvent::Failed {
                pool: cfg.key.clone(),
                agent: node.clone(),
                error,
            });
        };
        let permit = tokio::select! {
            p = ctl.gate.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return failed("the controller's connecting gate is closed".into()),
            },
            _ = ctl.stop.cancelled() => return failed("warmpool is shutting down".into()),
            _ = cancel.cancelled() => return failed(format!("pool {} was removed", cfg.key)),
        };
        self.metrics
            .jenkins_connecting
            .with_label_values(&[&ctl.root])
            .set(ctl.connecting() as i64);
        let workdir = self.runner.workdir(&cfg.jenkins, &node);
        let fail = |p: Problem| {
            tracing::warn!(error = %p.message, "provisioning a Jenkins agent failed");
            let msg = p.message.clone();
            self.set_problem(&cfg.key, PROBLEM_CREATE, Some(p));
            failed(msg);
        };
        if let Err(e) = client
            .create_node(&node, &workdir, &cfg.jenkins.labels, &description(&cfg.key))
            .await
        {
            return fail(Problem::from_error(
                &cfg.key,
                Some(&node),
                "creating the node",
                &e,
            ));
        }
        let secret = match client.secret(&node).await {
            Ok(s) => s,
            Err(e) => {
                self.undo(&cfg, &client, &node).await;
                return fail(Problem::from_error(
                    &cfg.key,
                    Some(&node),
                    "reading the agent secret",
                    &e,
                ));
            }
        };
        if ctl.stop.is_cancelled() || cancel.is_cancelled() {
            // Shutting down, or the pool is gone: no new agent; the node goes again.
            self.undo(&cfg, &client, &node).await;
            return failed(format!("pool {}: removed or shutting down", cfg.key));
        }
        let launch = Launch {
            pool: cfg.key.clone(),
            node: node.clone(),
            url: ctl.root.clone(),
            secret,
            workdir,
            spec: cfg.jenkins.clone(),
            agent_pool: cfg.agent_pool.clone(),
            ca_file: cfg.jenkins.ca_file.clone().or_else(|| self.ca_file.clone()),
        };
        if let Err(e) = self.runner.start(launch).await {
            self.undo(&cfg, &client, &node).await;
            return fail(Problem {
                reason: "AgentStartFailed".into(),
                message: format!(
                    "pool {}: node {node}: starting its agent ({}) failed: {e}",
                    cfg.key,
                    self.runner.name()
                ),
            });
        }
        tracing::info!("Jenkins node created; agent started");
        self.metrics
            .provisions
            .with_label_values(&[&cfg.key, "started"])
            .inc();
        self.set_problem(&cfg.key, PROBLEM_CREATE, None);
        let tracked = match self.agents.lock().expect("lock").get_mut(&node) {
            Some(a) => {
                a.permit = Some(permit);
                true
            }
            None => false,
        };
        if !tracked {
            // Terminated while it was being created (its pool went, or it timed out).
            self.undo(&cfg, &client, &node).await;
            return;
        }
        let _ = events.send(BackendEvent::Started { agent: node });
        ctl.started.notify_one();
    }

    /// Removes a half-provisioned node (best effort: a node left behind is an orphan the next
    /// poll deletes).
    async fn undo(&self, cfg: &PoolCfg, client: &Client, node: &str) {
        if let Err(e) = client.delete_node(node).await {
            tracing::warn!(error = %e, "deleting a half-provisioned node failed; the next poll retries");
        }
        let _ = self.runner.stop(client.root(), &cfg.key, node).await;
        self.deleted
            .lock()
            .expect("lock")
            .insert(node.to_string(), Instant::now());
    }
}

impl Backend for Connector {
    fn name(&self) -> &'static str {
        "jenkins"
    }

    fn provision(&self, req: ProvisionRequest, events: EventSink) {
        let found = {
            let pools = self.pools.lock().expect("lock");
            pools.get(&req.pool).map(|e| {
                (
                    e.cfg.clone(),
                    e.client.clone(),
                    e.cancel.clone(),
                    e.root.clone(),
                )
            })
        };
        let ctl = found
            .as_ref()
            .and_then(|f| self.controllers.lock().expect("lock").get(&f.3).cloned());
        let (Some((cfg, Some(client), cancel, _)), Some(ctl)) = (found, ctl) else {
            let _ = events.send(BackendEvent::Failed {
                error: format!(
                    "pool {}: not a Jenkins pool with credentials on this service",
                    req.pool
                ),
                pool: req.pool,
                agent: req.agent,
            });
            return;
        };
        self.track(&req.agent, &req.pool);
        let me = self.this();
        let span = agent_span(&req.pool, &req.agent, &ctl.root);
        self.tasks.spawn(
            async move {
                me.provision_agent(req, ctl, cfg, client, cancel, events)
                    .await
            }
            .instrument(span),
        );
    }

    fn terminate(&self, agent: &str, events: EventSink) {
        if self.keep.load(Ordering::SeqCst) {
            // Left for the next instance.
            return;
        }
        let Some((pool, root, client, permit)) =
            self.agents.lock().expect("lock").get_mut(agent).map(|a| {
                (
                    a.pool.clone(),
                    a.root.clone(),
                    a.client.clone(),
                    a.permit.take(),
                )
            })
        else {
            let _ = events.send(BackendEvent::Exited {
                agent: agent.to_string(),
                detail: "not a Jenkins agent of this service".into(),
            });
            return;
        };
        drop(permit);
        let (me, node) = (self.this(), agent.to_string());
        let span = agent_span(&pool, &node, &root);
        self.tasks.spawn(
            async move {
            let mut detail = "node deleted, agent stopped".to_string();
            if let Some(c) = &client {
                match c.delete_node(&node).await {
                    Ok(_) => me.set_problem(&pool, PROBLEM_DELETE, None),
                    Err(e) => {
                        // Its agent is stopped below: the next poll finds the node without it
                        // and deletes it as an orphan.
                        tracing::warn!(error = %e, "deleting a Jenkins node failed; the next poll retries");
                        let p = Problem::from_error(&pool, Some(&node), "deleting the node", &e);
                        me.set_problem(&pool, PROBLEM_DELETE, Some(p));
                        detail = format!("agent stopped; deleting the node failed: {e}");
                    }
                }
            }
            if let Err(e) = me.runner.stop(&root, &pool, &node).await {
                tracing::warn!(error = %e, "stopping an agent failed; the next poll retries");
            }
            me.deleted
                .lock()
                .expect("lock")
                .insert(node.clone(), Instant::now());
            me.agents.lock().expect("lock").remove(&node);
            let _ = events.send(BackendEvent::Exited {
                agent: node,
                detail,
            });
        }
            .instrument(span),
        );
    }

    fn record(&self, pool: &str, event: PoolEvent) {
        if let PoolEvent::Leak { agent } = event {
            let timeout = self
                .pools
                .lock()
                .expect("lock")
                .get(pool)
                .map(|e| e.cfg.spec.connect_timeout.to_string())
                .unwrap_or_default();
            let p = Problem {
                reason: "AgentNeverConnected".into(),
                message: format!(
                    "pool {pool}: node {agent}: its agent did not come online within connectTimeout {timeout}; node and agent deleted (a leak)"
                ),
            };
            self.set_problem(pool, PROBLEM_CONNECT, Some(p));
        }
    }

    fn shutdown(&self) -> BoxFuture<'_> {
        // The service shuts the connector down first (`Connector::shutdown`).
        Box::pin(async {})
    }
}
