//! warmpool: keeps CI build agents warm.
//!
//! A pool of pre-started agents per pool spec, each already connected to the service over
//! WebSocket, leased to jobs by label expression in milliseconds, provisioned under a rate limit
//! and recycled after use, idle TTL, max age or bad health.
//!
//! # Layout
//! - [`k8s`]: the `AgentPool` custom resource and leader election.
//! - [`labels`]: Jenkins label-expression parser and matcher (pure).
//! - [`spec`]: the pool spec, its defaults, duration syntax and validation (pure).
//! - [`hooks`]: the per-pool cleanup and health hooks: spec, reported results, the verdict (pure).
//! - [`engine`]: the pool engine, a synchronous state machine with time passed in (pure).
//! - [`protocol`]: the WebSocket remoting protocol between hub and agents (pure encoding).
//! - [`auth`]: per-agent HMAC tokens and the API bearer token.
//! - [`metrics`]: the Prometheus registry and every `warmpool_*` metric.
//! - [`pacer`]: the provisioning token buckets (governor) behind the engine's `Pacer`.
//! - [`procs`]: `/proc` process-tree helpers: leftovers, orphans, workspace size and wipe.
//! - [`service`]: the async shell: runs the engine, executes its actions, ticks time.
//! - [`hub`]: agent WebSocket connections, bounded per-connection queues, exec routing.
//! - [`api`]: the HTTP lease API (axum), including the exec WebSocket.
//! - [`api_error`]: the API's JSON errors, and the router's own 404 and 405 answers.
//! - [`backend`]: where agents come from (`process`: local child processes; `kubernetes`: pods).
//! - [`jenkins`]: the Jenkins connector: pools of warm Jenkins nodes, leased by Jenkins' queue.
//! - [`agent`]: the `warmpool agent` side: dial the hub, run execs, clean up.
//! - [`client`]: the lease API client behind `warmpool run` and `warmpool status`.
//! - [`tls`]: rustls client configs (platform roots + a CA file) and the reloading server cert.
//! - [`http_server`]: HTTP/1.1 serving with a header deadline and a connection cap.
//! - [`simulate`]: `warmpool simulate`: trace replay through the engine on a virtual clock.
//! - [`server`]: wiring: builds everything, serves a bound listener until shutdown.
//! - [`cli`]: clap definitions for the binary.
#![deny(missing_docs)]

pub mod agent;
pub mod api;
pub mod api_error;
pub mod auth;
pub mod backend;
pub mod backoff;
pub mod bench;
pub mod cli;
pub mod client;
pub mod engine;
pub mod exec_routes;
pub mod hello;
pub mod hooks;
pub mod http_server;
pub mod hub;
pub mod jenkins;
pub mod k8s;
pub mod labels;
pub mod metrics;
pub mod pacer;
pub mod procs;
pub mod protocol;
pub mod run;
pub mod server;
pub mod service;
pub mod simulate;
pub mod spec;
pub mod tls;
