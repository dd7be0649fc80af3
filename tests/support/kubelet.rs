//! A *simulated* kubelet, the one part of the cluster that cannot exist here: the process
//! kubelet. It watches pods in a namespace and, for each new pod:
//!   1. binds it to the node `process-kubelet` (pods/binding),
//!   2. after `start_delay`, starts the first container's command and args as a local process
//!      with the container's env (so agents really dial the hub), and marks the pod Running
//!      through the status subresource,
//!   3. marks it Succeeded/Failed when the process exits,
//!   4. when the pod gets a deletionTimestamp, kills the process and removes the pod (grace 0),
//!      as a kubelet confirms a deletion.
//!
//! With [`KubeletOptions`] it behaves more like a real v1.20 kubelet under churn:
//! - `graceful`: a deletion sends SIGTERM and the container keeps running until it exits (SIGKILL
//!   after the pod's grace period); the phase is left as it was (a v1.20 kubelet writes no
//!   terminal phase for a deleted pod) and the object is removed `reclaim` after the container
//!   stopped (volume teardown: 3-15 s on a real node);
//! - `lose_every`: every nth pod's node is lost for `lost_for` shortly after it runs: the pod is
//!   marked `Unknown` (the node controller's part) while its process keeps running, and the
//!   kubelet writes nothing and confirms no deletion for it until the node is back.
//!
//! - `missing_images`: a container whose image is listed never starts: the pod stays Pending and
//!   the container waits with `ErrImageNeverPull` (pull policy Never) or `ImagePullBackOff`,
//!   with the real kubelet's message.
//!
//! Container states are written as a v1.20 kubelet with Docker writes them (checked on the real
//! node of scripts/kube-node.sh): an exit ends the pod `Failed` with the container `terminated`
//! `{exitCode, reason: Error}` (`Completed` and `Succeeded` for 0), a signal as exit code
//! 128 + signal; [`ProcessKubelet::oom_kill`] kills a pod's process as the kernel does at the
//! container's memory limit, reported `OOMKilled`, exit code 137.
//!
//! Everything else (the apiserver, etcd, watches) is real.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

pub const NODE: &str = "process-kubelet";
/// Labels of the one simulated node.
pub const NODE_LABELS: [(&str, &str); 2] = [
    ("kubernetes.io/os", "linux"),
    ("kubernetes.io/hostname", NODE),
];

pub struct ProcessKubelet {
    stop: CancellationToken,
    procs: Arc<Mutex<HashMap<String, u32>>>,
    shared: SharedState,
}

/// How the simulated kubelet behaves (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct KubeletOptions {
    /// Delay between binding a pod and starting its process.
    pub start_delay: Duration,
    /// Graceful deletion: `Some(reclaim)`, the time between the container stopping and the
    /// object's removal. None: kill at once and remove (grace 0).
    pub graceful: Option<Duration>,
    /// Every nth started pod loses its node (0: never).
    pub lose_every: u32,
    /// How long a lost node stays lost.
    pub lost_for: Duration,
    /// Images that are not on the node (and cannot be pulled).
    pub missing_images: Vec<String>,
}

/// Per-pod state shared by the kubelet's tasks.
#[derive(Default)]
struct Shared {
    /// Pods being deleted gracefully: their process exit writes no phase.
    deleting: std::collections::HashSet<String>,
    /// Pods whose node is lost, until when.
    lost_until: HashMap<String, tokio::time::Instant>,
    /// Pods whose process was OOM-killed.
    oom_killed: std::collections::HashSet<String>,
}

type SharedState = Arc<Mutex<Shared>>;

/// Waits until the pod's node is back (at once when it was never lost).
async fn node_back(shared: &SharedState, name: &str) {
    let until = shared.lock().unwrap().lost_until.get(name).copied();
    if let Some(t) = until {
        tokio::time::sleep_until(t).await;
    }
}

impl ProcessKubelet {
    pub fn start(client: Client, namespace: &str, start_delay: Duration) -> ProcessKubelet {
        ProcessKubelet::start_with(
            client,
            namespace,
            KubeletOptions {
                start_delay,
                ..Default::default()
            },
        )
    }

    pub fn start_with(client: Client, namespace: &str, opts: KubeletOptions) -> ProcessKubelet {
        let start_delay = opts.start_delay;
        let stop = CancellationToken::new();
        let procs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let shared: SharedState = Arc::default();
        let kubelet_shared = shared.clone();
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let (s, p, ns) = (stop.clone(), procs.clone(), namespace.to_string());
        tokio::spawn(async move {
            let mut n_started = 0u32;
            let mut stream = watcher::watcher(api.clone(), watcher::Config::default())
                .default_backoff()
                .boxed();
            let mut started: std::collections::HashSet<String> = Default::default();
            loop {
                let ev = tokio::select! {
                    _ = s.cancelled() => return,
                    ev = stream.next() => ev,
                };
                let Some(Ok(ev)) = ev else { continue };
                match ev {
                    Event::Apply(pod) | Event::InitApply(pod) => {
                        let name = pod.name_any();
                        if pod.metadata.deletion_timestamp.is_some() {
                            match opts.graceful {
                                Some(reclaim) => {
                                    if shared.lock().unwrap().deleting.insert(name.clone()) {
                                        tokio::spawn(delete_gracefully(
                                            api.clone(),
                                            pod,
                                            p.clone(),
                                            shared.clone(),
                                            reclaim,
                                        ));
                                    }
                                }
                                None => {
                                    kill(&p, &name);
                                    let _ = api
                                        .delete(&name, &DeleteParams::default().grace_period(0))
                                        .await;
                                }
                            }
                            continue;
                        }
                        let bound = pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.node_name.clone())
                            .is_some();
                        if !bound {
                            // The scheduler's part: a nodeSelector this node cannot satisfy
                            // leaves the pod Pending and Unschedulable, as kube-scheduler does.
                            let selector = pod
                                .spec
                                .as_ref()
                                .and_then(|s| s.node_selector.clone())
                                .unwrap_or_default();
                            let fits = selector.iter().all(|(k, v)| {
                                NODE_LABELS.iter().any(|(nk, nv)| nk == k && nv == v)
                            });
                            if fits {
                                bind(&client, &ns, &name).await;
                            } else {
                                mark_unschedulable(&api, &name).await;
                            }
                            continue;
                        }
                        if started.insert(name.clone()) {
                            n_started += 1;
                            let lose =
                                opts.lose_every > 0 && n_started.is_multiple_of(opts.lose_every);
                            let lose = lose.then_some(opts.lost_for);
                            tokio::spawn(run_pod(
                                api.clone(),
                                pod,
                                p.clone(),
                                shared.clone(),
                                start_delay,
                                lose,
                                opts.missing_images.clone(),
                            ));
                        }
                    }
                    Event::Delete(pod) => kill(&p, &pod.name_any()),
                    _ => {}
                }
            }
        });
        ProcessKubelet {
            stop,
            procs,
            shared: kubelet_shared,
        }
    }

    /// Pids of the pods' processes now running.
    pub fn running(&self) -> usize {
        self.procs.lock().unwrap().len()
    }

    /// Kills pod `name`'s process as the kernel does at its container's memory limit (SIGKILL);
    /// the pod ends `Failed`, its container `OOMKilled` with exit code 137. False when it does
    /// not run.
    pub fn oom_kill(&self, name: &str) -> bool {
        let Some(pid) = self.procs.lock().unwrap().get(name).copied() else {
            return false;
        };
        self.shared
            .lock()
            .unwrap()
            .oom_killed
            .insert(name.to_string());
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        true
    }
}

impl Drop for ProcessKubelet {
    fn drop(&mut self) {
        self.stop.cancel();
        for (_, pid) in self.procs.lock().unwrap().drain() {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

fn kill(procs: &Arc<Mutex<HashMap<String, u32>>>, name: &str) {
    if let Some(pid) = procs.lock().unwrap().remove(name) {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

async fn bind(client: &Client, ns: &str, name: &str) {
    let body = serde_json::json!({
        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}
    });
    let req = http::Request::post(format!("/api/v1/namespaces/{ns}/pods/{name}/binding"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .unwrap();
    let _ = client.request_text(req).await;
}

async fn mark_unschedulable(api: &Api<Pod>, name: &str) {
    let patch = serde_json::json!({"status": {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    }]}});
    let _ = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await;
}

async fn set_phase(api: &Api<Pod>, name: &str, phase: &str) {
    let ready = if phase == "Running" { "True" } else { "False" };
    let patch = serde_json::json!({"status": {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": ready}],
        "startTime": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    }});
    let _ = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await;
}

/// A real kubelet's graceful deletion: SIGTERM, wait for the container (SIGKILL after the
/// pod's grace period), no phase written, the object removed `reclaim` later. A lost node
/// acts only once it is back.
async fn delete_gracefully(
    api: Api<Pod>,
    pod: Pod,
    procs: Arc<Mutex<HashMap<String, u32>>>,
    shared: SharedState,
    reclaim: Duration,
) {
    let name = pod.name_any();
    node_back(&shared, &name).await;
    let grace = Duration::from_secs(
        pod.metadata
            .deletion_grace_period_seconds
            .unwrap_or(30)
            .max(0) as u64,
    );
    let pid = procs.lock().unwrap().get(&name).copied();
    if let Some(pid) = pid {
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = tokio::time::Instant::now() + grace;
        while procs.lock().unwrap().contains_key(&name) {
            if tokio::time::Instant::now() >= deadline {
                kill(&procs, &name);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(reclaim).await;
    let _ = api
        .delete(&name, &DeleteParams::default().grace_period(0))
        .await;
}

/// Marks the pod Unknown (its node lost) for `lost_for`, then, the node back, reports the
/// truth again: Running if its process still runs.
async fn lose_node(
    api: Api<Pod>,
    name: String,
    procs: Arc<Mutex<HashMap<String, u32>>>,
    shared: SharedState,
    lost_for: Duration,
) {
    // Lost a moment after the pod runs (its agent has connected by then).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let until = tokio::time::Instant::now() + lost_for;
    shared
        .lock()
        .unwrap()
        .lost_until
        .insert(name.clone(), until);
    // Only a pod still running is lost with its node (a finished one keeps its terminal phase).
    if !procs.lock().unwrap().contains_key(&name) {
        shared.lock().unwrap().lost_until.remove(&name);
        return;
    }
    // The node controller's write, not the kubelet's.
    set_phase(&api, &name, "Unknown").await;
    tokio::time::sleep_until(until).await;
    let running = procs.lock().unwrap().contains_key(&name);
    let deleting = shared.lock().unwrap().deleting.contains(&name);
    if running && !deleting {
        set_phase(&api, &name, "Running").await;
    }
}

/// The container waits on an image that is not on the node, as a real kubelet reports it: the
/// pod stays Pending.
async fn wait_for_image(api: &Api<Pod>, name: &str, c: &k8s_openapi::api::core::v1::Container) {
    let image = c.image.clone().unwrap_or_default();
    let (reason, message) = if c.image_pull_policy.as_deref() == Some("Never") {
        (
            "ErrImageNeverPull",
            format!("Container image {image:?} is not present with pull policy of Never"),
        )
    } else {
        (
            "ImagePullBackOff",
            format!("Back-off pulling image {image:?}"),
        )
    };
    let patch = serde_json::json!({"status": {
        "phase": "Pending",
        "conditions": [{"type": "Ready", "status": "False", "reason": "ContainersNotReady",
            "message": format!("containers with unready status: [{}]", c.name)}],
        "containerStatuses": [{
            "name": c.name, "image": image, "imageID": "", "ready": false, "restartCount": 0,
            "started": false, "state": {"waiting": {"reason": reason, "message": message}},
        }],
    }});
    let _ = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await;
}

/// The container ended: the pod's terminal phase and the container's `terminated` state.
async fn set_terminated(
    api: &Api<Pod>,
    name: &str,
    c: &k8s_openapi::api::core::v1::Container,
    exit_code: i32,
    reason: &str,
) {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let phase = if exit_code == 0 {
        "Succeeded"
    } else {
        "Failed"
    };
    let patch = serde_json::json!({"status": {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [{
            "name": c.name, "image": c.image, "imageID": "", "ready": false, "restartCount": 0,
            "started": false,
            "state": {"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": now,
                "startedAt": now, "containerID": format!("process://{name}")}},
        }],
    }});
    let _ = api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
        .await;
}

async fn run_pod(
    api: Api<Pod>,
    pod: Pod,
    procs: Arc<Mutex<HashMap<String, u32>>>,
    shared: SharedState,
    delay: Duration,
    lose: Option<Duration>,
    missing_images: Vec<String>,
) {
    tokio::time::sleep(delay).await;
    let name = pod.name_any();
    let Some(c) = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .cloned()
    else {
        set_phase(&api, &name, "Failed").await;
        return;
    };
    if c.image.as_ref().is_some_and(|i| missing_images.contains(i)) {
        wait_for_image(&api, &name, &c).await;
        return;
    }
    let container = c.clone();
    let argv: Vec<String> = c
        .command
        .unwrap_or_default()
        .into_iter()
        .chain(c.args.unwrap_or_default())
        .collect();
    if argv.is_empty() {
        set_phase(&api, &name, "Failed").await;
        return;
    }
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let ws = std::env::temp_dir().join(format!("process-kubelet-{name}"));
    std::fs::create_dir_all(&ws).unwrap();
    cmd.env("WARMPOOL_WORKSPACE", &ws);
    for e in c.env.unwrap_or_default() {
        if let Some(v) = e.value {
            cmd.env(e.name, v);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(_) => {
            set_phase(&api, &name, "Failed").await;
            return;
        }
    };
    procs
        .lock()
        .unwrap()
        .insert(name.clone(), child.id().unwrap_or(0));
    set_phase(&api, &name, "Running").await;
    if let Some(lost_for) = lose {
        tokio::spawn(lose_node(
            api.clone(),
            name.clone(),
            procs.clone(),
            shared.clone(),
            lost_for,
        ));
    }
    let status = child.wait().await;
    let _ = std::fs::remove_dir_all(&ws);
    let ours = procs.lock().unwrap().remove(&name).is_some();
    // A lost node reports the exit once it is back.
    node_back(&shared, &name).await;
    // Killed for a deletion: the pod is going away, nothing to report.
    let deleting = shared.lock().unwrap().deleting.contains(&name);
    if ours && !deleting {
        use std::os::unix::process::ExitStatusExt;
        let oom = shared.lock().unwrap().oom_killed.remove(&name);
        let code = match status {
            Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9)),
            Err(_) => 128 + 9,
        };
        let reason = match code {
            _ if oom => "OOMKilled",
            0 => "Completed",
            _ => "Error",
        };
        set_terminated(&api, &name, &container, code, reason).await;
    }
}
