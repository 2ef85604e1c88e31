//! The bench's lab: nodes with 10 netexec backend pods each (pinned to CPU 0) and a client pod,
//! plus helpers to run tools inside a node.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_tests::{
    Agent, Lab, lab::netexec_bin, poll_until, process::LabChild, process::output_with_timeout,
};
use serde_json::Value;

use crate::services::{ENDPOINTS, TARGET_PORT, pod_ip};

pub const NODE: &str = "node1";
/// Backends run on this CPU, the client (and packet generators) on the other.
pub const BACKEND_CPU: usize = 0;
pub const CLIENT_CPU: usize = 1;

pub fn node_name(node: usize) -> String {
    format!("node{node}")
}

fn client_pod(node: usize) -> String {
    format!("n{node}-client")
}

fn client_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, node as u8, 100)
}

fn backend_pod(node: usize, j: usize) -> String {
    format!("n{node}-be{j}")
}

/// What one `kplb-connclient` run does.
pub struct Requests {
    pub count: usize,
    pub warmup: usize,
    /// Stop at the first failed request (a check that must all succeed).
    pub fail_fast: bool,
}

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

    /// `nodes` nodes, each with its own 10 netexec backends (the measured Service's endpoints
    /// on that node) and a client pod.
    pub fn with_pods(nodes: usize) -> Result<Self> {
        let mut lab = Lab::new(nodes).context("creating the lab")?;
        for node in 1..=nodes {
            for j in 0..ENDPOINTS {
                let ip = pod_ip(node, j).to_string();
                lab.add_pod(node, &backend_pod(node, j), &ip, None)?;
            }
            lab.add_pod(node, &client_pod(node), &client_ip(node).to_string(), None)?;
        }
        let netexec = netexec_bin()?;
        let netexec = netexec.to_str().context("netexec path is not UTF-8")?;
        let (cpu, port) = (BACKEND_CPU.to_string(), TARGET_PORT.to_string());
        let mut backends = Vec::new();
        for node in 1..=nodes {
            for j in 0..ENDPOINTS {
                let pod = backend_pod(node, j);
                backends.push(lab.spawn(
                    &pod,
                    &[
                        "taskset", "-c", &cpu, netexec, "serve", "--name", &pod, "--tcp", &port,
                    ],
                )?);
            }
        }
        for node in 1..=nodes {
            wait_for_backends(&lab, node)?;
        }
        Ok(Self {
            _backends: backends,
            lab,
        })
    }

    /// Runs `argv` in node `node`'s netns (and cgroup) with a time limit.
    pub fn node_run(&self, node: &str, argv: &[&str], limit: Duration) -> Result<Output> {
        output_with_timeout(self.lab.command(node, argv)?, limit)
    }

    /// Like [`BenchLab::node_run`], failing on a non-zero exit.
    pub fn node_ok(&self, node: &str, argv: &[&str], limit: Duration) -> Result<String> {
        let out = self.node_run(node, argv, limit)?;
        if !out.status.success() {
            bail!(
                "{argv:?} in {node}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether `argv` runs successfully in node `node`; the error text when not.
    pub fn node_probe(&self, node: &str, argv: &[&str]) -> std::result::Result<(), String> {
        match self.node_run(node, argv, Duration::from_secs(20)) {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!(
                "`{}` failed: {}",
                argv.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("`{}`: {e:#}", argv.join(" "))),
        }
    }

    /// One `kplb-connclient` run in node `node`'s client pod (its netns and cgroup).
    pub fn client(
        &self,
        node: usize,
        bin: &Path,
        targets: &[SocketAddr],
        req: &Requests,
    ) -> Result<Value> {
        let targets: Vec<String> = targets.iter().map(ToString::to_string).collect();
        let (targets, count, warmup, cpu) = (
            targets.join(","),
            req.count.to_string(),
            req.warmup.to_string(),
            CLIENT_CPU.to_string(),
        );
        let mut argv = vec![
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
        if req.fail_fast {
            argv.extend(["--max-errors", "1", "--timeout-ms", "1000"]);
        }
        let cmd = self.lab.command(&client_pod(node), &argv)?;
        let out = output_with_timeout(cmd, Duration::from_secs(600))?;
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

fn wait_for_backends(lab: &Lab, node: usize) -> Result<()> {
    poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        "netexec backends",
        || {
            lab.in_netns(&node_name(node), || {
                Ok((0..ENDPOINTS).all(|j| {
                    let addr = SocketAddr::new(pod_ip(node, j).into(), TARGET_PORT);
                    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                }))
            })
        },
    )
}

/// A running agent on a lab node and when it was started.
pub struct RunningAgent {
    pub agent: Agent,
    pub started: Instant,
}

impl RunningAgent {
    pub fn start(lab: &Lab, node: usize, manifests: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_bin(lab, node, &Agent::bin()?, manifests, extra)
    }

    /// [`RunningAgent::start`] with another agent binary (builds compared side by side).
    pub fn start_bin(
        lab: &Lab,
        node: usize,
        bin: &Path,
        manifests: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let started = Instant::now();
        let agent = Agent::start_bin(lab, node, bin, manifests, extra)?;
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

/// Keeps the calling thread on `cpu`.
pub fn pin_thread(cpu: usize) {
    // SAFETY: as in kplb-connclient: an initialised set for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
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
