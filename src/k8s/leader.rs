//! Leader election with a `coordination.k8s.io/v1` Lease, as Kubernetes controllers do.
//!
//! Owns acquiring, renewing and releasing one Lease object. A candidate takes the lease when it
//! is free, expired (`renewTime + leaseDurationSeconds` in the past) or already its own; writes
//! use the object's resourceVersion, so two candidates can never both win a round (the loser
//! gets 409). The leader renews every `retry_period`; when it has not renewed for
//! `renew_deadline` it gives up leadership. It never decides what a leader does.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

/// Leader-election settings.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This candidate's identity (pod name plus a random suffix).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub lease_duration: Duration,
    /// The leader gives up when it could not renew for this long (< lease_duration).
    pub renew_deadline: Duration,
    /// Time between acquire and renew attempts.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// Defaults as in Kubernetes controllers: 15s lease, 10s renew deadline, 2s retry.
    pub fn new(namespace: &str, identity: &str) -> LeaderConfig {
        LeaderConfig {
            namespace: namespace.into(),
            name: "warmpool-leader".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// One acquire-or-renew round. Ok(true) when this candidate holds the lease afterwards.
pub async fn try_acquire(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let secs = cfg.lease_duration.as_secs().max(1) as i32;
    let conflict = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 409);
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(secs));
            let expired = match &spec.renew_time {
                Some(MicroTime(t)) => *t + SignedDuration::from_secs(duration) < now,
                None => true,
            };
            let mine = holder == cfg.identity;
            if !mine && !holder.is_empty() && !expired {
                return Ok(false);
            }
            if !mine {
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.holder_identity = Some(cfg.identity.clone());
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(secs);
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Gives the lease up (if held) so a standby takes over at once instead of after expiry.
pub async fn release(api: &Api<Lease>, cfg: &LeaderConfig) {
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(cfg.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        let _ = api.replace(&cfg.name, &PostParams::default(), &lease).await;
    }
}

/// Waits until this candidate leads (None when `stop` fires first).
pub async fn acquire(api: &Api<Lease>, cfg: &LeaderConfig, stop: &CancellationToken) -> Option<()> {
    loop {
        match try_acquire(api, cfg).await {
            Ok(true) => {
                tracing::info!(identity = %cfg.identity, lease = %cfg.name, "became leader");
                return Some(());
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(lease = %cfg.name, error = %e, "leader election request failed")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(cfg.retry_period) => {}
        }
    }
}

/// Renews until leadership is lost (returns) or `stop` fires (releases the lease, returns).
pub async fn hold(api: &Api<Lease>, cfg: &LeaderConfig, stop: &CancellationToken) {
    let mut last_renewed = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                release(api, cfg).await;
                return;
            }
            _ = tokio::time::sleep(cfg.retry_period) => {}
        }
        // A renewal that hangs must not outlive the deadline: by then a standby may lead.
        let left = cfg.renew_deadline.saturating_sub(last_renewed.elapsed());
        match tokio::time::timeout(left, try_acquire(api, cfg)).await {
            Ok(Ok(true)) => last_renewed = Instant::now(),
            Ok(Ok(false)) => {
                tracing::error!(identity = %cfg.identity, "leader lease taken by another candidate");
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing the leader lease failed"),
            Err(_) => tracing::warn!("renewing the leader lease timed out"),
        }
        if last_renewed.elapsed() > cfg.renew_deadline {
            tracing::error!(identity = %cfg.identity, "could not renew the leader lease in time");
            return;
        }
    }
}
