//! Reads a Jenkins controller's build history over its REST API and turns it into a
//! `warmpool simulate` trace (`warmpool simulate --jenkins URL --job NAME --output FILE`).
//!
//! Endpoints (read-only, through the pool client [`Client`], its rate limit and metrics):
//! - `GET api/json?tree=jobs[name,jobs[name,jobs[name]]]`: the jobs when none is named; an item
//!   with `jobs` is a folder (or a multibranch project) whose jobs are listed below it.
//! - `GET job/A/job/B/api/json?tree=allBuilds[number,timestamp,duration,result,building]`:
//!   every build of job `A/B` (`allBuilds`; `builds` stops at the newest 100). `timestamp` is
//!   the build's scheduled start in ms since the epoch, `duration` its length in ms (0 while it
//!   runs: such builds are skipped).
//! - `GET job/A/job/B/config.xml`: the job's label expression (`<assignedNode>`) when it has one
//!   (a freestyle job); otherwise, or when it cannot be read, the given default selector (a
//!   Pipeline names its label in its Jenkinsfile, not in the job's configuration).
//!
//! Must not: write to Jenkins, or hold credentials longer than the client it builds.

use std::sync::{Arc, RwLock};
use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;

use super::client::{Client, Endpoint, JenkinsError};
use super::config::Credentials;
use crate::simulate::{Trace, TraceLease};

/// Errors of the history reader; each names the job or URL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request failed.
    #[error("reading the build history: {0}")]
    Request(#[from] JenkinsError),
    /// An answer is not what Jenkins documents.
    #[error("reading the build history: {url}: {message}")]
    Answer {
        /// The URL.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// A job's label expression cannot be parsed.
    #[error("job {job}: label expression {label:?} in its config.xml: {message}")]
    Label {
        /// The job.
        job: String,
        /// Its `assignedNode`.
        label: String,
        /// The parser's message.
        message: String,
    },
    /// No finished build was found.
    #[error("no finished builds in job(s) {jobs}")]
    NoBuilds {
        /// The jobs read.
        jobs: String,
    },
    /// The TLS settings could not be built.
    #[error("Jenkins TLS settings: {0}")]
    Tls(String),
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One finished build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildObs {
    /// Its number.
    pub number: u64,
    /// Scheduled start, ms since the epoch.
    pub timestamp_ms: u64,
    /// Length in ms.
    pub duration_ms: u64,
    /// `SUCCESS`, `FAILURE`, ...
    pub result: Option<String>,
}

/// A job's builds and label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobHistory {
    /// Its full name (`folder/job`).
    pub name: String,
    /// Its `assignedNode` label expression, if any.
    pub label: Option<String>,
    /// Its finished builds.
    pub builds: Vec<BuildObs>,
}

/// The URL path of a job by full name: `a/b` -> `job/a/job/b/`, each name percent-encoded.
pub fn job_path(full_name: &str) -> String {
    let mut out = String::new();
    for part in full_name.split('/').filter(|p| !p.is_empty()) {
        out.push_str("job/");
        for b in part.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out.push('/');
    }
    out
}

/// A client for `url` (any rate limit is the controller's default, 10 requests a second).
pub fn client(url: &str, creds: Credentials, ca_file: Option<&std::path::Path>) -> Result<Client> {
    let limiter = Arc::new(RwLock::new(Arc::new(governor::RateLimiter::direct(
        crate::pacer::quota(10.0, 20),
    ))));
    let tls = crate::tls::client_config(ca_file).map_err(|e| Error::Tls(e.to_string()))?;
    let root = format!("{}/", url.trim().trim_end_matches('/'));
    Ok(Client::new(
        &root,
        creds,
        limiter,
        crate::metrics::Metrics::new(),
        &tls,
    ))
}

#[derive(Deserialize)]
struct Item {
    name: String,
    #[serde(default)]
    jobs: Option<Vec<Item>>,
}

#[derive(Deserialize)]
struct Items {
    #[serde(default)]
    jobs: Vec<Item>,
}

fn flatten(prefix: &str, items: Vec<Item>, out: &mut Vec<String>) {
    for i in items {
        let name = format!("{prefix}{}", i.name);
        match i.jobs {
            Some(children) => flatten(&format!("{name}/"), children, out),
            None => out.push(name),
        }
    }
}

/// Every job of the controller, folders (three levels) expanded, by full name.
pub async fn list_jobs(c: &Client) -> Result<Vec<String>> {
    let path = "api/json?tree=jobs[name,jobs[name,jobs[name,jobs[name]]]]";
    let body = c.get(Endpoint::Jobs, path).await?;
    let items: Items = serde_json::from_slice(&body).map_err(|e| Error::Answer {
        url: format!("{}{path}", c.root()),
        message: format!("not a job list: {e}"),
    })?;
    let mut out = Vec::new();
    flatten("", items.jobs, &mut out);
    Ok(out)
}

#[derive(Deserialize)]
struct RawBuild {
    number: u64,
    timestamp: u64,
    #[serde(default)]
    duration: u64,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    building: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Builds {
    #[serde(default)]
    all_builds: Vec<RawBuild>,
}

/// The text of `<assignedNode>` in a job's config.xml, unescaped; None without one.
pub fn assigned_node(config_xml: &str) -> Option<String> {
    let start = config_xml.find("<assignedNode>")? + "<assignedNode>".len();
    let end = start + config_xml[start..].find("</assignedNode>")?;
    let v = config_xml[start..end]
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'");
    let v = v.trim().to_string();
    (!v.is_empty()).then_some(v)
}

/// A job's finished builds and label.
pub async fn read_job(c: &Client, job: &str) -> Result<JobHistory> {
    let base = job_path(job);
    let path = format!("{base}api/json?tree=allBuilds[number,timestamp,duration,result,building]");
    let body = c.get(Endpoint::Jobs, &path).await?;
    let b: Builds = serde_json::from_slice(&body).map_err(|e| Error::Answer {
        url: format!("{}{path}", c.root()),
        message: format!("job {job}: not a build list: {e}"),
    })?;
    let builds = b
        .all_builds
        .into_iter()
        .filter(|b| !b.building && b.duration > 0)
        .map(|b| BuildObs {
            number: b.number,
            timestamp_ms: b.timestamp,
            duration_ms: b.duration,
            result: b.result,
        })
        .collect();
    // A job without a readable config (no Configure/ExtendedRead permission) uses the default.
    let label = match c
        .get(Endpoint::JobConfig, &format!("{base}config.xml"))
        .await
    {
        Ok(xml) => assigned_node(&String::from_utf8_lossy(&xml)),
        Err(e) if e.status == Some(403) || e.status == Some(404) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(l) = &label
        && let Err(e) = crate::labels::Expr::parse(l)
    {
        return Err(Error::Label {
            job: job.to_string(),
            label: l.clone(),
            message: e.to_string(),
        });
    }
    Ok(JobHistory {
        name: job.to_string(),
        label,
        builds,
    })
}

/// Reads the named jobs (all jobs when `jobs` is empty).
pub async fn read(c: &Client, jobs: &[String]) -> Result<Vec<JobHistory>> {
    let names = if jobs.is_empty() {
        list_jobs(c).await?
    } else {
        jobs.to_vec()
    };
    let mut out = Vec::new();
    for j in &names {
        out.push(read_job(c, j).await?);
    }
    Ok(out)
}

/// The trace of some jobs' builds: one lease per finished build at its scheduled start (from
/// the earliest), holding its agent for its duration, with the job's label or `default_selector`.
/// The trace starts at the earliest build's time.
pub fn to_trace(jobs: &[JobHistory], default_selector: &str) -> Result<Trace> {
    let first = jobs
        .iter()
        .flat_map(|j| j.builds.iter().map(|b| b.timestamp_ms))
        .min()
        .ok_or_else(|| Error::NoBuilds {
            jobs: jobs
                .iter()
                .map(|j| j.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let mut leases: Vec<TraceLease> = jobs
        .iter()
        .flat_map(|j| {
            let selector = j.label.clone().unwrap_or_else(|| default_selector.into());
            j.builds.iter().map(move |b| TraceLease {
                at: Duration::from_millis(b.timestamp_ms - first),
                selector: selector.clone(),
                duration: Duration::from_millis(b.duration_ms),
            })
        })
        .collect();
    leases.sort_by_key(|l| l.at);
    Ok(Trace {
        leases,
        start: Some(UNIX_EPOCH + Duration::from_millis(first)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_labels_and_trace() {
        assert_eq!(job_path("a/b c"), "job/a/job/b%20c/");
        assert_eq!(
            assigned_node("<project><assignedNode>linux &amp;&amp; go</assignedNode></project>"),
            Some("linux && go".into())
        );
        assert_eq!(
            assigned_node("<project><canRoam>true</canRoam></project>"),
            None
        );
        let b = |n, t, d| BuildObs {
            number: n,
            timestamp_ms: t,
            duration_ms: d,
            result: Some("SUCCESS".into()),
        };
        let jobs = vec![
            JobHistory {
                name: "a".into(),
                label: Some("go".into()),
                builds: vec![b(2, 5_000, 1_500), b(1, 1_000, 60_000)],
            },
            JobHistory {
                name: "b".into(),
                label: None,
                builds: vec![b(1, 3_000, 2_000)],
            },
        ];
        let t = to_trace(&jobs, "linux").unwrap();
        let got: Vec<(u64, &str, u64)> = t
            .leases
            .iter()
            .map(|l| {
                (
                    l.at.as_millis() as u64,
                    l.selector.as_str(),
                    l.duration.as_millis() as u64,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (0, "go", 60_000),
                (2_000, "linux", 2_000),
                (4_000, "go", 1_500)
            ]
        );
        assert_eq!(t.start, Some(UNIX_EPOCH + Duration::from_millis(1_000)));
        assert!(to_trace(&[], "x").is_err());
    }
}
