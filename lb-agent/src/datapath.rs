//! The kernel side: loads the embedded programs, pins maps and links under `--bpffs-dir`,
//! attaches the socket-LB programs to the cgroup, and implements [`sync::Datapath`] over the
//! pinned maps.
//!
//! Layout under the bpffs dir: `maps/<MAP>` and `links/<program>`. Pinned links keep the
//! programs attached after the agent exits; a restarted agent attaches its new links first and
//! only then removes the old ones, so there is no instant without load balancing.

use std::{
    fs,
    net::IpAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, ArrayOfMaps, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError,
        lpm_trie::Key as LpmKey,
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkOrder, PinnedLink},
        tc::TcAttachOptions,
        xdp::XdpLink,
    },
};
use lb_common::{
    AffinityKey, AffinityVal, Backend, MaglevSlot, SvcKey, SvcVal,
    ct::{Config, CtKey, CtVal, SrcRangeKey},
    maps,
};
use tracing::{debug, info};

use crate::sync::{self, Existing, TableLoc};

mod batch;
mod tables;

/// The programs object, built by build.rs from lb-ebpf.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Socket-LB programs, attached to `--cgroup-path`.
pub const SOCK_PROGRAMS: [&str; 8] = [
    "kplb_connect4",
    "kplb_connect6",
    "kplb_sendmsg4",
    "kplb_sendmsg6",
    "kplb_recvmsg4",
    "kplb_recvmsg6",
    "kplb_getpeername4",
    "kplb_getpeername6",
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DatapathError {
    let what = what.into();
    move |source| DatapathError::Io { what, source }
}

pub struct Paths {
    pub maps: PathBuf,
    pub links: PathBuf,
}

impl Paths {
    pub fn new(bpffs_dir: &Path) -> Self {
        Self {
            maps: bpffs_dir.join("maps"),
            links: bpffs_dir.join("links"),
        }
    }
}

/// North-south programs attached to `--interfaces`.
pub const XDP_PROGRAM: &str = "kplb_xdp";
pub const TC_EGRESS_PROGRAM: &str = "kplb_tc_egress";
pub const TC_INGRESS_PROGRAM: &str = "kplb_tc_ingress";

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttach {
    /// Native (driver) mode where the driver supports it, generic otherwise.
    Auto,
    Native,
    Generic,
}

/// Load-time settings (a restart with other values keeps the pinned maps as they are).
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Capacity of the conntrack LRU (`--conntrack-max`).
    pub conntrack_max: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_max: maps::DEFAULT_CT_MAX,
        }
    }
}

/// Loaded programs plus typed handles on the pinned maps.
pub struct BpfDatapath {
    _ebpf: Ebpf,
    services: HashMap<MapData, SvcKey, SvcVal>,
    backends: HashMap<MapData, u32, Backend>,
    /// `backends`' fd, for the batch syscall aya does not wrap.
    backends_fd: OwnedFd,
    tables: tables::Slabs,
    ct: HashMap<MapData, CtKey, CtVal>,
    config: Array<MapData, Config>,
    /// What `config` holds (written whole: `backends_gen` moves on after backend removals).
    config_val: Config,
    src_ranges: LpmTrie<MapData, SrcRangeKey, u8>,
    affinity: HashMap<MapData, AffinityKey, AffinityVal>,
}

fn take<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DatapathError> {
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

impl BpfDatapath {
    /// Loads the programs with every map pinned (an existing pin is reused, which is how a
    /// restarted agent keeps the previous agent's state).
    pub fn load(bpffs_dir: &Path, opts: LoadOptions) -> Result<Self, DatapathError> {
        ensure_bpffs(bpffs_dir)?;
        let paths = Paths::new(bpffs_dir);
        fs::create_dir_all(&paths.maps)
            .map_err(io(format!("creating {}", paths.maps.display())))?;
        fs::create_dir_all(&paths.links)
            .map_err(io(format!("creating {}", paths.links.display())))?;
        let pins: Vec<(&str, PathBuf)> =
            maps::ALL.iter().map(|m| (*m, paths.maps.join(m))).collect();
        Self::load_with(&pins, opts)
    }

    /// Loads the programs with private, unpinned maps (fixture tests, benchmarks).
    pub fn load_unpinned(opts: LoadOptions) -> Result<Self, DatapathError> {
        Self::load_with(&[], opts)
    }

    fn load_with(pins: &[(&str, PathBuf)], opts: LoadOptions) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        for (name, path) in pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader.map_max_entries(maps::CT, opts.conntrack_max.max(1));
        let mut ebpf = loader.load(PROGRAMS)?;
        let outer = ebpf
            .take_map(maps::MAGLEV)
            .ok_or(DatapathError::MissingMap(maps::MAGLEV))?;
        let outer_fd = match &outer {
            Map::ArrayOfMaps(data) => data.fd().as_fd().try_clone_to_owned(),
            _ => Err(std::io::Error::from(std::io::ErrorKind::InvalidInput)),
        }
        .map_err(io(format!("map {}", maps::MAGLEV)))?;
        let outer = ArrayOfMaps::try_from(outer).map_err(|source| DatapathError::Map {
            name: maps::MAGLEV,
            source,
        })?;
        let services: HashMap<MapData, SvcKey, SvcVal> = take(&mut ebpf, maps::SERVICES)?;
        let backends: HashMap<MapData, u32, Backend> = take(&mut ebpf, maps::BACKENDS)?;
        let backends_fd = backends
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(io(format!("map {}", maps::BACKENDS)))?;
        let mut tables = tables::Slabs::open(outer, outer_fd)?;
        // Tables a previous agent's frontends still read stay where they are.
        for (_, v) in services.iter().filter_map(Result::ok) {
            if v.backend_count > 0 && v.table_size > 0 {
                tables.claim(TableLoc {
                    loc: v.table_loc,
                    size: v.table_size,
                });
            }
        }
        let config: Array<MapData, Config> = take(&mut ebpf, maps::CONFIG)?;
        let config_val = config.get(&0, 0).unwrap_or_default();
        Ok(Self {
            services,
            backends,
            backends_fd,
            tables,
            ct: take(&mut ebpf, maps::CT)?,
            config,
            config_val,
            src_ranges: take(&mut ebpf, maps::SRC_RANGES)?,
            affinity: take(&mut ebpf, maps::AFFINITY)?,
            _ebpf: ebpf,
        })
    }

    /// The loaded object (tests run programs through it).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self._ebpf
    }

    /// Capacity of the (possibly adopted) conntrack map.
    pub fn conntrack_capacity(&self) -> u32 {
        self.ct.map().info().map(|i| i.max_entries()).unwrap_or(0)
    }

    /// Writes the runtime configuration; programs see it on their next packet. Its
    /// `backends_gen` is the pinned one moved on: a previous agent may have removed backends
    /// without moving it (a crash in between), so established flows check theirs again.
    pub fn set_config(&mut self, cfg: &Config) -> Result<(), DatapathError> {
        self.config_val = Config {
            backends_gen: self.config_val.backends_gen.wrapping_add(1),
            ..*cfg
        };
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), DatapathError> {
        self.config
            .set(0, self.config_val, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::CONFIG,
                source,
            })
    }

    /// All conntrack entries (tests and diagnostics).
    pub fn ct_entries(&self) -> Vec<(CtKey, CtVal)> {
        self.ct.iter().filter_map(Result::ok).collect()
    }

    /// The sessionAffinity map (tests and diagnostics).
    pub fn affinity_map(&mut self) -> &mut HashMap<MapData, AffinityKey, AffinityVal> {
        &mut self.affinity
    }

    /// Deletes conntrack entries expired at `now_ns` (CLOCK_MONOTONIC) whose other direction
    /// is expired or gone too, so a one-way flow never loses its reply translation early.
    /// Returns (entries scanned, entries deleted). Runs beside the datapath: the programs treat
    /// expired entries as misses, so a slow scan never stalls or misroutes packets.
    pub fn ct_gc(&mut self, now_ns: u64) -> (usize, usize) {
        let entries = self.ct_entries();
        let live: std::collections::HashSet<CtKey> = entries
            .iter()
            .filter(|(_, v)| v.expires > now_ns)
            .map(|(k, _)| *k)
            .collect();
        let mut deleted = 0;
        for (k, v) in &entries {
            if v.expires <= now_ns && !live.contains(&k.twin(v)) && self.ct.remove(k).is_ok() {
                deleted += 1;
            }
        }
        (entries.len(), deleted)
    }

    /// Attaches XDP (make-before-break: an existing pinned link gets the new program
    /// atomically) and tc egress (TCX; the new link is attached before the old one goes) to
    /// `iface`. Returns the XDP mode in use.
    pub fn attach_interface(
        &mut self,
        iface: &str,
        bpffs_dir: &Path,
        mode: XdpAttach,
    ) -> Result<&'static str, DatapathError> {
        let links = Paths::new(bpffs_dir).links;
        let xdp_pin = links.join(format!("xdp_{iface}"));
        let prog: &mut Xdp = program(&mut self._ebpf, XDP_PROGRAM)?;
        prog.load()
            .or_else(already_loaded)
            .map_err(|source| DatapathError::Program {
                name: XDP_PROGRAM,
                source,
            })?;
        let err = |source| DatapathError::Program {
            name: XDP_PROGRAM,
            source,
        };
        let used = if let Ok(old) = PinnedLink::from_pin(&xdp_pin) {
            // Keep the interface's link (and its mode); swap the program in atomically.
            let fd: FdLink = old
                .unpin()
                .map_err(io(format!("unpinning {}", xdp_pin.display())))?;
            let link = XdpLink::try_from(fd).map_err(|source| DatapathError::Link {
                path: xdp_pin.clone(),
                source,
            })?;
            let id = prog.attach_to_link(link).map_err(err)?;
            let fd: FdLink = prog
                .take_link(id)
                .map_err(err)?
                .try_into()
                .map_err(|source| DatapathError::Link {
                    path: xdp_pin.clone(),
                    source,
                })?;
            fd.pin(&xdp_pin).map_err(|source| DatapathError::Pin {
                path: xdp_pin.clone(),
                source,
            })?;
            "existing link"
        } else {
            let tries: &[(XdpMode, &'static str)] = match mode {
                XdpAttach::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
                XdpAttach::Native => &[(XdpMode::Driver, "native")],
                XdpAttach::Generic => &[(XdpMode::Skb, "generic")],
            };
            let mut last = None;
            let mut used = None;
            for (m, name) in tries {
                match prog.attach(iface, *m) {
                    Ok(id) => {
                        let fd: FdLink =
                            prog.take_link(id)
                                .map_err(err)?
                                .try_into()
                                .map_err(|source| DatapathError::Link {
                                    path: xdp_pin.clone(),
                                    source,
                                })?;
                        let _ = fs::remove_file(&xdp_pin);
                        fd.pin(&xdp_pin).map_err(|source| DatapathError::Pin {
                            path: xdp_pin.clone(),
                            source,
                        })?;
                        used = Some(*name);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            match used {
                Some(u) => u,
                None => return Err(err(last.unwrap_or(aya::programs::ProgramError::NotLoaded))),
            }
        };
        for (name, attach, pin) in [
            (TC_EGRESS_PROGRAM, TcAttachType::Egress, "tc_egress"),
            (TC_INGRESS_PROGRAM, TcAttachType::Ingress, "tc_ingress"),
        ] {
            self.attach_tc(iface, &links, name, attach, pin)?;
        }
        Ok(used)
    }

    fn attach_tc(
        &mut self,
        iface: &str,
        links: &Path,
        name: &'static str,
        attach: TcAttachType,
        pin: &str,
    ) -> Result<(), DatapathError> {
        let tc: &mut SchedClassifier = program(&mut self._ebpf, name)?;
        let terr = |source| DatapathError::Program { name, source };
        tc.load().or_else(already_loaded).map_err(terr)?;
        let id = tc
            .attach_with_options(
                iface,
                attach,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(terr)?;
        let tc_pin = links.join(format!("{pin}_{iface}"));
        let fd: FdLink = tc
            .take_link(id)
            .map_err(terr)?
            .try_into()
            .map_err(|source| DatapathError::Link {
                path: tc_pin.clone(),
                source,
            })?;
        replace_pinned_link(fd, &tc_pin)?;
        Ok(())
    }

    /// Replaces the loadBalancerSourceRanges entry of `group` for `net/prefix`.
    pub fn set_src_range(
        &mut self,
        group: u32,
        net: IpAddr,
        prefix: u8,
        present: bool,
    ) -> Result<(), DatapathError> {
        let (key, plen) = src_range_key(group, net, prefix);
        let k = LpmKey::new(plen, key);
        let r = if present {
            self.src_ranges.insert(&k, 1, 0)
        } else {
            self.src_ranges.remove(&k)
        };
        if present {
            r.map_err(|source| DatapathError::Map {
                name: maps::SRC_RANGES,
                source,
            })
        } else {
            ignore_missing(r, maps::SRC_RANGES)
        }
    }

    /// Attaches the socket-LB programs to `cgroup`, replacing links a previous agent pinned.
    pub fn attach_cgroup(&mut self, cgroup: &Path, bpffs_dir: &Path) -> Result<(), DatapathError> {
        let links = Paths::new(bpffs_dir).links;
        let cg =
            fs::File::open(cgroup).map_err(io(format!("opening cgroup {}", cgroup.display())))?;
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = self
                ._ebpf
                .program_mut(name)
                .ok_or(DatapathError::Program {
                    name,
                    source: aya::programs::ProgramError::NotLoaded,
                })?
                .try_into()
                .map_err(|source| DatapathError::Program { name, source })?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
            let id = prog
                .attach(cg.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| DatapathError::Program { name, source })?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(|source| DatapathError::Program { name, source })?
                .try_into()
                .map_err(|source| DatapathError::Link {
                    path: links.join(name),
                    source,
                })?;
            replace_pinned_link(link, &links.join(name))?;
            debug!(program = name, cgroup = %cgroup.display(), "attached");
        }
        Ok(())
    }

    /// What a previous agent left in the pinned maps.
    pub fn existing(&self) -> Existing {
        Existing {
            backends: self.backends.iter().filter_map(Result::ok).collect(),
            frontends: self.services.iter().filter_map(Result::ok).collect(),
        }
    }

    /// The table at `loc` as the programs see it.
    pub fn table_at(&mut self, loc: TableLoc) -> Result<Vec<MaglevSlot>, DatapathError> {
        self.tables.read(loc)
    }

    /// Returns table space retired a while ago to the free lists (after an RCU grace period).
    /// For idle moments: it blocks for the grace period.
    pub fn reclaim_idle(&mut self, now: Instant) -> Result<(), DatapathError> {
        let r = self.tables.reclaim_idle(now);
        self.delete_released_backends()?;
        r
    }

    /// Waits for a grace period now and finishes everything retired: table space freed,
    /// backends deleted (tests that remove a backend and look at the next packet).
    pub fn settle(&mut self) -> Result<(), DatapathError> {
        let r = self.tables.settle();
        self.delete_released_backends()?;
        r
    }

    /// Deletes the backends whose grace period has passed, then moves `backends_gen` on so
    /// established flows check that theirs still exists.
    fn delete_released_backends(&mut self) -> Result<(), DatapathError> {
        let ids = self.tables.take_released_backends();
        if ids.is_empty() {
            return Ok(());
        }
        for id in &ids {
            ignore_missing(self.backends.remove(id), maps::BACKENDS)?;
        }
        debug!(backends = ids.len(), "retired backends deleted");
        self.config_val.backends_gen = self.config_val.backends_gen.wrapping_add(1);
        self.write_config()
    }

    /// Maglev storage: (slabs, slots in them, slots in use or waiting for reuse).
    pub fn table_usage(&self) -> (usize, u64, u64) {
        self.tables.usage()
    }
}

/// LPM key for `net/prefix` of `group`: the group id is always matched in full.
pub fn src_range_key(group: u32, net: IpAddr, prefix: u8) -> (SrcRangeKey, u32) {
    let extra = if net.is_ipv4() { 96 } else { 0 };
    (
        SrcRangeKey {
            group_be: group.to_be(),
            addr: lb_common::addr::from_ip(net),
        },
        32 + extra + u32::from(prefix),
    )
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::Program {
            name,
            source: aya::programs::ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn already_loaded(e: aya::programs::ProgramError) -> Result<(), aya::programs::ProgramError> {
    match e {
        aya::programs::ProgramError::AlreadyLoaded => Ok(()),
        e => Err(e),
    }
}

/// Make-before-break: the new link is attached before the old pin (and so the old link) goes.
fn replace_pinned_link(link: FdLink, path: &Path) -> Result<(), DatapathError> {
    // bpffs refuses names containing '.'.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!("_new{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let pinned = link.pin(&tmp).map_err(|source| DatapathError::Pin {
        path: tmp.clone(),
        source,
    })?;
    if path.exists() {
        // Dropping the unpinned old link detaches it.
        match PinnedLink::from_pin(path) {
            Ok(old) => drop(
                old.unpin()
                    .map_err(io(format!("unpinning {}", path.display())))?,
            ),
            Err(_) => fs::remove_file(path).map_err(io(format!("removing {}", path.display())))?,
        }
    }
    let link: FdLink = pinned
        .unpin()
        .map_err(io(format!("unpinning {}", tmp.display())))?;
    link.pin(path).map_err(|source| DatapathError::Pin {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// bpffs must be mounted where the pins go (a fresh machine may not have /sys/fs/bpf mounted).
fn ensure_bpffs(dir: &Path) -> Result<(), DatapathError> {
    if crate::mountns::on_bpffs(dir) {
        return Ok(());
    }
    Err(DatapathError::Io {
        what: format!(
            "{} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        ),
        source: std::io::Error::from(std::io::ErrorKind::Unsupported),
    })
}

impl sync::Datapath for BpfDatapath {
    type Error = DatapathError;

    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DatapathError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::BACKENDS,
                source,
            })
    }

    /// One syscall for all of them (a full sync writes ~100k at 10k services).
    fn set_backends(&mut self, backends: &[(u32, Backend)]) -> Vec<Result<(), DatapathError>> {
        let ids: Vec<u32> = backends.iter().map(|(id, _)| *id).collect();
        let values: Vec<Backend> = backends.iter().map(|(_, b)| *b).collect();
        batch::update(self.backends_fd.as_fd(), &ids, &values)
            .into_iter()
            .zip(backends)
            .map(|(r, (id, b))| match r {
                Ok(()) => Ok(()),
                Err(batch::Failed::Unsupported) => self.set_backend(*id, b),
                Err(batch::Failed::Os(e)) => Err(io(format!("map {} update", maps::BACKENDS))(e)),
            })
            .collect()
    }

    /// Deleted after an RCU grace period (a program that read a table naming it just before
    /// its frontend was repointed may still look it up), with the retired table space.
    fn del_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        self.tables.retire_backend(id);
        Ok(())
    }

    fn write_table(&mut self, table: &[MaglevSlot]) -> Result<TableLoc, DatapathError> {
        self.write_tables(&[table]).remove(0)
    }

    /// Space for all of them is added at once (one grace period for any new slabs), and each
    /// slab is mapped once for the lot.
    fn write_tables(&mut self, tables: &[&[MaglevSlot]]) -> Vec<Result<TableLoc, DatapathError>> {
        let size = |t: &[MaglevSlot]| u32::try_from(t.len()).unwrap_or(u32::MAX);
        let sizes: Vec<u32> = tables.iter().map(|t| size(t)).collect();
        if let Err(e) = self.tables.reserve(&sizes) {
            debug!("reserving Maglev table space: {e}"); // each allocation below tries again
        }
        let mut out: Vec<Result<TableLoc, DatapathError>> =
            sizes.iter().map(|&s| self.tables.alloc(s)).collect();
        let items: Vec<(TableLoc, &[MaglevSlot])> = out
            .iter()
            .zip(tables)
            .filter_map(|(r, t)| r.as_ref().ok().map(|loc| (*loc, *t)))
            .collect();
        let written = self.tables.write_many(&items);
        let mut written = written.into_iter();
        for r in &mut out {
            let Ok(loc) = r else { continue };
            if let Some(Err(e)) = written.next() {
                self.tables.retire(*loc);
                *r = Err(e);
            }
        }
        out
    }

    fn rewrite_table(&mut self, loc: TableLoc, table: &[MaglevSlot]) -> Result<(), DatapathError> {
        self.tables.write(loc, table)
    }

    fn retire_table(&mut self, loc: TableLoc) {
        self.tables.retire(loc);
    }

    fn set_frontend(&mut self, key: &SvcKey, val: &SvcVal) -> Result<(), DatapathError> {
        self.services
            .insert(key, val, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::SERVICES,
                source,
            })
    }

    fn set_src_range(
        &mut self,
        group: u32,
        net: IpAddr,
        prefix: u8,
        present: bool,
    ) -> Result<(), DatapathError> {
        BpfDatapath::set_src_range(self, group, net, prefix, present)
    }

    fn del_frontend(&mut self, key: &SvcKey) -> Result<(), DatapathError> {
        ignore_missing(self.services.remove(key), maps::SERVICES)
    }

    /// One pass over the affinity map (bounded by its capacity) for all groups; entries that
    /// vanish meanwhile (LRU eviction, a concurrent update) are fine to miss.
    fn purge_affinity_groups(&mut self, purges: &[(u32, Vec<u32>)]) -> Result<(), DatapathError> {
        let purges: std::collections::HashMap<u32, &[u32]> =
            purges.iter().map(|(g, k)| (*g, k.as_slice())).collect();
        let stale: Vec<AffinityKey> = self
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                purges
                    .get(&k.group_id)
                    .is_some_and(|keep| !keep.contains(&v.backend_id))
            })
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            ignore_missing(self.affinity.remove(k), maps::AFFINITY)?;
        }
        if !stale.is_empty() {
            debug!(purged = stale.len(), "affinity pins purged");
        }
        Ok(())
    }
}

fn ignore_missing(r: Result<(), MapError>, name: &'static str) -> Result<(), DatapathError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(DatapathError::Map { name, source }),
    }
}

/// `lb-agent cleanup`: removes every pin (detaching the programs) and the directory.
pub fn cleanup(bpffs_dir: &Path) -> Result<(), DatapathError> {
    if !bpffs_dir.exists() {
        info!(dir = %bpffs_dir.display(), "nothing to clean up");
        return Ok(());
    }
    fs::remove_dir_all(bpffs_dir).map_err(io(format!("removing {}", bpffs_dir.display())))?;
    info!(dir = %bpffs_dir.display(), "removed pinned programs, links and maps");
    Ok(())
}
