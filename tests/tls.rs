//! TLS everywhere: a CA and certificates made in the test (rcgen), the Jenkins double served
//! over https/wss, `serve --tls-cert/--tls-key` terminating TLS for the API and the agent hub,
//! real `warmpool agent` and `warmpool run` processes with `--ca-file`, the errors a wrong CA
//! gives, certificate rotation, and the handshake deadline.

#[path = "support/jenkins.rs"]
mod jenkins;
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use jenkins::{JenkinsConfig, JenkinsDouble};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use support::{EXE, Harness, test_config, wait_until};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use warmpool::client::Client;
use warmpool::server::start;
use warmpool::tls::{CertFiles, CertReloader};

const WAIT: Duration = Duration::from_secs(20);
const VERIFY_FAILED: &str =
    "TLS certificate verification failed: invalid peer certificate: UnknownIssuer";

/// A test CA that signs server certificates for 127.0.0.1 and localhost.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate as PEM, written to a file.
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("warmpool test CA {name}"));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        let pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        Ca { issuer, pem }
    }

    /// A leaf for 127.0.0.1 and localhost: (certificate PEM, key PEM).
    fn leaf(&self) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "warmpool");
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a leaf to `cert`/`key`, each by an atomic rename (as a Secret volume updates).
    fn issue(&self, files: &CertFiles) {
        let (cert, key) = self.leaf();
        write_atomic(&files.key, &key);
        write_atomic(&files.cert, &cert);
    }
}

fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn files(dir: &Path) -> CertFiles {
    CertFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    }
}

/// A scratch directory, CA `name` in it, and a leaf from that CA in its tls.crt/tls.key.
fn pki(name: &str) -> (tempfile::TempDir, Ca, CertFiles) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), name);
    let f = files(dir.path());
    ca.issue(&f);
    (dir, ca, f)
}

fn tls_client(base: &str, ca: &Path) -> Client {
    Client::with_tls(
        base,
        None,
        warmpool::tls::client_config(Some(ca)).expect("CA file loads"),
    )
}

/// `serve` in-process for `pools_yaml` over TLS with `files`, its outgoing clients and local
/// agents trusting `ca` (`--ca-file`).
async fn serve_tls(pools_yaml: &str, files: &CertFiles, ca: &Path) -> Harness {
    let mut cfg = test_config(pools_yaml);
    cfg.tls = Some(files.clone());
    cfg.ca_file = Some(ca.to_path_buf());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = start(listener, cfg).await.expect("server starts");
    assert!(server.base_url().starts_with("https://"));
    let client = tls_client(&server.base_url(), ca);
    Harness { server, client }
}

/// Starts `warmpool agent --hub wss://… --ca-file ca` as `mac-1` of the external pool `macs`,
/// with a fresh join token; returns it and the hub URL it dials.
async fn mac_agent(
    h: &Harness,
    ca: &Path,
    dir: &Path,
    stderr: Stdio,
) -> (tokio::process::Child, String) {
    let token = h.client.join_token("macs").await.unwrap();
    let hub = format!("wss://{}/v1/agents/connect", h.server.addr);
    let agent = tokio::process::Command::new(EXE)
        .args(["agent", "--hub", &hub, "--ca-file"])
        .arg(ca)
        .args(["--agent-id", "mac-1", "--pool", "macs", "--token", &token])
        .arg("--workspace")
        .arg(dir.join("mac-1"))
        .env_remove("WARMPOOL_CA_FILE")
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (agent, hub)
}

/// GETs `url` with a fresh reqwest client trusting what `tls` trusts; returns the body.
async fn get_text(tls: &Arc<rustls::ClientConfig>, url: &str) -> String {
    reqwest::Client::builder()
        .use_preconfigured_tls(warmpool::tls::for_reqwest(tls))
        .build()
        .unwrap()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn jenkins_over_https_with_ca_file_reaches_min_idle_and_a_wrong_ca_is_a_clear_degraded() {
    let (dir, ca, f) = pki("jenkins");
    let other = Ca::new(dir.path(), "other");
    let reloader = CertReloader::new(f.clone()).unwrap();
    let j =
        JenkinsDouble::start_tls(JenkinsConfig::default(), reloader.server_config().unwrap()).await;
    assert!(j.url().starts_with("https://127.0.0.1:"));
    let (user, token) = j.credentials();
    let creds = dir.path().join("creds");
    std::fs::write(&creds, format!("{user}:{token}\n")).unwrap();
    let pool = |name: &str, ca_file: &Path| {
        format!(
            r#"  - name: {name}
    minIdle: 2
    maxTotal: 4
    connectTimeout: 20s
    jenkins:
      url: {url}
      caFile: {ca}
      credentialsFile: {creds}
      remoteFS: {fs}
      labels: {name}
      nodeNamePrefix: {name}-
      agentCommand: [{EXE}, fake-jenkins-agent]
      pollInterval: 100ms
      maxPollInterval: 400ms
"#,
            url = j.url(),
            ca = ca_file.display(),
            creds = creds.display(),
            fs = dir.path().join("agents").display(),
        )
    };
    let yaml = format!(
        "pools:\n{}{}",
        pool("good", &ca.pem),
        pool("wrong", &other.pem)
    );
    let mut cfg = test_config(&yaml);
    cfg.jenkins_delete_on_shutdown = true;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = start(listener, cfg).await.expect("server starts");
    let connector = server.svc.jenkins.get().expect("connector").clone();
    let status = |name: &str| {
        connector
            .statuses()
            .into_iter()
            .find(|p| p.name == name)
            .expect("pool")
    };
    // The good pool's nodes are created over https and its agents (the simulated inbound
    // agent, given the pool's caFile) come online over wss.
    let online = |j: &JenkinsDouble| {
        j.nodes()
            .iter()
            .filter(|n| n.name.starts_with("good-") && n.online)
            .count()
    };
    assert!(
        j.wait_for(WAIT, |j| online(j) == 2).await,
        "good pool: {:?}",
        status("good")
    );
    wait_until("good pool shows 2 idle nodes", WAIT, || {
        status("good").nodes.idle == 2
    })
    .await;
    // The pool with the wrong CA never reaches Jenkins and says why, naming the URL.
    let degraded = |name: &str| {
        status(name)
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True")
    };
    wait_until("wrong pool is Degraded", WAIT, || {
        degraded("wrong").is_some_and(|c| c.message.contains(VERIFY_FAILED))
    })
    .await;
    let c = degraded("wrong").unwrap();
    assert!(
        c.message.contains(&format!("GET {}", j.url())),
        "{}",
        c.message
    );
    assert!(degraded("good").is_none(), "{:?}", status("good"));
    assert!(!j.nodes().iter().any(|n| n.name.starts_with("wrong-")));
    server.shutdown().await;
}

#[tokio::test]
async fn agents_join_over_wss_local_ones_and_a_real_agent_with_ca_file() {
    let (dir, ca, f) = pki("hub");
    let pools = "
pools:
  - name: local
    labels: [linux]
    minIdle: 1
    maxTotal: 1
  - name: macs
    labels: [macos]
    external: true
    minIdle: 0
    maxTotal: 1
";
    let h = serve_tls(pools, &f, &ca.pem).await;
    // Local agents dial the wss:// hub URL, trusting serve's --ca-file.
    h.wait_idle("local", 1).await;
    // An external machine: `warmpool agent --hub wss://... --ca-file`.
    let (mut agent, _) = mac_agent(&h, &ca.pem, dir.path(), Stdio::null()).await;
    h.wait_idle("macs", 1).await;
    // Leased and run through the TLS API and the wss exec socket.
    let lease = h.lease("macos", 10.0, 30.0).await;
    let mut out = Vec::new();
    let st = h
        .client
        .exec(
            &lease.id,
            support::script("echo over-tls"),
            |_, d| out.extend_from_slice(d),
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(st.code, Some(0));
    assert_eq!(String::from_utf8_lossy(&out), "over-tls\n");
    h.client.release(&lease.id).await.unwrap();
    let _ = agent.start_kill();
    h.server.shutdown().await;
}

#[tokio::test]
async fn an_agent_with_the_wrong_ca_logs_the_hub_and_the_verification_failure() {
    let (dir, ca, f) = pki("hub");
    let other = Ca::new(dir.path(), "other");
    let h = serve_tls("pools:\n  - name: macs\n    labels: [macos]\n    external: true\n    minIdle: 0\n    maxTotal: 1\n", &f, &ca.pem)
    .await;
    let (mut agent, hub) = mac_agent(&h, &other.pem, dir.path(), Stdio::piped()).await;
    let mut lines = tokio::io::BufReader::new(agent.stderr.take().unwrap()).lines();
    let found = tokio::time::timeout(WAIT, async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains(VERIFY_FAILED) {
                return Some(l);
            }
        }
        None
    })
    .await
    .expect("the agent logs the TLS failure in time")
    .expect("the agent logs the TLS failure");
    assert!(found.contains(&hub), "{found}");
    assert_eq!(h.pool("macs").idle, 0);
    let _ = agent.start_kill();
    h.server.shutdown().await;
}

async fn run_cli(base: &str, ca: &Path, cmd: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(EXE)
        .args(["run", "--server", base, "--ca-file"])
        .arg(ca)
        .arg("--")
        .args(cmd)
        .env_remove("WARMPOOL_CA_FILE")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test]
async fn run_over_https_prints_output_and_exit_code_and_a_wrong_ca_names_the_host() {
    let (dir, ca, f) = pki("api");
    let other = Ca::new(dir.path(), "other");
    let h = serve_tls(
        "pools:\n  - name: p\n    labels: [linux]\n    minIdle: 1\n    maxTotal: 2\n",
        &f,
        &ca.pem,
    )
    .await;
    let base = h.server.base_url();
    let (code, out, err) = run_cli(&base, &ca.pem, &["sh", "-c", "echo hello; exit 3"]).await;
    assert_eq!((code, out.as_str()), (Some(3), "hello\n"), "stderr: {err}");
    // `status` too, and /metrics over https.
    let st = tokio::process::Command::new(EXE)
        .args(["status", "--server", &base, "--ca-file"])
        .arg(&ca.pem)
        .output()
        .await
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(String::from_utf8_lossy(&st.stdout).contains("linux"));
    let metrics = get_text(h.client.tls(), &format!("{base}/metrics")).await;
    assert!(metrics.contains("warmpool_"));
    // A CA that did not sign the server's certificate: a clear error naming the server.
    let (code, _, err) = run_cli(&base, &other.pem, &["true"]).await;
    assert_eq!(code, Some(255), "{err}");
    assert!(
        err.contains(&format!("{base}: {VERIFY_FAILED}")),
        "stderr: {err}"
    );
    // No CA file at all: the platform's roots do not know the test CA either.
    let out = tokio::process::Command::new(EXE)
        .args(["run", "--server", &base, "--", "true"])
        .env_remove("WARMPOOL_CA_FILE")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(String::from_utf8_lossy(&out.stderr).contains(VERIFY_FAILED));
    h.server.shutdown().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_and_a_bad_one_is_ignored() {
    let (dir, first, f) = pki("first");
    let second = Ca::new(dir.path(), "second");
    let h = serve_tls(
        "pools:\n  - name: p\n    labels: [linux]\n    minIdle: 0\n",
        &f,
        &first.pem,
    )
    .await;
    let base = h.server.base_url();
    // A fresh client per check: a fresh connection, a fresh handshake.
    let works = |ca: &Path| {
        let c = tls_client(&base, ca);
        async move { c.pools().await.map(|_| ()).map_err(|e| e.to_string()) }
    };
    works(&first.pem).await.unwrap();
    // Rotate to a certificate from another CA.
    second.issue(&f);
    works(&second.pem).await.unwrap();
    let e = works(&first.pem).await.unwrap_err();
    assert!(e.contains(VERIFY_FAILED), "{e}");
    // A broken new certificate file: the last good certificate stays in use.
    write_atomic(&f.cert, "-----BEGIN CERTIFICATE-----\nnot base64\n");
    works(&second.pem).await.unwrap();
    // A key that does not match the certificate: kept too.
    let (_, other_key) = second.leaf();
    let (cert, _) = second.leaf();
    write_atomic(&f.cert, &cert);
    write_atomic(&f.key, &other_key);
    works(&second.pem).await.unwrap();
    h.server.shutdown().await;
}

#[tokio::test]
async fn serve_refuses_to_start_with_unreadable_tls_files_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config("pools:\n  - name: p\n    labels: [linux]\n    minIdle: 0\n");
    cfg.tls = Some(files(dir.path()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = start(listener, cfg).await.err().expect("no certificate");
    assert!(e.to_string().contains("tls.crt"), "{e}");
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_dropped() {
    let (_dir, ca, f) = pki("hs");
    let cfg = CertReloader::new(f).unwrap().server_config().unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = warmpool::tls::TlsListener::new(tcp, cfg, Duration::from_millis(300)).unwrap();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    // Connects and says nothing: the server closes the connection after the deadline.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, silent.read(&mut buf))
        .await
        .expect("the server closed the silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // Meanwhile and after, real clients are served.
    let trust = warmpool::tls::client_config(Some(&ca.pem)).unwrap();
    let body = get_text(&trust, &format!("https://{addr}/")).await;
    assert_eq!(body, "ok");
    server.abort();
}
