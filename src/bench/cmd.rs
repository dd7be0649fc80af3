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
    let command = match (&a.command, a.floor) {
        (Some(c), true) if !c.is_empty() => bail!(
            "--floor measures the lease API alone: drop --command or give --command '' (the floor has no agents to run {c:?})"
        ),
        (Some(c), _) => c.clone(),
        (None, true) => String::new(),
        (None, false) => "true".into(),
    };
    if a.floor && !a.embedded && targets.len() != 1 {
        bail!("--floor compares one warmpool target with the floor: give one --selector");
    }
    if a.floor && a.pods.is_some() {
        bail!("--floor measures the lease API: drop --pods");
    }
    let mut embedded = None;
    let (server, client) = if a.embedded {
        super::sysinfo::raise_nofile();
        let exe = std::env::current_exe().context("cannot find the warmpool executable")?;
        let mut cfg = crate::server::ServeConfig::new(exe);
        let max_uses = a.max_uses.unwrap_or(if a.floor { 0 } else { 1 });
        cfg.pools = super::embedded_pools(a.concurrency, max_uses);
        if a.floor {
            // The configuration: one pool, every lease warm.
            cfg.pools.truncate(1);
        }
        cfg.service.handshakes_per_second = 10_000;
        cfg.service.engine.max_waiters = a.concurrency.max(1024);
        let running = Embedded::start(cfg).await?;
        let url = running.url.clone();
        let client = Client::new(&url, None);
        super::wait_warm(&client, Duration::from_secs(120))
            .await
            .map_err(anyhow::Error::msg)?;
        if a.floor {
            super::steady_pool(&client, "bench && warm", a.concurrency)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        targets = if a.floor {
            vec![Target {
                name: "warmpool".into(),
                selector: "bench && warm".into(),
            }]
        } else {
            vec![
                Target {
                    name: "warm".into(),
                    selector: "bench && warm".into(),
                },
                Target {
                    name: "cold".into(),
                    selector: "bench && cold".into(),
                },
            ]
        };
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
        command,
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
    let floor = if a.floor {
        Some(
            super::floor::Floor::start()
                .await
                .context("starting the floor server")?,
        )
    } else {
        None
    };
    let floor_client = floor.as_ref().map(|f| Client::new(&f.base_url(), None));
    let side = floor_client.as_ref().map(|fc| super::side::SideRun {
        warmpool: &client,
        floor: fc,
        rounds: a.rounds.max(1),
        server_cpu: if embedded.is_some() {
            super::cpu::ServerCpu::InProcess
        } else {
            local_pid(&server).map_or(super::cpu::ServerCpu::Unknown, super::cpu::ServerCpu::Pid)
        },
        wait_warm: embedded.is_some(),
    });
    let report = super::run(&client, &server, &opts, pods, side.as_ref()).await;
    drop(floor);
    if let Some(r) = embedded {
        r.shutdown().await;
    }
    let report = report.map_err(anyhow::Error::msg)?;
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

/// The pid of the process listening on `url`'s port, when the URL names this machine.
fn local_pid(url: &str) -> Option<u32> {
    let u = reqwest::Url::parse(url).ok()?;
    let host = u.host_str()?.trim_matches(['[', ']']);
    let local = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !local {
        return None;
    }
    super::sysinfo::listener_pid(u.port_or_known_default()?)
}

/// The `--embedded` service, on a runtime of its own whose threads are named
/// [`super::cpu::SERVER_THREADS`] (so its CPU is read apart from the load generator's).
struct Embedded {
    url: String,
    running: crate::server::Running,
    rt: super::floor::OwnRuntime,
}

impl Embedded {
    async fn start(cfg: crate::server::ServeConfig) -> anyhow::Result<Embedded> {
        let rt = super::floor::OwnRuntime::new(super::cpu::SERVER_THREADS)?;
        let running = rt
            .handle()
            .spawn(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                anyhow::Ok(crate::server::start(listener, cfg).await?)
            })
            .await??;
        Ok(Embedded {
            url: running.base_url(),
            running,
            rt,
        })
    }

    async fn shutdown(self) {
        let Embedded { running, rt, .. } = self;
        let _ = rt.handle().spawn(running.shutdown()).await;
    }
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
