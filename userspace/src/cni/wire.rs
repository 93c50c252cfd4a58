//! What the CNI plugin and the node daemon say to each other on `<STATE_DIR>/<node>/cni.sock`:
//! one JSON line each way per connection.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};

/// Longest line either side reads: a pod's names, a few interfaces and addresses.
pub const MAX_LINE: usize = 64 * 1024;

/// A pod of the mesh, as the plugin found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// The API server's UID (none when enrolment comes from a workload file).
    #[serde(default)]
    pub uid: Option<String>,
    pub service_account: String,
}

impl PodRef {
    /// `namespace/name`, as workloads are named everywhere else.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A pod's sandbox, as the runtime set it up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub pod: PodRef,
    pub container_id: String,
    pub netns: PathBuf,
    /// The host-side interfaces the primary CNI reported (the pod's veth; a bridge CNI's
    /// bridge too).
    pub host_interfaces: Vec<String>,
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Enrol this sandbox; answer once it is in the map behind its interface.
    Add(Sandbox),
    /// The sandbox is being torn down.
    Del { namespace: String, name: String, container_id: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Every address of the pod is in the map, behind this interface.
    Enrolled {
        interface: String,
    },
    Released,
    /// The daemon will not (yet) enrol it, and why.
    Refused {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the other side closed the connection without answering")]
    Closed,
    #[error("a line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("an unreadable message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Writes one message as a line.
pub async fn send<T: Serialize>(w: &mut (impl AsyncWrite + Unpin), msg: &T) -> Result<(), WireError> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one message line, at most [`MAX_LINE`] bytes.
pub async fn receive<T: for<'de> Deserialize<'de>>(r: impl AsyncRead + Unpin) -> Result<T, WireError> {
    let mut line = Vec::new();
    let mut limited = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_LINE as u64 + 1));
    limited.read_until(b'\n', &mut line).await?;
    if line.len() > MAX_LINE {
        return Err(WireError::TooLong);
    }
    if line.last() != Some(&b'\n') {
        return Err(WireError::Closed);
    }
    Ok(serde_json::from_slice(&line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_goes_through_as_one_line_and_garbage_is_refused() {
        let req = Request::Add(Sandbox {
            pod: PodRef { namespace: "shop".into(), name: "cart".into(), uid: None, service_account: "sa".into() },
            container_id: "c1".into(),
            netns: "/var/run/netns/x".into(),
            host_interfaces: vec!["veth1".into()],
            ips: vec!["10.244.1.5".parse().expect("ip")],
        });
        let mut buf = Vec::new();
        send(&mut buf, &req).await.expect("send");
        assert_eq!(buf.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(receive::<Request>(&buf[..]).await.expect("receive"), req);
        assert!(matches!(receive::<Request>(&b"{\"add\":"[..]).await, Err(WireError::Closed)));
        assert!(matches!(receive::<Request>(&b"nonsense\n"[..]).await, Err(WireError::Json(_))));
        let long = vec![b'x'; MAX_LINE + 10];
        assert!(matches!(receive::<Request>(&long[..]).await, Err(WireError::TooLong)));
    }
}
