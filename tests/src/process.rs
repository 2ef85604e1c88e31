//! Child processes that cannot outlive the test that started them.

use std::{
    io::Read,
    ops::{Deref, DerefMut},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A spawned process that is SIGKILLed and reaped when dropped. Derefs to [`Child`].
#[derive(Debug)]
pub struct LabChild {
    child: Child,
    what: String,
}

impl LabChild {
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child,
            what: what.into(),
        }
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    /// The exit status, if it has exited (reaps it).
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.what))
    }

    /// Sends `signal` and waits up to `timeout` for the exit; SIGKILL after that.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        let pid = i32::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: the child has not been reaped (try_wait above), so the pid is still ours.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.child.kill().ok();
                return self
                    .child
                    .wait()
                    .with_context(|| format!("reaping {}", self.what));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Deref for LabChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for LabChild {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for LabChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// Runs `cmd` to completion with captured output; kills it after `timeout`.
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = LabChild::new(
        cmd.spawn().with_context(|| format!("spawning {what}"))?,
        &what,
    );
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    // Drain both pipes concurrently so a chatty child cannot block on a full pipe.
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        stderr.read_to_end(&mut buf).map(|_| buf)
    });
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let out_reader = thread::spawn(move || stdout.read_to_end(&mut out).map(|_| out));
    let status = loop {
        if let Some(status) = child.exited()? {
            break status;
        }
        if Instant::now() >= deadline {
            drop(child); // kills and reaps
            bail!("{what} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(2));
    };
    let stdout = out_reader
        .join()
        .map_err(|_| anyhow::anyhow!("stdout reader panicked"))??;
    let stderr = err_reader
        .join()
        .map_err(|_| anyhow::anyhow!("stderr reader panicked"))??;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}
