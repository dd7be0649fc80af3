//! The Kubernetes side of warmpool: the `AgentPool` custom resource (`crd.rs`) and leader
//! election with a coordination.k8s.io/v1 Lease (`leader.rs`).
//!
//! The Kubernetes backend (pods as agents, the per-pool reconciler, leak GC, restart adoption,
//! leader election) builds on these types; see docs/ARCHITECTURE.md for what exists so far.

pub mod crd;
pub mod leader;
