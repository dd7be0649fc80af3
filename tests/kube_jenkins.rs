//! A Jenkins pool on Kubernetes, end to end: a real kube-apiserver (AgentPool, Secret, pods,
//! status subresource), the process kubelet (tests/support/kubelet.rs: the only simulated part
//! of the cluster) running each pod's command as a local process, and the Jenkins double
//! (tests/support/jenkins.rs) that the simulated inbound agent in those pods dials.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/jenkins.rs"]
mod jenkins;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
mod support;

use std::time::Duration;

use cluster::*;
use jenkins::{CrumbMode, Endpoint, JenkinsConfig, JenkinsDouble};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, PostParams};
use kubelet::ProcessKubelet;
use serde_json::json;
use support::*;
use warmpool::k8s::crd::AgentPool;

fn jenkins_pool(
    name: &str,
    j: &JenkinsDouble,
    secret: &str,
    cmd: serde_json::Value,
    extra: serde_json::Value,
) -> AgentPool {
    let spec = json!({
        "minIdle": 2,
        "maxTotal": 4,
        "connectTimeout": "20s",
        "jenkins": {
            "url": j.url(),
            "credentialsSecret": secret,
            "labels": "linux k8s",
            "remoteFS": "/tmp/warmpool-kube-jenkins",
            "agentCommand": cmd,
            "pollInterval": "100ms",
        },
        "template": {"spec": {"containers": [{"name": "jnlp", "image": "jenkins/inbound-agent:latest"}]}}
    });
    agent_pool_with(name, spec, extra)
}

#[tokio::test]
async fn jenkins_pool_as_pods_secret_status_leaks_orphans_and_adoption() {
    let (api, client) = apiserver().await;
    let _kubelet = ProcessKubelet::start(client.clone(), "default", Duration::from_millis(50));
    let j = JenkinsDouble::start(JenkinsConfig {
        crumb: CrumbMode::Enforced,
        ..JenkinsConfig::default()
    })
    .await;
    let (user, token) = j.credentials();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "jenkins-api"},
        "stringData": {"username": user, "token": token}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let pools: Api<AgentPool> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let h = start_with(kube_config(&client)).await;
    let fake = json!([EXE, "fake-jenkins-agent"]);
    pools
        .create(
            &PostParams::default(),
            &jenkins_pool("ci", &j, "jenkins-api", fake.clone(), json!({})),
        )
        .await
        .unwrap();

    // Two nodes online, each the agent of a pod named after it, with the inbound-agent env.
    assert!(
        j.wait_for(Duration::from_secs(30), |j| j.online_with_prefix("ci-")
            == 2)
            .await
    );
    let ps = live_pods(&client, "ci").await;
    assert_eq!(ps.len(), 2);
    let nodes: Vec<String> = {
        let mut v: Vec<String> = j
            .nodes()
            .into_iter()
            .filter(|n| n.name.starts_with("ci-"))
            .map(|n| n.name)
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&ps), nodes);
    let pod = &ps[0];
    let labels = pod.metadata.labels.clone().unwrap();
    assert_eq!(
        labels["warmpool.dev/jenkins-node"],
        pod.metadata.name.clone().unwrap()
    );
    assert_eq!(labels["app.kubernetes.io/managed-by"], "warmpool-jenkins");
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("AgentPool", "ci")
    );
    let env: std::collections::BTreeMap<String, String> = pod.spec.as_ref().unwrap().containers[0]
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    assert_eq!(env["JENKINS_URL"], j.url());
    assert_eq!(
        env["JENKINS_AGENT_NAME"],
        pod.metadata.name.clone().unwrap()
    );
    assert_eq!(env["JENKINS_WEB_SOCKET"], "true");
    assert_eq!(env["JENKINS_AGENT_WORKDIR"], "/tmp/warmpool-kube-jenkins");
    assert_eq!(
        Some(&env["JENKINS_SECRET"]),
        j.secret(&env["JENKINS_AGENT_NAME"]).as_ref()
    );
    // The AgentPool status counts Jenkins nodes.
    until("status idle 2 and Ready", async || {
        let s = status(&client, "ci").await;
        s.idle == 2 && condition(&s, "Ready", "True", "", &[])
    })
    .await;

    // A build runs on a warm pod; finished, its node and pod are recycled (maxUses 1).
    let id = j.enqueue("k8s");
    assert!(
        j.wait_for(Duration::from_secs(10), |j| j.build_of(id).is_some())
            .await
    );
    let b = j.build_of(id).unwrap();
    until("busy in status", async || {
        status(&client, "ci").await.leased == 1
    })
    .await;
    j.finish(&b.url);
    until("used pod deleted and replaced", async || {
        let now = pod_names(&client, "ci").await;
        !now.contains(&b.node) && now.len() == 2
    })
    .await;
    assert!(
        j.wait_for(Duration::from_secs(10), |j| j.node(&b.node).is_none())
            .await
    );

    // An orphan pod (its node does not exist) is deleted.
    let mut orphan = pod.clone();
    orphan.metadata = kube::api::ObjectMeta {
        name: Some("ci-0rphan00".into()),
        labels: Some(
            [
                ("warmpool.dev/pool".to_string(), "ci".to_string()),
                (
                    "warmpool.dev/jenkins-node".to_string(),
                    "ci-0rphan00".to_string(),
                ),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "warmpool-jenkins".to_string(),
                ),
            ]
            .into(),
        ),
        annotations: pod.metadata.annotations.clone(),
        ..Default::default()
    };
    orphan.status = None;
    pods.create(&PostParams::default(), &orphan).await.unwrap();
    until("orphan pod deleted", async || {
        pod_gone(&client, "ci-0rphan00").await
    })
    .await;

    // A pool whose agents never connect: node and pod deleted after connectTimeout, a leak.
    let never = json!([
        "env",
        "FAKE_JENKINS_AGENT_NEVER_CONNECT=1",
        EXE,
        "fake-jenkins-agent"
    ]);
    pools
        .create(
            &PostParams::default(),
            &jenkins_pool(
                "stuck",
                &j,
                "jenkins-api",
                never,
                json!({"minIdle": 1, "connectTimeout": "1s"}),
            ),
        )
        .await
        .unwrap();
    until("a stuck pod", async || {
        !live_pods(&client, "stuck").await.is_empty()
    })
    .await;
    let first = pod_names(&client, "stuck").await[0].clone();
    until("stuck pod deleted, leak in status", async || {
        !pod_names(&client, "stuck").await.contains(&first)
            && status(&client, "stuck").await.leaks_total >= 1
    })
    .await;
    assert!(j.node(&first).is_none());

    // Missing credentials: Degraded, naming the Secret; the other pools are unaffected.
    pools
        .create(
            &PostParams::default(),
            &jenkins_pool("nocreds", &j, "no-such-secret", fake.clone(), json!({})),
        )
        .await
        .unwrap();
    until("nocreds degraded", async || {
        let reason = "CredentialsMissing";
        has_condition(
            &client,
            "nocreds",
            "Degraded",
            "True",
            reason,
            &["no-such-secret"],
        )
        .await
    })
    .await;
    assert!(live_pods(&client, "nocreds").await.is_empty());
    pools.delete("stuck", &Default::default()).await.unwrap();
    pools.delete("nocreds", &Default::default()).await.unwrap();

    // Restart: the new instance adopts nodes and pods; nothing created, nothing deleted.
    until("ci back at 2 idle", async || {
        status(&client, "ci").await.idle == 2
    })
    .await;
    let before = pod_names(&client, "ci").await;
    let addr = h.server.addr;
    h.server.shutdown().await;
    let created = j.request_count(Endpoint::CreateNode);
    let deleted = j.request_count(Endpoint::DeleteNode);
    let h2 = start_at(kube_config(&client), addr).await;
    until("adopted", async || {
        h2.server
            .svc
            .jenkins
            .get()
            .unwrap()
            .statuses()
            .iter()
            .any(|s| s.name == "ci" && s.nodes.idle == 2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(j.request_count(Endpoint::CreateNode), created);
    assert_eq!(j.request_count(Endpoint::DeleteNode), deleted);
    assert_eq!(pod_names(&client, "ci").await, before);
    // Deleting the AgentPool deletes its nodes.
    pools.delete("ci", &Default::default()).await.unwrap();
    assert!(
        j.wait_for(Duration::from_secs(20), |j| !j
            .nodes()
            .iter()
            .any(|n| n.name.starts_with("ci-")))
            .await
    );
    h2.server.shutdown().await;
    drop(api);
}
