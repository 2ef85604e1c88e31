//! `standalone::ManifestDir`: a directory of YAML files, re-read on change, feeding the agent's
//! `ClusterView` as the agent does.

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
};

use common::*;
use lb_agent::{standalone::ManifestDir, view::ClusterView};

/// A fresh temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kplb-test-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, text: &str) {
        fs::write(self.0.join(name), text).expect("write manifest");
    }

    fn remove(&self, name: &str) {
        fs::remove_file(self.0.join(name)).expect("remove manifest");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn service(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
    )
}

fn slice(service: &str, addrs: &[&str]) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
        addrs
            .iter()
            .map(|a| format!("{{addresses: [{a}]}}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The directory and the view it feeds.
struct Watched {
    dir: ManifestDir,
    view: ClusterView,
}

impl Watched {
    fn new(path: &Path) -> Self {
        let mut view = ClusterView::default();
        view.set_node(&node(NODE));
        Self {
            dir: ManifestDir::new(path),
            view,
        }
    }
}

fn names(m: &Watched) -> Vec<String> {
    let mut v: Vec<String> = m.view.services().map(|s| s.id.name.clone()).collect();
    v.sort();
    v
}

/// Polls, hands the changes to the view, and returns (changed, problems).
fn poll(m: &mut Watched) -> (bool, Vec<String>) {
    let mut problems = Vec::new();
    let changed = m.dir.poll(&mut problems).expect("poll");
    m.dir
        .update_view(&mut m.view, &changed, &mut |w| problems.push(w));
    m.view.recompute(&mut |w| problems.push(w));
    (!changed.is_empty(), problems)
}

/// The backends of `ip:80` in the view's desired state.
fn backends(m: &Watched, ip: &str) -> Vec<(std::net::IpAddr, u16)> {
    Run {
        desired: m.view.desired().clone(),
        warnings: Vec::new(),
    }
    .backends(&tcp(ip, 80))
}

#[test]
fn files_added_changed_and_removed_are_followed() {
    let dir = TempDir::new("follow");
    let mut m = Watched::new(dir.path());
    assert_eq!(poll(&mut m), (false, vec![]), "empty directory");

    dir.write(
        "web.yaml",
        &join(&[&service("web", "172.30.0.1"), &slice("web", &["10.0.1.1"])]),
    );
    assert_eq!(poll(&mut m), (true, vec![]));
    assert_eq!(names(&m), ["web"]);
    assert_eq!(backends(&m, "172.30.0.1"), eps(&[("10.0.1.1", 8080)]));
    assert_eq!(poll(&mut m), (false, vec![]), "nothing changed");

    // A second file, ".yml" spelling.
    dir.write("api.yml", &service("api", "172.30.0.2"));
    assert_eq!(poll(&mut m), (true, vec![]));
    assert_eq!(names(&m), ["api", "web"]);

    // A changed file (another endpoint: the length differs, so no mtime granularity issue).
    dir.write(
        "web.yaml",
        &join(&[
            &service("web", "172.30.0.1"),
            &slice("web", &["10.0.1.1", "10.0.2.1"]),
        ]),
    );
    assert_eq!(poll(&mut m), (true, vec![]));
    assert_eq!(
        backends(&m, "172.30.0.1"),
        eps(&[("10.0.1.1", 8080), ("10.0.2.1", 8080)])
    );

    // A removed file.
    dir.remove("api.yml");
    assert_eq!(poll(&mut m), (true, vec![]));
    assert_eq!(names(&m), ["web"]);
    assert_eq!(poll(&mut m), (false, vec![]));

    // Everything removed.
    dir.remove("web.yaml");
    assert_eq!(poll(&mut m), (true, vec![]));
    assert!(names(&m).is_empty());
    assert!(m.view.desired().frontends.is_empty());
}

#[test]
fn hidden_and_non_yaml_files_are_ignored() {
    let dir = TempDir::new("ignored");
    let mut m = Watched::new(dir.path());
    dir.write("web.yaml", &service("web", "172.30.0.1"));
    assert!(poll(&mut m).0);

    // An editor's swap file, a hidden manifest, notes and a backup: none of them are read.
    dir.write(".web.yaml.swp", &service("swap", "172.30.0.3"));
    dir.write(".hidden.yaml", &service("hidden", "172.30.0.4"));
    dir.write("notes.txt", &service("notes", "172.30.0.5"));
    dir.write("web.yaml~", &service("backup", "172.30.0.6"));
    dir.write("README", "not yaml at all: [");
    fs::create_dir(dir.path().join("sub.yaml")).expect("mkdir");
    assert_eq!(poll(&mut m), (false, vec![]));
    assert_eq!(names(&m), ["web"]);
}

#[test]
fn a_file_that_stops_parsing_keeps_its_last_good_content() {
    let dir = TempDir::new("broken");
    let mut m = Watched::new(dir.path());
    let good = join(&[&service("web", "172.30.0.1"), &slice("web", &["10.0.1.1"])]);
    dir.write("web.yaml", &good);
    dir.write("api.yaml", &service("api", "172.30.0.2"));
    assert!(poll(&mut m).0);

    // A half-written save, cut inside a flow mapping.
    dir.write(
        "web.yaml",
        &good[..good.find("labels").expect("slice has labels")],
    );
    let (_, problems) = poll(&mut m);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].contains("web.yaml"), "{problems:?}");
    assert!(
        problems[0].contains("keeping its last good content"),
        "{problems:?}"
    );
    assert_eq!(names(&m), ["api", "web"]);
    assert_eq!(backends(&m, "172.30.0.1"), eps(&[("10.0.1.1", 8080)]));
    // Not reported again while it stays the same.
    assert_eq!(poll(&mut m), (false, vec![]));

    // Fixed (with a change): the new content is used.
    let fixed = join(&[
        &service("web", "172.30.0.1"),
        &slice("web", &["10.0.1.7", "10.0.1.8"]),
    ]);
    dir.write("web.yaml", &fixed);
    assert_eq!(poll(&mut m), (true, vec![]));
    assert_eq!(
        backends(&m, "172.30.0.1"),
        eps(&[("10.0.1.7", 8080), ("10.0.1.8", 8080)])
    );
}

#[test]
fn a_new_broken_file_is_reported_and_adds_nothing() {
    let dir = TempDir::new("new-broken");
    let mut m = Watched::new(dir.path());
    dir.write("web.yaml", &service("web", "172.30.0.1"));
    dir.write(
        "bad.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
    );
    let (_, problems) = poll(&mut m);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].contains("bad.yaml") && problems[0].contains("skipped"),
        "{problems:?}"
    );
    assert_eq!(names(&m), ["web"]);
    assert_eq!(poll(&mut m), (false, vec![]));
}

#[test]
fn a_schema_error_skips_one_object_of_a_file() {
    let dir = TempDir::new("schema");
    let mut m = Watched::new(dir.path());
    let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {ports: [{port: eighty}]}\n";
    dir.write(
        "all.yaml",
        &join(&[
            &service("web", "172.30.0.1"),
            bad,
            &service("api", "172.30.0.2"),
        ]),
    );
    let (changed, problems) = poll(&mut m);
    assert!(changed);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].contains("all.yaml") && problems[0].contains("Service broken"),
        "{problems:?}"
    );
    assert_eq!(names(&m), ["api", "web"]);
}

#[test]
fn fixtures_load_from_a_directory() {
    let dir = TempDir::new("fixtures");
    for f in ["clusterip.yaml", "types.yaml", "dualstack.yaml"] {
        dir.write(f, &fixture(f));
    }
    let mut m = Watched::new(dir.path());
    let (changed, _) = poll(&mut m);
    assert!(changed);
    let text = join(&[
        &fixture("clusterip.yaml"),
        &fixture("types.yaml"),
        &fixture("dualstack.yaml"),
    ]);
    assert_eq!(m.view.desired(), &run_yaml(&text, &node(NODE)).desired);
}

#[test]
fn a_missing_directory_is_an_error() {
    let dir = TempDir::new("missing");
    let gone = dir.path().join("nope");
    let mut m = ManifestDir::new(&gone);
    assert!(m.poll(&mut Vec::new()).is_err());
}

#[test]
fn an_object_defined_twice_follows_the_last_file_and_falls_back() {
    let dir = TempDir::new("twice");
    let mut m = Watched::new(dir.path());
    dir.write("a.yaml", &service("web", "172.30.0.1"));
    dir.write("b.yaml", &service("web", "172.30.0.2"));
    dir.write("web-eps.yaml", &slice("web", &["10.0.1.1"]));
    assert!(poll(&mut m).0);
    let vip = |m: &Watched| {
        let ips: Vec<_> = m
            .view
            .services()
            .flat_map(|s| s.cluster_ips.clone())
            .collect();
        ips
    };
    assert_eq!(vip(&m), [ip("172.30.0.2")], "the last file wins");
    // Editing the file that lost changes nothing; removing the winner brings the other back
    // (read again from its unchanged file).
    dir.write("a.yaml", &service("web", "172.30.0.3"));
    poll(&mut m);
    assert_eq!(vip(&m), [ip("172.30.0.2")]);
    dir.remove("b.yaml");
    poll(&mut m);
    assert_eq!(vip(&m), [ip("172.30.0.3")]);
    assert_eq!(backends(&m, "172.30.0.3"), eps(&[("10.0.1.1", 8080)]));
}
