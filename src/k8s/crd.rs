//! The `AgentPool` custom resource (`warmpool.dev/v1alpha1`), derived with `kube::CustomResource`
//! and schemars from the same [`PoolSpec`] the process backend reads from its pools file.
//!
//! Owns the resource's shape: spec (the pool spec plus a pod `template` and the name of the
//! `agentContainer`), status (counts by state, `observedGeneration`, conditions, `leaksTotal`),
//! printer columns (`kubectl get agentpools`; `-o wide` adds the priority-1 ones) and the scale
//! subresource on `minIdle` with the pods' label selector (so an HPA can target a pool). Validation that a 1.20 apiserver
//! can express without CEL lives in the schema (minimums; the pod template's containers have a
//! name and an image, their resources are quantities); cross-field rules (`maxTotal >=
//! minIdle`) are checked by [`AgentPoolSpec::problems`] and reported as a condition.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::PoolSpec;

/// Spec of an `AgentPool`: a pool spec plus the pod template its agents run from.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "warmpool.dev",
    version = "v1alpha1",
    kind = "AgentPool",
    plural = "agentpools",
    shortname = "ap",
    namespaced,
    status = "AgentPoolStatus",
    scale = r#"{"specReplicasPath":".spec.minIdle","statusReplicasPath":".status.idle","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Labels","type":"string","jsonPath":".status.labelExpression"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Idle","type":"integer","jsonPath":".status.idle"}"#,
    printcolumn = r#"{"name":"Leased","type":"integer","jsonPath":".status.leased"}"#,
    printcolumn = r#"{"name":"Waiting","type":"integer","jsonPath":".status.waiting"}"#,
    printcolumn = r#"{"name":"Leaks","type":"integer","jsonPath":".status.leaksTotal"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.total"}"#,
    printcolumn = r#"{"name":"Min","type":"integer","jsonPath":".spec.minIdle"}"#,
    printcolumn = r#"{"name":"Max","type":"integer","jsonPath":".spec.maxTotal"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Provisioning","type":"integer","priority":1,"jsonPath":".status.provisioning"}"#,
    printcolumn = r#"{"name":"Connecting","type":"integer","priority":1,"jsonPath":".status.connecting"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","priority":1,"jsonPath":".status.desiredIdle"}"#,
    printcolumn = r#"{"name":"Source","type":"string","priority":1,"jsonPath":".status.desiredIdleSource"}"#,
    printcolumn = r#"{"name":"WarmHit","type":"number","priority":1,"jsonPath":".status.warmHitRatio"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Degraded\")].reason"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentPoolSpec {
    /// The pool: labels, sizing, recycling, provisioning pace, health limits.
    #[serde(flatten)]
    pub pool: PoolSpec,
    /// The pod every agent of this pool runs as (required unless the pool is `external`).
    #[serde(default)]
    #[schemars(schema_with = "pod_template_schema")]
    pub template: PodTemplateSpec,
    /// The container that runs `warmpool agent` (default: the first container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_container: Option<String>,
}

/// What a 1.20 apiserver can check of a pod template at admission, in a structural schema:
/// every container (and init container) has a `name` and an `image`, and its resource limits
/// and requests are quantities. The rest stays an open object (`x-kubernetes-preserve-unknown-
/// fields`): the CRD stays small and independent of the Kubernetes version, and the controller
/// has the apiserver judge the whole pod in a server-side dry run when it first sees a template
/// (docs/KUBERNETES.md, Validation).
fn pod_template_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    // resource.Quantity's own pattern (k8s.io/apimachinery, as controller-gen writes it).
    let quantity = serde_json::json!({
        "x-kubernetes-int-or-string": true,
        "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTP]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
    });
    let quantities = serde_json::json!({"type": "object", "additionalProperties": quantity});
    let container = serde_json::json!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "required": ["name", "image"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "image": {"type": "string", "minLength": 1},
            "resources": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "properties": {"limits": quantities, "requests": quantities}
            }
        }
    });
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "A core/v1 PodTemplateSpec: metadata and spec of the agent pods.",
        "properties": {
            "spec": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "properties": {
                    "containers": {"type": "array", "items": container},
                    "initContainers": {"type": "array", "items": container}
                }
            }
        }
    })
}

/// The conditions as `metav1.Condition`s: `type`, `status`, `reason`, `message` and
/// `lastTransitionTime` (a date-time) required, `observedGeneration` optional.
fn conditions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "description": "`Ready`, `Throttled`, `Degraded` (metav1.Condition).",
        "items": {
            "type": "object",
            "description": "A status condition (metav1.Condition).",
            "required": ["type", "status", "reason", "message", "lastTransitionTime"],
            "properties": {
                "type": {"type": "string", "description": "`Ready`, `Throttled` or `Degraded`."},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "reason": {"type": "string", "description": "CamelCase machine reason."},
                "message": {"type": "string", "description": "For people: names the pods, nodes or controller concerned."},
                "lastTransitionTime": {"type": "string", "format": "date-time", "description": "When `status` last changed (RFC 3339)."},
                "observedGeneration": {"type": "integer", "format": "int64", "description": "The spec generation the condition was computed for."}
            }
        }
    })
}

/// Observed state of an `AgentPool`, written through the status subresource.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPoolStatus {
    /// Pods requested, not yet running.
    #[serde(default)]
    pub provisioning: u32,
    /// Pods running whose agent has not registered yet.
    #[serde(default)]
    pub connecting: u32,
    /// Agents connected and free.
    #[serde(default)]
    pub idle: u32,
    /// Agents bound to a lease (or cleaning after one).
    #[serde(default)]
    pub leased: u32,
    /// Pods being deleted.
    #[serde(default)]
    pub terminating: u32,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Throttled`, `Degraded`.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Agents that never registered within `connectTimeout`.
    #[serde(default)]
    pub leaks_total: u64,
    /// Lease requests waiting that this pool could serve.
    #[serde(default)]
    pub waiting: u32,
    /// All pods of the pool: provisioning, connecting, idle, leased and terminating.
    #[serde(default)]
    pub total: u32,
    /// The pool's labels as a Jenkins label expression (`linux && e2e`), for `kubectl get`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label_expression: String,
    /// Label selector of the pool's pods (`warmpool.dev/pool=NAME`): the scale
    /// subresource's selector, so a HorizontalPodAutoscaler can target the pool.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// Idle agents the sizing policy wants now (docs/SIZING.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_idle: Option<u32>,
    /// What dominates `desiredIdle`: `minIdle`, `schedule`, `forecast`, `demand` or
    /// `scaleToZero`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_idle_source: Option<String>,
    /// Lease requests per minute the forecast expects now (two significant digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrival_rate: Option<f64>,
    /// Learned seconds from provisioning an agent to its registration (two significant
    /// digits; a default before the first measurement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill_seconds: Option<f64>,
    /// Share of the last hour's leases that found an idle agent (two decimals); absent without
    /// a lease in the hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_hit_ratio: Option<f64>,
}

/// Rounds to two significant digits (status fields that change a little on every pass would
/// otherwise be rewritten every time).
fn two_digits(x: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return 0.0;
    }
    let scale = 10f64.powi(1 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

impl AgentPoolStatus {
    /// Sets the sizing policy's fields from the engine's view of the pool.
    pub fn set_policy(&mut self, p: &crate::engine::PoolStatus) {
        self.desired_idle = Some(p.desired_idle);
        self.desired_idle_source = Some(p.desired_idle_source.as_str().to_string());
        self.arrival_rate = Some(two_digits(p.arrival_rate));
        self.refill_seconds = Some(two_digits(p.refill_seconds));
        self.warm_hit_ratio = p.warm_hit_ratio.map(|r| (r * 100.0).round() / 100.0);
    }
}

impl AgentPoolStatus {
    /// Sets what `kubectl get agentpools` and the scale subresource read besides the counts:
    /// `total`, `labelExpression` and `selector` of the AgentPool `name` with `spec`.
    pub fn set_view(&mut self, name: &str, spec: &AgentPoolSpec) {
        self.total =
            self.provisioning + self.connecting + self.idle + self.leased + self.terminating;
        self.label_expression = label_expression(&spec.pool.labels);
        self.selector = format!("{}={name}", crate::backend::kubernetes::LABEL_POOL);
    }
}

/// Labels as Jenkins writes an expression that selects them all: `linux && e2e`; a label
/// holding a space or an operator character is double-quoted.
pub fn label_expression(labels: &[String]) -> String {
    labels
        .iter()
        .map(|l| {
            if l.is_empty()
                || l.chars()
                    .any(|c| c.is_whitespace() || "&|!()<>=\"".contains(c))
            {
                format!("{l:?}")
            } else {
                l.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" && ")
}

/// A status condition, shaped like `metav1.Condition`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Throttled` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase machine reason (required, as in `metav1.Condition`).
    pub reason: String,
    /// Human message (names the pods concerned; required, may be empty).
    pub message: String,
    /// RFC 3339 time the condition's `status` last changed (required, as in
    /// `metav1.Condition`; empty only when read from a status an older warmpool wrote).
    #[serde(default)]
    pub last_transition_time: String,
    /// Generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl AgentPoolSpec {
    /// Rules the schema cannot express on a 1.20 apiserver; one message per problem.
    pub fn problems(&self) -> Vec<String> {
        let mut p = self.pool.validate("spec.");
        let containers = self
            .template
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default();
        if self.pool.external {
            if !containers.is_empty() {
                p.push(
                    "spec.template: an external pool starts no pods; remove the template".into(),
                );
            }
        } else if containers.is_empty() {
            p.push("spec.template.spec.containers: the pod template has no container".into());
        }
        if let Some(name) = &self.agent_container
            && !containers.iter().any(|c| &c.name == name)
        {
            p.push(format!(
                "spec.agentContainer: no container named {name:?} in the pod template"
            ));
        }
        p
    }
}

/// The CRD as YAML, exactly as `warmpool crd` prints it and `manifests/crd.yaml` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = AgentPool::crd();
    format!(
        "# Generated by `warmpool crd`; do not edit (a test fails when they differ).\n{}",
        // A long description stays on one line (not folded at 80 columns): small diffs.
        serde_saphyr::to_string_with_options(
            &crd,
            serde_saphyr::ser_options! { folded_wrap_chars: 10_000 },
        )
        .expect("CRD serialises")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_crd_matches_the_code() {
        let want = crd_yaml();
        let have = include_str!("../../manifests/crd.yaml");
        assert!(
            have == want,
            "manifests/crd.yaml is stale: regenerate it with `cargo run -- crd > manifests/crd.yaml`"
        );
    }

    #[test]
    fn crd_has_subresources_columns_and_schema_minimums() {
        let y = crd_yaml();
        for want in [
            "group: warmpool.dev",
            "kind: AgentPool",
            "scope: Namespaced",
            "specReplicasPath: .spec.minIdle",
            "statusReplicasPath: .status.idle",
            "status: {}",
            "labelSelectorPath: .status.selector",
            "jsonPath: .status.labelExpression",
            "priority: 1",
            "jsonPath: .metadata.creationTimestamp",
            "x-kubernetes-preserve-unknown-fields: true",
            "x-kubernetes-int-or-string: true",
        ] {
            assert!(y.contains(want), "CRD lacks {want:?}:\n{y}");
        }
    }

    #[test]
    fn the_view_has_a_jenkins_label_expression_a_pod_selector_and_the_total() {
        let spec: AgentPoolSpec = serde_saphyr::from_str("labels: [linux, e2e]\n").unwrap();
        let mut st = AgentPoolStatus {
            provisioning: 1,
            connecting: 2,
            idle: 3,
            leased: 4,
            terminating: 5,
            ..Default::default()
        };
        st.set_view("go", &spec);
        assert_eq!(st.total, 15);
        assert_eq!(st.label_expression, "linux && e2e");
        // The label the Kubernetes backend puts on every pod of the pool.
        assert_eq!(st.selector, "warmpool.dev/pool=go");
        assert_eq!(
            st.selector,
            format!("{}=go", crate::backend::kubernetes::LABEL_POOL)
        );
        assert_eq!(
            label_expression(&["a b".into(), "x&y".into(), "ok".into()]),
            r#""a b" && "x&y" && ok"#
        );
        assert_eq!(label_expression(&[]), "");
    }

    #[test]
    fn policy_status_fields_are_rounded_for_few_writes() {
        assert_eq!(two_digits(29.548), 30.0);
        assert_eq!(two_digits(0.4166), 0.42);
        assert_eq!(two_digits(26.0), 26.0);
        assert_eq!(two_digits(0.0), 0.0);
        let spec: AgentPoolSpec = serde_saphyr::from_str(
            "schedules:\n  - {cron: '0 8 * * 1-5', duration: 0s, timeZone: Nowhere, minIdle: 1}\n",
        )
        .unwrap();
        let p = spec.problems().join("\n");
        assert!(p.contains("spec.schedules[0].timeZone: \"Nowhere\""), "{p}");
        assert!(
            p.contains("spec.schedules[0].duration: must be longer than 0s"),
            "{p}"
        );
    }

    #[test]
    fn spec_round_trips_and_reports_problems() {
        let yaml = r#"
labels: [linux, docker]
minIdle: 5
maxTotal: 2
idleTtl: 5m
agentContainer: agent
template:
  spec:
    containers:
      - name: main
        image: warmpool:dev
"#;
        let spec: AgentPoolSpec = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(spec.pool.idle_ttl, crate::spec::Dur::secs(300));
        let p = spec.problems().join("\n");
        assert!(p.contains("spec.minIdle: 5 is above maxTotal 2"), "{p}");
        assert!(p.contains("spec.agentContainer"), "{p}");
        let back: AgentPoolSpec =
            serde_saphyr::from_str(&serde_saphyr::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }
}
