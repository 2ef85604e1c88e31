//! The kernel side: loads the embedded programs, pins maps and links under `--bpffs-dir`,
//! attaches the socket-LB programs to the cgroup, and implements [`sync::Datapath`] over the
//! pinned maps.
//!
//! Layout under the bpffs dir: `maps/<MAP>` and `links/<program>`. Pinned links keep the
//! programs attached after the agent exits; a restarted agent attaches its new links first and
//! only then removes the old ones, so there is no instant without load balancing.

use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, HashOfMaps, IterableMap as _, Map, MapData, MapError},
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
use lb_common::{Backend, MaglevSlot, SvcKey, SvcVal, maps};
use tracing::{debug, info};

use crate::sync::{self, Existing};

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

/// Loaded programs plus typed handles on the pinned maps.
pub struct BpfDatapath {
    _ebpf: Ebpf,
    services: HashMap<MapData, SvcKey, SvcVal>,
    backends: HashMap<MapData, u32, Backend>,
    maglev: HashOfMaps<MapData, u32, Array<MapData, MaglevSlot>>,
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
    pub fn load(bpffs_dir: &Path) -> Result<Self, DatapathError> {
        ensure_bpffs(bpffs_dir)?;
        let paths = Paths::new(bpffs_dir);
        fs::create_dir_all(&paths.maps)
            .map_err(io(format!("creating {}", paths.maps.display())))?;
        fs::create_dir_all(&paths.links)
            .map_err(io(format!("creating {}", paths.links.display())))?;
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&str, PathBuf)> =
            maps::ALL.iter().map(|m| (*m, paths.maps.join(m))).collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(PROGRAMS)?;
        Ok(Self {
            services: take(&mut ebpf, maps::SERVICES)?,
            backends: take(&mut ebpf, maps::BACKENDS)?,
            maglev: take(&mut ebpf, maps::MAGLEV)?,
            _ebpf: ebpf,
        })
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
            groups: self.maglev.keys().filter_map(Result::ok).collect(),
        }
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

    fn del_backend(&mut self, id: u32) -> Result<(), DatapathError> {
        ignore_missing(self.backends.remove(&id), maps::BACKENDS)
    }

    fn set_table(&mut self, id: u32, table: &[MaglevSlot]) -> Result<(), DatapathError> {
        let inner = new_table(table)?;
        // One update swaps the whole table: readers see the old or the new one.
        self.maglev
            .insert(id, &inner, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::MAGLEV,
                source,
            })
    }

    fn del_table(&mut self, id: u32) -> Result<(), DatapathError> {
        ignore_missing(self.maglev.remove(&id), maps::MAGLEV)
    }

    fn set_frontend(&mut self, key: &SvcKey, val: &SvcVal) -> Result<(), DatapathError> {
        self.services
            .insert(key, val, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::SERVICES,
                source,
            })
    }

    fn del_frontend(&mut self, key: &SvcKey) -> Result<(), DatapathError> {
        ignore_missing(self.services.remove(key), maps::SERVICES)
    }
}

fn ignore_missing(r: Result<(), MapError>, name: &'static str) -> Result<(), DatapathError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(DatapathError::Map { name, source }),
    }
}

/// A new, unreachable inner table filled through a shared mapping (one copy, not one syscall
/// per slot).
fn new_table(table: &[MaglevSlot]) -> Result<Array<MapData, MaglevSlot>, DatapathError> {
    let len = u32::try_from(table.len()).map_err(|_| DatapathError::Io {
        what: "table too large".into(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let inner =
        Array::<MapData, MaglevSlot>::create(len, maps::MAGLEV_TABLE_FLAGS).map_err(|source| {
            DatapathError::Map {
                name: maps::MAGLEV,
                source,
            }
        })?;
    let bytes = std::mem::size_of_val(table);
    let fd = inner.map().fd().as_fd().as_raw_fd();
    // SAFETY: mapping `bytes` (<= the array's mmapable size: elements are exactly 8 bytes) of a
    // freshly created BPF_F_MMAPABLE array that nothing else references yet.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(io("mmap of a maglev table")(std::io::Error::last_os_error()));
        }
        std::ptr::copy_nonoverlapping(table.as_ptr().cast::<u8>(), p.cast::<u8>(), bytes);
        libc::munmap(p, bytes);
    }
    Ok(inner)
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
