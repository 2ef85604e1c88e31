//! Running the real `lb-agent` on a lab node with the README §1 command line.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{ExitStatus, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    lab::{Lab, Node},
    netns,
    poll::poll_until,
    process::{LabChild, output_with_timeout},
};

/// An agent process inside a node's netns and cgroup.
///
/// Dropping a still-running agent SIGKILLs it and runs `lb-agent cleanup` for the node. After
/// an explicit [`Agent::stop`] or [`Agent::kill9`] the pinned state is left alone (a restarted
/// agent adopts it); the lab removes it when it is dropped.
#[derive(Debug)]
pub struct Agent {
    node: Node,
    bin: PathBuf,
    log: PathBuf,
    child: Option<LabChild>,
}

impl Agent {
    /// The agent binary: `$KPLB_AGENT_BIN`, else `lb-agent` in the running test's target dir,
    /// else `<workspace>/target/debug/lb-agent`.
    pub fn bin() -> Result<PathBuf> {
        if let Some(p) = std::env::var_os("KPLB_AGENT_BIN") {
            return Ok(PathBuf::from(p));
        }
        let mut candidates = Vec::new();
        if let Ok(exe) = std::env::current_exe() {
            candidates.extend(exe.ancestors().skip(1).take(2).map(|d| d.join("lb-agent")));
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        candidates.push(workspace.join("target/debug/lb-agent"));
        candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
            format!(
                "lb-agent binary not found (looked at {candidates:?}); build it with \
                 `cargo build -p lb-agent` (same CARGO_TARGET_DIR as the tests) or set KPLB_AGENT_BIN"
            )
        })
    }

    /// The README §1 flags for `node`.
    pub fn args(node: &Node, manifests: &Path) -> Vec<String> {
        [
            ("--node-name", node.name.clone()),
            ("--manifests", manifests.display().to_string()),
            ("--interfaces", "eth0".to_owned()),
            ("--cgroup-path", node.cgroup.display().to_string()),
            ("--bpffs-dir", node.bpffs.display().to_string()),
            ("--node-ips", node.ipv4.to_string()),
            ("--healthz-bind", "127.0.0.1:10256".to_owned()),
            ("--metrics-bind", "127.0.0.1:10249".to_owned()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value])
        .collect()
    }

    /// Starts the agent on node `node` (1-based) reading `manifests`, with `extra_args`
    /// appended. Output goes to a log file in the lab's scratch dir.
    pub fn start(lab: &Lab, node: usize, manifests: &Path, extra_args: &[&str]) -> Result<Self> {
        Self::start_bin(lab, node, &Self::bin()?, manifests, extra_args)
    }

    /// [`Agent::start`] with another agent binary (benchmarks compare builds side by side).
    pub fn start_bin(
        lab: &Lab,
        node: usize,
        bin: &Path,
        manifests: &Path,
        extra_args: &[&str],
    ) -> Result<Self> {
        let node = lab.node(node)?.clone();
        let bin = bin.to_path_buf();
        let mut argv = vec![bin.display().to_string()];
        argv.extend(Self::args(&node, manifests));
        argv.extend(extra_args.iter().map(|s| (*s).to_owned()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();

        let log = unique_log(lab.tmp_dir(), &node.name)?;
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("dup log fd")?;
        let mut cmd = netns::command(&node.netns, Some(&node.cgroup), &argv)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // Default to informative logs; a caller's RUST_LOG wins.
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let child = LabChild::new(child, format!("lb-agent on {}", node.name));
        Ok(Self {
            node,
            bin,
            log,
            child: Some(child),
        })
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the agent printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits for the log line announcing the first full sync; fails early if the agent exits.
    pub fn wait_synced(&mut self, timeout: Duration) -> Result<()> {
        let what = format!("lb-agent on {} to log `synced`", self.node.name);
        let res = poll_until(timeout, Duration::from_millis(20), &what, || {
            if let Some(status) = self.exited()? {
                bail!(
                    "lb-agent on {} exited ({status}) before syncing",
                    self.node.name
                );
            }
            Ok(self.log().lines().any(|l| l.contains("synced")))
        });
        res.with_context(|| format!("agent log ({}):\n{}", self.log.display(), self.log_tail(40)))
    }

    /// The exit status once the process has exited; `None` while it runs (or if never started).
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(child) => child.exited(),
            None => Ok(None),
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && matches!(self.exited(), Ok(None))
    }

    /// SIGTERM and wait (SIGKILL after 10 s). Pinned state stays for a restarted agent.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        child.signal_and_wait(libc::SIGTERM, Duration::from_secs(10))
    }

    /// SIGKILL (a crash). Pinned state stays.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        child.signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
    }

    /// `lb-agent cleanup --bpffs-dir .. --interfaces eth0 --cgroup-path ..` in the node's netns.
    pub fn cleanup(&self) -> Result<Output> {
        let args = [
            self.bin.display().to_string(),
            "cleanup".into(),
            "--bpffs-dir".into(),
            self.node.bpffs.display().to_string(),
            "--interfaces".into(),
            "eth0".into(),
            "--cgroup-path".into(),
            self.node.cgroup.display().to_string(),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let cmd = netns::command(&self.node.netns, Some(&self.node.cgroup), &argv)?;
        output_with_timeout(cmd, Duration::from_secs(30))
    }
}

fn unique_log(dir: &Path, node: &str) -> Result<PathBuf> {
    (0..1000)
        .map(|i| dir.join(format!("agent-{node}-{i}.log")))
        .find(|p| !p.exists())
        .context("no free agent log name")
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- lb-agent on {} ({}), last lines:\n{}",
                self.node.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
        let running = self.is_running();
        if let Some(mut child) = self.child.take() {
            child
                .signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
                .ok();
        }
        // Normally runs while the node still exists (agents are declared after their lab, so
        // dropped first). If not, it fails harmlessly: the lab has removed everything.
        if running {
            self.cleanup().ok();
        }
    }
}
