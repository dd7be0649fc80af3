//! A real kube-apiserver (v1.20.2, built from Debian's archive by `scripts/kube-assets.sh`, or
//! taken from `KUBEBUILDER_ASSETS`) and etcd, started on free loopback ports for one test, with a
//! static admin token (group system:masters), RBAC, and a self-signed serving certificate.
//! Nothing is simulated: the production `kube::Client` talks to them unchanged.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, PostParams};
use warmpool::k8s::crd::AgentPool;

pub struct KubeApi {
    pub url: String,
    pub token: String,
    dir: tempfile::TempDir,
    etcd: Child,
    apiserver: Child,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The directory holding kube-apiserver and etcd (builds them once if needed).
pub fn assets() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kube-assets.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("scripts/kube-assets.sh runs");
    assert!(out.status.success(), "scripts/kube-assets.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

impl KubeApi {
    pub async fn start() -> KubeApi {
        let bin = assets();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let token = "warmpool-test-admin-token".to_string();
        std::fs::write(
            d.join("tokens.csv"),
            format!("{token},admin,admin,\"system:masters\"\n"),
        )
        .unwrap();
        let key = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(d.join("sa.key"))
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("openssl generates the service-account key");
        assert!(key.success());
        let (client, peer, secure) = (free_port(), free_port(), free_port());
        let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
        let etcd = Command::new(bin.join("etcd"))
            .arg("--data-dir")
            .arg(d.join("etcd"))
            .args(["--name", "default"])
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .stdout(log("etcd.log"))
            .stderr(log("etcd.err"))
            .spawn()
            .expect("etcd starts");
        let apiserver = Command::new(bin.join("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={secure}"))
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--endpoint-reconciler-type=none")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--service-account-issuer=https://warmpool.test")
            .arg(format!(
                "--service-account-signing-key-file={}",
                d.join("sa.key").display()
            ))
            .arg(format!(
                "--service-account-key-file={}",
                d.join("sa.key").display()
            ))
            .stdout(log("apiserver.log"))
            .stderr(log("apiserver.err"))
            .spawn()
            .expect("kube-apiserver starts");
        let api = KubeApi {
            url: format!("https://127.0.0.1:{secure}"),
            token,
            dir,
            etcd,
            apiserver,
        };
        api.wait_ready().await;
        api
    }

    async fn wait_ready(&self) {
        let client = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let req = http::Request::get("/readyz").body(Vec::new()).unwrap();
            if let Ok(body) = client.request_text(req).await
                && body.trim() == "ok"
            {
                return;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.path().join("apiserver.err"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!(
                    "kube-apiserver not ready after 60s; last log lines:\n{}",
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A kubeconfig for this apiserver (what a user would hand to warmpool).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n    namespace: default\ncurrent-context: test\n",
            self.url, self.token
        )
    }

    /// The production client, configured from [`KubeApi::kubeconfig`].
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig()).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(cfg).unwrap()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let _ = self.apiserver.kill();
        let _ = self.apiserver.wait();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
}

/// Installs manifests/crd.yaml (checked to equal the generated CRD) and waits until it is
/// Established.
pub async fn install_crd(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let from_file: CustomResourceDefinition =
        serde_saphyr::from_str(include_str!("../../manifests/crd.yaml"))
            .expect("manifests/crd.yaml parses");
    assert_eq!(
        from_file.spec,
        AgentPool::crd().spec,
        "the checked-in CRD is the generated one"
    );
    crds.create(&PostParams::default(), &from_file)
        .await
        .expect("apiserver accepts the CRD");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let crd = crds.get("agentpools.warmpool.dev").await.unwrap();
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return;
        }
        assert!(Instant::now() < deadline, "CRD never became Established");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
