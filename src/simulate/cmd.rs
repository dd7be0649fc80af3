//! The `warmpool simulate` subcommand: replay a trace for some policies and print the report
//! (text or JSON, an SVG on request), or write a trace (synthetic, or from Jenkins).

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::cli::SimulateArgs;
use crate::jenkins::config::Credentials;

use super::generate::{GenConfig, generate};
use super::{Error, Result, SimConfig, Trace, trace};

/// Writes a trace to `output` (a file; None or `-`: standard output) and says so on stderr.
fn write_trace(t: &Trace, output: Option<&str>) -> Result<()> {
    let text = trace::write(t);
    match output {
        None | Some("-") => {
            let _ = std::io::stdout().write_all(text.as_bytes());
        }
        Some(path) => {
            std::fs::write(path, &text).map_err(|e| Error::Io {
                path: path.to_string(),
                message: e.to_string(),
            })?;
            eprintln!(
                "wrote {} leases over {:.2} days to {path}",
                t.leases.len(),
                t.end().as_secs_f64() / 86_400.0
            );
        }
    }
    Ok(())
}

fn credentials(a: &SimulateArgs) -> Result<Credentials> {
    if let (Some(user), Some(token)) = (&a.jenkins_user, &a.jenkins_token) {
        return Ok(Credentials {
            user: user.clone(),
            token: token.clone(),
        });
    }
    match &a.jenkins_credentials_file {
        Some(p) => Credentials::load(p).map_err(|e| Error::Flag {
            flag: "--jenkins-credentials-file",
            message: e.to_string(),
        }),
        None => Err(Error::Flag {
            flag: "--jenkins",
            message: "needs --jenkins-credentials-file, or --jenkins-user and --jenkins-token"
                .into(),
        }),
    }
}

/// Runs `warmpool simulate`.
pub async fn run(a: SimulateArgs) -> Result<()> {
    if let Some(profile) = a.generate {
        let t = generate(&GenConfig {
            profile,
            weeks: a.weeks,
            seed: a.seed,
            selector: a.selector.clone().unwrap_or_else(|| "linux".into()),
            rate_per_minute: a.rate,
            start: a.start.unwrap_or_else(super::default_start),
        });
        return write_trace(&t, a.output.as_deref());
    }
    if let Some(url) = &a.jenkins {
        let c = crate::jenkins::history::client(url, credentials(&a)?, a.ca_file.as_deref())?;
        let jobs = crate::jenkins::history::read(&c, &a.job).await?;
        let t = crate::jenkins::history::to_trace(&jobs, a.selector.as_deref().unwrap_or(""))?;
        return write_trace(&t, a.output.as_deref());
    }
    let path = a.trace.as_deref().ok_or(Error::Flag {
        flag: "--trace",
        message: "missing (or --generate, or --jenkins)".into(),
    })?;
    replay(&a, path)
}

fn replay(a: &SimulateArgs, path: &Path) -> Result<()> {
    let json = match a.output.as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            return Err(Error::Flag {
                flag: "--output",
                message: format!("{other:?}: a replay prints `text` or `json`"),
            });
        }
    };
    let provision = a.provision.ok_or(Error::Flag {
        flag: "--provision",
        message: "missing: the provisioning latency MIN..MAX, e.g. 20s..30s".into(),
    })?;
    if !(a.target > 0.0 && a.target < 1.0) && a.pools.is_empty() {
        return Err(Error::Flag {
            flag: "--target",
            message: format!(
                "{}: the forecast's warmHitTarget is above 0 and below 1",
                a.target
            ),
        });
    }
    if a.tick.0.is_zero() {
        return Err(Error::Flag {
            flag: "--tick",
            message: "must be longer than 0s".into(),
        });
    }
    let t = trace::load(path)?;
    let cfg = SimConfig {
        provision,
        cleanup: a.cleanup.0,
        terminate: a.terminate.0,
        tick: a.tick.0,
        seed: a.seed,
        start: a.start.or(t.start).unwrap_or_else(super::default_start),
        warmup: a
            .warmup
            .map(|w| w.0)
            .unwrap_or_else(|| super::default_warmup(&t)),
        wait: a.wait.0.max(Duration::from_millis(1)),
        quiet: a.quiet,
    };
    let policies = if a.pools.is_empty() {
        super::builtin(
            &t,
            a.min_idle,
            a.max_total,
            a.target,
            a.scale_to_zero_after.map(|d| d.0),
        )
    } else {
        a.pools
            .iter()
            .map(|p| super::policy_file(p))
            .collect::<Result<Vec<_>>>()?
    };
    let template = match a.pools.first() {
        Some(_) => policies[0].clone(),
        None => super::baseline(&t, 0, a.max_total),
    };
    let search = a
        .search_min_idle
        .then_some((&template, a.target, a.search_limit));
    let report = super::simulate(&t, &path.display().to_string(), &policies, &cfg, search)?;
    if let Some(p) = &a.plot {
        super::plot::write_svg(&report, p)?;
    }
    let out = if json {
        serde_json::to_string_pretty(&report).expect("a report serializes") + "\n"
    } else {
        report.text()
    };
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
}
