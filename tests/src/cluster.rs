//! A lab with one agent per node sharing one manifests directory: the fixture of the
//! end-to-end tests.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{agent::Agent, lab::Lab, manifests};

#[derive(Debug)]
pub struct Cluster {
    /// Declared before `lab`: fields drop in order, so agents clean up while nodes exist.
    pub agents: Vec<Agent>,
    pub lab: Lab,
    manifests: PathBuf,
}

impl Cluster {
    /// Wraps `lab`; manifests go to `<lab tmp>/manifests`. No agent runs yet.
    pub fn new(lab: Lab) -> Result<Self> {
        let manifests = lab.tmp_dir().join("manifests");
        std::fs::create_dir_all(&manifests)
            .with_context(|| format!("creating {}", manifests.display()))?;
        Ok(Self {
            agents: Vec::new(),
            lab,
            manifests,
        })
    }

    pub fn manifests_dir(&self) -> &Path {
        &self.manifests
    }

    /// Atomically writes `docs` as `file` in the manifests directory.
    pub fn write(&self, file: &str, docs: &[Value]) -> Result<()> {
        manifests::write(&self.manifests, file, docs).map(|_| ())
    }

    pub fn remove(&self, file: &str) -> Result<()> {
        manifests::remove(&self.manifests, file)
    }

    /// Starts an agent on every node (with `extra_args`), then waits until each has synced.
    pub fn start_agents(&mut self, extra_args: &[&str], timeout: Duration) -> Result<()> {
        for node in 1..=self.lab.nodes().len() {
            self.agents
                .push(Agent::start(&self.lab, node, &self.manifests, extra_args)?);
        }
        for agent in &mut self.agents {
            agent.wait_synced(timeout)?;
        }
        Ok(())
    }

    /// The agent of node `k` (1-based), as started by [`Cluster::start_agents`].
    pub fn agent(&mut self, k: usize) -> Result<&mut Agent> {
        self.agents
            .iter_mut()
            .find(|a| a.node().index == k)
            .with_context(|| format!("no agent on node{k}"))
    }
}
