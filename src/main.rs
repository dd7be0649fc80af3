//! The `warmpool` binary: parses the CLI, sets up logging and signals, and hands over to the
//! library (`server::serve`, `agent::run`, `client::run_job`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use warmpool::cli::{Cli, Command, LogArgs, LogFormat, OutputFormat, ServerArgs};
use warmpool::{agent, auth, client, protocol, server, spec};

/// Standard error for logs. A write that fails (a reader that went away, a full disk) loses
/// that line and nothing else: logging never stops the service.
struct LogOut;

impl std::io::Write for LogOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn init_logging(args: &LogArgs, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(args.log.as_deref().unwrap_or(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // No colours in a file or a pipe; no `eprintln!` from the subscriber about a failed write
    // (it would panic on the same broken stderr).
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .with_writer(|| LogOut);
    match args.log_format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
}

/// First SIGINT/SIGTERM cancels `token`; a second one exits at once, killing every agent, job
/// and leftover process this process started (whole process groups) and removing its default
/// work dir first.
fn on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if n == 0 {
                token.cancel();
            } else {
                let _ = writeln!(
                    std::io::stderr(),
                    "warmpool: second signal; killing agents and jobs and exiting now"
                );
                // Blocking and bounded (about a second): nothing else should run meanwhile.
                server::force_exit();
                std::process::exit(130);
            }
        }
    });
}

fn client_for(s: &ServerArgs) -> anyhow::Result<client::Client> {
    let token = match &s.api_token_file {
        Some(p) => Some(auth::load_api_token(p)?),
        None => None,
    };
    let tls = warmpool::tls::client_config(s.ca_file.as_deref())?;
    Ok(client::Client::with_tls(&s.server, token, tls))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // An agent is a small process: one thread runs it (every thread of the agent is one more
    // `children` file to read in each walk of the processes below it); everything else gets
    // a worker per core.
    let runtime = match cli.command {
        Command::Agent(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build();
    match runtime {
        Ok(rt) => rt.block_on(async_main(cli)),
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "warmpool: cannot start the runtime: {e}");
            ExitCode::from(255)
        }
    }
}

async fn async_main(cli: Cli) -> ExitCode {
    // The process-wide rustls provider, for any client built without a warmpool config.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let default_log = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    init_logging(&cli.log, default_log);
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "warmpool: {}", one_line(&e));
            ExitCode::from(255)
        }
    }
}

/// Prints the pools as `status` does; a closed stdout (`status --watch | head`) is an error.
fn print_status(
    pools: &[warmpool::engine::PoolStatus],
    output: OutputFormat,
) -> anyhow::Result<()> {
    let text = match output {
        OutputFormat::Table => client::pools_table(pools),
        OutputFormat::Json => serde_json::to_string_pretty(pools)? + "\n",
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// The error and its causes, each cause once: most of our errors already end with their cause
/// ("cannot read pools file p.yaml: No such file or directory"), which `{e:#}` would repeat.
fn one_line(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
    }
    message
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(a) => {
            // Every agent and client holds a socket: use all the descriptors the system allows.
            match warmpool::http_server::raise_fd_limit() {
                Ok(n) => tracing::debug!(open_files = n, "open-files limit"),
                Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
            }
            let exe = match a.agent_exe {
                Some(p) => p,
                None => std::env::current_exe().context("cannot find the warmpool executable")?,
            };
            let mut cfg = server::ServeConfig::new(exe);
            if let Some(p) = &a.pools {
                cfg.pools = spec::load_file(p)?;
            }
            if let Some(p) = &a.api_token_file {
                cfg.api_token = Some(auth::load_api_token(p)?);
            }
            if let Some(p) = &a.agent_key_file {
                cfg.agent_key = auth::AgentKey::from_file(p)?;
            }
            if a.backend == warmpool::cli::BackendKind::Kubernetes {
                let client = kube::Client::try_default()
                    .await
                    .context("cannot configure a Kubernetes client (in-cluster or KUBECONFIG)")?;
                let namespace = a
                    .namespace
                    .clone()
                    .unwrap_or_else(|| client.default_namespace().to_string());
                let leader = a.leader_elect.then(|| {
                    let pod = std::env::var("POD_NAME")
                        .or_else(|_| std::env::var("HOSTNAME"))
                        .unwrap_or_else(|_| "warmpool".into());
                    let mut l = warmpool::k8s::leader::LeaderConfig::new(
                        &namespace,
                        &format!("{pod}-{:08x}", rand::random::<u32>()),
                    );
                    l.name = a.leader_lease_name.clone();
                    l.lease_duration = a.leader_lease_duration.0;
                    l.renew_deadline = a.leader_renew_deadline.0;
                    l.retry_period = a.leader_retry_period.0;
                    Box::new(l)
                });
                cfg.backend = server::BackendChoice::Kubernetes {
                    client,
                    namespace: (!a.all_namespaces).then_some(namespace),
                    leader,
                };
            }
            cfg.work_dir = a.work_dir;
            cfg.hub_url = a.hub_url;
            cfg.service.heartbeat_interval = a.heartbeat_interval.0;
            cfg.service.engine.heartbeat_timeout = a.heartbeat_interval.0 * 3;
            cfg.service.handshakes_per_second = a.handshakes_per_second;
            cfg.service.max_frame_bytes = a.max_frame_bytes;
            cfg.service.agent_send_timeout = a.agent_send_timeout.0;
            cfg.http.header_timeout = a.http_header_timeout.0;
            cfg.http.max_connections = a
                .max_connections
                .unwrap_or_else(warmpool::http_server::default_max_connections);
            if cfg.http.max_connections < 2 {
                anyhow::bail!(
                    "--max-connections {} is too low: at least 2 (one slot is kept for agents)",
                    cfg.http.max_connections
                );
            }
            cfg.http.agent_reserve = match a.agent_reserved_connections {
                Some(n) if n == 0 || n >= cfg.http.max_connections => anyhow::bail!(
                    "--agent-reserved-connections {n} must be at least 1 and below \
                     --max-connections {}",
                    cfg.http.max_connections
                ),
                n => n,
            };
            cfg.service.engine.max_waiters = a.max_waiters;
            cfg.shutdown_grace = a.shutdown_grace.0;
            cfg.jenkins_delete_on_shutdown = a.jenkins_delete_on_shutdown;
            if let (Some(cert), Some(key)) = (a.tls_cert, a.tls_key) {
                cfg.tls = Some(warmpool::tls::CertFiles { cert, key });
            }
            cfg.ca_file = a.ca_file;
            // Refused before binding: the address is never open, not even for a moment.
            if !a.listen.ip().is_loopback() && cfg.api_token.is_none() {
                return Err(server::Error::NoTokenOnPublicAddress(a.listen).into());
            }
            let listener = tokio::net::TcpListener::bind(a.listen)
                .await
                .with_context(|| format!("cannot listen on {}", a.listen))?;
            let stop = CancellationToken::new();
            on_signals(stop.clone());
            server::serve(listener, cfg, stop.cancelled_owned()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(a) => {
            let token = match (&a.token_file, a.token) {
                (Some(p), _) => auth::take_token_file(p)?,
                (None, Some(t)) => t,
                (None, None) => anyhow::bail!("agent {}: no token given", a.agent_id),
            };
            let stop = CancellationToken::new();
            on_signals(stop.clone());
            let hub = a.hub;
            agent::run(
                agent::AgentConfig {
                    hub: hub.clone(),
                    agent_id: a.agent_id,
                    token,
                    pool: a.pool,
                    labels: a.labels,
                    workspace: a.workspace,
                    max_backoff: a.max_backoff.0,
                    tls: warmpool::tls::client_config_for(&hub, a.ca_file.as_deref())?,
                },
                stop,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(a) => {
            let code = warmpool::bench::cmd::run(a).await?;
            Ok(ExitCode::from(code as u8))
        }
        Command::Run(a) => {
            let c = client_for(&a.server)?;
            let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
            let opts = client::RunOptions {
                selector: a.selector,
                wait: a.wait.0,
                ttl: a.ttl.0.max(Duration::from_secs(3)),
                holder: format!("warmpool run ({user}, pid {})", std::process::id()),
                spec: protocol::ExecSpec {
                    argv: Some(a.command),
                    script: None,
                    env: a.env.into_iter().collect(),
                    cwd: a.cwd,
                    timeout_ms: a.timeout.map(|t| t.0.as_millis() as u64),
                    stdin: false,
                    tty: None,
                },
                reattach: a.reattach_timeout.0,
                stdin: a.interactive
                    || a.tty
                    || !std::io::IsTerminal::is_terminal(&std::io::stdin()),
                tty: a.tty,
            };
            let code = client::run_job(&c, opts).await?;
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        Command::FakeJenkinsAgent { args } => {
            let code = warmpool::jenkins::fake_agent::run(args).await;
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        Command::Simulate(a) => {
            warmpool::simulate::cmd::run(*a).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Crd => {
            print!("{}", warmpool::k8s::crd::crd_yaml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(a) => {
            let c = client_for(&a.server)?;
            let Some(every) = a.watch else {
                print_status(&c.pools().await?, a.output)?;
                return Ok(ExitCode::SUCCESS);
            };
            // Until interrupted (Ctrl-C ends the process); a failed refresh is shown in place
            // of the table and the next one tries again, as `watch` does.
            // A closed stdout (`status --watch | head`) ends the watch quietly.
            let closed = |e: &anyhow::Error| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            };
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
            let mut tick = tokio::time::interval(every.0);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let pools = c.pools().await;
                let shown = (|| -> anyhow::Result<()> {
                    let mut out = std::io::stdout().lock();
                    if terminal {
                        write!(out, "\x1b[H\x1b[2J")?;
                    }
                    writeln!(out, "every {every}: {}", c.base())?;
                    drop(out);
                    match &pools {
                        Ok(p) => print_status(p, a.output)?,
                        Err(e) => writeln!(std::io::stdout(), "warmpool: {e}")?,
                    }
                    if !terminal {
                        writeln!(std::io::stdout())?;
                    }
                    Ok(())
                })();
                match shown {
                    Err(e) if closed(&e) => return Ok(ExitCode::SUCCESS),
                    other => other?,
                }
            }
        }
    }
}
