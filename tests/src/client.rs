//! Driving `netexec client` and reading its JSON lines (one per attempt).

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One `netexec client` invocation: what to send, how often, with which options.
#[derive(Debug, Clone)]
pub struct Request {
    args: Vec<String>,
    count: u32,
    timeout_ms: u64,
    interval_ms: u64,
    duration_ms: u64,
    stream: bool,
    /// Connected UDP connects again midway: twice the attempts.
    reconnects: bool,
}

impl Request {
    /// HTTP `GET path` over a new TCP connection per attempt; `target` is `ip:port` or
    /// `[ipv6]:port`.
    pub fn http(target: &str, path: &str) -> Self {
        Self::new(["--tcp", target, "--path", path])
    }

    /// One datagram per attempt, from a new socket unless [`Request::connected`].
    pub fn udp(target: &str, msg: &str) -> Self {
        Self::new(["--udp", target, "--msg", msg])
    }

    /// One long TCP connection to `GET /stream`, echoing a counter every 10 ms.
    pub fn stream(target: &str, duration: Duration) -> Self {
        let mut r = Self::new(["--tcp", target, "--stream"]);
        r.duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        r.stream = true;
        r
    }

    fn new<const N: usize>(args: [&str; N]) -> Self {
        Self {
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            count: 1,
            timeout_ms: 2000,
            interval_ms: 0,
            duration_ms: 0,
            stream: false,
            reconnects: false,
        }
    }

    pub fn count(mut self, n: u32) -> Self {
        self.count = n;
        self
    }

    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = ms;
        self
    }

    pub fn interval_ms(mut self, ms: u64) -> Self {
        self.interval_ms = ms;
        self
    }

    /// UDP: one `connect()`ed socket for all attempts.
    pub fn connected(mut self) -> Self {
        self.args.push("--connected".into());
        self
    }

    /// Connected UDP: after the attempts, `connect()` the same socket to `target` and make as
    /// many again (twice the attempts in all).
    pub fn reconnect(mut self, target: &str) -> Self {
        self.args.extend(["--reconnect".into(), target.to_owned()]);
        self.reconnects = true;
        self
    }

    /// UDP: bind this source port (fixed 5-tuples).
    pub fn local_port(mut self, port: u16) -> Self {
        self.args.extend(["--local-port".into(), port.to_string()]);
        self
    }

    /// The arguments after `netexec client`.
    pub fn args(&self) -> Vec<String> {
        let mut args = self.args.clone();
        args.extend(["--count".into(), self.count.to_string()]);
        args.extend(["--timeout-ms".into(), self.timeout_ms.to_string()]);
        args.extend(["--interval-ms".into(), self.interval_ms.to_string()]);
        if self.duration_ms > 0 {
            args.extend(["--duration-ms".into(), self.duration_ms.to_string()]);
        }
        args
    }

    /// How many JSON lines the client prints: one per attempt, one for a stream.
    pub fn attempts(&self) -> u32 {
        match (self.stream, self.reconnects) {
            (true, _) => 1,
            (false, true) => self.count * 2,
            (false, false) => self.count,
        }
    }

    /// A bound on how long the client can take; the runner kills it after that.
    pub fn worst_case(&self) -> Duration {
        let per = self.timeout_ms.saturating_mul(3) + self.interval_ms; // connect+write+read
        Duration::from_millis(per * u64::from(self.attempts()) + self.duration_ms + 10_000)
    }
}

/// One attempt as printed by `netexec client`.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub ok: bool,
    pub body: Option<String>,
    /// TCP: getpeername() of the client's socket.
    pub peer: Option<String>,
    /// UDP: the reply's source address as returned by recvfrom().
    pub from: Option<String>,
    /// getsockname() of the client's socket.
    pub local: Option<String>,
    /// errno name (`ECONNREFUSED`), `timeout`, or `HTTP <code>`.
    pub error: Option<String>,
    pub ms: f64,
    /// When the attempt ended, in ms since the client process started.
    pub at: f64,
    /// Stream mode: bytes echoed back and verified.
    pub bytes: Option<u64>,
}

impl Attempt {
    pub fn parse(line: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("bad client line {line:?}"))?;
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok(Self {
            ok: v
                .get("ok")
                .and_then(Value::as_bool)
                .with_context(|| format!("no ok in {line:?}"))?,
            body: s("body"),
            peer: s("peer"),
            from: s("from"),
            local: s("local"),
            error: s("error"),
            ms: v.get("ms").and_then(Value::as_f64).unwrap_or(0.0),
            at: v.get("at").and_then(Value::as_f64).unwrap_or(0.0),
            bytes: v.get("bytes").and_then(Value::as_u64),
        })
    }

    /// The body when ok, `error:<name>` otherwise: handy for counting outcomes.
    pub fn outcome(&self) -> String {
        match (&self.body, &self.error) {
            (Some(body), _) if self.ok => body.clone(),
            (_, Some(err)) => format!("error:{err}"),
            _ => "error:?".into(),
        }
    }
}

/// Parses the client's stdout; every non-empty line must be an attempt.
pub fn parse_output(stdout: &str, expected: u32) -> Result<Vec<Attempt>> {
    let attempts: Vec<Attempt> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(Attempt::parse)
        .collect::<Result<_>>()?;
    if attempts.len() != expected as usize {
        bail!(
            "expected {expected} attempts, got {}:\n{stdout}",
            attempts.len()
        );
    }
    Ok(attempts)
}

/// How often each outcome occurred (body, or `error:<name>`).
pub fn tally(attempts: &[Attempt]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in attempts {
        *counts.entry(a.outcome()).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_success_and_failure_lines() {
        let ok = Attempt::parse(
            r#"{"ok":true,"body":"pod-a","peer":"1.2.3.4:80","local":"10.0.0.1:5","ms":1.5}"#,
        )
        .unwrap();
        assert_eq!(ok.outcome(), "pod-a");
        assert_eq!(ok.peer.as_deref(), Some("1.2.3.4:80"));
        let err = Attempt::parse(r#"{"ok":false,"error":"ECONNREFUSED","ms":0.2}"#).unwrap();
        assert_eq!(err.outcome(), "error:ECONNREFUSED");
        assert_eq!(tally(&[ok.clone(), ok, err])["pod-a"], 2);
    }

    #[test]
    fn stream_request_args() {
        let args = Request::stream("1.2.3.4:80", Duration::from_millis(500)).args();
        assert!(args.windows(2).any(|w| w == ["--duration-ms", "500"]));
    }
}
