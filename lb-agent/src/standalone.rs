//! Standalone source: Service and EndpointSlice YAML files in a directory, re-read on change.
//! Node documents are read too, so a lab can give its nodes zones (or mark one as deleting).
//!
//! Only changed files are re-parsed (by size, mtime and inode), and a poll reports which
//! objects they define or defined; their content goes to the agent's view once and is not
//! kept here. A file that no longer parses keeps its last good content (an editor's
//! half-written save must not delete services); the error is logged with the file name.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::{
    Metadata,
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;

use crate::{
    changes::Changed,
    objects::{self, ObjKey},
    view::ClusterView,
};

#[derive(Clone, Debug, PartialEq, Eq)]
struct Signature {
    len: u64,
    mtime: Option<SystemTime>,
    ino: u64,
}

#[derive(Clone, Debug, Default)]
pub struct FileObjects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

/// What a file defines: only the keys of its Services and EndpointSlices (their content lives
/// in the agent's view once applied, so it is not kept twice), and its Node documents.
#[derive(Debug)]
struct FileState {
    sig: Signature,
    path: Arc<Path>,
    services: Vec<ObjKey>,
    slices: Vec<ObjKey>,
    nodes: Vec<Node>,
}

/// Which files define each object. When several do, the last file in path order wins (and
/// within a file the last document), as if the directory were read as one stream in order.
#[derive(Debug, Default)]
struct ByKey {
    /// Sorted by path.
    files: HashMap<ObjKey, Vec<Arc<Path>>>,
}

impl ByKey {
    fn winner(&self, key: &ObjKey) -> Option<&Arc<Path>> {
        self.files.get(key).and_then(|f| f.last())
    }

    fn remove_file(&mut self, path: &Path, keys: &[ObjKey], changed: &mut BTreeSet<ObjKey>) {
        for key in keys {
            if let Some(files) = self.files.get_mut(key) {
                files.retain(|p| **p != *path);
                if files.is_empty() {
                    self.files.remove(key);
                }
            }
            changed.insert(key.clone());
        }
    }

    fn add_file(&mut self, path: &Arc<Path>, keys: &[ObjKey], changed: &mut BTreeSet<ObjKey>) {
        for key in keys {
            let files = self.files.entry(key.clone()).or_default();
            if let Err(at) = files.binary_search(path) {
                files.insert(at, path.clone());
            }
            changed.insert(key.clone());
        }
    }
}

/// The keys of `objs` (nameless ones reported and left out), and the last object of each key.
fn keyed<K: Metadata<Ty = ObjectMeta>>(
    path: &Path,
    objs: Vec<K>,
    problems: &mut Vec<Problem>,
) -> (Vec<ObjKey>, HashMap<ObjKey, K>) {
    let mut keys = Vec::new();
    let mut by_key = HashMap::new();
    for o in objs {
        let Some(key) = objects::object_key(o.metadata()) else {
            problems.push(format!(
                "{}: an object without metadata.name; skipped",
                path.display()
            ));
            continue;
        };
        if by_key.insert(key.clone(), o).is_none() {
            keys.push(key);
        }
    }
    (keys, by_key)
}

/// The manifest directory: which file defines which object, and the objects read since the
/// view last took them.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    services: ByKey,
    slices: ByKey,
    /// Changed objects (`None`: gone) waiting for [`ManifestDir::update_view`].
    pending_services: HashMap<ObjKey, Option<Service>>,
    pending_slices: HashMap<ObjKey, Option<EndpointSlice>>,
}

/// A problem found while reading; the caller logs it.
pub type Problem = String;

/// A file's Services and EndpointSlices by key, parsed during one poll.
#[derive(Default)]
struct Parsed {
    services: HashMap<ObjKey, Service>,
    slices: HashMap<ObjKey, EndpointSlice>,
}

impl ManifestDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            services: ByKey::default(),
            slices: ByKey::default(),
            pending_services: HashMap::new(),
            pending_slices: HashMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads changed, new and removed files. Returns the objects they define or defined;
    /// their new content waits for [`ManifestDir::update_view`].
    pub fn poll(&mut self, problems: &mut Vec<Problem>) -> std::io::Result<Changed> {
        let mut seen = BTreeSet::new();
        let mut changed = Changed::default();
        let mut parsed: HashMap<PathBuf, Parsed> = HashMap::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if !is_manifest(&path) {
                continue;
            }
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            seen.insert(path.clone());
            let sig = signature(&meta);
            if self.files.get(&path).is_some_and(|f| f.sig == sig) {
                continue;
            }
            match read_file(&path, problems) {
                Ok(objects) => {
                    let (state, objects) = file_state(&path, sig, objects, problems);
                    self.replace_file(&path, Some(state), &mut changed);
                    parsed.insert(path, objects);
                }
                Err(e) => {
                    let keep = if self.files.contains_key(&path) {
                        "keeping its last good content"
                    } else {
                        "skipped"
                    };
                    problems.push(format!("{}: {e}; {keep}", path.display()));
                    // Remember the signature so an unchanged broken file is not re-reported.
                    match self.files.get_mut(&path) {
                        Some(f) => f.sig = sig,
                        None => {
                            let (state, _) =
                                file_state(&path, sig, FileObjects::default(), problems);
                            self.files.insert(path, state);
                        }
                    }
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            self.replace_file(&path, None, &mut changed);
        }
        self.take_winners(&changed, &mut parsed, problems);
        Ok(changed)
    }

    /// Each changed key's current object (from its winning file) into the pending maps.
    fn take_winners(
        &mut self,
        changed: &Changed,
        parsed: &mut HashMap<PathBuf, Parsed>,
        problems: &mut Vec<Problem>,
    ) {
        for key in &changed.services {
            let obj =
                self.services.winner(key).cloned().and_then(|p| {
                    reparsed(parsed, &p, problems).and_then(|f| f.services.remove(key))
                });
            self.pending_services.insert(key.clone(), obj);
        }
        for key in &changed.slices {
            let obj =
                self.slices.winner(key).cloned().and_then(|p| {
                    reparsed(parsed, &p, problems).and_then(|f| f.slices.remove(key))
                });
            self.pending_slices.insert(key.clone(), obj);
        }
    }

    fn replace_file(&mut self, path: &Path, new: Option<FileState>, changed: &mut Changed) {
        if let Some(old) = self.files.remove(path) {
            self.services
                .remove_file(path, &old.services, &mut changed.services);
            self.slices
                .remove_file(path, &old.slices, &mut changed.slices);
            changed.nodes |= !old.nodes.is_empty();
        }
        if let Some(new) = new {
            self.services
                .add_file(&new.path, &new.services, &mut changed.services);
            self.slices
                .add_file(&new.path, &new.slices, &mut changed.slices);
            changed.nodes |= !new.nodes.is_empty();
            self.files.insert(path.to_path_buf(), new);
        }
    }

    /// Hands the objects changed since the last call to `view`. (A directory has no relists:
    /// its first poll reports every object, so `changed.all` needs nothing more.)
    pub fn update_view(
        &mut self,
        view: &mut ClusterView,
        _changed: &Changed,
        warn: &mut dyn FnMut(String),
    ) {
        // Taken, not drained: a drained map keeps its capacity (megabytes after a first read
        // of a large directory).
        for (k, obj) in std::mem::take(&mut self.pending_services) {
            view.set_service(&k, obj.as_ref(), warn);
        }
        for (k, obj) in std::mem::take(&mut self.pending_slices) {
            view.set_slice(&k, obj.as_ref(), warn);
        }
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.files.values().flat_map(|f| f.nodes.iter())
    }

    /// The Node document named `name`, if the directory has one.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes()
            .find(|n| n.metadata.name.as_deref() == Some(name))
    }
}

/// A file's state and its objects by key.
fn file_state(
    path: &Path,
    sig: Signature,
    objects: FileObjects,
    problems: &mut Vec<Problem>,
) -> (FileState, Parsed) {
    let (services, svc_objs) = keyed(path, objects.services, problems);
    let (slices, slice_objs) = keyed(path, objects.slices, problems);
    (
        FileState {
            sig,
            path: Arc::from(path),
            services,
            slices,
            nodes: objects.nodes,
        },
        Parsed {
            services: svc_objs,
            slices: slice_objs,
        },
    )
}

/// `path`'s objects: as parsed in this poll, or read again (the winner of a key whose other
/// definition just went away; its file did not change, so it parses as before).
fn reparsed<'a>(
    parsed: &'a mut HashMap<PathBuf, Parsed>,
    path: &Path,
    problems: &mut Vec<Problem>,
) -> Option<&'a mut Parsed> {
    if !parsed.contains_key(path) {
        let objects = read_file(path, problems).ok()?;
        let (_, objects) = file_state(
            path,
            Signature {
                len: 0,
                mtime: None,
                ino: 0,
            },
            objects,
            &mut Vec::new(),
        );
        parsed.insert(path.to_path_buf(), objects);
    }
    parsed.get_mut(path)
}

fn is_manifest(p: &Path) -> bool {
    let hidden = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    !hidden
        && matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        )
}

fn signature(meta: &fs::Metadata) -> Signature {
    use std::os::unix::fs::MetadataExt;
    Signature {
        len: meta.len(),
        mtime: meta.modified().ok(),
        ino: meta.ino(),
    }
}

fn read_file(path: &Path, problems: &mut Vec<Problem>) -> Result<FileObjects, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut object_problems = Vec::new();
    let objects = parse_documents(&text, &mut object_problems)?;
    problems.extend(
        object_problems
            .into_iter()
            .map(|p| format!("{}: {p}; skipped", path.display())),
    );
    Ok(objects)
}

/// Parses a multi-document YAML stream. A syntax error fails the whole stream; an object of a
/// known kind that does not fit its schema is reported and skipped; other kinds are ignored and
/// a `List` is unpacked.
pub fn parse_documents(text: &str, problems: &mut Vec<Problem>) -> Result<FileObjects, String> {
    let mut out = FileObjects::default();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value =
            serde_yaml::Value::deserialize(doc).map_err(|e| format!("invalid YAML: {e}"))?;
        add_value(value, &mut out, problems);
    }
    Ok(out)
}

fn add_value(value: serde_yaml::Value, out: &mut FileObjects, problems: &mut Vec<Problem>) {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_string();
    match kind.as_str() {
        "Service" => match serde_yaml::from_value(value) {
            Ok(s) => out.services.push(s),
            Err(e) => problems.push(format!("Service {name}: {e}")),
        },
        "EndpointSlice" => match serde_yaml::from_value(value) {
            Ok(s) => out.slices.push(s),
            Err(e) => problems.push(format!("EndpointSlice {name}: {e}")),
        },
        "Node" => match serde_yaml::from_value(value) {
            Ok(n) => out.nodes.push(n),
            Err(e) => problems.push(format!("Node {name}: {e}")),
        },
        "List" | "ServiceList" | "EndpointSliceList" | "NodeList" => {
            if let Some(serde_yaml::Value::Sequence(items)) = value.get("items").cloned() {
                for item in items {
                    add_value(item, out, problems);
                }
            }
        }
        // Null documents (a trailing `---`) and other kinds are not ours.
        _ => {}
    }
}

/// Wakes the agent as soon as something in the manifest directory changes (inotify), so a
/// change reaches the maps in milliseconds instead of at the next poll; the timed poll stays as
/// the fallback (and is all there is where inotify is unavailable).
#[derive(Debug)]
pub struct DirWatch {
    fd: std::os::fd::OwnedFd,
}

impl DirWatch {
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
        // SAFETY: plain syscall; the fd is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MODIFY
            | libc::IN_ATTRIB
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF;
        // SAFETY: valid fd and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(raw, path.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Waits until the directory changes or `timeout` passes (a signal ends the wait early).
    /// Returns whether something changed; pending events are consumed.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        use std::os::fd::AsRawFd as _;
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return false;
        }
        let mut buf = [0u8; 4096];
        // Drain: a burst of events (an editor's save) is one wake-up.
        // SAFETY: reading into a local buffer from a non-blocking fd.
        while unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        true
    }
}
