//! The install of docs/KUBERNETES.md against a real kube-apiserver v1.20 (tests/support/kube.rs)
//! and the kubectl on the PATH (its built-in kustomize), which fails the test when absent (as
//! tests/kube_kubectl.rs does; `.ci/run` warns):
//! - the kustomize base (`manifests/kustomization.yaml`), every overlay (`overlays/*`) and an
//!   overlay of one's own combining the components (the docs' example) render with
//!   `kubectl kustomize` to the objects they promise, and pass
//!   `kubectl apply -k DIR --dry-run=server`;
//! - a server-side dry run of namespaced objects needs their namespace: it fails before the
//!   namespace exists, passes after (the docs create it first);
//! - the PodDisruptionBudget: `policy/v1` is refused by v1.20, `policy/v1beta1` accepted;
//! - the ```sh blocks of the docs' "Install" section run as written, for real, with `docker`
//!   stubbed (no image is built here), and the "Uninstalling" block passes a server-side dry run.
//!
//! The monitoring overlay needs prometheus-operator's CRDs. Simulated: the test installs minimal
//! stand-ins (same group, version, kinds and names, schema left open), so it checks the kinds,
//! API version and namespaces of the monitoring objects, not the operator's field validation.

#[path = "support/kube.rs"]
#[allow(dead_code)] // install_crd: here the install applies the CRD itself
mod kube_api;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use kube_api::KubeApi;
use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The namespaced install: every object of the base, as (kind, name).
const BASE: [(&str, &str); 8] = [
    ("Namespace", "warmpool"),
    ("CustomResourceDefinition", "agentpools.warmpool.dev"),
    ("ServiceAccount", "warmpool"),
    ("Role", "warmpool"),
    ("RoleBinding", "warmpool"),
    ("Service", "warmpool"),
    ("Service", "warmpool-hub"),
    ("Deployment", "warmpool"),
];
const ALL_NAMESPACES: [(&str, &str); 2] = [
    ("ClusterRole", "warmpool"),
    ("ClusterRoleBinding", "warmpool"),
];
const MONITORING: [(&str, &str); 2] = [("PrometheusRule", "warmpool"), ("PodMonitor", "warmpool")];

/// Stand-ins for prometheus-operator's CRDs (simulated: open schema).
const MONITORING_CRDS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: prometheusrules.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: PrometheusRule, listKind: PrometheusRuleList, plural: prometheusrules, singular: prometheusrule}
  scope: Namespaced
  versions:
    - {name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: podmonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: PodMonitor, listKind: PodMonitorList, plural: podmonitors, singular: podmonitor}
  scope: Namespaced
  versions:
    - {name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}
"#;

/// kubectl (or bash running kubectl) against one test apiserver, from the repository's root,
/// with its own discovery cache.
struct Kubectl {
    dir: tempfile::TempDir,
}

impl Kubectl {
    fn new(k: &KubeApi) -> Kubectl {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kubeconfig"), k.kubeconfig()).unwrap();
        Kubectl { dir }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(REPO)
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .env("KUBECACHEDIR", self.dir.path().join("cache"))
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command("kubectl")
            .args(args)
            .output()
            .expect("kubectl runs (install any kubectl >= 1.21 on PATH)")
    }

    /// Runs kubectl; panics with its output when it fails.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{}",
            text(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs kubectl; panics unless it fails with `needle` in its output.
    fn fails(&self, args: &[&str], needle: &str) {
        let out = self.run(args);
        assert!(
            !out.status.success() && text(&out).contains(needle),
            "kubectl {args:?} should fail with {needle:?}:\n{}",
            text(&out)
        );
    }

    /// Runs a bash script as a user would paste it; panics with its output when it fails.
    fn bash(&self, script: &str) -> String {
        let out = self
            .command("bash")
            .arg("-c")
            .arg(script)
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "script failed:\n{script}\n---\n{}",
            text(&out)
        );
        text(&out)
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The objects a kustomization renders to, as (kind, name), and the YAML documents.
fn render(kubectl: &Kubectl, dir: &str) -> (BTreeSet<(String, String)>, Vec<Value>) {
    let yaml = kubectl.ok(&["kustomize", dir]);
    let docs: Vec<Value> = serde_saphyr::from_multiple(&yaml)
        .unwrap_or_else(|e| panic!("kubectl kustomize {dir}: {e}\n{yaml}"));
    let docs: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
    let ids = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_string(),
                d["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (ids, docs)
}

fn ids(parts: &[&[(&str, &str)]]) -> BTreeSet<(String, String)> {
    parts
        .iter()
        .flat_map(|p| p.iter())
        .map(|(k, n)| (k.to_string(), n.to_string()))
        .collect()
}

fn deployment_args(docs: &[Value]) -> Vec<String> {
    let d = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    serde_json::from_value(d["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap()
}

/// The section of docs/KUBERNETES.md that starts with `heading` (up to the next heading of the
/// same or a higher level), and its ```sh blocks.
fn doc_sh_blocks(heading: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(Path::new(REPO).join("docs/KUBERNETES.md")).unwrap();
    let level = heading.split(' ').next().unwrap().len();
    let mut lines = doc.lines().skip_while(|l| *l != heading);
    assert!(
        lines.next().is_some(),
        "docs/KUBERNETES.md has no {heading:?}"
    );
    // Every fenced block, with its info string ("sh", "yaml", ""): a `#` line inside one is
    // no heading.
    let mut blocks = Vec::new();
    let mut fence: Option<(&str, String)> = None;
    for line in lines {
        match &mut fence {
            Some((info, body)) if line == "```" => {
                if *info == "sh" {
                    blocks.push(std::mem::take(body));
                }
                fence = None;
            }
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None if line.starts_with("```") => fence = Some((&line[3..], String::new())),
            None => {
                let hashes = line.len() - line.trim_start_matches('#').len();
                if (1..=level).contains(&hashes) && line[hashes..].starts_with(' ') {
                    break;
                }
            }
        }
    }
    assert!(!blocks.is_empty(), "no ```sh block under {heading:?}");
    blocks
}

#[tokio::test]
async fn kustomize_base_and_overlays_pass_a_server_side_dry_run() {
    let k = KubeApi::start().await;
    let kubectl = Kubectl::new(&k);

    // What each renders to: no Secret (created by hand), no PodDisruptionBudget (its API
    // version depends on the cluster's).
    let (base, base_docs) = render(&kubectl, "manifests");
    assert_eq!(base, ids(&[&BASE]));
    assert!(!deployment_args(&base_docs).contains(&"--all-namespaces".to_string()));
    assert_eq!(render(&kubectl, "overlays/namespaced").0, ids(&[&BASE]));
    let (all, all_docs) = render(&kubectl, "overlays/all-namespaces");
    assert_eq!(all, ids(&[&BASE, &ALL_NAMESPACES]));
    assert!(
        deployment_args(&all_docs).contains(&"--all-namespaces".to_string()),
        "{:?}",
        deployment_args(&all_docs)
    );
    assert_eq!(
        render(&kubectl, "overlays/monitoring").0,
        ids(&[&BASE, &MONITORING])
    );

    // The docs' overlay of one's own, next to a checkout named `warmpool`.
    let own = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(REPO, own.path().join("warmpool")).unwrap();
    std::fs::create_dir(own.path().join("my-warmpool")).unwrap();
    std::fs::write(
        own.path().join("my-warmpool/kustomization.yaml"),
        own_overlay_from_docs(),
    )
    .unwrap();
    let own_dir = own.path().join("my-warmpool");
    let own_dir = own_dir.to_str().unwrap();
    assert_eq!(
        render(&kubectl, own_dir).0,
        ids(&[&BASE, &ALL_NAMESPACES, &MONITORING])
    );

    // A server-side dry run creates nothing, so namespaced objects fail until their namespace
    // exists for real; the docs create it first.
    kubectl.fails(
        &["apply", "-k", "manifests", "--dry-run=server"],
        r#"namespaces "warmpool" not found"#,
    );
    kubectl.ok(&["apply", "-f", "manifests/namespace.yaml"]);
    for dir in [
        "manifests",
        "overlays/namespaced",
        "overlays/all-namespaces",
    ] {
        let out = kubectl.ok(&["apply", "-k", dir, "--dry-run=server"]);
        assert!(
            out.contains("deployment.apps/warmpool created (server dry run)"),
            "{dir}: {out}"
        );
    }

    // The monitoring objects need prometheus-operator's CRDs.
    kubectl.fails(
        &["apply", "-k", "overlays/monitoring", "--dry-run=server"],
        r#"no matches for kind "PrometheusRule" in version "monitoring.coreos.com/v1""#,
    );
    let crds = own.path().join("monitoring-crds.yaml");
    std::fs::write(&crds, MONITORING_CRDS).unwrap();
    kubectl.ok(&["apply", "-f", crds.to_str().unwrap()]);
    kubectl.ok(&[
        "wait",
        "--for=condition=established",
        "crd/prometheusrules.monitoring.coreos.com",
        "crd/podmonitors.monitoring.coreos.com",
    ]);
    for dir in ["overlays/monitoring", own_dir] {
        let out = kubectl.ok(&["apply", "-k", dir, "--dry-run=server"]);
        for obj in [
            "prometheusrule.monitoring.coreos.com/warmpool created (server dry run)",
            "podmonitor.monitoring.coreos.com/warmpool created (server dry run)",
        ] {
            assert!(out.contains(obj), "{dir}: {out}");
        }
    }

    // The PodDisruptionBudget: v1.20 predates policy/v1.
    kubectl.fails(
        &[
            "apply",
            "-f",
            "manifests/pdb/policy-v1.yaml",
            "--dry-run=server",
        ],
        r#"no matches for kind "PodDisruptionBudget" in version "policy/v1""#,
    );
    kubectl.ok(&[
        "apply",
        "-f",
        "manifests/pdb/policy-v1beta1.yaml",
        "--dry-run=server",
    ]);
    let pdb = |file: &str| -> Value {
        let path = Path::new(REPO).join("manifests/pdb").join(file);
        let mut v: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("apiVersion");
        v
    };
    assert_eq!(
        pdb("policy-v1.yaml"),
        pdb("policy-v1beta1.yaml"),
        "the two PodDisruptionBudgets differ in more than their apiVersion"
    );

    // Dry runs created nothing.
    let left = kubectl.ok(&[
        "-n",
        "warmpool",
        "get",
        "deployments,services,roles",
        "-o",
        "name",
    ]);
    assert_eq!(left, "", "a dry run created objects");
    kubectl.fails(&["get", "clusterrole", "warmpool"], "NotFound");
}

/// The ```yaml block of the docs' Install section that starts with `# my-warmpool/`.
fn own_overlay_from_docs() -> String {
    let doc = std::fs::read_to_string(Path::new(REPO).join("docs/KUBERNETES.md")).unwrap();
    let start = doc
        .find("```yaml\n# my-warmpool/kustomization.yaml")
        .expect(
            "docs/KUBERNETES.md shows an overlay of one's own (# my-warmpool/kustomization.yaml)",
        );
    let body = &doc[start + "```yaml\n".len()..];
    body[..body.find("```").unwrap()].to_string()
}

#[tokio::test]
async fn the_install_steps_of_the_docs_run_as_written() {
    let k = KubeApi::start().await;
    let kubectl = Kubectl::new(&k);

    // Stubbed: docker (no image build here). Everything else runs for real, in order.
    let stub = "set -e\ndocker() { echo \"stub: docker $*\" >&2; cat >/dev/null; }\n";
    let install = doc_sh_blocks("## Install").join("");
    let out = kubectl.bash(&format!("{stub}{install}"));
    assert!(out.contains("stub: docker build"), "{out}");
    assert!(install.contains("kubectl apply -k "), "{install}");

    // What it made: the Secrets, the install, the PodDisruptionBudget the cluster serves
    // (policy/v1beta1 on v1.20), the example pools.
    for obj in [
        "secret/warmpool-api-token",
        "secret/warmpool-agent-key",
        "deployment.apps/warmpool",
        "service/warmpool-hub",
        "poddisruptionbudget.policy/warmpool",
        "agentpool.warmpool.dev/go",
        "agentpool.warmpool.dev/docker",
    ] {
        kubectl.ok(&["-n", "warmpool", "get", obj]);
    }
    let token = kubectl.ok(&[
        "-n",
        "warmpool",
        "get",
        "secret/warmpool-api-token",
        "-o",
        "jsonpath={.data.token}",
    ]);
    assert!(token.len() > 40, "the token is a generated one: {token:?}");

    // Uninstalling, as a server-side dry run (this apiserver has no namespace controller to
    // finish a namespace's deletion).
    let uninstall = doc_sh_blocks("### Uninstalling").join("");
    assert!(uninstall.contains("kubectl delete"), "{uninstall}");
    let dry = "set -e\nkubectl() { command kubectl \"$@\" --dry-run=server; }\n";
    let out = kubectl.bash(&format!("{dry}{uninstall}"));
    assert!(
        out.contains("namespace \"warmpool\" deleted (server dry run)"),
        "{out}"
    );
    kubectl.ok(&["get", "namespace", "warmpool"]);
}
