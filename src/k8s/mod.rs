//! The Kubernetes side of warmpool: the `AgentPool` custom resource (`crd.rs`).
//!
//! The Kubernetes backend (pods as agents, the per-pool reconciler, leak GC, restart adoption,
//! leader election) builds on these types; see docs/ARCHITECTURE.md for what exists so far.

pub mod crd;
