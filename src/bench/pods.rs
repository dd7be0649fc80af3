//! `warmpool bench --pods NAMESPACE`: what the cluster did during a load on the Kubernetes
//! backend, from a watch on the pods of warmpool's pools (label `warmpool.dev/pool`) in that
//! namespace:
//! - per pod, when the watch first saw it (its creation) and first saw it `Running`;
//! - per pool, the pods created during the run, and the peak of pods that count toward
//!   `maxTotal` by the documented rule (docs/KUBERNETES.md, Sizing: every pod not `Succeeded`
//!   or `Failed`, being deleted or not);
//! - per target, the split of the jobs that waited for a new pod (cold starts): lease
//!   request -> pod created -> pod Running -> lease granted (the agent connected and was
//!   assigned at once) -> first byte.
//!
//! It only reads the cluster: it must never create, change or delete anything. The bookkeeping
//! ([`PodLog`], [`PodLog::report`]) is plain data so it is tested without a cluster.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use serde::Serialize;

use super::stats::{Sample, Summary};

/// The label warmpool puts on every pod it creates, naming its pool.
const POOL_LABEL: &str = "warmpool.dev/pool";

/// What the watch knows of one pod. Times are seconds from the start of the load (negative
/// for pods seen before it).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodTimes {
    /// Its pool.
    pub pool: String,
    /// First seen.
    pub seen_s: f64,
    /// First seen `Running`.
    pub running_s: Option<f64>,
    /// Listed when the watch started: not created by the load.
    pub before: bool,
}

/// The pods seen, and each pool's count of pods that may still run.
#[derive(Debug, Default)]
pub struct PodLog {
    /// Every pod seen, by name.
    pub pods: HashMap<String, PodTimes>,
    /// Pods that exist now, by name: (pool, may still run).
    live: HashMap<String, (String, bool)>,
    /// Per pool, the most pods that may still run at once.
    pub peak: BTreeMap<String, usize>,
    /// The initial list is done.
    pub synced: bool,
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

impl PodLog {
    /// Records `pod` as seen `at_s` seconds from the start of the load.
    pub fn apply(&mut self, pod: &Pod, at_s: f64) {
        let (Some(name), Some(pool)) = (
            pod.metadata.name.clone(),
            pod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(POOL_LABEL))
                .cloned(),
        ) else {
            return;
        };
        let before = !self.synced;
        let t = self.pods.entry(name.clone()).or_insert(PodTimes {
            pool: pool.clone(),
            seen_s: at_s,
            running_s: None,
            before,
        });
        if t.running_s.is_none() && phase(pod) == "Running" {
            t.running_s = Some(at_s);
        }
        let may_run = !matches!(phase(pod), "Succeeded" | "Failed");
        self.live.insert(name, (pool.clone(), may_run));
        self.recount(&pool);
    }

    /// Records that pod `name` is gone.
    pub fn delete(&mut self, name: &str) {
        if let Some((pool, _)) = self.live.remove(name) {
            self.recount(&pool);
        }
    }

    /// Forgets the pods that exist (a restarted watch lists them again); keeps the history.
    pub fn relist(&mut self) {
        self.live.clear();
    }

    fn recount(&mut self, pool: &str) {
        let n = self
            .live
            .values()
            .filter(|(p, may_run)| p == pool && *may_run)
            .count();
        let peak = self.peak.entry(pool.to_string()).or_default();
        *peak = (*peak).max(n);
    }

    /// The report of a run: per pool its pods created and peak, with `max_total` per pool as
    /// the service reported it; per target the split of its jobs that waited for a pod created
    /// after their lease request.
    pub fn report(
        &self,
        namespace: &str,
        samples: &[Sample],
        max_total: &BTreeMap<String, u32>,
    ) -> PodsReport {
        let mut pools: BTreeMap<String, PoolPods> = BTreeMap::new();
        for t in self.pods.values() {
            let p = pools.entry(t.pool.clone()).or_insert_with(|| PoolPods {
                pool: t.pool.clone(),
                created: 0,
                peak: 0,
                max_total: max_total.get(&t.pool).copied(),
            });
            p.created += usize::from(!t.before);
        }
        for p in pools.values_mut() {
            p.peak = self.peak.get(&p.pool).copied().unwrap_or(0);
        }
        let mut by_target: BTreeMap<String, [Vec<f64>; 4]> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.error.is_none()) {
            let Some(pod) = s.agent.as_ref().and_then(|a| self.pods.get(a)) else {
                continue;
            };
            if pod.before || pod.seen_s < s.at_s {
                continue; // a warm job: its pod was there before the request
            }
            let ms = |at: f64| (at - s.at_s) * 1000.0;
            let (Some(lease), Some(ttfb)) = (s.lease_ms, s.ttfb_ms) else {
                continue;
            };
            let v = by_target.entry(s.target.clone()).or_default();
            v[0].push(ms(pod.seen_s));
            // A pod that serves one short job is often deleted before the kubelet reports it
            // Running: that milestone then has fewer samples.
            v[1].extend(pod.running_s.map(ms));
            v[2].push(lease);
            v[3].push(ttfb);
        }
        PodsReport {
            namespace: namespace.to_string(),
            pods: self.pods.clone().into_iter().collect(),
            pools: pools.into_values().collect(),
            cold_starts: by_target
                .into_iter()
                .map(|(target, v)| ColdSplit {
                    target,
                    created: Summary::of(&v[0]),
                    running: Summary::of(&v[1]),
                    lease: Summary::of(&v[2]),
                    ttfb: Summary::of(&v[3]),
                })
                .collect(),
        }
    }
}

/// What `--pods` adds to the report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodsReport {
    /// The namespace watched.
    pub namespace: String,
    /// Every pod seen, by name (times in seconds from the start of the load).
    pub pods: BTreeMap<String, PodTimes>,
    /// Per pool.
    pub pools: Vec<PoolPods>,
    /// Per target with jobs that waited for a new pod.
    pub cold_starts: Vec<ColdSplit>,
}

/// One pool's pods during the run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolPods {
    /// Pool name.
    pub pool: String,
    /// Pods created during the run.
    pub created: usize,
    /// The most pods that counted toward `maxTotal` at once (not Succeeded or Failed, being
    /// deleted or not), as the watch saw them.
    pub peak: usize,
    /// The pool's `maxTotal`, as the service reported it.
    pub max_total: Option<u32>,
}

/// The jobs of one target that waited for a new pod: each milestone in milliseconds from the
/// lease request.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ColdSplit {
    /// Target name.
    pub target: String,
    /// The pod created (first seen by the watch).
    pub created: Summary,
    /// The pod first seen `Running`: the kubelet reports it late, often after the agent
    /// connected, and not at all for a pod deleted first (fewer samples).
    pub running: Summary,
    /// The lease granted: the agent connected and was assigned at once.
    pub lease: Summary,
    /// The first byte of the job's output.
    pub ttfb: Summary,
}

/// A running watch feeding a [`PodLog`].
pub struct PodWatch {
    log: Arc<Mutex<PodLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodWatch {
    /// Watches the warmpool pods of `namespace`, times relative to `t0`; returns once the
    /// initial list is in (those pods count as there before the run).
    pub async fn start(
        client: kube::Client,
        namespace: &str,
        t0: Instant,
    ) -> Result<PodWatch, String> {
        let api: Api<Pod> = Api::namespaced(client, namespace);
        let cfg = watcher::Config::default().labels(POOL_LABEL);
        let log: Arc<Mutex<PodLog>> = Arc::default();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let l = log.clone();
        let ns = namespace.to_string();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut events = std::pin::pin!(watcher(api, cfg));
            while let Some(e) = events.next().await {
                let at = t0.elapsed().as_secs_f64();
                let mut log = l.lock().unwrap_or_else(|p| p.into_inner());
                match e {
                    Ok(watcher::Event::Init) => log.relist(),
                    Ok(watcher::Event::InitApply(p) | watcher::Event::Apply(p)) => {
                        log.apply(&p, at)
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        log.delete(p.metadata.name.as_deref().unwrap_or(""))
                    }
                    Ok(watcher::Event::InitDone) => {
                        log.synced = true;
                        if let Some(r) = ready.take() {
                            let _ = r.send(Ok(()));
                        }
                    }
                    Err(e) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Err(format!("watching pods in {ns}: {e}")));
                            return;
                        }
                    }
                }
            }
        });
        match ready_rx.await {
            Ok(Ok(())) => Ok(PodWatch { log, task }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("the pod watch in {namespace} ended")),
        }
    }

    /// Stops the watch and hands back what it saw.
    pub fn stop(self) -> PodLog {
        self.task.abort();
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, pool: &str, phase: &str, deleting: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name, "labels": {POOL_LABEL: pool},
                "deletionTimestamp": deleting.then_some("2026-12-01T00:00:00Z"),
            },
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn sample(target: &str, agent: &str, at_s: f64, lease: f64, ttfb: f64) -> Sample {
        Sample {
            target: target.into(),
            agent: Some(agent.into()),
            at_s,
            lease_ms: Some(lease),
            ttfb_ms: Some(ttfb),
            exit_ms: Some(ttfb),
            release_ms: None,
            exit_code: Some(0),
            error: None,
        }
    }

    #[test]
    fn peak_counts_terminating_pods_until_terminal_or_gone() {
        let mut log = PodLog {
            synced: true,
            ..PodLog::default()
        };
        log.apply(&pod("a", "p", "Running", false), 0.0);
        log.apply(&pod("b", "p", "Pending", false), 0.1);
        // Being deleted, still running: counts.
        log.apply(&pod("a", "p", "Running", true), 0.2);
        log.apply(&pod("c", "p", "Pending", false), 0.3);
        assert_eq!(log.peak["p"], 3);
        // Terminal, or gone: no longer counts.
        log.apply(&pod("a", "p", "Succeeded", true), 0.4);
        log.delete("b");
        log.apply(&pod("d", "p", "Pending", false), 0.5);
        log.apply(&pod("x", "other", "Running", false), 0.5);
        assert_eq!(log.peak["p"], 3);
        assert_eq!(log.peak["other"], 1);
        let r = log.report("ns", &[], &BTreeMap::from([("p".to_string(), 3)]));
        let p = r.pools.iter().find(|p| p.pool == "p").unwrap();
        assert_eq!((p.created, p.peak, p.max_total), (4, 3, Some(3)));
    }

    #[test]
    fn cold_split_takes_only_jobs_that_waited_for_a_new_pod() {
        let mut log = PodLog::default();
        log.apply(&pod("warm-1", "warm", "Running", false), -5.0);
        log.synced = true;
        // cold-1 created 0.1 s after the request at 10.0 s, Running 1.5 s after it.
        log.apply(&pod("cold-1", "cold", "Pending", false), 10.1);
        log.apply(&pod("cold-1", "cold", "Running", false), 11.5);
        // cold-2 deleted before the kubelet reported it Running.
        log.apply(&pod("cold-2", "cold", "Pending", false), 30.2);
        log.apply(&pod("cold-2", "cold", "Pending", true), 31.0);
        // warm-2 created before its job's request at 20 s: a warm job.
        log.apply(&pod("warm-2", "warm", "Running", false), 15.0);
        let samples = [
            sample("warm", "warm-1", 1.0, 2.0, 5.0),
            sample("warm", "warm-2", 20.0, 2.0, 5.0),
            sample("cold", "cold-1", 10.0, 1200.0, 1210.0),
            sample("cold", "cold-2", 30.0, 700.0, 710.0),
        ];
        let r = log.report("ns", &samples, &BTreeMap::new());
        assert_eq!(r.cold_starts.len(), 1, "{:?}", r.cold_starts);
        let c = &r.cold_starts[0];
        assert_eq!(c.target, "cold");
        assert_eq!(
            (c.created.n, c.running.n, c.lease.n, c.ttfb.n),
            (2, 1, 2, 2)
        );
        assert!((c.created.max - 200.0).abs() < 1e-6);
        assert!((c.running.p50 - 1500.0).abs() < 1e-6);
        assert_eq!((c.lease.p50, c.ttfb.max), (700.0, 1210.0));
        assert!(r.pods["cold-2"].running_s.is_none());
        let warm = r.pools.iter().find(|p| p.pool == "warm").unwrap();
        assert_eq!(warm.created, 1, "warm-1 was there before the run");
    }
}
