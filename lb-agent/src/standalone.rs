//! Standalone source: Service and EndpointSlice YAML files in a directory, re-read on change.
//! Node documents are read too, so a lab can give its nodes zones (or mark one as deleting).
//!
//! Only changed files are re-parsed (by size, mtime and inode). A file that no longer parses
//! keeps its last good content (an editor's half-written save must not delete services); the
//! error is logged with the file name.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize;

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

/// A file's objects behind `Arc`s: a sync takes them without copying, and an unchanged file
/// keeps handing out the same allocations.
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

/// The parsed contents of a manifest directory.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

/// A problem found while reading; the caller logs it.
pub type Problem = String;

impl ManifestDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
        }
    }

    /// Re-reads changed, new and removed files. Returns whether anything changed.
    pub fn poll(&mut self, problems: &mut Vec<Problem>) -> std::io::Result<bool> {
        let mut seen = Vec::new();
        let mut changed = false;
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
            seen.push(path.clone());
            let sig = signature(&meta);
            if self.files.get(&path).is_some_and(|f| f.sig == sig) {
                continue;
            }
            changed = true;
            match read_file(&path, problems) {
                Ok(objects) => {
                    let objects = objects.into();
                    self.files.insert(path, FileState { sig, objects });
                }
                Err(e) => {
                    let keep = if self.files.contains_key(&path) {
                        "keeping its last good content"
                    } else {
                        "skipped"
                    };
                    problems.push(format!("{}: {e}; {keep}", path.display()));
                    // Remember the signature so an unchanged broken file is not re-reported.
                    let objects = self
                        .files
                        .remove(&path)
                        .map(|f| f.objects)
                        .unwrap_or_default();
                    self.files.insert(path, FileState { sig, objects });
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        Ok(changed || self.files.len() != before)
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.shared_services().map(|s| &**s)
    }

    pub fn slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.shared_slices().map(|s| &**s)
    }

    pub fn shared_services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.files.values().flat_map(|f| f.objects.services.iter())
    }

    pub fn shared_slices(&self) -> impl Iterator<Item = &Arc<EndpointSlice>> {
        self.files.values().flat_map(|f| f.objects.slices.iter())
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
