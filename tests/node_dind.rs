//! The Docker-in-Docker example (`manifests/examples/agentpool-docker.yaml`) on the real node:
//! each agent pod has a privileged sidecar running Debian's dockerd, jobs use it through
//! `DOCKER_HOST` (the pool's configured variable), and the pool's hooks keep reused pods clean.
//! The hooks are the example's own; the pod template is adapted to the node as
//! docs/KUBERNETES.md ("Docker-in-Docker on the node") says: host network, the daemon's socket
//! shared through an emptyDir, local images. Skips without a node, like tests/node_e2e.rs.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/kube.rs"]
mod kube_api;
#[path = "support/kubelet.rs"]
mod kubelet;
#[path = "support/node.rs"]
mod node;
mod support;

use std::time::Duration;

use cluster::*;
use kube::api::{DeleteParams, PostParams};
use node::*;
use serde_json::{Value, json};
use support::*;

const AGENT_IMAGE: &str = "warmpool-agent-docker:node-e2e";
const DIND_IMAGE: &str = "warmpool-dind:node-e2e";

/// The example's spec, its pod template replaced by the node's variant.
fn example_spec(name: &str) -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/manifests/examples/agentpool-docker.yaml"
    );
    let doc: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut spec = doc["spec"].clone();
    assert_eq!(spec["agentContainer"], "agent");
    assert!(spec["hooks"]["cleanup"]["command"][2].is_string());
    spec["labels"] = json!(["linux", "docker", name]);
    // One pod, so the next lease must reuse it.
    spec["minIdle"] = json!(1);
    spec["maxTotal"] = json!(1);
    spec["template"] = json!({"spec": {
        "hostNetwork": true,
        "volumes": [{"name": "dind-sock", "emptyDir": {}}, {"name": "dind-data", "emptyDir": {}}],
        "containers": [
            {
                "name": "agent", "image": AGENT_IMAGE, "imagePullPolicy": "Never",
                "command": ["/usr/local/bin/warmpool", "agent"],
                "env": [{"name": "DOCKER_HOST", "value": "unix:///var/run/dind/docker.sock"}],
                "volumeMounts": [{"name": "dind-sock", "mountPath": "/var/run/dind"}]
            },
            {
                "name": "dind", "image": DIND_IMAGE, "imagePullPolicy": "Never",
                "securityContext": {"privileged": true},
                "volumeMounts": [
                    {"name": "dind-sock", "mountPath": "/var/run/dind"},
                    {"name": "dind-data", "mountPath": "/var/lib/docker"}
                ]
            }
        ]
    }});
    spec
}

/// A job script: waits for the sidecar's daemon, then builds `job-img:<tag>` FROM scratch
/// (busybox and a file holding the tag, so each tag is its own image).
fn build_job_image(tag: &str) -> String {
    format!(
        "for i in $(seq 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done; \
         d=$(mktemp -d) && cp /bin/busybox $d/ && echo {tag} > $d/tag && \
         printf 'FROM scratch\\nCOPY busybox /bin/busybox\\nCOPY tag /tag\\n' > $d/Dockerfile && \
         docker build -q -t job-img:{tag} $d >/dev/null"
    )
}

async fn start_pool(client: &kube::Client, h: &Harness, name: &str, spec: Value) -> String {
    pools(client)
        .create(
            &PostParams::default(),
            &agent_pool_with(name, spec, json!({})),
        )
        .await
        .unwrap();
    poll(
        "a Docker-in-Docker agent idle",
        Duration::from_secs(180),
        async || {
            h.server
                .svc
                .pools()
                .iter()
                .any(|p| p.name == name && p.idle == 1)
        },
    )
    .await;
    let pods = live_pods(client, name).await;
    assert_eq!(pods.len(), 1, "{:?}", names(&pods));
    names(&pods)[0].clone()
}

async fn run(h: &Harness, lease: &str, s: &str) -> String {
    let out = exec(h, lease, script(s)).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code,
        Some(0),
        "{s}\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn delete_pool(client: &kube::Client, name: &str) {
    pools(client)
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    poll(
        "the pool's pods gone",
        Duration::from_secs(180),
        async || pods_of(client, name).await.is_empty(),
    )
    .await;
}

#[tokio::test]
async fn docker_in_docker_example_cleans_reused_pods_and_recycles_past_the_health_limit() {
    let Some((client, _node)) = node_setup("node-dind-").await else {
        return;
    };
    build_image(AGENT_IMAGE, &["--docker-cli"]);
    build_image(DIND_IMAGE, &["--dind"]);
    let h = start_with(kube_config(&client)).await;

    // The example as it is: a job's `docker run` without --rm leaves a container and an image;
    // the cleanup hook removes both, the health hook passes and the pod is reused.
    let name = format!("node-dind-{}", std::process::id());
    let pod = start_pool(&client, &h, &name, example_spec(&name)).await;
    let l = h.lease(&name, 60.0, 300.0).await;
    assert_eq!(l.agent, pod);
    let out = run(
        &h,
        &l.id,
        &format!(
            "{} && docker run --network none job-img:1 /bin/busybox echo from-inner && \
             docker ps -aq | grep -c .",
            build_job_image("1")
        ),
    )
    .await;
    assert_eq!(out, "from-inner\n1\n", "a leftover container");
    h.client.release(&l.id).await.unwrap();
    h.wait_idle(&name, 1).await;
    let l = h.lease(&name, 60.0, 300.0).await;
    assert_eq!(l.agent, pod, "reused (maxUses 20)");
    let out = run(
        &h,
        &l.id,
        "echo $(docker ps -aq | grep -c .) $(docker images -q | grep -c .)",
    )
    .await;
    assert_eq!(out, "0 0\n", "the cleanup hook removed the leftovers");
    h.client.release(&l.id).await.unwrap();
    h.wait_idle(&name, 1).await;
    assert_eq!(h.recycles("health-check-failed"), 0);
    delete_pool(&client, &name).await;

    // The example's variant that keeps tagged images as a warm cache (`prune -f` without -a)
    // with room for one: a job leaving two is past the health limit, and the pod is recycled.
    let name = format!("node-dind-cache-{}", std::process::id());
    let mut spec = example_spec(&name);
    let cleanup = spec["hooks"]["cleanup"]["command"][2]
        .as_str()
        .unwrap()
        .replace("prune -af", "prune -f");
    spec["hooks"]["cleanup"]["command"][2] = json!(cleanup);
    let health = spec["hooks"]["health"]["command"][2]
        .as_str()
        .unwrap()
        .replace("maxImages=20", "maxImages=1");
    spec["hooks"]["health"]["command"][2] = json!(health);
    let pod = start_pool(&client, &h, &name, spec).await;
    let l = h.lease(&name, 60.0, 300.0).await;
    run(
        &h,
        &l.id,
        &format!("{} && {}", build_job_image("1"), build_job_image("2")),
    )
    .await;
    h.client.release(&l.id).await.unwrap();
    poll(
        "the pod past the health limit recycled and replaced",
        Duration::from_secs(180),
        async || {
            let live = names(&live_pods(&client, &name).await);
            !live.contains(&pod)
                && live.len() == 1
                && h.server
                    .svc
                    .pools()
                    .iter()
                    .any(|p| p.name == name && p.idle == 1)
        },
    )
    .await;
    assert_eq!(h.recycles("health-check-failed"), 1);
    // Deleted while warmpool runs: its finalizer's cleanup removes the pods, then lets the
    // AgentPool go (deleted while warmpool is down, it would wait for the next instance).
    delete_pool(&client, &name).await;
    h.server.shutdown().await;
}
