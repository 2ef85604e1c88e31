//! A fake Kubernetes API server behind kube-rs' mock service (`tower_test::mock::pair`): it
//! answers list and watch requests for Services, EndpointSlices and Nodes from an in-memory
//! store, streams watch events as newline-delimited JSON, keeps an event log so a watch resumes
//! from its resourceVersion, and injects faults: HTTP errors, 410 Gone (compaction, forcing a
//! relist), closed watch streams, and a list paused between its two pages.
#![allow(dead_code)] // each test uses a different subset

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use serde_json::{Value, json};

pub type Body = StreamBody<mpsc::UnboundedReceiver<Result<Frame<Bytes>, Infallible>>>;
pub type MockHandle = tower_test::mock::Handle<Request<kube::client::Body>, Response<Body>>;
pub type MockService = tower_test::mock::Mock<Request<kube::client::Body>, Response<Body>>;

/// The resource types the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Services,
    EndpointSlices,
    Nodes,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Services, Kind::EndpointSlices, Kind::Nodes];

    fn path(self) -> &'static str {
        match self {
            Kind::Services => "/api/v1/services",
            Kind::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Nodes => "/api/v1/nodes",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Kind::Services => "ServiceList",
            Kind::EndpointSlices => "EndpointSliceList",
            Kind::Nodes => "NodeList",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub kind: Kind,
    pub watch: bool,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
}

type Sender = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

#[derive(Default)]
struct Collection {
    /// Keyed by "namespace/name".
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, event type, object) since the last compaction.
    log: Vec<(u64, &'static str, Value)>,
    /// Watches older than this get 410 Gone.
    compacted: u64,
    watchers: Vec<(Sender, Selector)>,
    list_failures: VecDeque<u16>,
    watch_failures: VecDeque<u16>,
    gate: Option<Arc<tokio::sync::Notify>>,
}

#[derive(Default)]
struct State {
    rv: u64,
    collections: HashMap<Kind, Collection>,
    seen: Vec<Seen>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The server; dropping it stops answering (the mock then reports closed).
pub struct FakeApi {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A paused list: the first page has been served; the second waits for [`Gate::open`].
pub struct Gate(Arc<tokio::sync::Notify>);

impl Gate {
    pub fn open(&self) {
        self.0.notify_one();
    }
}

fn key_of(obj: &Value) -> String {
    let m = &obj["metadata"];
    format!(
        "{}/{}",
        m["namespace"].as_str().unwrap_or(""),
        m["name"].as_str().expect("test object without a name")
    )
}

/// The label and field selectors the agent uses: `!label` terms and `metadata.name=X`.
#[derive(Clone, Debug, Default)]
struct Selector {
    without_labels: Vec<String>,
    name: Option<String>,
}

impl Selector {
    fn from_query(q: &BTreeMap<String, String>) -> Self {
        let mut s = Selector::default();
        for term in q
            .get("labelSelector")
            .into_iter()
            .flat_map(|v| v.split(','))
        {
            let label = term
                .strip_prefix('!')
                .unwrap_or_else(|| panic!("fake apiserver: unsupported label selector {term:?}"));
            s.without_labels.push(label.to_string());
        }
        if let Some(f) = q.get("fieldSelector") {
            let name = f
                .strip_prefix("metadata.name=")
                .unwrap_or_else(|| panic!("fake apiserver: unsupported field selector {f:?}"));
            s.name = Some(name.to_string());
        }
        s
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.without_labels.iter().all(|l| labels.get(l).is_none())
            && self
                .name
                .as_ref()
                .is_none_or(|n| obj["metadata"]["name"].as_str() == Some(n))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn finished_body(bytes: Vec<u8>) -> Body {
    let (tx, rx) = mpsc::unbounded();
    let _ = tx.unbounded_send(Ok(Frame::data(Bytes::from(bytes))));
    StreamBody::new(rx)
}

fn respond_json(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(finished_body(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn status_object(code: u16, reason: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": format!("injected by the fake apiserver: {reason}"),
        "reason": reason, "code": code,
    })
}

fn event_line(kind: &str, obj: &Value) -> Result<Frame<Bytes>, Infallible> {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap();
    line.push(b'\n');
    Ok(Frame::data(Bytes::from(line)))
}

impl FakeApi {
    /// Starts answering `handle`'s requests on the current Tokio runtime.
    pub fn start(mut handle: MockHandle) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let server = shared.clone();
        let task = tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let response = Self::answer(&server, &req);
                server.changed.notify_all();
                match response {
                    Answer::Now(r) => send.send_response(r),
                    Answer::After(gate, r) => {
                        tokio::spawn(async move {
                            gate.notified().await;
                            send.send_response(r);
                        });
                    }
                }
            }
        });
        Self { shared, task }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answer(shared: &Shared, req: &Request<kube::client::Body>) -> Answer {
        let path = req.uri().path();
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.path() == path)
            .unwrap_or_else(|| panic!("fake apiserver: unexpected request {}", req.uri()));
        assert_eq!(req.method(), http::Method::GET, "the agent only reads");
        let query = parse_query(req.uri().query());
        let watch = query.get("watch").is_some_and(|v| v == "true" || v == "1");
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        st.seen.push(Seen {
            kind,
            watch,
            query: query.clone(),
        });
        let rv = st.rv;
        let coll = st.collections.entry(kind).or_default();
        let selector = Selector::from_query(&query);
        if watch {
            if let Some(code) = coll.watch_failures.pop_front() {
                return Answer::Now(respond_json(
                    StatusCode::from_u16(code).unwrap(),
                    &status_object(code, "InternalError"),
                ));
            }
            let from: u64 = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = mpsc::unbounded();
            if from < coll.compacted {
                let _ = tx.unbounded_send(event_line("ERROR", &status_object(410, "Expired")));
                drop(tx);
            } else {
                for (_, ty, obj) in coll.log.iter().filter(|(r, _, _)| *r > from) {
                    if selector.matches(obj) {
                        let _ = tx.unbounded_send(event_line(ty, obj));
                    }
                }
                coll.watchers.push((tx, selector));
            }
            let r = Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(StreamBody::new(rx))
                .unwrap();
            return Answer::Now(r);
        }
        if let Some(code) = coll.list_failures.pop_front() {
            return Answer::Now(respond_json(
                StatusCode::from_u16(code).unwrap(),
                &status_object(code, "InternalError"),
            ));
        }
        let items: Vec<Value> = coll
            .objects
            .values()
            .filter(|o| selector.matches(o))
            .cloned()
            .collect();
        let list = |items: &[Value], cont: Option<&str>| {
            json!({
                "apiVersion": kind.api_version(), "kind": kind.list_kind(),
                "metadata": {"resourceVersion": rv.to_string(), "continue": cont.unwrap_or("")},
                "items": items,
            })
        };
        let half = items.len() / 2;
        match (query.contains_key("continue"), coll.gate.clone()) {
            // A paused list: the first page now, the rest once the gate opens.
            (false, Some(_)) => Answer::Now(respond_json(
                StatusCode::OK,
                &list(&items[..half], Some("page2")),
            )),
            (true, Some(gate)) => {
                coll.gate = None;
                Answer::After(
                    gate,
                    respond_json(StatusCode::OK, &list(&items[half..], None)),
                )
            }
            (_, None) => Answer::Now(respond_json(StatusCode::OK, &list(&items, None))),
        }
    }

    fn record(&self, kind: Kind, ty: &'static str, mut obj: Value) {
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let coll = st.collections.entry(kind).or_default();
        let key = key_of(&obj);
        if ty == "DELETED" {
            coll.objects.remove(&key);
        } else {
            coll.objects.insert(key, obj.clone());
        }
        coll.log.push((rv, ty, obj.clone()));
        coll.watchers.retain(|(tx, sel)| {
            !sel.matches(&obj) || tx.unbounded_send(event_line(ty, &obj)).is_ok()
        });
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Creates or replaces an object (ADDED or MODIFIED for open watches).
    pub fn apply(&self, kind: Kind, obj: impl serde::Serialize) {
        let obj = serde_json::to_value(obj).unwrap();
        let exists = self
            .lock()
            .collections
            .get(&kind)
            .is_some_and(|c| c.objects.contains_key(&key_of(&obj)));
        self.record(kind, if exists { "MODIFIED" } else { "ADDED" }, obj);
    }

    /// Deletes an object (DELETED for open watches).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        let obj = self
            .lock()
            .collections
            .get(&kind)
            .and_then(|c| c.objects.get(&key).cloned())
            .unwrap_or_else(|| panic!("no {kind:?} {key} to delete"));
        self.record(kind, "DELETED", obj);
    }

    /// Replaces the whole collection without events, then compacts: open watches get 410 Gone
    /// and the client must relist to see the new state (events it missed are gone for good).
    pub fn replace_and_compact(&self, kind: Kind, objects: Vec<Value>) {
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        let coll = st.collections.entry(kind).or_default();
        coll.objects = objects
            .into_iter()
            .map(|mut o| {
                o["metadata"]["resourceVersion"] = json!(rv.to_string());
                (key_of(&o), o)
            })
            .collect();
        coll.log.clear();
        coll.compacted = rv;
        for (tx, _) in coll.watchers.drain(..) {
            let _ = tx.unbounded_send(event_line("ERROR", &status_object(410, "Expired")));
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Ends every open watch stream of `kind` (like the server's watch timeout).
    pub fn close_watches(&self, kind: Kind) {
        self.lock()
            .collections
            .entry(kind)
            .or_default()
            .watchers
            .clear();
    }

    /// The next `n` lists of `kind` fail with HTTP `code`.
    pub fn fail_lists(&self, kind: Kind, n: usize, code: u16) {
        let mut st = self.lock();
        let c = st.collections.entry(kind).or_default();
        c.list_failures.extend(std::iter::repeat_n(code, n));
    }

    /// The next `n` watch requests of `kind` fail with HTTP `code`.
    pub fn fail_watches(&self, kind: Kind, n: usize, code: u16) {
        let mut st = self.lock();
        let c = st.collections.entry(kind).or_default();
        c.watch_failures.extend(std::iter::repeat_n(code, n));
    }

    /// The next list of `kind` comes in two pages, the second held back until the gate opens.
    pub fn pause_next_list(&self, kind: Kind) -> Gate {
        let n = Arc::new(tokio::sync::Notify::new());
        self.lock().collections.entry(kind).or_default().gate = Some(n.clone());
        Gate(n)
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Waits (without sleeping blindly) until `pred` holds over the requests seen, or panics
    /// at the deadline.
    pub fn wait_for_requests(&self, what: &str, timeout: Duration, pred: impl Fn(&[Seen]) -> bool) {
        self.wait(what, timeout, |st| pred(&st.seen));
    }

    /// Waits until `kind` has an open watch stream.
    pub fn wait_watching(&self, kind: Kind, timeout: Duration) {
        self.wait(&format!("a watch of {kind:?}"), timeout, |st| {
            st.collections.get_mut(&kind).is_some_and(|c| {
                c.watchers.retain(|(tx, _)| !tx.is_closed());
                !c.watchers.is_empty()
            })
        });
    }

    fn wait(&self, what: &str, timeout: Duration, mut pred: impl FnMut(&mut State) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while !pred(&mut st) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; seen: {:#?}",
                st.seen
            );
            st = self
                .shared
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

enum Answer {
    Now(Response<Body>),
    After(Arc<tokio::sync::Notify>, Response<Body>),
}
