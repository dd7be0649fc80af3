//! The `AgentPool` CRD against a real kube-apiserver (see tests/support/kube.rs): the generated
//! CRD equals manifests/crd.yaml and is accepted; the schema applies defaults and rejects what it
//! can express; status and scale subresources work (`kubectl scale` drives minIdle); printer
//! columns are what `kubectl get agentpools` shows.

#[path = "support/kube.rs"]
mod kube_api;

use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_api::{KubeApi, install_crd};
use serde_json::json;
use warmpool::k8s::crd::{AgentPool, AgentPoolStatus};

fn pool_json(name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({
        "labels": ["linux", "go"],
        "template": {"spec": {"containers": [{"name": "agent", "image": "warmpool:dev"}]}}
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "warmpool.dev/v1alpha1", "kind": "AgentPool", "metadata": {"name": name}, "spec": spec})
}

#[tokio::test]
async fn agentpool_crd_on_a_real_apiserver() {
    let k = KubeApi::start().await;
    let client = k.client().await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, "v1.20.2");
    install_crd(&client).await;
    let pools: Api<AgentPool> = Api::namespaced(client.clone(), "default");

    // Schema defaults fill what the user left out; the typed client reads it back.
    let created: AgentPool =
        serde_json::from_value(pool_json("go", json!({"minIdle": 2, "idleTtl": "5m"}))).unwrap();
    pools
        .create(&PostParams::default(), &created)
        .await
        .expect("pool created");
    let got = pools.get("go").await.unwrap();
    assert_eq!(got.spec.pool.min_idle, 2);
    assert_eq!(got.spec.pool.max_total, 10, "schema default");
    assert_eq!(
        got.spec.pool.provisioning.burst, 10,
        "nested schema default"
    );
    assert_eq!(got.spec.pool.idle_ttl, warmpool::spec::Dur::secs(300));
    assert!(got.spec.problems().is_empty(), "{:?}", got.spec.problems());

    // What the schema can express is rejected by the apiserver, naming the field.
    for (bad, field) in [
        (json!({"maxTotal": 0}), "spec.maxTotal"),
        (
            json!({"provisioning": {"burst": 0}}),
            "spec.provisioning.burst",
        ),
        (json!({"minIdle": "two"}), "spec.minIdle"),
    ] {
        let obj: serde_json::Value = pool_json("bad", bad.clone());
        let req = http::Request::post("/apis/warmpool.dev/v1alpha1/namespaces/default/agentpools")
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&obj).unwrap())
            .unwrap();
        let err = client
            .request_text(req)
            .await
            .expect_err(&format!("{bad} must be rejected"));
        assert!(err.to_string().contains(field), "{bad}: {err}");
    }
    // What it cannot express (maxTotal >= minIdle needs CEL, absent in 1.20) is reported by us.
    let unexpressible: AgentPool =
        serde_json::from_value(pool_json("odd", json!({"minIdle": 5, "maxTotal": 2}))).unwrap();
    pools
        .create(&PostParams::default(), &unexpressible)
        .await
        .unwrap();
    let odd = pools.get("odd").await.unwrap();
    assert!(
        odd.spec
            .problems()
            .iter()
            .any(|p| p.contains("minIdle: 5 is above maxTotal 2"))
    );

    // Status subresource: written separately from the spec.
    let status = AgentPoolStatus {
        idle: 2,
        leased: 1,
        observed_generation: got.metadata.generation,
        ..Default::default()
    };
    pools
        .patch_status(
            "go",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .unwrap();
    let got = pools.get("go").await.unwrap();
    assert_eq!(got.status.as_ref().unwrap().idle, 2);
    assert_eq!(
        got.spec.pool.min_idle, 2,
        "status writes do not touch the spec"
    );

    // Scale subresource: `kubectl scale agentpool go --replicas=5` sets minIdle.
    let scale = pools.get_scale("go").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(2));
    assert_eq!(scale.status.unwrap().replicas, 2, "status replicas = idle");
    pools
        .patch_scale(
            "go",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    assert_eq!(pools.get("go").await.unwrap().spec.pool.min_idle, 5);

    // Printer columns: what `kubectl get agentpools` shows (server-side Table).
    let req = http::Request::get("/apis/warmpool.dev/v1alpha1/namespaces/default/agentpools")
        .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .unwrap();
    let table: serde_json::Value =
        serde_json::from_str(&client.request_text(req).await.unwrap()).unwrap();
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        columns,
        [
            "Name",
            "Labels",
            "Ready",
            "Idle",
            "Leased",
            "Waiting",
            "Leaks",
            "Total",
            "Min",
            "Max",
            "Age",
            "Provisioning",
            "Connecting",
            "Desired",
            "Source",
            "WarmHit",
            "Reason"
        ]
    );
    let row = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cells"][0] == "go")
        .unwrap();
    assert_eq!(row["cells"][8], 5, "Min");
    assert_eq!(row["cells"][3], 2, "Idle");
}

#[tokio::test]
async fn manifests_are_accepted_by_the_apiserver() {
    use kube::api::{ApiResource, DynamicObject};
    use kube::discovery::Discovery;
    let k = KubeApi::start().await;
    let client = k.client().await;
    install_crd(&client).await;
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let mut files: Vec<_> = [
        "namespace.yaml",
        "rbac.yaml",
        "components/all-namespaces/rbac-all-namespaces.yaml",
        "deployment.yaml",
        "service.yaml",
        "pdb/policy-v1beta1.yaml",
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect();
    files.push(dir.join("examples/agentpool-generic.yaml"));
    files.push(dir.join("examples/agentpool-docker.yaml"));
    files.push(dir.join("examples/agentpool-jenkins.yaml"));
    let mut created = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for value in docs {
            if value.is_null() {
                continue;
            }
            let obj: DynamicObject = serde_json::from_value(value.clone()).unwrap();
            let tm = obj.types.clone().unwrap();
            let gvk = kube::api::GroupVersionKind::try_from(&tm).unwrap();
            let (ar, caps): (ApiResource, _) = discovery
                .resolve_gvk(&gvk)
                .unwrap_or_else(|| panic!("{}: unknown kind {gvk:?}", f.display()));
            let api: Api<DynamicObject> = match (caps.scope, obj.metadata.namespace.as_deref()) {
                (kube::discovery::Scope::Namespaced, Some(ns)) => {
                    Api::namespaced_with(client.clone(), ns, &ar)
                }
                _ => Api::all_with(client.clone(), &ar),
            };
            api.create(&PostParams::default(), &obj)
                .await
                .unwrap_or_else(|e| panic!("{}: {} rejected: {e}", f.display(), tm.kind));
            created += 1;
            if tm.kind == "AgentPool" {
                let pool: AgentPool = serde_json::from_value(value).unwrap();
                assert!(
                    pool.spec.problems().is_empty(),
                    "{}: {:?}",
                    f.display(),
                    pool.spec.problems()
                );
            }
        }
    }
    // Namespace, ServiceAccount, Role, RoleBinding, ClusterRole, ClusterRoleBinding, Deployment,
    // two Services (the API and the hub), the PodDisruptionBudget (policy/v1beta1: this
    // apiserver is 1.20; tests/kube_install.rs checks both), three AgentPools (one a Jenkins
    // pool) and its Secret.
    assert_eq!(created, 14);
}
