//! The Kubernetes side of warmpool: the `AgentPool` custom resource (`crd.rs`), the one
//! AgentPool controller (`agentpool/`: routing, finalizer, status, adoption) and leader
//! election with a coordination.k8s.io/v1 Lease (`leader.rs`).
//!
//! The Kubernetes backend (`backend/kubernetes/`: pods as agents, the pod watcher) builds on
//! these types; see docs/ARCHITECTURE.md.

pub mod agentpool;
pub mod crd;
pub mod leader;
