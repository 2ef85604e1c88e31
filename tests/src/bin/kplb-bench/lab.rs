//! The bench's lab: one node, 10 netexec backend pods (the measured Service's endpoints,
//! pinned to CPU 0) and a client pod, plus helpers to run tools inside the node.

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_tests::{
    Agent, Lab, lab::netexec_bin, poll_until, process::LabChild, process::output_with_timeout,
};
use serde_json::Value;

use crate::services::{ENDPOINTS, TARGET_PORT, pod_ip, pod_name};

pub const CLIENT: &str = "client";
pub const CLIENT_IP: &str = "10.0.1.100";
pub const NODE: &str = "node1";
/// Backends run on this CPU, the client (and packet generators) on the other.
pub const BACKEND_CPU: usize = 0;
pub const CLIENT_CPU: usize = 1;

pub struct BenchLab {
    /// Dropped before the lab (fields drop in order).
    _backends: Vec<LabChild>,
    pub lab: Lab,
}

impl BenchLab {
    /// A lab of `nodes` nodes with nothing else in it.
    pub fn new_nodes(nodes: usize) -> Result<Self> {
        Ok(Self {
            _backends: Vec::new(),
            lab: Lab::new(nodes).context("creating the lab")?,
        })
    }

    pub fn new(with_backends: bool) -> Result<Self> {
        let mut lab = Lab::new(1).context("creating the lab")?;
        let mut backends = Vec::new();
        if with_backends {
            for j in 0..ENDPOINTS {
                lab.add_pod(1, &pod_name(j), &pod_ip(j).to_string(), None)?;
            }
        }
        lab.add_pod(1, CLIENT, CLIENT_IP, None)?;
        if with_backends {
            let netexec = netexec_bin()?;
            let netexec = netexec.to_str().context("netexec path is not UTF-8")?;
            let cpu = BACKEND_CPU.to_string();
            let port = TARGET_PORT.to_string();
            for j in 0..ENDPOINTS {
                let pod = pod_name(j);
                backends.push(lab.spawn(
                    &pod,
                    &[
                        "taskset", "-c", &cpu, netexec, "serve", "--name", &pod, "--tcp", &port,
                    ],
                )?);
            }
            poll_until(
                Duration::from_secs(10),
                Duration::from_millis(20),
                "netexec backends",
                || {
                    lab.in_netns(NODE, || {
                        Ok((0..ENDPOINTS).all(|j| {
                            let addr = SocketAddr::new(pod_ip(j).into(), TARGET_PORT);
                            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                        }))
                    })
                },
            )?;
        }
        Ok(Self {
            _backends: backends,
            lab,
        })
    }

    /// Runs `argv` in the node's netns (and cgroup) with a time limit.
    pub fn node_run(&self, argv: &[&str], limit: Duration) -> Result<Output> {
        output_with_timeout(self.lab.command(NODE, argv)?, limit)
    }

    /// Like [`BenchLab::node_run`], failing on a non-zero exit.
    pub fn node_ok(&self, argv: &[&str], limit: Duration) -> Result<String> {
        let out = self.node_run(argv, limit)?;
        if !out.status.success() {
            bail!(
                "{argv:?} in {NODE}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether `argv` runs successfully in the node; the error text when not.
    pub fn node_probe(&self, argv: &[&str]) -> std::result::Result<(), String> {
        match self.node_run(argv, Duration::from_secs(20)) {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "`{}` failed: {}",
                argv.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("`{}`: {e:#}", argv.join(" "))),
        }
    }

    /// One `kplb-connclient` run in the client pod (its netns and cgroup).
    pub fn client(
        &self,
        bin: &Path,
        targets: &[SocketAddr],
        count: usize,
        warmup: usize,
    ) -> Result<Value> {
        let targets: Vec<String> = targets.iter().map(ToString::to_string).collect();
        let (targets, count, warmup, cpu) = (
            targets.join(","),
            count.to_string(),
            warmup.to_string(),
            CLIENT_CPU.to_string(),
        );
        let argv = [
            bin.to_str().context("client path is not UTF-8")?,
            "--targets",
            &targets,
            "--count",
            &count,
            "--warmup",
            &warmup,
            "--cpu",
            &cpu,
        ];
        let out = output_with_timeout(self.lab.command(CLIENT, &argv)?, Duration::from_secs(600))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| {
            format!(
                "kplb-connclient printed {stdout:?} ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

/// A running agent on node1 and when it was started.
pub struct RunningAgent {
    pub agent: Agent,
    pub started: Instant,
}

impl RunningAgent {
    pub fn start(lab: &Lab, manifests: &Path, extra: &[&str]) -> Result<Self> {
        let started = Instant::now();
        let agent = Agent::start(lab, 1, manifests, extra)?;
        Ok(Self { agent, started })
    }

    /// Waits for the `synced` line; returns (seconds since start, the line's fields).
    pub fn wait_synced(&mut self, timeout: Duration) -> Result<(f64, Value)> {
        let what = "lb-agent to log `synced`";
        let line = poll_until(timeout, Duration::from_millis(5), what, || {
            if let Some(status) = self.agent.exited()? {
                bail!(
                    "lb-agent exited ({status}) before syncing:\n{}",
                    self.agent.log_tail(20)
                );
            }
            Ok(self
                .agent
                .log()
                .lines()
                .find(|l| l.contains(" synced"))
                .map(str::to_owned))
        })?;
        Ok((self.started.elapsed().as_secs_f64(), fields(&line)))
    }

    /// SIGTERM, then `lb-agent cleanup` (pins, links), so the next dataplane starts clean.
    pub fn stop_and_clean(mut self) -> Result<()> {
        self.agent.stop()?;
        let out = self.agent.cleanup()?;
        if !out.status.success() {
            bail!(
                "lb-agent cleanup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The agent's pid: the only process in the node's own cgroup (pods are below it).
    pub fn pid(&self) -> Result<u32> {
        let procs = self.agent.node().cgroup.join("cgroup.procs");
        let text = fs::read_to_string(&procs).with_context(|| format!("{}", procs.display()))?;
        text.lines()
            .find_map(|l| l.trim().parse().ok())
            .context("no process in the node cgroup")
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.agent.node().bpffs.join("maps")
    }
}

/// `key=value` fields of a tracing log line, numbers as numbers.
pub fn fields(line: &str) -> Value {
    let mut m = serde_json::Map::new();
    for tok in line.split_whitespace() {
        if let Some((k, v)) = tok.split_once('=') {
            let v = v.trim_matches('"');
            let val = v
                .parse::<f64>()
                .ok()
                .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
                .unwrap_or_else(|| Value::String(v.to_owned()));
            m.insert(k.to_owned(), val);
        }
    }
    Value::Object(m)
}

/// VmRSS and VmHWM of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let get = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("{key} in /proc/{pid}/status"))
    };
    Ok((get("VmRSS:")?, get("VmHWM:")?))
}
