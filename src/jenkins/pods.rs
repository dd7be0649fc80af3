//! Jenkins agents as pods: [`KubeRunner`] builds each agent pod from its `AgentPool`'s
//! template (the official `jenkins/inbound-agent` image reads the injected `JENKINS_*`
//! variables), names it after its node, labels it so it can be listed and adopted
//! (`warmpool.dev/pool`, `warmpool.dev/jenkins-node`, managed-by `warmpool-jenkins`, which the
//! warmpool-agent pod watcher ignores), and owns it by the `AgentPool` so deleting the pool
//! deletes its pods. Finished pods (Succeeded/Failed) are deleted when listed.
//!
//! Also reads a pool's credentials Secret (`username` and `token`, or `password`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};

use super::config::CredentialsError;
use super::config::{Credentials, JenkinsSpec};
use super::runner::{AgentRef, BoxFuture, Launch, Runner, RunnerError};
use crate::backend::kubernetes::{LABEL_MANAGED_BY, LABEL_POOL, pod_from_template};

/// Label: the Jenkins node a pod is the agent of (also the pod's name).
pub const LABEL_JENKINS_NODE: &str = "warmpool.dev/jenkins-node";
/// `app.kubernetes.io/managed-by` of Jenkins agent pods.
pub const MANAGED_BY: &str = "warmpool-jenkins";
/// Annotation: the controller's root URL.
pub const ANNOTATION_JENKINS_URL: &str = "warmpool.dev/jenkins-url";

/// Agents as pods.
pub struct KubeRunner {
    client: Client,
    namespace: Option<String>,
}

impl KubeRunner {
    /// A runner for one namespace, or all (pool keys are then `namespace.name`).
    pub fn new(client: Client, namespace: Option<String>) -> KubeRunner {
        KubeRunner { client, namespace }
    }

    fn key(&self, ns: &str, name: &str) -> String {
        match &self.namespace {
            Some(_) => name.to_string(),
            None => format!("{ns}.{name}"),
        }
    }

    fn ns_of_key<'a>(&'a self, key: &'a str) -> &'a str {
        match &self.namespace {
            Some(ns) => ns,
            None => key.split_once('.').map_or("default", |(ns, _)| ns),
        }
    }
}

/// Builds the agent pod of `launch` from its AgentPool's template.
pub fn build_pod(launch: &Launch) -> Result<Pod, RunnerError> {
    let ap = launch
        .agent_pool
        .as_ref()
        .ok_or_else(|| RunnerError::NoAgentPool {
            node: launch.node.clone(),
        })?;
    pod_from_template(
        ap,
        &launch.node,
        launch.spec.agent_command.as_deref(),
        launch.env(),
        [
            (LABEL_JENKINS_NODE, launch.node.clone()),
            (LABEL_MANAGED_BY, MANAGED_BY.to_string()),
        ],
        [(ANNOTATION_JENKINS_URL, launch.url.clone())],
    )
    .map_err(|source| RunnerError::Template {
        node: launch.node.clone(),
        source: Box::new(source),
    })
}

impl Runner for KubeRunner {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn workdir(&self, spec: &JenkinsSpec, _node: &str) -> String {
        spec.remote_fs.clone()
    }

    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<(), RunnerError>> {
        Box::pin(async move {
            let pod = build_pod(&launch)?;
            let ns = pod.namespace().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            match api.create(&PostParams::default(), &pod).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                Err(source) => Err(RunnerError::Pod {
                    action: "creating",
                    namespace: ns,
                    name: launch.node.clone(),
                    source: Box::new(source),
                }),
            }
        })
    }

    fn stop(&self, _url: &str, pool: &str, node: &str) -> BoxFuture<'_, Result<(), RunnerError>> {
        let ns = self.ns_of_key(pool).to_string();
        let node = node.to_string();
        Box::pin(async move {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            match api.delete(&node, &DeleteParams::default()).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                Err(source) => Err(RunnerError::Pod {
                    action: "deleting",
                    namespace: ns,
                    name: node,
                    source: Box::new(source),
                }),
            }
        })
    }

    fn list(&self, url: &str) -> BoxFuture<'_, Result<Vec<AgentRef>, RunnerError>> {
        let url = url.to_string();
        Box::pin(async move {
            let api: Api<Pod> = match &self.namespace {
                Some(ns) => Api::namespaced(self.client.clone(), ns),
                None => Api::all(self.client.clone()),
            };
            let lp = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"));
            let pods = api
                .list(&lp)
                .await
                .map_err(|e| RunnerError::List(Box::new(e)))?;
            let mut out = Vec::new();
            for pod in pods.items {
                if pod.annotations().get(ANNOTATION_JENKINS_URL) != Some(&url) {
                    continue;
                }
                let (Some(pool), Some(node)) = (
                    pod.labels().get(LABEL_POOL).cloned(),
                    pod.labels().get(LABEL_JENKINS_NODE).cloned(),
                ) else {
                    continue;
                };
                let ns = pod.namespace().unwrap_or_default();
                if pod.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                if matches!(phase, Some("Succeeded") | Some("Failed")) {
                    // The agent ended: its pod goes (its node is an orphan the planner deletes).
                    let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
                    let name = pod.name_any();
                    tokio::spawn(async move {
                        let _ = api.delete(&name, &DeleteParams::default()).await;
                    });
                    continue;
                }
                out.push(AgentRef {
                    pool: self.key(&ns, &pool),
                    node,
                    started: pod
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| std::time::SystemTime::from(t.0)),
                });
            }
            Ok(out)
        })
    }
}

/// Reads a pool's Jenkins credentials from Secret `name` in `namespace`: `username` and `token`
/// (or `password`, as in a `kubernetes.io/basic-auth` Secret).
pub async fn read_credentials(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Credentials, CredentialsError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let s = api.get(name).await.map_err(|e| CredentialsError::Secret {
        secret: format!("{namespace}/{name}"),
        message: e.to_string(),
    })?;
    let data = s.data.unwrap_or_default();
    let mut string_data = s.string_data.unwrap_or_default();
    let get = |k: &str, sd: &mut BTreeMap<String, String>| -> Option<String> {
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
            .or_else(|| sd.remove(k).map(|v| v.trim().to_string()))
            .filter(|v| !v.is_empty())
    };
    let user = get("username", &mut string_data).ok_or_else(|| CredentialsError::SecretKey {
        secret: format!("{namespace}/{name}"),
        keys: "`username`",
    })?;
    let token = get("token", &mut string_data)
        .or_else(|| get("password", &mut string_data))
        .ok_or_else(|| CredentialsError::SecretKey {
            secret: format!("{namespace}/{name}"),
            keys: "`token` (or `password`)",
        })?;
    Ok(Credentials { user, token })
}
