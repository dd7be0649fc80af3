//! Tests of the Jenkins double (`tests/support/jenkins.rs`) through real HTTP and WebSocket, and
//! of the fake inbound agent (`warmpool::jenkins::fake_agent`) against it.

#[path = "support/jenkins.rs"]
mod jenkins;

use std::path::Path;
use std::time::{Duration, Instant};

use jenkins::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use warmpool::jenkins::fake_agent;

const WAIT: Duration = Duration::from_secs(5);

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A double with crumbs off unless a test wants them.
async fn double() -> JenkinsDouble {
    JenkinsDouble::start(JenkinsConfig {
        crumb: CrumbMode::Off,
        ..JenkinsConfig::default()
    })
    .await
}

async fn get(j: &JenkinsDouble, path: &str) -> reqwest::Response {
    let (user, token) = j.credentials();
    http()
        .get(format!("{}{path}", j.url()))
        .basic_auth(user, Some(token))
        .send()
        .await
        .unwrap()
}

async fn get_json(j: &JenkinsDouble, path: &str) -> Value {
    let r = get(j, path).await;
    assert_eq!(r.status(), StatusCode::OK, "GET {path}");
    r.json().await.unwrap()
}

fn node_form(name: &str, labels: &str) -> Vec<(&'static str, String)> {
    let inner = json!({
        "name": name,
        "nodeDescription": "warm agent",
        "numExecutors": 1,
        "remoteFS": "/home/jenkins/agent",
        "labelString": labels,
        "mode": "EXCLUSIVE",
        "retentionStrategy": {"stapler-class": "hudson.slaves.RetentionStrategy$Always"},
        "nodeProperties": {"stapler-class-bag": "true"},
        "launcher": {"stapler-class": "hudson.slaves.JNLPLauncher", "webSocket": true},
    });
    vec![
        ("name", name.to_string()),
        ("type", "hudson.slaves.DumbSlave$DescriptorImpl".to_string()),
        ("json", inner.to_string()),
    ]
}

/// `POST computer/doCreateItem` with the API token (no crumb).
async fn create(j: &JenkinsDouble, name: &str, labels: &str) -> reqwest::Response {
    let (user, token) = j.credentials();
    http()
        .post(format!("{}computer/doCreateItem", j.url()))
        .basic_auth(user, Some(token))
        .form(&node_form(name, labels))
        .send()
        .await
        .unwrap()
}

async fn delete(j: &JenkinsDouble, name: &str) -> reqwest::Response {
    let (user, token) = j.credentials();
    http()
        .post(format!("{}computer/{name}/doDelete", j.url()))
        .basic_auth(user, Some(token))
        .send()
        .await
        .unwrap()
}

/// The first two `<argument>`s of a JNLP file: (secret, name).
fn jnlp_secret_and_name(xml: &str) -> (String, String) {
    let args: Vec<&str> = xml
        .split("<argument>")
        .skip(1)
        .map(|s| s.split("</argument>").next().unwrap())
        .collect();
    (args[0].to_string(), args[1].to_string())
}

fn agent_args(j: &JenkinsDouble, name: &str, secret: &str, work: &Path) -> Vec<String> {
    [
        "-url",
        j.url().trim_end_matches('/'),
        "-name",
        name,
        "-secret",
        secret,
        "-webSocket",
        "-workDir",
        work.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test]
async fn auth_failures() {
    let j = double().await;
    let url = format!("{}computer/api/json", j.url());

    let bad = http()
        .get(&url)
        .basic_auth("warmpool", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(bad.headers()["www-authenticate"], "Basic realm=\"Jenkins\"");
    assert!(bad.headers().contains_key("x-jenkins"));

    let malformed = http()
        .get(&url)
        .header("authorization", "Basic !!!")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::UNAUTHORIZED);

    let anon = http().get(&url).send().await.unwrap();
    assert_eq!(anon.status(), StatusCode::FORBIDDEN);
    assert_eq!(anon.headers()["x-you-are-authenticated-as"], "anonymous");
    assert_eq!(
        anon.headers()["x-required-permission"],
        "hudson.model.Hudson.Read"
    );

    assert_eq!(get(&j, "computer/api/json").await.status(), StatusCode::OK);

    // Credentials can change mid-test; the old token then fails.
    j.set_credentials("warmpool", "new-token");
    let old = http()
        .get(&url)
        .basic_auth("warmpool", Some("11aa22bb33cc44dd55ee66ff77889900aa"))
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(get(&j, "computer/api/json").await.status(), StatusCode::OK);

    // A permission taken away: 403 naming it.
    j.deny(Endpoint::CreateNode);
    let denied = create(&j, "n1", "linux").await;
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    assert_eq!(denied.headers()["x-you-are-authenticated-as"], "warmpool");
    assert_eq!(
        denied.headers()["x-required-permission"],
        "hudson.model.Computer.Create"
    );
    assert!(j.nodes().is_empty());
}

#[tokio::test]
async fn crumb_flow() {
    let j = JenkinsDouble::start(JenkinsConfig::default()).await;
    let (user, token) = j.credentials();
    let post_create = |name: &str, crumb: Option<&str>, cookie: Option<&str>| {
        let mut rb = http()
            .post(format!("{}computer/doCreateItem", j.url()))
            .basic_auth(&user, Some(&token))
            .form(&node_form(name, "linux"));
        if let Some(c) = crumb {
            rb = rb.header(CRUMB_FIELD, c);
        }
        if let Some(c) = cookie {
            rb = rb.header("cookie", c);
        }
        rb.send()
    };

    let r = get(&j, "crumbIssuer/api/json").await;
    assert_eq!(r.status(), StatusCode::OK);
    let set_cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    let cookie_name = cookie.split('=').next().unwrap();
    assert_eq!(cookie_name, j.cookie_name());
    assert!(cookie_name.starts_with("JSESSIONID.") && cookie_name.len() == 19);
    assert!(set_cookie.contains("Path=/") && set_cookie.contains("HttpOnly"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["_class"], "hudson.security.csrf.DefaultCrumbIssuer");
    assert_eq!(body["crumbRequestField"], CRUMB_FIELD);
    let crumb = body["crumb"].as_str().unwrap().to_string();
    assert_eq!(crumb.len(), 64);

    // Without a crumb, without the session, or with a wrong crumb: 403.
    for (crumb, cookie) in [
        (None, Some(cookie.as_str())),
        (Some(crumb.as_str()), None),
        (Some("0000"), Some(cookie.as_str())),
    ] {
        let r = post_create("n1", crumb, cookie).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(
            r.text()
                .await
                .unwrap()
                .contains("No valid crumb was included in the request")
        );
    }
    assert!(j.nodes().is_empty());

    // Crumb + cookie: created.
    let r = post_create("n1", Some(&crumb), Some(&cookie))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);

    // The same session gets the same crumb, and no new cookie.
    let again = http()
        .get(format!("{}crumbIssuer/api/json", j.url()))
        .basic_auth(&user, Some(&token))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert!(!again.headers().contains_key("set-cookie"));
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["crumb"], crumb.as_str());

    // The crumb as a form field works too.
    let mut form = node_form("n2", "linux");
    form.push((CRUMB_FIELD, crumb.clone()));
    let r = http()
        .post(format!("{}computer/doCreateItem", j.url()))
        .basic_auth(&user, Some(&token))
        .header("cookie", &cookie)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);

    // Expired sessions: the old crumb stops working.
    j.expire_sessions();
    let r = post_create("n3", Some(&crumb), Some(&cookie))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Token-exempt: no crumb needed. Off: crumbIssuer 404, no crumb needed.
    j.set_crumb_mode(CrumbMode::IssuedTokenExempt);
    assert_eq!(post_create("n3", None, None).await.unwrap().status(), 302);
    j.set_crumb_mode(CrumbMode::Off);
    assert_eq!(get(&j, "crumbIssuer/api/json").await.status(), 404);
    assert_eq!(post_create("n4", None, None).await.unwrap().status(), 302);
    assert_eq!(j.nodes().len(), 4);
}

#[tokio::test]
async fn create_read_secret_delete() {
    let j = double().await;
    let r = create(&j, "warm-1", "linux x86_64").await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()["location"], format!("{}computer/", j.url()));

    let dup = create(&j, "warm-1", "linux").await;
    assert_eq!(dup.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        dup.headers()["x-error"].as_bytes(),
        "Agent called ‘warm-1’ already exists".as_bytes()
    );

    let n = j.node("warm-1").unwrap();
    assert_eq!(n.labels, vec!["linux", "x86_64"]);
    assert_eq!(n.mode, NodeMode::Exclusive);
    assert_eq!(n.num_executors, 1);
    assert!(n.web_socket && !n.online);
    assert_eq!(n.secret.len(), 64);
    assert_eq!(j.secret("warm-1").unwrap(), n.secret);

    for file in ["jenkins-agent.jnlp", "slave-agent.jnlp"] {
        let r = get(&j, &format!("computer/warm-1/{file}")).await;
        assert_eq!(r.status(), StatusCode::OK, "{file}");
        assert_eq!(r.headers()["content-type"], "application/x-java-jnlp-file");
        let xml = r.text().await.unwrap();
        assert_eq!(
            jnlp_secret_and_name(&xml),
            (n.secret.clone(), "warm-1".into())
        );
        assert!(xml.contains("<argument>-webSocket</argument>"), "{xml}");
        assert!(xml.contains(&format!("<argument>{}</argument>", j.url())));
    }
    // Jenkins >= 2.437 logs a deprecation WARNING per JNLP file served, under either name.
    let warnings = j.warnings();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("Agent \"warm-1\" is connecting with the \"-jnlpUrl\" argument"));
    assert_eq!(
        get(&j, "computer/nope/jenkins-agent.jnlp").await.status(),
        404
    );

    let one = get_json(&j, "computer/warm-1/api/json").await;
    assert_eq!(one["displayName"], "warm-1");
    assert_eq!(one["offline"], true);

    let r = delete(&j, "warm-1").await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert!(j.node("warm-1").is_none());
    assert_eq!(delete(&j, "warm-1").await.status(), 404);
    assert_eq!(get(&j, "computer/warm-1/api/json").await.status(), 404);
    assert_eq!(j.request_count(Endpoint::CreateNode), 2);
    assert_eq!(j.request_count(Endpoint::DeleteNode), 2);
}

#[tokio::test]
async fn create_validation() {
    let j = double().await;
    let (user, token) = j.credentials();
    let post = |fields: Vec<(&'static str, String)>| {
        http()
            .post(format!("{}computer/doCreateItem", j.url()))
            .basic_auth(&user, Some(&token))
            .form(&fields)
            .send()
    };
    let r = post(vec![("type", "hudson.slaves.DumbSlave".into())])
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-error"], "Query parameter 'name' is required");

    let mut bad_type = node_form("a", "linux");
    bad_type[1].1 = "hudson.slaves.Nope".into();
    assert_eq!(post(bad_type).await.unwrap().status(), 500);

    let mut unsafe_name = node_form("a/b", "linux");
    unsafe_name[0].1 = "a/b".into();
    assert_eq!(post(unsafe_name).await.unwrap().status(), 400);

    let mut no_ws = node_form("a", "linux");
    no_ws[2].1 = no_ws[2]
        .1
        .replace("\"webSocket\":true", "\"webSocket\":false");
    assert_eq!(post(no_ws).await.unwrap().status(), 400);

    // The query string works as well as a form body; `DumbSlave` (the descriptor id) too.
    let mut q = node_form("q1", "linux");
    q[1].1 = "hudson.slaves.DumbSlave".into();
    let r = http()
        .post(format!("{}computer/doCreateItem", j.url()))
        .basic_auth(&user, Some(&token))
        .query(&q)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(
        j.nodes()
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>(),
        ["q1"]
    );
}

#[tokio::test]
async fn jenkins_agent_jnlp_is_404_before_2_264() {
    let j = JenkinsDouble::start(JenkinsConfig {
        crumb: CrumbMode::Off,
        version: "2.263.4".into(),
        serve_jenkins_agent_jnlp: false,
        ..JenkinsConfig::default()
    })
    .await;
    j.add_node("n1", "linux", 1);
    assert_eq!(
        get(&j, "computer/n1/jenkins-agent.jnlp").await.status(),
        404
    );
    let r = get(&j, "computer/n1/slave-agent.jnlp").await;
    assert_eq!(r.status(), 200);
    let xml = r.text().await.unwrap();
    assert!(
        xml.contains("main-class=\"hudson.remoting.jnlp.Main\""),
        "{xml}"
    );
    assert_eq!(jnlp_secret_and_name(&xml).1, "n1");
    // No deprecation warning before 2.437.
    assert!(j.warnings().is_empty());
}

#[tokio::test]
async fn computer_set_json() {
    let j = double().await;
    j.add_node("b-node", "linux", 2);
    j.add_node("a-node", "mac", 1);
    let v = get_json(
        &j,
        "computer/api/json?tree=computer[displayName,offline,idle,numExecutors,assignedLabels[name],executors[idle,currentExecutable[url]]]",
    )
    .await;
    assert_eq!(v["_class"], "hudson.model.ComputerSet");
    let c = v["computer"].as_array().unwrap();
    let names: Vec<&str> = c
        .iter()
        .map(|c| c["displayName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Built-In Node", "a-node", "b-node"]);
    assert_eq!(c[0]["_class"], "hudson.model.Hudson$MasterComputer");
    assert_eq!(c[0]["assignedLabels"][0]["name"], "built-in");
    let b = &c[2];
    assert_eq!(b["_class"], "hudson.slaves.SlaveComputer");
    assert_eq!(b["offline"], true);
    assert_eq!(b["numExecutors"], 2);
    // Offline agents still list their (idle) executors.
    assert_eq!(b["executors"].as_array().unwrap().len(), 2);
    assert_eq!(b["executors"][0]["idle"], true);
    assert!(b["executors"][0]["currentExecutable"].is_null());
    let labels: Vec<&str> = b["assignedLabels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["b-node", "linux"]);
}

#[tokio::test]
async fn fake_agent_online_until_deleted() {
    let j = double().await;
    assert_eq!(create(&j, "warm-1", "linux").await.status(), 302);
    let xml = get(&j, "computer/warm-1/jenkins-agent.jnlp")
        .await
        .text()
        .await
        .unwrap();
    let (secret, name) = jnlp_secret_and_name(&xml);
    let work = tempfile::tempdir().unwrap();
    let workdir = work.path().join("agent");

    let agent = tokio::spawn(fake_agent::run(agent_args(&j, &name, &secret, &workdir)));
    assert!(j.wait_for(WAIT, |j| j.is_online("warm-1")).await);
    assert_eq!(j.online_count(), 1);
    assert!(workdir.join("remoting").is_dir());
    let c = get_json(&j, "computer/warm-1/api/json").await;
    assert_eq!(c["offline"], false);

    // Deleting the node closes the socket; the agent exits 0.
    assert_eq!(delete(&j, "warm-1").await.status(), 302);
    assert!(!j.is_online("warm-1"));
    let code = tokio::time::timeout(WAIT, agent).await.unwrap().unwrap();
    assert_eq!(code, 0);
    assert!(j.wait_for(WAIT, |j| j.ws_stats().open == 0).await);
    let ws = j.ws_stats();
    assert_eq!((ws.accepted, ws.max_open), (1, 1));
}

#[tokio::test]
async fn fake_agent_offline_when_stopped_and_refusals() {
    let j = double().await;
    let secret = j.add_node("n1", "linux", 1);
    let work = tempfile::tempdir().unwrap();

    // Stopped (as by SIGTERM): close frame, exit 0, node offline.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(fake_agent::run_until(
        agent_args(&j, "n1", &secret, work.path()),
        async move {
            let _ = stopped.await;
        },
    ));
    assert!(j.wait_for(WAIT, |j| j.is_online("n1")).await);
    // A second agent for the same node is refused while the first is connected.
    let second = fake_agent::run(agent_args(&j, "n1", &secret, work.path())).await;
    assert_eq!(second, fake_agent::EXIT_CONNECT);
    stop.send(()).unwrap();
    assert_eq!(agent.await.unwrap(), 0);
    assert!(j.wait_for(WAIT, |j| !j.is_online("n1")).await);

    // Wrong secret (403), unknown node (400): exit 1, nothing online.
    let wrong = fake_agent::run(agent_args(&j, "n1", "bad", work.path())).await;
    assert_eq!(wrong, fake_agent::EXIT_CONNECT);
    let unknown = fake_agent::run(agent_args(&j, "nope", &secret, work.path())).await;
    assert_eq!(unknown, fake_agent::EXIT_CONNECT);
    assert_eq!(j.online_count(), 0);
    assert_eq!(j.ws_stats().rejected, 3);
    let statuses: Vec<u16> = j
        .requests()
        .iter()
        .filter(|r| r.endpoint == Endpoint::WsAgents)
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [101, 500, 403, 400]);

    // Controller-side disconnect: offline at once; the agent sees the close and exits 0.
    let agent = tokio::spawn(fake_agent::run(agent_args(&j, "n1", &secret, work.path())));
    assert!(j.wait_for(WAIT, |j| j.is_online("n1")).await);
    assert!(j.disconnect("n1"));
    assert!(!j.is_online("n1"));
    assert_eq!(tokio::time::timeout(WAIT, agent).await.unwrap().unwrap(), 0);
}

#[tokio::test]
async fn fake_agent_config() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let c = fake_agent::config(
        env(&[
            ("JENKINS_URL", "http://j:8080/jenkins"),
            ("JENKINS_NAME", "n1"),
            ("JENKINS_SECRET", "s"),
            ("JENKINS_WEB_SOCKET", "true"),
            ("JENKINS_AGENT_WORKDIR", "/tmp/w"),
            ("FAKE_JENKINS_AGENT_CONNECT_DELAY_MS", "250"),
            ("FAKE_JENKINS_AGENT_NEVER_CONNECT", "1"),
        ]),
        &[],
    )
    .unwrap();
    assert_eq!(c.url, "http://j:8080/jenkins/");
    assert_eq!((c.name.as_str(), c.secret.as_str()), ("n1", "s"));
    assert_eq!(c.work_dir.as_deref(), Some(Path::new("/tmp/w")));
    assert_eq!(c.connect_delay, Duration::from_millis(250));
    assert!(c.never_connect);
    assert_eq!(fake_agent::ws_url(&c.url), "ws://j:8080/jenkins/wsagents/");
    assert_eq!(fake_agent::ws_url("https://j/"), "wss://j/wsagents/");

    // JENKINS_AGENT_NAME wins over JENKINS_NAME; flags win over the environment.
    let c = fake_agent::config(
        env(&[
            ("JENKINS_URL", "http://a/"),
            ("JENKINS_AGENT_NAME", "a"),
            ("JENKINS_NAME", "b"),
        ]),
        &args(&[
            "-url",
            "http://b",
            "-secret",
            "s",
            "-webSocket",
            "-workDir",
            "/w",
            "-internalDir",
            "remoting",
            "-noReconnect",
        ]),
    )
    .unwrap();
    assert_eq!(
        (c.url.as_str(), c.name.as_str(), c.secret.as_str()),
        ("http://b/", "a", "s")
    );
    // agent.jar positional form: SECRET NAME.
    let c = fake_agent::config(
        env(&[("JENKINS_URL", "http://a/"), ("JENKINS_WEB_SOCKET", "true")]),
        &args(&["SECRET", "NAME"]),
    )
    .unwrap();
    assert_eq!((c.secret.as_str(), c.name.as_str()), ("SECRET", "NAME"));

    // Not WebSocket, no URL, a flag without its value: configuration errors (exit 2).
    let full: &'static [(&str, &str)] = &[
        ("JENKINS_URL", "http://a/"),
        ("JENKINS_AGENT_NAME", "a"),
        ("JENKINS_SECRET", "s"),
    ];
    let e = fake_agent::config(env(full), &[]).unwrap_err();
    assert!(e.contains("JENKINS_WEB_SOCKET"), "{e}");
    let e = fake_agent::config(env(&full[1..]), &args(&["-webSocket"])).unwrap_err();
    assert!(e.contains("JENKINS_URL"), "{e}");
    assert!(fake_agent::config(env(full), &args(&["-webSocket", "-url"])).is_err());
    // With no -url and (normally) no JENKINS_URL in the test environment: exit 2.
    if std::env::var_os("JENKINS_URL").is_none() {
        assert_eq!(
            fake_agent::run(args(&["-name", "a", "-secret", "s", "-webSocket"])).await,
            fake_agent::EXIT_CONFIG
        );
    }
}

#[tokio::test]
async fn fake_agent_delay_and_never_connect() {
    let j = double().await;
    let secret = j.add_node("n1", "linux", 1);
    let base = fake_agent::Config {
        url: j.url().to_string(),
        name: "n1".into(),
        secret,
        work_dir: None,
        connect_delay: Duration::ZERO,
        never_connect: true,
        ca_file: None,
    };

    // Never connects: no handshake until stopped; then exit 0.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let cfg = base.clone();
    let agent = tokio::spawn(async move {
        fake_agent::run_config(&cfg, async move {
            let _ = stopped.await;
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(j.request_count(Endpoint::WsAgents), 0);
    stop.send(()).unwrap();
    assert_eq!(agent.await.unwrap(), 0);

    // A connect delay holds the dial back.
    let cfg = fake_agent::Config {
        connect_delay: Duration::from_millis(200),
        never_connect: false,
        ..base
    };
    let t0 = Instant::now();
    let agent =
        tokio::spawn(
            async move { fake_agent::run_config(&cfg, std::future::pending::<()>()).await },
        );
    assert!(j.wait_for(WAIT, |j| j.is_online("n1")).await);
    assert!(t0.elapsed() >= Duration::from_millis(200));
    assert!(j.ws_connect_times()[0] >= t0 + Duration::from_millis(200));
    j.disconnect("n1");
    assert_eq!(agent.await.unwrap(), 0);
}

#[tokio::test]
async fn dispatch_and_finish() {
    let j = double().await;
    assert_eq!(create(&j, "warm-1", "linux").await.status(), 302);
    let secret = j.secret("warm-1").unwrap();

    let q1 = j.enqueue("linux");
    assert_eq!(j.queue().len(), 1);
    assert!(j.running().is_empty());

    let agent = FakeAgent::connect(j.url(), "warm-1", &secret)
        .await
        .unwrap();
    assert!(j.wait_for(WAIT, |j| j.running().len() == 1).await);
    let build = j.build_of(q1).unwrap();
    assert_eq!(build.node, "warm-1");
    assert_eq!(build.url, format!("{}job/x/1/", j.url()));
    assert!(j.queue().is_empty());

    let c = get_json(&j, "computer/warm-1/api/json").await;
    assert_eq!(c["idle"], false);
    assert_eq!(c["executors"][0]["idle"], false);
    assert_eq!(c["executors"][0]["currentExecutable"]["url"], build.url);

    // A second build waits for the only executor.
    let q2 = j.enqueue("linux");
    assert_eq!(
        j.queue()[0].why,
        "Waiting for next available executor on ‘warm-1’"
    );

    assert!(j.finish(&build.url));
    assert!(!j.finish(&build.url));
    assert_eq!(j.finished(), vec![build]);
    let b2 = j.build_of(q2).unwrap();
    assert_eq!(b2.url, format!("{}job/x/2/", j.url()));
    assert!(j.finish(&b2.url));
    let c = get_json(&j, "computer/warm-1/api/json").await;
    assert_eq!(c["idle"], true);
    assert!(c["executors"][0]["currentExecutable"].is_null());
    assert_eq!(j.node("warm-1").unwrap().builds, 2);
    assert_eq!(j.builds_by_node()["warm-1"], 2);

    // Label expressions; a label that no node has stays queued.
    let q3 = j.enqueue("linux && !windows");
    assert!(j.build_of(q3).is_some());
    let q4 = j.enqueue("windows");
    assert!(j.build_of(q4).is_none());

    // The node going away aborts its build.
    agent.close();
    assert!(j.wait_for(WAIT, |j| !j.is_online("warm-1")).await);
    assert_eq!(j.aborted().len(), 1);
    assert!(j.running().is_empty());
}

#[tokio::test]
async fn queue_why_texts() {
    let j = double().await;
    let why = |v: &Value| v["items"][0]["why"].as_str().unwrap().to_string();

    let id = j.enqueue("linux");
    let v = get_json(&j, "queue/api/json").await;
    assert_eq!(v["_class"], "hudson.model.Queue");
    let item = &v["items"][0];
    assert_eq!(item["_class"], "hudson.model.Queue$BuildableItem");
    assert_eq!(item["buildable"], true);
    assert_eq!(item["id"], id);
    assert_eq!(item["url"], format!("queue/item/{id}/"));
    // No agent node at all: Jenkins does not name the label (Queue.BuildableItem
    // .getCauseOfBlockage); the freestyle task's `labelExpression` does.
    assert_eq!(why(&v), "Waiting for next available executor");
    assert_eq!(item["stuck"], false);
    assert_eq!(item["task"]["labelExpression"], "linux");

    j.add_node("other", "windows", 1);
    let v = get_json(&j, "queue/api/json").await;
    assert_eq!(v["items"][0]["stuck"], true);
    assert_eq!(why(&v), "There are no nodes with the label ‘linux’");

    let s1 = j.add_node("n1", "linux", 1);
    assert_eq!(
        why(&get_json(&j, "queue/api/json").await),
        "‘n1’ is offline"
    );
    let s2 = j.add_node("n2", "linux", 1);
    assert_eq!(
        why(&get_json(&j, "queue/api/json").await),
        "All nodes of label ‘linux’ are offline"
    );

    // Both online and busy: the queued item waits for an executor on the label.
    let _a1 = FakeAgent::connect(j.url(), "n1", &s1).await.unwrap();
    let _a2 = FakeAgent::connect(j.url(), "n2", &s2).await.unwrap();
    assert!(j.wait_for(WAIT, |j| j.online_count() == 2).await);
    assert_eq!(j.running().len(), 1);
    j.enqueue("linux");
    let newer = j.enqueue("linux");
    assert_eq!(j.running().len(), 2);
    let v = get_json(&j, "queue/api/json").await;
    assert_eq!(v["items"][0]["id"], newer, "newest first");
    assert_eq!(v["items"][0]["stuck"], false);
    assert_eq!(why(&v), "Waiting for next available executor on ‘linux’");

    // No label at all.
    j.enqueue("");
    let v = get_json(&j, "queue/api/json").await;
    assert_eq!(why(&v), "Waiting for next available executor");

    // queue/item/ID/api/json: a dispatched item is a LeftItem with its executable.
    let left = get_json(&j, &format!("queue/item/{id}/api/json")).await;
    assert_eq!(left["_class"], "hudson.model.Queue$LeftItem");
    assert_eq!(left["executable"]["url"], format!("{}job/x/1/", j.url()));
}

#[tokio::test]
async fn request_rate_window() {
    let j = double().await;
    for _ in 0..5 {
        get(&j, "queue/api/json").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        get(&j, "queue/api/json").await;
    }
    get(&j, "computer/api/json").await;
    assert_eq!(j.request_count(Endpoint::Queue), 7);
    assert_eq!(
        j.max_in_window(Endpoint::Queue, Duration::from_millis(200)),
        5
    );
    assert_eq!(j.max_in_window(Endpoint::Queue, Duration::from_secs(10)), 7);
    assert_eq!(
        j.max_in_window(Endpoint::ComputerSet, Duration::from_secs(1)),
        1
    );
    assert_eq!(
        j.max_in_window(Endpoint::CreateNode, Duration::from_secs(1)),
        0
    );
    j.clear_requests();
    assert!(j.requests().is_empty());
}

#[tokio::test]
async fn faults() {
    let j = double().await;
    j.set_fault(Fault::status(503).on(&[Endpoint::Queue]).times(2));
    assert_eq!(get(&j, "queue/api/json").await.status(), 503);
    assert_eq!(get(&j, "computer/api/json").await.status(), 200);
    assert_eq!(get(&j, "queue/api/json").await.status(), 503);
    assert_eq!(get(&j, "queue/api/json").await.status(), 200);

    j.set_fault(Fault::slow(Duration::from_millis(100)));
    let t0 = Instant::now();
    assert_eq!(get(&j, "queue/api/json").await.status(), 200);
    assert!(t0.elapsed() >= Duration::from_millis(100));
    j.clear_fault();
    assert_eq!(get(&j, "login").await.status(), 200);
}

#[tokio::test]
async fn ws_max_open_and_handshakes() {
    let j = JenkinsDouble::start(JenkinsConfig {
        crumb: CrumbMode::Off,
        ws_handshake_delay: Duration::from_millis(150),
        ..JenkinsConfig::default()
    })
    .await;
    let secrets: Vec<(String, String)> = (0..3)
        .map(|i| {
            let name = format!("n{i}");
            let s = j.add_node(&name, "linux", 1);
            (name, s)
        })
        .collect();
    let url = j.url().to_string();
    let agents =
        futures_util::future::join_all(secrets.iter().map(|(n, s)| FakeAgent::connect(&url, n, s)))
            .await;
    let agents: Vec<FakeAgent> = agents.into_iter().map(Result::unwrap).collect();
    assert!(j.wait_for(WAIT, |j| j.online_count() == 3).await);
    let ws = j.ws_stats();
    assert_eq!((ws.open, ws.max_open, ws.accepted), (3, 3, 3));
    assert_eq!(ws.max_handshaking, 3);
    assert_eq!(ws.handshaking, 0);
    assert_eq!(j.ws_connect_times().len(), 3);

    drop(agents);
    assert!(j.wait_for(WAIT, |j| j.online_count() == 0).await);
    assert!(j.wait_for(WAIT, |j| j.ws_stats().open == 0).await);
    assert_eq!(j.ws_stats().max_open, 3);

    // Refused: missing headers (400) and not a WebSocket request.
    let r = http().get(format!("{url}wsagents/")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = http()
        .get(format!("{url}wsagents/"))
        .header("Node-Name", "n0")
        .header("Secret-Key", &secrets[0].1)
        .header("X-Remoting-Capability", REMOTING_CAPABILITY)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    assert!(!j.is_online("n0"));
    assert_eq!(j.ws_stats().rejected, 2);
}
