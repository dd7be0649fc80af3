//! The jobs and build history of the Jenkins double (tests/support/jenkins.rs), for
//! `warmpool simulate --jenkins`. Served as Jenkins core serves them:
//! - `GET api/json`: `jobs` of the root, each `{_class, name, url}`; a folder
//!   (`com.cloudbees.hudson.plugins.folder.Folder`) carries its own `jobs`, nested.
//! - `GET job/A/job/B/api/json`: a job's `allBuilds` (every build, newest first: `Job.getBuilds`,
//!   exported as `allBuilds` at visibility -2) and `builds` (the newest 100,
//!   `Job.getNewBuilds`), each `{_class, number, url, timestamp, duration, result, building}`:
//!   `timestamp` in ms since the epoch (when the build was scheduled), `duration` in ms and 0
//!   while it runs (`result` is then null). A folder answers its `jobs`.
//! - `GET job/A/job/B/config.xml`: a freestyle `<project>` with `<assignedNode>` (XML-escaped)
//!   and `<canRoam>false</canRoam>` when it has a label, `<canRoam>true</canRoam>` otherwise.
//!
//! Where it differs from Jenkins: `tree` is ignored (every field above is sent), folders exist
//! only through the jobs inside them, every job is a freestyle project.
#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// One build of a job.
#[derive(Debug, Clone)]
pub struct HistBuild {
    pub number: u32,
    pub timestamp_ms: u64,
    /// 0 while building.
    pub duration_ms: u64,
    pub result: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct Job {
    label: Option<String>,
    builds: Vec<HistBuild>,
}

/// The jobs by full name (`folder/job`).
#[derive(Debug, Default)]
pub struct Jobs {
    jobs: BTreeMap<String, Job>,
}

const FOLDER: &str = "com.cloudbees.hudson.plugins.folder.Folder";
const FREESTYLE: &str = "hudson.model.FreeStyleProject";

fn job_url(base: &str, full: &str) -> String {
    let mut u = base.to_string();
    for p in full.split('/') {
        u.push_str(&format!("job/{p}/"));
    }
    u
}

impl Jobs {
    pub fn add_job(&mut self, full_name: &str, label: Option<&str>) {
        self.jobs.entry(full_name.to_string()).or_default().label = label.map(str::to_string);
    }

    /// Adds a build (numbered in order); `duration_ms` 0 is a build still running.
    pub fn add_build(&mut self, full_name: &str, timestamp_ms: u64, duration_ms: u64) -> u32 {
        let j = self.jobs.entry(full_name.to_string()).or_default();
        let number = j.builds.len() as u32 + 1;
        j.builds.push(HistBuild {
            number,
            timestamp_ms,
            duration_ms,
            result: (duration_ms > 0).then(|| "SUCCESS".to_string()),
        });
        number
    }

    /// The items directly below folder `prefix` ("" for the root).
    fn children(&self, base: &str, prefix: &str) -> Vec<Value> {
        let mut names: Vec<(String, bool)> = Vec::new();
        for full in self.jobs.keys() {
            let Some(rest) = full.strip_prefix(prefix) else {
                continue;
            };
            let (name, folder) = match rest.split_once('/') {
                Some((f, _)) => (f.to_string(), true),
                None => (rest.to_string(), false),
            };
            if !names.contains(&(name.clone(), folder)) {
                names.push((name, folder));
            }
        }
        names
            .into_iter()
            .map(|(name, folder)| {
                let full = format!("{prefix}{name}");
                if folder {
                    json!({"_class": FOLDER, "name": name, "url": job_url(base, &full),
                        "jobs": self.children(base, &format!("{full}/"))})
                } else {
                    json!({"_class": FREESTYLE, "name": name, "url": job_url(base, &full)})
                }
            })
            .collect()
    }

    /// `GET api/json` of the root.
    pub fn root_json(&self, base: &str) -> Value {
        json!({"_class": "hudson.model.Hudson", "jobs": self.children(base, "")})
    }

    /// `GET job/.../api/json`; None: no such job or folder.
    pub fn job_json(&self, base: &str, full: &str) -> Option<Value> {
        let url = job_url(base, full);
        if let Some(j) = self.jobs.get(full) {
            let builds: Vec<Value> = j
                .builds
                .iter()
                .rev()
                .map(|b| {
                    json!({"_class": "hudson.model.FreeStyleBuild", "number": b.number,
                        "url": format!("{url}{}/", b.number), "timestamp": b.timestamp_ms,
                        "duration": b.duration_ms, "result": b.result,
                        "building": b.duration_ms == 0})
                })
                .collect();
            let newest: Vec<Value> = builds.iter().take(100).cloned().collect();
            return Some(json!({"_class": FREESTYLE, "name": full.rsplit('/').next(),
                "fullName": full, "url": url, "allBuilds": builds, "builds": newest}));
        }
        let children = self.children(base, &format!("{full}/"));
        (!children.is_empty()).then(|| {
            json!({"_class": FOLDER, "name": full.rsplit('/').next(), "url": url,
                "jobs": children})
        })
    }

    /// `GET job/.../config.xml`; None: no such job.
    pub fn config_xml(&self, full: &str) -> Option<String> {
        let j = self.jobs.get(full)?;
        let node = match &j.label {
            Some(l) => format!(
                "<assignedNode>{}</assignedNode>\n  <canRoam>false</canRoam>",
                l.replace('&', "&amp;")
                    .replace('<', "&lt;")
                    .replace('>', "&gt;")
            ),
            None => "<canRoam>true</canRoam>".to_string(),
        };
        Some(format!(
            "<?xml version='1.1' encoding='UTF-8'?>\n<project>\n  <description></description>\n  <keepDependencies>false</keepDependencies>\n  {node}\n  <disabled>false</disabled>\n  <builders/>\n</project>"
        ))
    }
}

/// A job path below the root (`job/A/job/B/api/json`, percent-encoded) as (full name, rest):
/// (`A/B`, `api/json`).
pub fn split_job_path(path: &str) -> Option<(String, String)> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i + 1 < segs.len() && segs[i] == "job" {
        names.push(decode(segs[i + 1]));
        i += 2;
    }
    if names.is_empty() {
        return None;
    }
    Some((names.join("/"), segs[i..].join("/")))
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}
