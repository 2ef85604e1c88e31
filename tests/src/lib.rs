//! kplb's lab: nodes and pods as network namespaces on one kernel, each with a cgroup v2
//! directory, plus helpers to run the real `lb-agent` on them and drive `netexec` traffic.
//!
//! Everything needs root; tests begin with `if !require_root("...") { return; }`.

pub mod agent;
pub mod bpfmaps;
pub mod cleanup;
pub mod client;
pub mod cluster;
pub mod host;
pub mod lab;
pub mod manifests;
pub mod netns;
pub mod poll;
pub mod process;
pub mod require;
pub mod scenario;

pub use agent::Agent;
pub use client::{Attempt, Request, tally};
pub use cluster::Cluster;
pub use lab::{Lab, Node, Ns, Role};
pub use poll::poll_until;
pub use require::require_root;
