//! Events on AgentPools (`events.k8s.io/v1`), every occurrence counted in an Event's series.
//!
//! Owns publishing: [`Events::publish`] returns at once (it counts the occurrence in memory and
//! wakes the series' writer task); it must not block, decide anything about pools, or call the
//! engine.
//!
//! Folding, as the Events API intends: an occurrence joins the open series of the same
//! AgentPool (uid), type, reason, action and *fold key*; the Event's `series.count` counts every
//! occurrence and `series.lastObservedTime` is the last one. The fold key is what must differ
//! for two occurrences to be two Events: the note, or the note without the pod it names (a
//! leak's fold key is empty: every leak of a pool joins one series). The note of a series is
//! that of its first occurrence (events.k8s.io/v1 refuses to change a note). A series ends
//! after [`SERIES_IDLE`] without an occurrence (as client-go's recorder); the next occurrence
//! starts a new Event. A pool and reason hold at most [`MAX_SERIES`] open series (notes that
//! keep changing, such as hook output): a further fold key joins the newest.
//!
//! Writes: one writer task per series with unwritten occurrences. The first occurrence is
//! created at once; later ones are written (a patch of `series`) at most once per
//! [`WRITE_INTERVAL`], all that arrived since in one write: a leak storm costs one write per
//! interval per pool and reason, and the counts still add up. An Event the apiserver dropped
//! (its TTL) is created anew for the occurrences it did not hold.
//!
//! Not kube's `Recorder`: it writes once per occurrence (a create or a patch each), so it
//! cannot cap writes without losing counts, and it reads its cache before the API call and
//! writes it after, so concurrent publishes of one event lose counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;

/// The `reportingController` (and `reportingInstance`) of warmpool's Events.
pub const REPORTER: &str = "warmpool";
/// A series without an occurrence for this long ends; the next one starts a new Event.
pub const SERIES_IDLE: Duration = Duration::from_secs(6 * 60);
/// A series is written at most once per this (its first occurrence at once).
pub const WRITE_INTERVAL: Duration = Duration::from_secs(10);
/// Open series per pool and reason; further fold keys join the newest.
pub const MAX_SERIES: usize = 4;

/// One occurrence to publish.
#[derive(Debug, Clone)]
pub struct Occurrence {
    /// Normal or Warning.
    pub type_: EventType,
    /// CamelCase reason (`AgentLeaked`, `Scaled`...).
    pub reason: &'static str,
    /// CamelCase action (`DeletePod`, `Reconcile`...).
    pub action: &'static str,
    /// For people (cut to the 1 KiB an Event holds).
    pub note: String,
    /// What must differ for two occurrences to be two Events (None: the note).
    pub fold: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    pool: String,
    uid: String,
    type_: EventType,
    reason: &'static str,
    action: &'static str,
    fold: String,
}

#[derive(Debug)]
struct Series {
    reference: ObjectReference,
    note: String,
    /// Bumped when the series restarts (a new Event): a write of the old one is then void.
    epoch: u64,
    /// Occurrences observed, and how many of them the apiserver holds.
    count: i32,
    written: i32,
    /// The Event object, once created.
    name: Option<String>,
    first: Timestamp,
    last_observed: Timestamp,
    last_seen: Instant,
    started: Instant,
    last_write: Option<Instant>,
    writing: bool,
}

impl Series {
    fn new(reference: ObjectReference, note: String, epoch: u64, now: Instant) -> Series {
        let t = Timestamp::now();
        Series {
            reference,
            note,
            epoch,
            count: 1,
            written: 0,
            name: None,
            first: t,
            last_observed: t,
            last_seen: now,
            started: now,
            last_write: None,
            writing: false,
        }
    }
}

/// Publishes AgentPool Events, folding repeats into series.
#[derive(Clone)]
pub struct Events {
    client: kube::Client,
    series: Arc<Mutex<HashMap<Key, Series>>>,
}

/// What a writer sends in one API call.
struct Write {
    key: Key,
    epoch: u64,
    count: i32,
    name: Option<String>,
    event: Event,
}

impl Events {
    /// Publishes through `client`.
    pub fn new(client: kube::Client) -> Events {
        Events {
            client,
            series: Arc::default(),
        }
    }

    /// Counts `occ` on the AgentPool `reference` (pool `pool`) and makes sure it gets written;
    /// returns at once. Needs a Tokio runtime.
    pub fn publish(&self, pool: &str, reference: ObjectReference, occ: Occurrence) {
        let now = Instant::now();
        let mut key = Key {
            pool: pool.to_string(),
            uid: reference.uid.clone().unwrap_or_default(),
            type_: occ.type_,
            reason: occ.reason,
            action: occ.action,
            fold: occ.fold.unwrap_or_else(|| occ.note.clone()),
        };
        let note = event_note(&occ.note);
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.writing || now.duration_since(s.last_seen) < SERIES_IDLE);
        if !map.contains_key(&key) {
            let open: Vec<(&Key, &Series)> = map
                .iter()
                .filter(|(k, s)| {
                    k.pool == key.pool
                        && k.uid == key.uid
                        && k.reason == key.reason
                        && now.duration_since(s.last_seen) < SERIES_IDLE
                })
                .collect();
            if open.len() >= MAX_SERIES
                && let Some((newest, _)) = open.iter().max_by_key(|(_, s)| s.started)
            {
                key = (*newest).clone();
            }
        }
        let series = match map.get_mut(&key) {
            Some(s) if now.duration_since(s.last_seen) < SERIES_IDLE => {
                s.count += 1;
                s.last_observed = Timestamp::now();
                s.last_seen = now;
                s
            }
            Some(s) => {
                // Ended: a new Event (what the old one did not hold is lost with it); a writer
                // still running goes on with it.
                let writing = s.writing;
                *s = Series::new(reference, note, s.epoch + 1, now);
                s.writing = writing;
                s
            }
            None => map
                .entry(key.clone())
                .or_insert(Series::new(reference, note, 0, now)),
        };
        if series.writing {
            return;
        }
        series.writing = true;
        drop(map);
        let this = self.clone();
        tokio::spawn(async move { this.write(key).await });
    }

    /// Forgets the series of every pool `live` does not hold (gone): their writers stop.
    pub fn forget_all_but(&self, live: &std::collections::HashSet<String>) {
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|k, _| live.contains(&k.pool));
    }

    /// Writes series `key` until the apiserver holds every occurrence.
    async fn write(&self, key: Key) {
        loop {
            let w = {
                let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
                let Some(s) = map.get_mut(&key) else { return };
                if s.written >= s.count {
                    s.writing = false;
                    return;
                }
                let wait = s
                    .last_write
                    .map(|t| WRITE_INTERVAL.saturating_sub(t.elapsed()))
                    .unwrap_or_default();
                if wait.is_zero() {
                    Ok(self.next_write(&key, s))
                } else {
                    Err(wait)
                }
            };
            let w = match w {
                Ok(w) => w,
                Err(wait) => {
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            let result = self.send(&w).await;
            let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
            let Some(s) = map.get_mut(&key) else { return };
            s.last_write = Some(Instant::now());
            if s.epoch != w.epoch {
                continue;
            }
            match result {
                Ok(name) => {
                    s.name = Some(name);
                    s.written = w.count;
                }
                Err(kube::Error::Api(e)) if e.code == 404 && w.name.is_some() => {
                    // The apiserver dropped the Event (its TTL): the rest goes in a new one.
                    s.name = None;
                    s.count -= s.written;
                    s.written = 0;
                    s.last_write = None;
                }
                Err(e) => {
                    tracing::warn!(pool = %w.key.pool, reason = w.key.reason, error = %e,
                        "publishing an AgentPool event failed; retrying");
                }
            }
        }
    }

    fn next_write(&self, key: &Key, s: &Series) -> Write {
        let series = (s.count >= 2).then_some(EventSeries {
            count: s.count,
            last_observed_time: MicroTime(s.last_observed),
        });
        let event = Event {
            action: Some(key.action.into()),
            reason: Some(key.reason.into()),
            event_time: Some(MicroTime(s.first)),
            regarding: Some(s.reference.clone()),
            note: Some(s.note.clone()),
            metadata: ObjectMeta {
                namespace: s.reference.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    s.reference.name.as_deref().unwrap_or(REPORTER),
                    s.first.as_nanosecond()
                )),
                ..Default::default()
            },
            reporting_controller: Some(REPORTER.into()),
            reporting_instance: Some(REPORTER.into()),
            series,
            type_: Some(
                match key.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            ..Default::default()
        };
        Write {
            key: key.clone(),
            epoch: s.epoch,
            count: s.count,
            name: s.name.clone(),
            event,
        }
    }

    /// Creates the Event, or patches its series; returns its name.
    async fn send(&self, w: &Write) -> Result<String, kube::Error> {
        let ns = w.event.metadata.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
        match &w.name {
            None => {
                let name = w.event.metadata.name.clone().unwrap_or_default();
                match api.create(&PostParams::default(), &w.event).await {
                    Ok(_) => Ok(name),
                    // Created by an earlier attempt whose answer was lost: patch it.
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        self.patch(&api, &name, &w.event).await
                    }
                    Err(e) => Err(e),
                }
            }
            Some(name) => self.patch(&api, name, &w.event).await,
        }
    }

    async fn patch(&self, api: &Api<Event>, name: &str, ev: &Event) -> Result<String, kube::Error> {
        let patch = serde_json::json!({ "series": ev.series });
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| name.to_string())
    }
}

/// `note` cut to fit an Event (at most 1024 bytes): its first and last bytes, on char boundaries.
pub fn event_note(note: &str) -> String {
    const MAX: usize = 1000;
    if note.len() <= MAX {
        return note.to_string();
    }
    let mut head = 300;
    while !note.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = note.len() - (MAX - head - 5);
    while !note.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{} ... {}", &note[..head], &note[tail..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn occ(reason: &'static str, note: &str, fold: Option<&str>) -> Occurrence {
        Occurrence {
            type_: EventType::Warning,
            reason,
            action: "DeletePod",
            note: note.into(),
            fold: fold.map(str::to_string),
        }
    }

    fn reference() -> ObjectReference {
        ObjectReference {
            name: Some("go".into()),
            namespace: Some("default".into()),
            uid: Some("u1".into()),
            ..Default::default()
        }
    }

    /// (reason, fold, note, count) of every series.
    fn series(ev: &Events) -> Vec<(&'static str, String, String, i32)> {
        let map = ev.series.lock().unwrap();
        let mut v: Vec<_> = map
            .iter()
            .map(|(k, s)| (k.reason, k.fold.clone(), s.note.clone(), s.count))
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn repeats_fold_into_one_series_whose_note_is_the_first() {
        // Nothing listens there: the writers fail and retry; the counts are what matters.
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let ev = Events::new(client);
        for i in 0..5 {
            ev.publish(
                "go",
                reference(),
                occ("AgentLeaked", &format!("pod go-{i} leaked"), Some("")),
            );
        }
        ev.publish("go", reference(), occ("InvalidSpec", "a", None));
        ev.publish("go", reference(), occ("InvalidSpec", "a", None));
        ev.publish("go", reference(), occ("InvalidSpec", "b", None));
        assert_eq!(
            series(&ev),
            vec![
                ("AgentLeaked", String::new(), "pod go-0 leaked".into(), 5),
                ("InvalidSpec", "a".into(), "a".into(), 2),
                ("InvalidSpec", "b".into(), "b".into(), 1),
            ]
        );
        // Notes that keep changing: at most MAX_SERIES series, the rest joins the newest.
        for i in 0..MAX_SERIES + 3 {
            ev.publish(
                "go",
                reference(),
                occ("CleanupHookFailed", &format!("output {i}"), None),
            );
        }
        let hooks: Vec<_> = series(&ev)
            .into_iter()
            .filter(|s| s.0 == "CleanupHookFailed")
            .collect();
        assert_eq!(hooks.len(), MAX_SERIES);
        assert_eq!(
            hooks.iter().map(|s| s.3).sum::<i32>() as usize,
            MAX_SERIES + 3,
            "every occurrence counted: {hooks:?}"
        );
        ev.forget_all_but(&["other".to_string()].into());
        assert!(series(&ev).is_empty());
    }

    #[test]
    fn a_long_note_is_cut_to_fit_an_event() {
        let note = format!("{}é{}", "a".repeat(299), "b".repeat(2000));
        let cut = event_note(&note);
        assert!(cut.len() <= 1024, "{}", cut.len());
        assert!(cut.starts_with("aaa") && cut.ends_with("bbb") && cut.contains(" ... "));
    }
}
