//! Every Prometheus metric warmpool exports, built once into one registry at start-up.
//!
//! Names are `warmpool_*` with units in the name. Agent counts by state are refreshed from the
//! engine at scrape time (level-triggered), counters and histograms are updated by the shell.
//!
//! Every family exists from the first scrape, at zero: label values known up front (reasons,
//! results, states, endpoints) are created in [`Metrics::new`], per-pool series in
//! [`Metrics::init_pool`] when the pool appears, so alerts and `rate()` work before the first
//! event. The exceptions (documented in the README's metrics list) are the per-controller Jenkins
//! gauges, `warmpool_jenkins_nodes`/`warmpool_jenkins_queue_demand` (Jenkins pools only),
//! `warmpool_warm_hit_ratio` (no series while a pool had no lease in the hour) and
//! `warmpool_warm_hit_target` (only for pools with `warmHitTarget`).

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The registry and its metrics.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// `warmpool_agents{pool,state}`.
    pub agents: IntGaugeVec,
    /// `warmpool_lease_wait_seconds{pool}`: request to grant.
    pub lease_wait: HistogramVec,
    /// `warmpool_provision_to_idle_seconds{pool}`: agent requested to registered.
    pub provision_to_idle: HistogramVec,
    /// `warmpool_exec_time_to_first_byte_seconds{pool}`.
    pub exec_ttfb: HistogramVec,
    /// `warmpool_recycles_total{pool,reason}`: agents terminated, by reason.
    pub recycles: IntCounterVec,
    /// `warmpool_leaks_total{pool}`: agents that never registered within connectTimeout.
    pub leaks: IntCounterVec,
    /// `warmpool_rejected_connections_total{reason}`: hub connections refused.
    pub rejected_connections: IntCounterVec,
    /// `warmpool_unverified_lease_claims_total{pool}`: leases agents reported in `hello`
    /// without a valid lease token (ignored; the agent and lease are in the log line).
    pub unverified_lease_claims: IntCounterVec,
    /// `warmpool_http_connections_refused_total{reason}`: HTTP connections refused at the
    /// connection limit (`limit`) or on a slot reserved for agents (`reserved-for-agents`).
    pub http_refused: IntCounterVec,
    /// `warmpool_protocol_errors_total{reason}`: connections closed for bad frames.
    pub protocol_errors: IntCounterVec,
    /// `warmpool_provisions_throttled_total{pool}`: provisions held back by the rate limiter.
    pub throttled: IntCounterVec,
    /// `warmpool_provisions_total{pool,result}`.
    pub provisions: IntCounterVec,
    /// `warmpool_lease_requests_total{result}`.
    pub lease_requests: IntCounterVec,
    /// `warmpool_leases_ended_total{pool,state}`.
    pub leases_ended: IntCounterVec,
    /// `warmpool_jenkins_requests_total{endpoint,code}`: Jenkins API calls by answer.
    pub jenkins_requests: IntCounterVec,
    /// `warmpool_jenkins_request_seconds{endpoint}`.
    pub jenkins_request_seconds: HistogramVec,
    /// `warmpool_jenkins_connecting_agents{controller}`: agents started, not yet online.
    pub jenkins_connecting: IntGaugeVec,
    /// `warmpool_jenkins_nodes{pool,state}`: Jenkins nodes of a pool by state.
    pub jenkins_nodes: IntGaugeVec,
    /// `warmpool_jenkins_poll_interval_seconds{controller}`: the current (backed-off) interval.
    pub jenkins_poll_interval: GaugeVec,
    /// `warmpool_jenkins_queue_demand{pool}`: queued builds waiting for the pool's labels.
    pub jenkins_demand: IntGaugeVec,
    /// `warmpool_leases_total{pool,path}`: leases granted, `warm` (an idle agent was ready at
    /// request time) or `cold` (the request waited).
    pub leases: IntCounterVec,
    /// `warmpool_idle_agent_seconds_total{pool}`: idle agents integrated over time.
    pub idle_agent_seconds: CounterVec,
    /// `warmpool_desired_idle_agents{pool}`: what the sizing policy wants idle now.
    pub desired_idle: IntGaugeVec,
    /// `warmpool_desired_idle_source{pool,source}`: 1 for the term that dominates the desired
    /// idle count (minIdle, schedule, forecast, demand, scaleToZero), 0 for the others.
    pub desired_idle_source: IntGaugeVec,
    /// `warmpool_arrival_rate_per_minute{pool}`: the lease requests per minute the forecast
    /// expects.
    pub arrival_rate: GaugeVec,
    /// `warmpool_refill_seconds{pool}`: learned provision-to-idle time.
    pub refill_seconds: GaugeVec,
    /// `warmpool_warm_hit_ratio{pool}`: share of the last hour's leases that were warm (no
    /// series while the pool had no lease in the hour).
    pub warm_hit_ratio: GaugeVec,
    /// `warmpool_warm_hit_target{pool}`: the pool's `warmHitTarget` (no series without one).
    pub warm_hit_target: GaugeVec,
    /// `warmpool_lease_requests_waiting{pool}`: lease requests queued for the pool now.
    pub waiting: IntGaugeVec,
    /// `warmpool_pool_degraded{pool}`: 1 while agents of the pool fail to start or their hooks
    /// fail (the engine's `lastError` or `lastHookFailure`), else 0.
    pub pool_degraded: IntGaugeVec,
    /// `warmpool_ready`: 1 while this instance grants leases (the leader, or the only instance),
    /// 0 on a standby, while adopting, and when shutting down.
    pub ready: IntGauge,
}

/// `reason` values of `warmpool_rejected_connections_total` (the hub's refusals).
pub const REJECTED_CONNECTION_REASONS: &[&str] = &[
    "version",
    "invalid-token",
    "not-ready",
    "protocol",
    "malformed",
    "unknown-agent",
    "wrong-pool",
    "duplicate-agent",
    "terminating",
    "not-joinable",
    "pool-full",
    "hello-timeout",
    "closed-before-hello",
    "bad-frame",
    "frame-too-large",
    "hello-too-large",
    "handshake-rate",
];

/// `reason` values of `warmpool_protocol_errors_total`.
pub const PROTOCOL_ERROR_REASONS: &[&str] = &[
    "bad-frame",
    "frame-too-large",
    "hello-too-large",
    "protocol",
    "malformed",
    "message-rate",
    "slow-consumer",
];

/// `reason` values of `warmpool_http_connections_refused_total`.
pub const HTTP_REFUSED_REASONS: &[&str] = &["limit", "reserved-for-agents"];

/// `result` values of `warmpool_provisions_total`.
pub const PROVISION_RESULTS: &[&str] = &["requested", "started", "failed"];

/// Every recycle reason, as `warmpool_recycles_total{reason}` spells it.
pub fn recycle_reasons() -> Vec<&'static str> {
    use crate::engine::Reason;
    let s = String::new;
    [
        Reason::MaxUses,
        Reason::IdleTtl,
        Reason::MaxAge,
        Reason::Rolled,
        Reason::ConnectTimeout,
        Reason::HeartbeatLost,
        Reason::Unhealthy(s()),
        Reason::LeaseExpired,
        Reason::Disconnected(s()),
        Reason::Exited(s()),
        Reason::ProvisionFailed(s()),
        Reason::StartFailed(s()),
        Reason::ProvisionTimeout,
        Reason::CleanupTimeout,
        Reason::CleanupFailed(s()),
        Reason::HealthCheckFailed(s()),
        Reason::OverCap,
        Reason::PoolRemoved,
        Reason::OrphanNode,
        Reason::OrphanAgent,
        Reason::Shutdown,
    ]
    .iter()
    .map(|r| r.as_str())
    .collect()
}

/// `result` values of `warmpool_lease_requests_total`: `granted`, `queued` and every lease
/// error code.
pub fn lease_request_results() -> Vec<&'static str> {
    use crate::engine::LeaseError as E;
    let s = String::new;
    let mut v = vec!["granted", "queued"];
    v.extend(
        [
            E::Unsatisfiable {
                selector: s(),
                pools: s(),
            },
            E::WaitExpired {
                selector: s(),
                waited_ms: 0,
                pools: s(),
            },
            E::QueueFull { limit: 0 },
            E::NotFound(s()),
            E::Ended {
                id: s(),
                state: s(),
                reason: s(),
            },
            E::DuplicateRequest(s()),
            E::ShuttingDown,
        ]
        .iter()
        .map(|e| e.code()),
    );
    v
}

/// Every Jenkins endpoint label.
fn jenkins_endpoints() -> Vec<&'static str> {
    use crate::jenkins::client::Endpoint as E;
    [
        E::Crumb,
        E::Computers,
        E::Queue,
        E::CreateNode,
        E::SlaveAgentJnlp,
        E::JenkinsAgentJnlp,
        E::DeleteNode,
        E::ConfigXml,
        E::Jobs,
        E::JobConfig,
    ]
    .iter()
    .map(|e| e.label())
    .collect()
}

fn buckets() -> Vec<f64> {
    // 100 us .. ~105 s, doubling.
    prometheus::exponential_buckets(0.0001, 2.0, 21).expect("valid buckets")
}

impl Metrics {
    /// Builds and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let hist = |name: &str, help: &str| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets()), &["pool"])
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let jenkins_request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "warmpool_jenkins_request_seconds",
                "Jenkins API call durations, by endpoint.",
            )
            .buckets(buckets()),
            &["endpoint"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(jenkins_request_seconds.clone()))
            .expect("unique metric");
        let jenkins_poll_interval = GaugeVec::new(
            Opts::new(
                "warmpool_jenkins_poll_interval_seconds",
                "Current poll interval per Jenkins controller (backs off when Jenkins is slow or failing).",
            ),
            &["controller"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(jenkins_poll_interval.clone()))
            .expect("unique metric");
        let fgauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["pool"]).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let idle_agent_seconds = CounterVec::new(
            Opts::new(
                "warmpool_idle_agent_seconds_total",
                "Idle agents integrated over time (agent-seconds), per pool: the cost of warmth.",
            ),
            &["pool"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(idle_agent_seconds.clone()))
            .expect("unique metric");
        let ready = IntGauge::new(
            "warmpool_ready",
            "1 while this instance grants leases (the leader, or the only instance), else 0.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(ready.clone()))
            .expect("unique metric");
        let m = Metrics {
            ready,
            warm_hit_target: fgauge(
                "warmpool_warm_hit_target",
                "The pool's warmHitTarget (only for pools that set one).",
            ),
            waiting: gauge(
                "warmpool_lease_requests_waiting",
                "Lease requests waiting for an agent of the pool now.",
                &["pool"],
            ),
            pool_degraded: gauge(
                "warmpool_pool_degraded",
                "1 while the pool's agents fail to start or fail their hooks (lastError or lastHookFailure), else 0.",
                &["pool"],
            ),
            idle_agent_seconds,
            leases: counter(
                "warmpool_leases_total",
                "Leases granted, by path: warm (an idle agent was ready at request time) or cold (the request waited).",
                &["pool", "path"],
            ),
            desired_idle: gauge(
                "warmpool_desired_idle_agents",
                "Idle agents the sizing policy wants now, per pool.",
                &["pool"],
            ),
            desired_idle_source: gauge(
                "warmpool_desired_idle_source",
                "1 for the term that dominates a pool's desired idle count (minIdle, schedule, forecast, demand, scaleToZero).",
                &["pool", "source"],
            ),
            arrival_rate: fgauge(
                "warmpool_arrival_rate_per_minute",
                "Lease requests per minute the forecast expects, per pool.",
            ),
            refill_seconds: fgauge(
                "warmpool_refill_seconds",
                "Learned time from provisioning an agent to its registration, per pool.",
            ),
            warm_hit_ratio: fgauge(
                "warmpool_warm_hit_ratio",
                "Share of the last hour's leases that found an idle agent, per pool.",
            ),
            jenkins_request_seconds,
            jenkins_poll_interval,
            jenkins_requests: counter(
                "warmpool_jenkins_requests_total",
                "Jenkins API calls, by endpoint and HTTP status (`error`: no answer).",
                &["endpoint", "code"],
            ),
            jenkins_connecting: gauge(
                "warmpool_jenkins_connecting_agents",
                "Jenkins agents started and not yet online, per controller.",
                &["controller"],
            ),
            jenkins_nodes: gauge(
                "warmpool_jenkins_nodes",
                "Jenkins nodes of a pool by state.",
                &["pool", "state"],
            ),
            jenkins_demand: gauge(
                "warmpool_jenkins_queue_demand",
                "Queued Jenkins builds waiting for a pool's labels.",
                &["pool"],
            ),
            agents: gauge(
                "warmpool_agents",
                "Agents by pool and state.",
                &["pool", "state"],
            ),
            lease_wait: hist(
                "warmpool_lease_wait_seconds",
                "Time from lease request to grant.",
            ),
            provision_to_idle: hist(
                "warmpool_provision_to_idle_seconds",
                "Time from provisioning an agent to its registration (idle).",
            ),
            exec_ttfb: hist(
                "warmpool_exec_time_to_first_byte_seconds",
                "Time from exec request to its first output byte (or exit).",
            ),
            recycles: counter(
                "warmpool_recycles_total",
                "Agents terminated, by reason.",
                &["pool", "reason"],
            ),
            leaks: counter(
                "warmpool_leaks_total",
                "Agents that never registered within connectTimeout.",
                &["pool"],
            ),
            rejected_connections: counter(
                "warmpool_rejected_connections_total",
                "Agent connections the hub refused, by reason.",
                &["reason"],
            ),
            unverified_lease_claims: counter(
                "warmpool_unverified_lease_claims_total",
                "Leases agents claimed in hello without a valid lease token (ignored), by pool.",
                &["pool"],
            ),
            http_refused: counter(
                "warmpool_http_connections_refused_total",
                "HTTP connections refused at the connection limit or on a slot reserved for agents, by reason.",
                &["reason"],
            ),
            protocol_errors: counter(
                "warmpool_protocol_errors_total",
                "Agent connections closed for a protocol error, by reason.",
                &["reason"],
            ),
            throttled: counter(
                "warmpool_provisions_throttled_total",
                "Provisioning passes held back by the rate limiter.",
                &["pool"],
            ),
            provisions: counter(
                "warmpool_provisions_total",
                "Agents provisioned, by result.",
                &["pool", "result"],
            ),
            lease_requests: counter(
                "warmpool_lease_requests_total",
                "Lease requests, by result.",
                &["result"],
            ),
            leases_ended: counter(
                "warmpool_leases_ended_total",
                "Leases ended, by final state.",
                &["pool", "state"],
            ),
            registry,
        };
        m.init_known();
        m
    }

    /// Creates the series whose label values are known up front, at zero.
    fn init_known(&self) {
        for r in REJECTED_CONNECTION_REASONS {
            self.rejected_connections.with_label_values(&[r]);
        }
        for r in PROTOCOL_ERROR_REASONS {
            self.protocol_errors.with_label_values(&[r]);
        }
        for r in HTTP_REFUSED_REASONS {
            self.http_refused.with_label_values(&[r]);
        }
        for r in lease_request_results() {
            self.lease_requests.with_label_values(&[r]);
        }
        for e in jenkins_endpoints() {
            self.jenkins_request_seconds.with_label_values(&[e]);
            // No answer yet; HTTP codes appear as Jenkins answers.
            self.jenkins_requests.with_label_values(&[e, "error"]);
        }
    }

    /// Creates a pool's policy series at zero (so rates and ratios work from the first scrape).
    pub fn init_pool(&self, pool: &str) {
        for path in ["warm", "cold"] {
            self.leases.with_label_values(&[pool, path]);
        }
        self.idle_agent_seconds.with_label_values(&[pool]);
        for h in [&self.lease_wait, &self.provision_to_idle, &self.exec_ttfb] {
            h.with_label_values(&[pool]);
        }
        for r in recycle_reasons() {
            self.recycles.with_label_values(&[pool, r]);
        }
        for c in [&self.leaks, &self.unverified_lease_claims, &self.throttled] {
            c.with_label_values(&[pool]);
        }
        for r in PROVISION_RESULTS {
            self.provisions.with_label_values(&[pool, r]);
        }
        for st in ["released", "expired", "failed"] {
            self.leases_ended.with_label_values(&[pool, st]);
        }
        self.waiting.with_label_values(&[pool]);
        self.pool_degraded.with_label_values(&[pool]);
        self.desired_idle.with_label_values(&[pool]);
        self.arrival_rate.with_label_values(&[pool]);
        self.refill_seconds.with_label_values(&[pool]);
    }

    /// Sets a pool's policy gauges and brings its idle agent-seconds counter up to the
    /// engine's total.
    pub fn pool_policy(&self, p: &crate::engine::PoolStatus) {
        let pool = p.name.as_str();
        self.desired_idle
            .with_label_values(&[pool])
            .set(i64::from(p.desired_idle));
        for s in [
            crate::engine::IdleSource::MinIdle,
            crate::engine::IdleSource::Schedule,
            crate::engine::IdleSource::Forecast,
            crate::engine::IdleSource::Demand,
            crate::engine::IdleSource::ScaleToZero,
        ] {
            self.desired_idle_source
                .with_label_values(&[pool, s.as_str()])
                .set(i64::from(s == p.desired_idle_source));
        }
        self.arrival_rate
            .with_label_values(&[pool])
            .set(p.arrival_rate);
        self.waiting
            .with_label_values(&[pool])
            .set(i64::from(p.waiting));
        self.pool_degraded.with_label_values(&[pool]).set(i64::from(
            p.last_error.is_some() || p.last_hook_failure.is_some(),
        ));
        self.refill_seconds
            .with_label_values(&[pool])
            .set(p.refill_seconds);
        match p.warm_hit_ratio {
            Some(r) => self.warm_hit_ratio.with_label_values(&[pool]).set(r),
            None => {
                let _ = self.warm_hit_ratio.remove_label_values(&[pool]);
            }
        }
        let c = self.idle_agent_seconds.with_label_values(&[pool]);
        let delta = p.idle_agent_seconds - c.get();
        if delta > 0.0 {
            c.inc_by(delta);
        }
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
