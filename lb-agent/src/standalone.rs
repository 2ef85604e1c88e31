//! Standalone source: Service and EndpointSlice YAML files in a directory, re-read on change.
//! Node documents are read too, so a lab can give its nodes zones (or mark one as deleting).
//!
//! Only changed files are re-parsed (by size, mtime and inode), and a poll reports which
//! objects they define or defined, so a sync re-reads only those. A file that no longer parses
//! keeps its last good content (an editor's half-written save must not delete services); the
//! error is logged with the file name.

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

#[derive(Debug)]
struct FileState {
    sig: Signature,
    objects: SharedObjects,
}

/// A file's objects behind `Arc`s: the index and a sync share them without copying.
#[derive(Debug, Default)]
struct SharedObjects {
    services: Vec<Arc<Service>>,
    slices: Vec<Arc<EndpointSlice>>,
    nodes: Vec<Node>,
}

impl From<FileObjects> for SharedObjects {
    fn from(o: FileObjects) -> Self {
        Self {
            services: o.services.into_iter().map(Arc::new).collect(),
            slices: o.slices.into_iter().map(Arc::new).collect(),
            nodes: o.nodes,
        }
    }
}

/// Which files define each object. When several do, the last file in path order wins (and
/// within a file the last document), as if the directory were read as one stream in order.
#[derive(Debug)]
struct ByKey<K> {
    files: HashMap<ObjKey, BTreeMap<PathBuf, Arc<K>>>,
}

impl<K> Default for ByKey<K> {
    fn default() -> Self {
        Self {
            files: HashMap::new(),
        }
    }
}

impl<K: Metadata<Ty = ObjectMeta>> ByKey<K> {
    fn get(&self, key: &ObjKey) -> Option<&Arc<K>> {
        self.files.get(key).and_then(|f| f.values().next_back())
    }

    fn all(&self) -> impl Iterator<Item = &Arc<K>> {
        self.files.values().filter_map(|f| f.values().next_back())
    }

    fn remove_file(&mut self, path: &Path, objs: &[Arc<K>], changed: &mut BTreeSet<ObjKey>) {
        for key in objs
            .iter()
            .filter_map(|o| objects::object_key(o.metadata()))
        {
            if let Some(files) = self.files.get_mut(&key) {
                files.remove(path);
                if files.is_empty() {
                    self.files.remove(&key);
                }
            }
            changed.insert(key);
        }
    }

    fn add_file(
        &mut self,
        path: &Path,
        objs: &[Arc<K>],
        changed: &mut BTreeSet<ObjKey>,
        problems: &mut Vec<Problem>,
    ) {
        for o in objs {
            let Some(key) = objects::object_key(o.metadata()) else {
                problems.push(format!(
                    "{}: an object without metadata.name; skipped",
                    path.display()
                ));
                continue;
            };
            self.files
                .entry(key.clone())
                .or_default()
                .insert(path.to_path_buf(), o.clone());
            changed.insert(key);
        }
    }
}

/// The parsed contents of a manifest directory.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    services: ByKey<Service>,
    slices: ByKey<EndpointSlice>,
}

/// A problem found while reading; the caller logs it.
pub type Problem = String;

impl ManifestDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            services: ByKey::default(),
            slices: ByKey::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-reads changed, new and removed files. Returns the objects they define or defined.
    pub fn poll(&mut self, problems: &mut Vec<Problem>) -> std::io::Result<Changed> {
        let mut seen = BTreeSet::new();
        let mut changed = Changed::default();
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
            let objects = match read_file(&path, problems) {
                Ok(objects) => objects.into(),
                Err(e) => {
                    let keep = if self.files.contains_key(&path) {
                        "keeping its last good content"
                    } else {
                        "skipped"
                    };
                    problems.push(format!("{}: {e}; {keep}", path.display()));
                    // Remember the signature so an unchanged broken file is not re-reported.
                    if let Some(f) = self.files.get_mut(&path) {
                        f.sig = sig;
                    } else {
                        self.files.insert(
                            path,
                            FileState {
                                sig,
                                objects: SharedObjects::default(),
                            },
                        );
                    }
                    continue;
                }
            };
            self.replace_file(
                &path,
                Some(FileState { sig, objects }),
                &mut changed,
                problems,
            );
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            self.replace_file(&path, None, &mut changed, problems);
        }
        Ok(changed)
    }

    fn replace_file(
        &mut self,
        path: &Path,
        new: Option<FileState>,
        changed: &mut Changed,
        problems: &mut Vec<Problem>,
    ) {
        if let Some(old) = self.files.remove(path) {
            self.services
                .remove_file(path, &old.objects.services, &mut changed.services);
            self.slices
                .remove_file(path, &old.objects.slices, &mut changed.slices);
            changed.nodes |= !old.objects.nodes.is_empty();
        }
        if let Some(new) = new {
            self.services
                .add_file(path, &new.objects.services, &mut changed.services, problems);
            self.slices
                .add_file(path, &new.objects.slices, &mut changed.slices, problems);
            changed.nodes |= !new.objects.nodes.is_empty();
            self.files.insert(path.to_path_buf(), new);
        }
    }

    /// Brings `view` up to date with the objects `changed` names (everything with `all`).
    pub fn update_view(
        &self,
        view: &mut ClusterView,
        changed: &Changed,
        warn: &mut dyn FnMut(String),
    ) {
        if changed.all {
            view.resync(self.services(), self.slices(), warn);
            return;
        }
        for k in &changed.services {
            view.set_service(k, self.service(k), warn);
        }
        for k in &changed.slices {
            view.set_slice(k, self.slice(k), warn);
        }
    }

    /// Every Service (one per key).
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.services.all().map(|s| &**s)
    }

    /// Every EndpointSlice (one per key).
    pub fn slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.slices.all().map(|s| &**s)
    }

    /// The Service `key`, if a file defines it.
    pub fn service(&self, key: &ObjKey) -> Option<&Service> {
        self.services.get(key).map(|s| &**s)
    }

    /// The EndpointSlice `key`, if a file defines it.
    pub fn slice(&self, key: &ObjKey) -> Option<&EndpointSlice> {
        self.slices.get(key).map(|s| &**s)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.files.values().flat_map(|f| f.objects.nodes.iter())
    }

    /// The Node document named `name`, if the directory has one.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes()
            .find(|n| n.metadata.name.as_deref() == Some(name))
    }
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
