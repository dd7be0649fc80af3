//! What `kubectl` shows of an AgentPool, against a real kube-apiserver v1.20 (see
//! tests/support/kube.rs) and the kubectl on the PATH:
//! - `kubectl get agentpools` default columns answer "is this pool healthy and warm?": LABELS
//!   as a Jenkins label expression (not a JSON array), READY, IDLE, LEASED, WAITING, LEAKS,
//!   TOTAL, MIN, MAX, AGE; `-o wide` adds the rest (priority 1 columns);
//! - `kubectl wait --for=condition=Ready` works on the status conditions, which carry
//!   `lastTransitionTime` and `observedGeneration`;
//! - the scale subresource has a label selector (`status.selector`), so a
//!   HorizontalPodAutoscaler (autoscaling/v1) can target an AgentPool.

#[path = "support/kube.rs"]
mod kube_api;

use std::process::Command;

use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_api::{KubeApi, install_crd};
use serde_json::{Value, json};
use warmpool::k8s::crd::AgentPool;

/// The default columns, in order, and the ones `-o wide` adds.
const DEFAULT: [&str; 11] = [
    "Name", "Labels", "Ready", "Idle", "Leased", "Waiting", "Leaks", "Total", "Min", "Max", "Age",
];
const WIDE: [&str; 6] = [
    "Provisioning",
    "Connecting",
    "Desired",
    "Source",
    "WarmHit",
    "Reason",
];

async fn get_json(client: &kube::Client, path: &str, accept: &str) -> Value {
    let req = http::Request::get(path)
        .header("accept", accept)
        .body(Vec::new())
        .unwrap();
    serde_json::from_str(&client.request_text(req).await.expect(path)).unwrap()
}

async fn post_json(client: &kube::Client, path: &str, body: &Value) -> Value {
    let req = http::Request::post(path)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .unwrap();
    serde_json::from_str(&client.request_text(req).await.expect(path)).unwrap()
}

/// Runs kubectl against the test apiserver; panics with its stderr when it fails.
fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn kubectl_columns_conditions_and_an_hpa_on_an_agentpool() {
    let k = KubeApi::start().await;
    let client = k.client().await;
    install_crd(&client).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, k.kubeconfig()).unwrap();

    let pools: Api<AgentPool> = Api::namespaced(client.clone(), "default");
    let pool: AgentPool = serde_json::from_value(json!({
        "apiVersion": "warmpool.dev/v1alpha1", "kind": "AgentPool",
        "metadata": {"name": "e2e"},
        "spec": {
            "labels": ["linux", "e2e"], "minIdle": 2, "maxTotal": 6,
            "template": {"spec": {"containers": [{"name": "agent", "image": "warmpool:dev"}]}}
        }
    }))
    .unwrap();
    let created = pools.create(&PostParams::default(), &pool).await.unwrap();

    // The status as warmpool's status loop writes it (AgentPoolStatus::set_view and the
    // engine's counts; unit-tested in src/k8s/crd.rs), written raw so the apiserver's pruning
    // decides what stays.
    let status = json!({
        "provisioning": 1, "connecting": 0, "idle": 1, "leased": 2, "terminating": 0,
        "waiting": 3, "leaksTotal": 4, "total": 4,
        "labelExpression": "linux && e2e",
        "selector": "warmpool.dev/pool=e2e",
        "desiredIdle": 3, "desiredIdleSource": "demand", "warmHitRatio": 0.5,
        "observedGeneration": created.metadata.generation,
        "conditions": [
            {"type": "Ready", "status": "False", "reason": "BelowMinIdle",
             "message": "1 of 2 idle agents", "lastTransitionTime": "2026-12-01T20:00:00Z",
             "observedGeneration": created.metadata.generation},
            {"type": "Degraded", "status": "True", "reason": "AgentsFailing",
             "message": "pod e2e-1 exited", "lastTransitionTime": "2026-12-01T20:00:00Z",
             "observedGeneration": created.metadata.generation}
        ]
    });
    pools
        .patch_status(
            "e2e",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .unwrap();

    // Server-side Table: the columns, their priorities and the cells.
    let table = get_json(
        &client,
        "/apis/warmpool.dev/v1alpha1/namespaces/default/agentpools",
        "application/json;as=Table;v=v1;g=meta.k8s.io",
    )
    .await;
    let defs = table["columnDefinitions"].as_array().unwrap();
    let names: Vec<&str> = defs.iter().map(|c| c["name"].as_str().unwrap()).collect();
    let want: Vec<&str> = DEFAULT.iter().chain(WIDE.iter()).copied().collect();
    assert_eq!(names, want);
    for d in defs {
        let wide = WIDE.contains(&d["name"].as_str().unwrap());
        assert_eq!(d["priority"], if wide { 1 } else { 0 }, "{d}");
    }
    let cells = table["rows"][0]["cells"].as_array().unwrap();
    let cell = |name: &str| &cells[want.iter().position(|n| *n == name).unwrap()];
    assert_eq!(cell("Name"), "e2e");
    assert_eq!(
        cell("Labels"),
        "linux && e2e",
        "a label expression, not JSON"
    );
    assert_eq!(cell("Ready"), "False");
    assert_eq!(cell("Idle"), 1);
    assert_eq!(cell("Leased"), 2);
    assert_eq!(cell("Waiting"), 3);
    assert_eq!(cell("Leaks"), 4);
    assert_eq!(cell("Total"), 4);
    assert_eq!(cell("Min"), 2);
    assert_eq!(cell("Max"), 6);
    assert_eq!(cell("Desired"), 3);
    assert_eq!(cell("Source"), "demand");
    assert_eq!(cell("Reason"), "AgentsFailing");

    // What a person sees.
    let out = kubectl(&kubeconfig, &["get", "agentpools"]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "LABELS", "READY", "IDLE", "LEASED", "WAITING", "LEAKS", "TOTAL", "MIN", "MAX",
            "AGE"
        ],
        "{out}"
    );
    assert!(out.contains("linux && e2e"), "{out}");
    let wide = kubectl(&kubeconfig, &["get", "agentpools", "-o", "wide"]);
    for col in ["DESIRED", "SOURCE", "WARMHIT", "REASON"] {
        assert!(wide.lines().next().unwrap().contains(col), "{wide}");
    }
    assert!(
        wide.contains("demand") && wide.contains("AgentsFailing"),
        "{wide}"
    );

    // Conditions as metav1.Condition: the apiserver keeps lastTransitionTime and
    // observedGeneration, and `kubectl wait --for=condition=Ready` sees the flip.
    let raw = get_json(
        &client,
        "/apis/warmpool.dev/v1alpha1/namespaces/default/agentpools/e2e",
        "application/json",
    )
    .await;
    let ready = &raw["status"]["conditions"][0];
    assert_eq!(ready["lastTransitionTime"], "2026-12-01T20:00:00Z", "{raw}");
    assert_eq!(
        ready["observedGeneration"],
        json!(created.metadata.generation)
    );
    pools
        .patch_status(
            "e2e",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "MinIdleReached",
                 "message": "2 of 2 idle agents", "lastTransitionTime": "2026-12-01T20:05:00Z"}
            ]}})),
        )
        .await
        .unwrap();
    kubectl(
        &kubeconfig,
        &[
            "wait",
            "--for=condition=Ready",
            "agentpool/e2e",
            "--timeout=30s",
        ],
    );

    // The scale subresource carries the pods' selector; an HPA can target the AgentPool.
    let scale = get_json(
        &client,
        "/apis/warmpool.dev/v1alpha1/namespaces/default/agentpools/e2e/scale",
        "application/json",
    )
    .await;
    assert_eq!(
        scale["status"]["selector"], "warmpool.dev/pool=e2e",
        "{scale}"
    );
    assert_eq!(scale["spec"]["replicas"], 2, "{scale}");
    let hpa = json!({
        "apiVersion": "autoscaling/v1", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "e2e"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "warmpool.dev/v1alpha1", "kind": "AgentPool", "name": "e2e"},
            "minReplicas": 1, "maxReplicas": 6, "targetCPUUtilizationPercentage": 80
        }
    });
    let made = post_json(
        &client,
        "/apis/autoscaling/v1/namespaces/default/horizontalpodautoscalers",
        &hpa,
    )
    .await;
    assert_eq!(
        made["spec"]["scaleTargetRef"]["kind"], "AgentPool",
        "{made}"
    );
    let hpas = kubectl(&kubeconfig, &["get", "hpa", "e2e"]);
    assert!(hpas.contains("AgentPool/e2e"), "{hpas}");
}
