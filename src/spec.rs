//! The pool specification: one serde model, [`PoolSpec`], read alike from the pools file and from
//! the `AgentPool` CRD (which flattens it into its spec).
//!
//! Owns field names, defaults, duration syntax (`30s`, `10m`, `1h30m`) and validation. Loading a
//! pools file collects one clear message per bad field, each naming the field's full path
//! (`pools[0].provisioning.burst`), instead of stopping at the first (`read`); nothing here
//! starts agents or talks to the network.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use read::Tree;
pub use schedule::{Schedule, Window};

/// Agents one pool may have at most (`maxTotal`): a bound on what one spec can make the
/// service allocate.
pub const MAX_POOL_AGENTS: u32 = 100_000;
/// Upper bound of `provisioning.perSecond`, `burst` and `maxConcurrent`: agents one pool may
/// start in one pass stay bounded.
pub const MAX_PROVISIONING: u32 = 1_000;

/// Errors from loading or validating pool specs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pools file could not be read.
    #[error("cannot read pools file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The pools file is not YAML of the expected shape.
    #[error("pools file {path} is not valid YAML: {message}")]
    Yaml {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// One or more fields are invalid; one message per field.
    #[error("invalid pool spec in {source_name}:\n  - {}", .problems.join("\n  - "))]
    Invalid {
        /// Where the spec came from (file name or "request").
        source_name: String,
        /// One message per bad field, each naming the field.
        problems: Vec<String>,
    },
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A duration written as `30s`, `10m`, `1h30m` (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl Dur {
    /// Parses the human form (`30s`, `10m`, `250ms`).
    ///
    /// ```
    /// use warmpool::spec::Dur;
    /// assert_eq!(Dur::parse("10m").unwrap(), Dur::secs(600));
    /// assert!(Dur::parse("soon").is_err());
    /// ```
    pub fn parse(s: &str) -> std::result::Result<Dur, String> {
        let t = s.trim();
        let d = match t.parse::<u64>() {
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => humantime::parse_duration(t)
                .map_err(|e| format!("{s:?} is not a duration like 30s, 10m or 1h ({e})"))?,
        };
        Dur::at_most_max(d, s)
    }

    /// The longest duration accepted anywhere (100 years): any sum of a few such durations, or
    /// an instant plus one, stays far from overflowing.
    pub const MAX: Dur = Dur::secs(3_155_760_000);

    fn at_most_max(d: Duration, written: &str) -> std::result::Result<Dur, String> {
        if d > Dur::MAX.0 {
            return Err(format!(
                "{written:?} is longer than 100 years, the longest duration accepted"
            ));
        }
        Ok(Dur(d))
    }

    /// Builds from whole seconds.
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl JsonSchema for Dur {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // A string like "30s" or "10m", or a whole number of seconds (structural: int-or-string).
        schemars::json_schema!({
            "x-kubernetes-int-or-string": true,
            "description": "A duration: 30s, 10m, 1h30m, 250ms, or a whole number of seconds."
        })
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like 30s, 10m or 1h, or a whole number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, s: u64) -> std::result::Result<Dur, E> {
                Dur::at_most_max(Duration::from_secs(s), &s.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, s: i64) -> std::result::Result<Dur, E> {
                match u64::try_from(s) {
                    Ok(s) => self.visit_u64(s),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(s), &self)),
                }
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<Dur, E> {
                Dur::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Provisioning pace for one pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Provisioning {
    /// Sustained agent starts per second.
    #[schemars(range(min = 0.001))]
    pub per_second: f64,
    /// Starts allowed in a burst above the sustained rate.
    #[schemars(range(min = 1))]
    pub burst: u32,
    /// Agents provisioning or connecting at once (in-flight provisions).
    #[schemars(range(min = 1))]
    pub max_concurrent: u32,
}

impl Default for Provisioning {
    fn default() -> Self {
        Provisioning {
            per_second: 5.0,
            burst: 10,
            max_concurrent: 10,
        }
    }
}

/// Health limits an agent reports against in its heartbeats and after cleanup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HealthLimits {
    /// Bytes left in the workspace above which the agent is recycled.
    pub max_workspace_bytes: u64,
    /// Processes left behind by jobs above which the agent is recycled.
    pub max_leftover_processes: u32,
}

impl Default for HealthLimits {
    fn default() -> Self {
        HealthLimits {
            max_workspace_bytes: 10 * 1024 * 1024 * 1024,
            max_leftover_processes: 0,
        }
    }
}

/// The specification of one pool of warm agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PoolSpec {
    /// Labels every agent of the pool carries; lease selectors match against them.
    pub labels: Vec<String>,
    /// Idle agents kept ready at all times.
    pub min_idle: u32,
    /// Hard cap on agents of the pool in any state.
    #[schemars(range(min = 1))]
    pub max_total: u32,
    /// Leases an agent serves before it is replaced (1 = a fresh agent per lease, 0 = no limit).
    pub max_uses: u32,
    /// Idle agents above `minIdle` are scaled down after being idle this long.
    pub idle_ttl: Dur,
    /// Every agent is rotated after this age (replaced before it is terminated).
    pub max_age: Dur,
    /// An agent not registered with the hub by then is killed and counted as a leak.
    pub connect_timeout: Dur,
    /// Provisioning pace.
    pub provisioning: Provisioning,
    /// Health limits checked on heartbeats and after each cleanup.
    pub health: HealthLimits,
    /// Commands agents run between leases (cleanup, then a health check that can recycle).
    #[serde(skip_serializing_if = "crate::hooks::Hooks::is_empty")]
    pub hooks: crate::hooks::Hooks,
    /// External pool: warmpool starts no agents; machines join with the pool's join token
    /// (static hosts, GPU machines, VMs). Leasing, heartbeats and recycling-by-release apply;
    /// `maxTotal` caps how many may join; sizing, `maxUses`, `maxAge` and `idleTtl` do not.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub external: bool,
    /// Process backend only: the command that starts one agent instead of `warmpool agent`.
    /// It gets `WARMPOOL_HUB`, `WARMPOOL_AGENT_ID`, `WARMPOOL_TOKEN_FILE` (a 0600 file holding
    /// its token, to read and delete) and `WARMPOOL_WORKSPACE`.
    /// Not part of the `AgentPool` schema: pods get their command from the pod template.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub agent_command: Option<Vec<String>>,
    /// A Jenkins pool: its agents are Jenkins nodes, online on this controller over Jenkins'
    /// own WebSocket remoting, and Jenkins' queue leases them (docs/JENKINS.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jenkins: Option<crate::jenkins::JenkinsSpec>,
    /// Time windows (a cron start, a duration, a time zone) that replace `minIdle`, and
    /// optionally `maxTotal`, while open. Overlapping windows: the highest `minIdle` and the
    /// highest `maxTotal` among the open windows that set one (docs/SIZING.md).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<Schedule>,
    /// Forecast headroom: the share of leases that should find an idle agent (0 < x < 1, like
    /// 0.95). warmpool learns the pool's arrival rate and refill time and keeps enough idle
    /// agents for the arrivals expected during one refill; `minIdle` and schedules stay floors.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub warm_hit_target: Option<f64>,
    /// After no lease request for this long the pool may drop to zero idle agents (`minIdle`
    /// and the forecast stop applying; an open schedule window still does); the next request
    /// wakes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_to_zero_after: Option<Dur>,
}

impl Default for PoolSpec {
    fn default() -> Self {
        PoolSpec {
            labels: Vec::new(),
            min_idle: 1,
            max_total: 10,
            max_uses: 1,
            idle_ttl: Dur::secs(600),
            max_age: Dur::secs(3600),
            connect_timeout: Dur::secs(120),
            provisioning: Provisioning::default(),
            health: HealthLimits::default(),
            hooks: crate::hooks::Hooks::default(),
            external: false,
            agent_command: None,
            jenkins: None,
            schedules: Vec::new(),
            warm_hit_target: None,
            scale_to_zero_after: None,
        }
    }
}

/// A named pool as written in a pools file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolDef {
    /// Pool name (a DNS-1123 label).
    pub name: String,
    /// The spec.
    #[serde(flatten)]
    pub spec: PoolSpec,
}

impl PoolSpec {
    /// The built-in pool of `warmpool serve`: labels `linux` and the machine's arch, minIdle 2.
    pub fn builtin_default() -> PoolSpec {
        PoolSpec {
            labels: vec![
                std::env::consts::OS.to_string(),
                std::env::consts::ARCH.to_string(),
            ],
            min_idle: 2,
            max_total: 10,
            ..PoolSpec::default()
        }
    }

    /// The labels as a set.
    pub fn label_set(&self) -> BTreeSet<String> {
        self.labels.iter().cloned().collect()
    }

    /// Semantic checks; one message per bad field, each prefixed with `prefix`.
    pub fn validate(&self, prefix: &str) -> Vec<String> {
        let mut p = Vec::new();
        for (i, l) in self.labels.iter().enumerate() {
            if !crate::labels::is_bare_atom(l) {
                p.push(format!(
                    "{prefix}labels[{i}]: {l:?} is not a valid label (no whitespace, no & | ! < > ( ) \" ' and no \"->\")"
                ));
            }
        }
        if self.max_total == 0 {
            p.push(format!("{prefix}maxTotal: must be at least 1"));
        }
        if self.max_total > MAX_POOL_AGENTS {
            p.push(format!(
                "{prefix}maxTotal: {} is above the limit of {MAX_POOL_AGENTS} agents a pool",
                self.max_total
            ));
        }
        if self.min_idle > self.max_total {
            p.push(format!(
                "{prefix}minIdle: {} is above maxTotal {}",
                self.min_idle, self.max_total
            ));
        }
        for (field, d) in [
            ("idleTtl", self.idle_ttl),
            ("maxAge", self.max_age),
            ("connectTimeout", self.connect_timeout),
        ] {
            if d.0.is_zero() {
                p.push(format!("{prefix}{field}: must be longer than 0s"));
            }
        }
        let pr = &self.provisioning;
        if !(pr.per_second.is_finite() && pr.per_second > 0.0) {
            p.push(format!(
                "{prefix}provisioning.perSecond: must be a positive number, got {}",
                pr.per_second
            ));
        }
        if pr.per_second > MAX_PROVISIONING as f64 {
            p.push(format!(
                "{prefix}provisioning.perSecond: {} is above the limit of {MAX_PROVISIONING}",
                pr.per_second
            ));
        }
        for (field, v) in [("burst", pr.burst), ("maxConcurrent", pr.max_concurrent)] {
            if v == 0 {
                p.push(format!("{prefix}provisioning.{field}: must be at least 1"));
            } else if v > MAX_PROVISIONING {
                p.push(format!(
                    "{prefix}provisioning.{field}: {v} is above the limit of {MAX_PROVISIONING}"
                ));
            }
        }
        p.extend(command_problem(
            &format!("{prefix}agentCommand"),
            &self.agent_command,
        ));
        if self.external && self.agent_command.is_some() {
            p.push(format!(
                "{prefix}agentCommand: an external pool starts no agents (its machines join with the pool's join token)"
            ));
        }
        p.extend(self.hooks.validate(prefix));
        for (i, w) in self.schedules.iter().enumerate() {
            p.extend(w.validate(&format!("{prefix}schedules[{i}]."), self.max_total));
        }
        if let Some(t) = self.warm_hit_target
            && !(t.is_finite() && t > 0.0 && t < 1.0)
        {
            p.push(format!(
                "{prefix}warmHitTarget: must be between 0 and 1 (exclusive), like 0.95; got {t}"
            ));
        }
        if self.scale_to_zero_after.is_some_and(|d| d.0.is_zero()) {
            p.push(format!("{prefix}scaleToZeroAfter: must be longer than 0s"));
        }
        if self.external {
            for (field, set) in [
                ("schedules", !self.schedules.is_empty()),
                ("warmHitTarget", self.warm_hit_target.is_some()),
                ("scaleToZeroAfter", self.scale_to_zero_after.is_some()),
            ] {
                if set {
                    p.push(format!(
                        "{prefix}{field}: an external pool starts no agents, so it has no sizing policy"
                    ));
                }
            }
        }
        if let Some(j) = &self.jenkins {
            p.extend(j.validate(&format!("{prefix}jenkins.")));
            if !self.hooks.is_empty() {
                p.push(format!(
                    "{prefix}hooks: a Jenkins pool's agents are Jenkins nodes; warmpool runs no hooks on them"
                ));
            }
            if self.external {
                p.push(format!(
                    "{prefix}jenkins: a Jenkins pool cannot be external (warmpool starts its agents)"
                ));
            }
            if self.agent_command.is_some() {
                p.push(format!(
                    "{prefix}agentCommand: a Jenkins pool takes its command from jenkins.agentCommand"
                ));
            }
        }
        p
    }
}

/// The problem with an optional command line (`agentCommand`): it must name a program.
pub fn command_problem(field: &str, cmd: &Option<Vec<String>>) -> Option<String> {
    match cmd {
        Some(c) if c.first().is_none_or(|p| p.is_empty()) => {
            Some(format!("{field}: must name a program"))
        }
        _ => None,
    }
}

/// Checks a pool name: a DNS-1123 label (lowercase alphanumerics and '-', at most 63).
pub fn validate_name(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    (!ok).then(|| {
        format!("{name:?} is not a valid pool name (lowercase letters, digits and '-', at most 63)")
    })
}

/// Loads a pools file (`pools: [ {name, labels, minIdle, ...}, ... ]`).
pub fn load_file(path: &Path) -> Result<Vec<PoolDef>> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: display.clone(),
        source,
    })?;
    parse_pools(&text, &display)
}

/// Parses pools YAML; `source_name` is used in messages.
///
/// ```
/// let pools = warmpool::spec::parse_pools("pools:\n  - name: go\n    labels: [linux, go]\n", "example").unwrap();
/// assert_eq!(pools[0].spec.labels, ["linux", "go"]);
/// let err = warmpool::spec::parse_pools("pools:\n  - name: go\n    provisioning: {burst: lots}\n", "example").unwrap_err();
/// assert!(err.to_string().contains("pools[0].provisioning.burst: invalid type: string \"lots\""));
/// ```
pub fn parse_pools(text: &str, source_name: &str) -> Result<Vec<PoolDef>> {
    let doc: Tree = serde_saphyr::from_str(text).map_err(|e| Error::Yaml {
        path: source_name.to_string(),
        message: yaml_message(&e),
    })?;
    let invalid = |problems: Vec<String>| Error::Invalid {
        source_name: source_name.to_string(),
        problems,
    };
    let mut root = match doc {
        Tree::Map(_) => doc,
        _ => {
            return Err(invalid(vec![
                "the file must be a mapping with a `pools` list".into(),
            ]));
        }
    };
    let pools = match root.remove("pools") {
        Some(Tree::Seq(s)) => s,
        Some(_) => return Err(invalid(vec!["pools: must be a list".into()])),
        None => return Err(invalid(vec!["pools: missing (a list of pools)".into()])),
    };
    let mut problems: Vec<String> = match &root {
        Tree::Map(m) => m
            .iter()
            .map(|(k, _)| format!("{k}: unknown field"))
            .collect(),
        _ => Vec::new(),
    };
    let mut defs = Vec::new();
    let mut names = BTreeSet::new();
    for (i, item) in pools.into_iter().enumerate() {
        match pool_entry(item, &format!("pools[{i}]")) {
            Ok(def) => {
                if !names.insert(def.name.clone()) {
                    problems.push(format!("pools[{i}].name: {:?} is defined twice", def.name));
                }
                defs.push(def);
            }
            Err(mut p) => problems.append(&mut p),
        }
    }
    if defs.is_empty() && problems.is_empty() {
        problems.push("pools: the list is empty".into());
    }
    if problems.is_empty() {
        Ok(defs)
    } else {
        Err(invalid(problems))
    }
}

/// The parser's message, with the source lines around the problem; a second document is named
/// as such (the parser's own words address a programmer).
fn yaml_message(e: &serde_saphyr::Error) -> String {
    match e.without_snippet() {
        serde_saphyr::Error::MultipleDocuments { location, .. } => format!(
            "line {} column {}: a second YAML document starts here; a pools file holds one",
            location.line(),
            location.column()
        ),
        _ => e.to_string(),
    }
}

/// One entry of a pools file's list: a `name` beside the fields of a [`PoolSpec`], read by the
/// same serde model as the `AgentPool` spec. One message per bad field, each with its full path
/// below `at` (`pools[0]`); the semantic checks run once every field reads.
fn pool_entry(mut item: Tree, at: &str) -> std::result::Result<PoolDef, Vec<String>> {
    if !matches!(item, Tree::Map(_)) {
        return Err(vec![format!("{at}: must be a mapping")]);
    }
    let mut problems = Vec::new();
    let name = match item.remove("name") {
        Some(Tree::Str(n)) => {
            if let Some(msg) = validate_name(&n) {
                problems.push(format!("{at}.name: {msg}"));
            }
            Some(n)
        }
        Some(_) => {
            problems.push(format!("{at}.name: must be a string"));
            None
        }
        None => {
            problems.push(format!("{at}.name: missing"));
            None
        }
    };
    match read::read::<PoolSpec>(item, at) {
        Ok(spec) if problems.is_empty() => {
            let p = spec.validate(&format!("{at}."));
            match name {
                Some(name) if p.is_empty() => Ok(PoolDef { name, spec }),
                _ => Err(p),
            }
        }
        Ok(_) => Err(problems),
        Err(mut p) => {
            problems.append(&mut p);
            Err(problems)
        }
    }
}

mod read;
pub mod schedule;

#[cfg(test)]
mod tests;
