//! The pools file (`serve --pools`) read through the same serde model as the `AgentPool` CRD:
//! every field of the CRD is accepted with the same meaning, each bad field gets one message
//! naming its full path (`pools[0].provisioning.burst`), and the README and docs examples load.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use warmpool::spec::{self, PoolSpec, parse_pools};

/// All problems of a file that does not load, one string per message.
fn problems(yaml: &str) -> Vec<String> {
    match parse_pools(yaml, "pools.yaml") {
        Err(spec::Error::Invalid { problems, .. }) => problems,
        other => panic!("expected invalid fields, got {other:?}"),
    }
}

fn has(problems: &[String], prefix: &str, also: &str) {
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(prefix) && p.contains(also)),
        "no message starting {prefix:?} containing {also:?} in:\n{}",
        problems.join("\n")
    );
}

#[test]
fn several_bad_fields_get_one_message_each_with_full_paths() {
    let yaml = r#"
pools:
  - name: a
    minIdle: lots
    provisioning: {perSecond: fast, burst: many, maxConcurrent: 3}
    health: {maxWorkspaceBytes: -1}
  - name: b
    jenkins:
      url: http://jenkins.example.com/
      labels: linux
      pollInterval: soon
      requestBurst: [1]
"#;
    let p = problems(yaml);
    has(&p, "pools[0].minIdle: ", "\"lots\"");
    has(&p, "pools[0].minIdle: ", "whole number");
    has(&p, "pools[0].provisioning.perSecond: ", "\"fast\"");
    has(&p, "pools[0].provisioning.burst: ", "\"many\"");
    has(&p, "pools[0].health.maxWorkspaceBytes: ", "-1");
    has(
        &p,
        "pools[1].jenkins.pollInterval: ",
        "\"soon\" is not a duration",
    );
    has(&p, "pools[1].jenkins.requestBurst: ", "list");
    assert_eq!(p.len(), 6, "one message per bad field:\n{}", p.join("\n"));
}

#[test]
fn an_unknown_nested_field_is_named_by_its_full_path() {
    let yaml = r#"
pools:
  - name: a
    provisioning: {burts: 4}
    hooks:
      health: {command: ["true"], timeot: 5s}
  - name: b
    jenkins: {url: http://jenkins.example.com/, labels: linux, pollIntervall: 5s}
"#;
    let p = problems(yaml);
    has(&p, "pools[0].provisioning.burts: unknown field", "`burst`");
    has(
        &p,
        "pools[0].hooks.health.timeot: unknown field",
        "`timeout`",
    );
    has(
        &p,
        "pools[1].jenkins.pollIntervall: unknown field",
        "`pollInterval`",
    );
    assert_eq!(p.len(), 3, "{}", p.join("\n"));
}

#[test]
fn a_wrong_type_names_the_value_and_what_is_expected() {
    let p = problems("pools:\n  - name: a\n    maxTotal: [1, 2]\n    external: maybe\n");
    has(&p, "pools[0].maxTotal: ", "list");
    has(&p, "pools[0].maxTotal: ", "expected a whole number");
    has(&p, "pools[0].external: ", "\"maybe\"");
    has(&p, "pools[0].external: ", "expected a boolean");
    assert_eq!(p.len(), 2, "{}", p.join("\n"));
    // A nested block of the wrong shape.
    let p = problems("pools:\n  - name: a\n    provisioning: 5\n");
    assert_eq!(
        p,
        ["pools[0].provisioning: must be a mapping, got integer `5`"]
    );
}

/// Every property of the `AgentPool` spec schema (but the pod-only `template` and
/// `agentContainer`), at every depth.
fn schema_paths(schema: &Value, at: &str, out: &mut Vec<String>) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (k, v) in props {
        if at.is_empty() && (k == "template" || k == "agentContainer") {
            continue;
        }
        let path = if at.is_empty() {
            k.clone()
        } else {
            format!("{at}.{k}")
        };
        out.push(path.clone());
        schema_paths(v, &path, out);
    }
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// A pool spec with every optional part set, as an `AgentPool` spec could carry it.
fn full_spec() -> Value {
    json!({
        "labels": ["linux", "go"],
        "minIdle": 2, "maxTotal": 7, "maxUses": 3,
        "idleTtl": "5m", "maxAge": "2h", "connectTimeout": "30s",
        "provisioning": {"perSecond": 2.5, "burst": 4, "maxConcurrent": 3},
        "health": {"maxWorkspaceBytes": 1000, "maxLeftoverProcesses": 2},
        "external": false,
        "schedules": [
            {"cron": "0 8 * * 1-5", "duration": "10h", "timeZone": "Europe/Berlin",
             "minIdle": 5, "maxTotal": 7},
            {"cron": "0 20 * * *", "duration": 3600, "minIdle": 0}
        ],
        "warmHitTarget": 0.95,
        "scaleToZeroAfter": "2h",
        "jenkins": {
            "url": "https://jenkins.example.com/",
            "credentialsSecret": "jenkins-token",
            "caFile": "/etc/ca.pem",
            "nodeNamePrefix": "go-",
            "remoteFS": "/agent",
            "labels": "linux go",
            "agentCommand": ["jenkins-agent"],
            "pollInterval": "3s", "maxPollInterval": "1m", "slowResponse": "4s",
            "requestsPerSecond": 5.0, "requestBurst": 6, "maxConnecting": 7
        }
    })
}

#[test]
fn every_field_of_the_agentpool_schema_is_read_from_the_pools_file_alike() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(warmpool::k8s::crd::AgentPool::crd()).unwrap();
    let spec_schema =
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut paths = Vec::new();
    schema_paths(spec_schema, "", &mut paths);
    assert!(paths.len() > 20, "{paths:?}");
    let full = full_spec();
    let hooks = json!({
        "cleanup": {"command": ["sh", "-c", "true"], "timeout": "1m"},
        "health": {"command": ["true"], "timeout": "10s", "maxOutputBytes": 0}
    });
    // Hooks and a Jenkins block exclude each other: check hooks on a second spec.
    let mut with_hooks = full.clone();
    with_hooks.as_object_mut().unwrap().remove("jenkins");
    with_hooks["hooks"] = hooks;
    for path in &paths {
        assert!(
            lookup(&full, path).is_some() || lookup(&with_hooks, path).is_some(),
            "the test's sample lacks CRD field {path}: add it"
        );
    }
    for sample in [full, with_hooks] {
        // The meaning in the CRD: what serde makes of the spec as the apiserver stores it.
        let crd_meaning: PoolSpec = serde_json::from_value(sample.clone()).unwrap();
        let mut entry = sample.clone();
        entry["name"] = json!("full");
        // JSON is YAML: the same mapping written as a pools file.
        let file = json!({ "pools": [entry] }).to_string();
        let defs = parse_pools(&file, "pools.yaml")
            .unwrap_or_else(|e| panic!("a field of the CRD is refused in a pools file: {e}"));
        assert_eq!(defs[0].spec, crd_meaning);
    }
}

#[test]
fn yaml_anchors_load_and_several_documents_are_refused() {
    let yaml = "
common: &labels [linux, go]
pools:
  - name: a
    labels: *labels
";
    // An extra top-level key stays an error; anchors are resolved where they are used.
    let p = problems(yaml);
    assert_eq!(p, ["common: unknown field"]);
    let yaml = "pools:\n  - name: a\n    labels: &l [linux, go]\n  - name: b\n    labels: *l\n";
    let defs = parse_pools(yaml, "f").unwrap();
    assert_eq!(defs[1].spec.labels, ["linux", "go"]);
    // Merge keys copy an earlier pool's fields (serde_yaml 0.9 read `<<` as an unknown field),
    // as README.md shows.
    let yaml = "pools:\n  - &go {name: go, labels: [linux, go]}\n  - {<<: *go, name: go-big, maxTotal: 20}\n";
    let defs = parse_pools(yaml, "f").unwrap();
    assert_eq!(
        (defs[1].name.as_str(), defs[1].spec.max_total),
        ("go-big", 20)
    );
    assert_eq!(defs[1].spec.labels, ["linux", "go"]);
    assert_eq!(defs[0].spec.max_total, PoolSpec::default().max_total);
    // A second document is not silently ignored.
    let err = parse_pools("pools: [{name: a}]\n---\npools: [{name: b}]\n", "f").unwrap_err();
    assert!(
        matches!(err, spec::Error::Yaml { .. }),
        "{err}: several documents must be refused as YAML"
    );
    assert!(err.to_string().contains("a second YAML document"), "{err}");
    // An alias bomb is refused, not expanded.
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for l in 1..=12 {
        let refs = vec![format!("*a{}", l - 1); 10].join(", ");
        bomb.push_str(&format!("a{l}: &a{l} [{refs}]\n"));
    }
    bomb.push_str("pools:\n  - name: p\n    labels: *a12\n");
    let err = parse_pools(&bomb, "f").unwrap_err();
    assert!(matches!(err, spec::Error::Yaml { .. }), "{err}");
}

/// The ```yaml blocks of README.md and docs/*.md that are pools files.
fn documented_pools_files() -> Vec<(String, String)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![format!("{root}/README.md")];
    for e in std::fs::read_dir(format!("{root}/docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p.display().to_string());
        }
    }
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let mut block: Option<String> = None;
        for line in text.lines() {
            match (&mut block, line.trim_start()) {
                (None, l) if l.starts_with("```yaml") => block = Some(String::new()),
                (Some(b), l) if l.starts_with("```") => {
                    if b.starts_with("pools:") {
                        out.push((f.clone(), std::mem::take(b)));
                    }
                    block = None;
                }
                (Some(b), _) => {
                    b.push_str(line);
                    b.push('\n');
                }
                (None, _) => {}
            }
        }
    }
    out
}

#[test]
fn the_documented_pools_files_load() {
    let files = documented_pools_files();
    assert!(files.len() >= 3, "{files:?}");
    for (doc, yaml) in files {
        parse_pools(&yaml, &doc).unwrap_or_else(|e| panic!("{doc}: example does not load: {e}"));
    }
}

#[test]
fn schedule_and_policy_fields_are_checked_with_their_paths() {
    let yaml = r#"
pools:
  - name: go
    maxTotal: 10
    warmHitTarget: 1.5
    scaleToZeroAfter: 0s
    schedules:
      - {cron: "0 8 * * 1-5", duration: 10h, timeZone: Europe/Berlin, minIdle: 4}
      - {cron: "0 25 * * *", duration: 0s, timeZone: Moon/Base, minIdle: 12}
"#;
    let p = problems(yaml);
    has(
        &p,
        "pools[0].schedules[1].cron:",
        "\"0 25 * * *\" is not a valid cron expression",
    );
    has(
        &p,
        "pools[0].schedules[1].timeZone:",
        "\"Moon/Base\" is not a known IANA time zone",
    );
    has(
        &p,
        "pools[0].schedules[1].duration:",
        "must be longer than 0s",
    );
    has(
        &p,
        "pools[0].schedules[1].minIdle:",
        "12 is above the pool's maxTotal 10",
    );
    has(&p, "pools[0].warmHitTarget:", "between 0 and 1");
    has(&p, "pools[0].scaleToZeroAfter:", "longer than 0s");
    assert!(!p.iter().any(|m| m.contains("schedules[0]")), "{p:?}");
    // A misspelt field, or a missing required one, is named (the semantic checks wait for the
    // fields to read).
    let p = problems(
        "pools:\n  - name: go\n    schedules:\n      - {cron: '0 8 * * *', duration: 1h, minIdel: 2}\n",
    );
    has(&p, "pools[0].schedules[0].minIdel:", "unknown field");
    has(&p, "pools[0].schedules[0].minIdle:", "missing");
    let ok = "pools:\n  - name: go\n    schedules:\n      - {cron: '0 8 * * 1-5', duration: 10h, minIdle: 3, maxTotal: 12}\n";
    let defs = parse_pools(ok, "f").unwrap();
    let w = &defs[0].spec.schedules[0];
    assert_eq!(
        (w.time_zone.as_str(), w.min_idle, w.max_total),
        ("UTC", 3, Some(12))
    );
}

#[test]
fn a_negative_burst_is_at_its_own_path_and_a_misspelt_field_gets_a_suggestion() {
    let p = problems("pools:\n  - name: a\n    maxTotl: 3\n    provisioning:\n      burst: -1\n");
    has(&p, "pools[0].provisioning.burst: ", "-1");
    has(
        &p,
        "pools[0].maxTotl: unknown field",
        "did you mean `maxTotal`?",
    );
    assert_eq!(p.len(), 2, "{p:?}");
}

/// Every documented pools file the process backend can serve (no Jenkins pool) runs as
/// written: served, it grants a lease on each of its pools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_pools_files_serve_a_lease_per_pool() {
    let mut served = 0;
    for (doc, yaml) in documented_pools_files() {
        let pools = parse_pools(&yaml, &doc).unwrap();
        if pools.iter().any(|p| p.spec.jenkins.is_some()) {
            continue;
        }
        let h = support::start_pools(&yaml).await;
        for p in &pools {
            let selector = p.spec.labels.join(" && ");
            let lease = tokio::time::timeout(
                Duration::from_secs(30),
                h.client.lease(&warmpool::api::CreateLease {
                    selector: selector.clone(),
                    wait_seconds: Some(25.0),
                    ..Default::default()
                }),
            )
            .await
            .unwrap_or_else(|_| panic!("{doc}: pool {}: no answer", p.name))
            .unwrap_or_else(|e| {
                panic!(
                    "{doc}: pool {} ({selector:?}): no lease: {e}; last error: {:?}",
                    p.name,
                    h.pool(&p.name).last_error
                )
            });
            h.client.release(&lease.id).await.unwrap();
        }
        h.server.shutdown().await;
        served += 1;
    }
    assert!(served >= 1, "at least the README's example is served");
}
