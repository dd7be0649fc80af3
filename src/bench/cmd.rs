//! The `warmpool bench` command: turns flags into a run, starts the embedded service when
//! asked, and prints the report (table or JSON) and the plot.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, bail};

use super::{LoadOptions, Target, agents};
use crate::cli::{BenchAgentsArgs, BenchArgs, BenchCommand, BenchLoadArgs, OutputFormat};
use crate::client::Client;

fn token(path: &Option<std::path::PathBuf>) -> anyhow::Result<Option<String>> {
    Ok(match path {
        Some(p) => Some(crate::auth::load_api_token(p)?),
        None => None,
    })
}

/// Runs `warmpool bench [agents]`; returns the exit code (1 when jobs failed).
pub async fn run(args: BenchArgs) -> anyhow::Result<i32> {
    match args.sub {
        Some(BenchCommand::Agents(a)) => run_agents(a).await,
        None => run_load(args.load).await,
    }
}

async fn run_load(a: BenchLoadArgs) -> anyhow::Result<i32> {
    let mut targets: Vec<Target> = a.selector.iter().map(|s| Target::parse(s)).collect();
    if let Some(s) = &a.warm_selector {
        targets.push(Target {
            name: "warm".into(),
            selector: s.clone(),
        });
    }
    if let Some(s) = &a.cold_selector {
        targets.push(Target {
            name: "cold".into(),
            selector: s.clone(),
        });
    }
    if a.embedded && !targets.is_empty() {
        bail!(
            "--embedded brings its own pools (warm and cold); drop --selector/--warm-selector/--cold-selector"
        );
    }
    if !a.embedded && targets.is_empty() {
        bail!("give --selector (repeatable), --warm-selector and --cold-selector, or --embedded");
    }
    if a.embedded && a.pods.is_some() {
        bail!("--embedded runs the process backend: --pods needs a service on Kubernetes");
    }
    if a.jobs == 0 || a.concurrency == 0 {
        bail!("--jobs and --concurrency must be at least 1");
    }
    let mut embedded = None;
    let (server, client) = if a.embedded {
        super::sysinfo::raise_nofile();
        let exe = std::env::current_exe().context("cannot find the warmpool executable")?;
        let mut cfg = crate::server::ServeConfig::new(exe);
        cfg.pools = super::embedded_pools(a.concurrency, a.max_uses);
        cfg.service.handshakes_per_second = 10_000;
        cfg.service.engine.max_waiters = a.concurrency.max(1024);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let running = crate::server::start(listener, cfg).await?;
        let url = running.base_url();
        let client = Client::new(&url, None);
        super::wait_warm(&client, Duration::from_secs(120))
            .await
            .map_err(anyhow::Error::msg)?;
        targets = vec![
            Target {
                name: "warm".into(),
                selector: "bench && warm".into(),
            },
            Target {
                name: "cold".into(),
                selector: "bench && cold".into(),
            },
        ];
        embedded = Some(running);
        (url, client)
    } else {
        let url = a
            .server
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1:7420".into());
        let tls = crate::tls::client_config(a.ca_file.as_deref())?;
        let client = Client::with_tls(&url, token(&a.api_token_file)?, tls);
        (url, client)
    };
    let opts = LoadOptions {
        targets,
        jobs: a.jobs,
        concurrency: a.concurrency,
        command: a.command.clone(),
        duration: a.duration.map(|d| d.0),
        wait: a.wait.0,
        progress: std::io::stderr().is_terminal(),
    };
    let pods = match &a.pods {
        Some(ns) => Some((
            kube::Client::try_default()
                .await
                .context("--pods: no Kubernetes client (KUBECONFIG or in-cluster)")?,
            ns.clone(),
        )),
        None => None,
    };
    let report = super::run(&client, &server, &opts, pods)
        .await
        .map_err(anyhow::Error::msg)?;
    if let Some(r) = embedded {
        r.shutdown().await;
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        super::plot::write_svg(&report, p).map_err(anyhow::Error::msg)?;
    }
    match a.output {
        OutputFormat::Table => print!("{}", super::report::render(&report)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    let errors: usize = report.targets.iter().map(|t| t.errors).sum();
    Ok(if errors > 0 { 1 } else { 0 })
}

async fn run_agents(a: BenchAgentsArgs) -> anyhow::Result<i32> {
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    let opts = agents::AgentsOptions {
        server: a.server.clone(),
        api_token: token(&a.api_token_file)?,
        pools: a.pool.clone(),
        server_pid: a.server_pid,
        count: a.count,
        label_sets: a.label_sets,
        dial_concurrency: a.dial_concurrency,
        handshakes_per_second: a.handshakes_per_second,
        heartbeat_interval: a.heartbeat_interval.0,
        measure: a.measure.0,
        jobs: a.jobs,
        concurrency: a.concurrency,
        exe: std::env::current_exe().context("cannot find the warmpool executable")?,
        progress: std::io::stderr().is_terminal(),
        tls: crate::tls::client_config(a.ca_file.as_deref())?,
    };
    let report = agents::run(&opts).await.map_err(anyhow::Error::msg)?;
    match a.output {
        OutputFormat::Table => print!("{}", agents::render(&report)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(if report.errors > 0 { 1 } else { 0 })
}
