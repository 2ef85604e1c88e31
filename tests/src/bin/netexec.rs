//! netexec: the lab's test backend and client, after Kubernetes e2e's netexec (README §3).
//!
//! ```text
//! netexec serve --name POD [--tcp 8080,8081] [--udp 8080] [--bind ::] [--verbose]
//! netexec client --tcp HOST:PORT [--path /hostname] [--count N] [--timeout-ms 2000] [--interval-ms 0]
//! netexec client --tcp HOST:PORT --stream --duration-ms D [--timeout-ms 2000]
//! netexec client --udp HOST:PORT [--msg hostname] [--count N] [--connected [--reconnect HOST:PORT]] [--local-port P] ...
//! ```
//! The server answers HTTP `GET /hostname`, `/clientip`, `/localaddr`, `/echo?msg=X`,
//! `/healthz` and `/stream` (echoes every byte until EOF), and UDP datagrams `hostname`,
//! `echo X`, `clientip`. The client prints one JSON line per attempt on stdout.

// A crate root looks for modules next to itself; keep netexec's in their own folder.
#[path = "netexec/client.rs"]
mod client;
#[path = "netexec/server.rs"]
mod server;
#[path = "netexec/sys.rs"]
mod sys;
#[path = "netexec/wire.rs"]
mod wire;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    process::ExitCode,
    str::FromStr,
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// `--key value` options and bare `--switch`es.
struct Flags {
    values: HashMap<String, String>,
    switches: HashSet<String>,
}

impl Flags {
    fn parse(args: &[String], switches: &[&str], valued: &[&str]) -> Result<Self> {
        let mut flags = Self {
            values: HashMap::new(),
            switches: HashSet::new(),
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let key = arg
                .strip_prefix("--")
                .with_context(|| format!("unexpected argument {arg:?}"))?;
            if switches.contains(&key) {
                flags.switches.insert(key.to_owned());
            } else if valued.contains(&key) {
                let value = it
                    .next()
                    .with_context(|| format!("--{key} needs a value"))?;
                flags.values.insert(key.to_owned(), value.clone());
            } else {
                bail!("unknown option --{key}");
            }
        }
        Ok(flags)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    fn has(&self, key: &str) -> bool {
        self.switches.contains(key)
    }

    fn parse_or<T: FromStr>(&self, key: &str, default: T) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| anyhow::anyhow!("--{key} {v:?}: {e}")),
        }
    }

    fn ms(&self, key: &str, default: u64) -> Result<Duration> {
        self.parse_or(key, default).map(Duration::from_millis)
    }
}

fn ports(list: Option<&str>) -> Result<Vec<u16>> {
    list.map_or(Ok(Vec::new()), |l| {
        l.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| p.parse().with_context(|| format!("port {p:?}")))
            .collect()
    })
}

fn serve(args: &[String]) -> Result<()> {
    let flags = Flags::parse(args, &["verbose"], &["name", "tcp", "udp", "bind"])?;
    let name = flags.get("name").context("serve needs --name")?.to_owned();
    let bind: IpAddr = flags.parse_or("bind", IpAddr::from([0u16; 8]))?;
    let (tcp, udp) = (ports(flags.get("tcp"))?, ports(flags.get("udp"))?);
    if tcp.is_empty() && udp.is_empty() {
        bail!("serve needs --tcp and/or --udp ports");
    }
    server::serve(server::Config {
        name,
        bind,
        tcp,
        udp,
        verbose: flags.has("verbose"),
    })
}

fn client(args: &[String]) -> Result<()> {
    let flags = Flags::parse(
        args,
        &["connected", "stream"],
        &[
            "tcp",
            "udp",
            "path",
            "msg",
            "count",
            "timeout-ms",
            "interval-ms",
            "duration-ms",
            "local-port",
            "reconnect",
        ],
    )?;
    let target = |s: &str| {
        s.parse()
            .with_context(|| format!("target {s:?} (want ip:port or [ipv6]:port)"))
    };
    let mode = match (flags.get("tcp"), flags.get("udp")) {
        (Some(t), None) if flags.has("stream") => client::Mode::Stream {
            target: target(t)?,
            duration: flags.ms("duration-ms", 1000)?,
        },
        (Some(t), None) => client::Mode::Http {
            target: target(t)?,
            path: flags.get("path").unwrap_or("/hostname").into(),
        },
        (None, Some(u)) => client::Mode::Udp {
            target: target(u)?,
            msg: flags.get("msg").unwrap_or("hostname").into(),
            connected: flags.has("connected"),
            local_port: flags
                .get("local-port")
                .map(str::parse)
                .transpose()
                .context("--local-port")?,
            reconnect: flags.get("reconnect").map(target).transpose()?,
        },
        _ => bail!("client needs exactly one of --tcp HOST:PORT or --udp HOST:PORT"),
    };
    client::run(&client::Config {
        mode,
        count: flags.parse_or("count", 1)?,
        timeout: flags.ms("timeout-ms", 2000)?,
        interval: flags.ms("interval-ms", 0)?,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("client") => client(&args[1..]),
        _ => Err(anyhow::anyhow!(
            "usage: netexec serve|client ... (see the source's header)"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netexec: {e:#}");
            ExitCode::from(2)
        }
    }
}
