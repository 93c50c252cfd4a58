//! The daemon's control socket: `meshpath status` lists the open connections and the local
//! workloads' policies through it, `meshpath close` closes a connection and `meshpath policy`
//! asks whether a connection would pass.
//!
//! A unix socket rather than a port: it is root's only by its file mode (0600), as what it
//! shows names workloads and what it does ends connections, while a port on the node's
//! loopback would be open to every local user. One per daemon, beside the daemon's note in
//! the node's state directory, since during a takeover two daemons hold connections. One
//! JSON request line, one JSON answer line, then the socket closes.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::inspect;
use super::registry::{Closed, OpenConnection, Registry};
use crate::record::Outcome;
use crate::state::WorkloadIndex;

/// A request is a line of a few dozen bytes.
const MAX_REQUEST: u64 = 4096;
/// An answer lists every open connection (a few hundred bytes each, bounded by the
/// connection limit); past this it is not meshpath's.
const MAX_ANSWER: u64 = 256 << 20;
/// How long either side waits for the other.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("control socket {path}: no answer within {TIMEOUT:?}")]
    Timeout { path: String },
    #[error("control socket {path}: {reason}")]
    Protocol { path: String, reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Every open connection.
    List,
    /// Close connection `id`: it ends at once and its record says `cut`.
    Close { id: u64 },
    /// The policies that apply to each local workload.
    Policies,
    /// Whether a connection from `from` to `to` would pass `to`'s policies now.
    Check { from: IpAddr, to: SocketAddr },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Connections(Vec<OpenConnection>),
    /// `found`: the connection was open (it is closing now).
    Closed {
        found: bool,
    },
    Policies(Vec<inspect::WorkloadPolicies>),
    Decision(inspect::Decision),
    /// The request was not understood.
    Refused(String),
}

/// What the policy requests are answered from: the index the proxy serves with.
#[derive(Clone, Debug)]
pub struct View {
    pub index: watch::Receiver<Arc<WorkloadIndex>>,
    pub node: String,
}

/// A daemon's control socket; removed when dropped.
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl ControlSocket {
    /// Listens at `path` (in place of what a dead daemon left there) for requests on
    /// `registry`.
    pub fn listen(path: &Path, registry: Arc<Registry>, view: View) -> Result<Self, ControlError> {
        let io = |source| ControlError::Io { path: path.display().to_string(), source };
        // Bound under another name and made root's only before it takes its own: no one
        // else can connect, not even for an instant.
        let tmp = path.with_extension("sock.tmp");
        for old in [&tmp, &path.to_path_buf()] {
            match std::fs::remove_file(old) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => {}
            }
        }
        let listener = UnixListener::bind(&tmp).map_err(io)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        let task = tokio::spawn(serve(listener, registry, view));
        Ok(Self { path: path.to_owned(), task })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(listener: UnixListener, registry: Arc<Registry>, view: View) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, registry.clone(), view.clone()));
            }
            // EMFILE and friends: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn answer(stream: UnixStream, registry: Arc<Registry>, view: View) {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(TIMEOUT, BufReader::new(rd.take(MAX_REQUEST)).read_line(&mut line)).await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return;
    }
    let response = match serde_json::from_str(&line) {
        Ok(request) => respond(&request, &registry, &view),
        Err(e) => Response::Refused(format!("not a request meshpath knows: {e}")),
    };
    let mut body = serde_json::to_vec(&response).unwrap_or_default();
    body.push(b'\n');
    let _ = tokio::time::timeout(TIMEOUT, wr.write_all(&body)).await;
}

fn respond(request: &Request, registry: &Registry, view: &View) -> Response {
    match request {
        Request::Policies => Response::Policies(inspect::policies_on(&view.index.borrow(), &view.node)),
        Request::Check { from, to } => Response::Decision(inspect::decide(&view.index.borrow(), *from, *to)),
        Request::List => Response::Connections(registry.list()),
        Request::Close { id } => {
            let closed = Closed { outcome: Outcome::Cut, reason: "cut: closed on request (meshpath close)".into() };
            Response::Closed { found: registry.close(*id, closed) }
        }
    }
}

/// Sends `request` to the daemon listening at `path` and returns its answer.
pub async fn request(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let p = || path.display().to_string();
    let exchange = async {
        let mut stream = UnixStream::connect(path).await?;
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        stream.write_all(&line).await?;
        let mut answer = Vec::new();
        stream.take(MAX_ANSWER).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = match tokio::time::timeout(TIMEOUT, exchange).await {
        Ok(Ok(a)) => a,
        Ok(Err(source)) => return Err(ControlError::Io { path: p(), source }),
        Err(_) => return Err(ControlError::Timeout { path: p() }),
    };
    serde_json::from_slice(&answer)
        .map_err(|e| ControlError::Protocol { path: p(), reason: format!("an answer meshpath does not know: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::registry::{Kind, testing};

    /// A directory of the test's own: tests run in parallel, and each removes its own.
    fn dir(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("meshpath-control-test-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&d).expect("a temporary directory");
        d
    }

    /// Workloads a (n1) and c (n2) of namespace ns, and a policy of ns denying a.
    fn view() -> View {
        use crate::policy::{Action, Match, Policy, Scope, StringMatch};
        let file = "workloads:\n  - {name: a, namespace: ns, serviceAccount: sa-a, node: n1, ips: [10.0.0.1]}\n  - {name: c, namespace: ns, serviceAccount: sa-c, node: n2, ips: [10.0.0.3]}\n";
        let state = crate::state::DesiredState {
            workloads: crate::workloads::WorkloadFile::parse(file, "test").expect("a file"),
            ..Default::default()
        };
        let mut index = WorkloadIndex::new(&state, "cluster.local");
        let principals = vec![StringMatch::Exact("cluster.local/ns/ns/sa/sa-a".into())];
        let rules = vec![vec![vec![Match { principals, ..Default::default() }]]];
        let mut store = index.policies().clone();
        store.insert(Policy::new("ns", "no-a", Scope::Namespace, Action::Deny, rules, false).expect("a policy"));
        index.set_policies(store);
        View { index: watch::channel(Arc::new(index)).1, node: "n1".into() }
    }

    #[tokio::test]
    async fn answers_policy_questions_from_the_index() {
        let path = dir("policies").join("control.sock");
        let socket = ControlSocket::listen(&path, Arc::default(), view()).expect("listens");
        let Response::Policies(list) = request(&path, &Request::Policies).await.expect("an answer") else {
            panic!("not policies")
        };
        assert_eq!(list.len(), 1, "only n1's workload: {list:?}");
        assert_eq!((list[0].workload.as_str(), &list[0].policies[..]), ("ns/a", &["ns/no-a".to_string()][..]));
        let check = |from: &str, to: &str| Request::Check { from: from.parse().unwrap(), to: to.parse().unwrap() };
        let Response::Decision(d) = request(&path, &check("10.0.0.1", "10.0.0.3:8080")).await.expect("an answer")
        else {
            panic!("not a decision")
        };
        assert!(!d.allowed);
        assert_eq!((d.decision.as_str(), d.deciding.as_deref()), ("explicitly denied by: ns/no-a", Some("ns/no-a")));
        assert_eq!(d.from_identity.as_deref(), Some("spiffe://cluster.local/ns/ns/sa/sa-a"));
        let Response::Decision(d) = request(&path, &check("10.0.0.3", "10.0.0.1:8080")).await.expect("an answer")
        else {
            panic!("not a decision")
        };
        assert!(d.allowed, "{d:?}");
        drop(socket);
        let _ = std::fs::remove_dir(path.parent().expect("a directory"));
    }

    #[tokio::test]
    async fn lists_and_closes_over_a_socket_only_its_owner_may_use() {
        let path = dir("connections").join("control.sock");
        let registry = Arc::new(Registry::default());
        let (tx, mut closed) = watch::channel(None);
        let entry = registry.add(testing::info(Kind::SameNode), testing::counters(), tx);
        let socket = ControlSocket::listen(&path, registry.clone(), view()).expect("listens");
        let mode = std::fs::metadata(&path).expect("the socket exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the control socket is root's only");

        let Response::Connections(list) = request(&path, &Request::List).await.expect("an answer") else {
            panic!("not a list")
        };
        assert_eq!(list.iter().map(|c| (c.id, c.kind)).collect::<Vec<_>>(), [(entry.id, Kind::SameNode)]);
        let answer = request(&path, &Request::Close { id: entry.id }).await.expect("an answer");
        assert_eq!(answer, Response::Closed { found: true });
        assert_eq!(closed.borrow_and_update().as_ref().map(|c| c.outcome), Some(Outcome::Cut));
        let answer = request(&path, &Request::Close { id: 999 }).await.expect("an answer");
        assert_eq!(answer, Response::Closed { found: false });

        // Garbage gets a refusal, not a hang or a crash.
        let mut raw = UnixStream::connect(&path).await.expect("connects");
        raw.write_all(b"{\"launch\":1}\n").await.expect("writes");
        let mut answer = String::new();
        raw.read_to_string(&mut answer).await.expect("reads");
        assert!(answer.starts_with("{\"refused\""), "{answer}");

        drop(socket);
        assert!(!path.exists(), "the socket goes with its daemon");
        assert!(matches!(request(&path, &Request::List).await, Err(ControlError::Io { .. })));
        let _ = std::fs::remove_dir(path.parent().expect("a directory"));
    }
}
