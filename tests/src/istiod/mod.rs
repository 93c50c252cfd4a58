//! A fake istiod for the lab: the workload xDS ([`xds`]) and the CA a node proxy talks to, on
//! one TLS listener whose certificate the lab's root ([`pki`]) signs, enforcing what istiod
//! checks of every caller ([`auth`]). Built piece by piece (see issue 21).
//!
//! ```no_run
//! # async fn f(listener: tokio::net::TcpListener) -> Result<(), meshpath_lab::istiod::IstiodError> {
//! use meshpath_lab::istiod::{FakeIstiod, auth::Account};
//! let istiod = FakeIstiod::builder("Kubernetes")?
//!     .token("node-token", Account::new("istio-system", "ztunnel"))
//!     .serve(listener)?;
//! std::fs::write("/tmp/root-cert.pem", istiod.root_pem()).ok();
//! # Ok(()) }
//! ```

pub mod auth;
pub mod ca;
pub mod pki;
pub mod proto;
pub mod xds;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::RoutesBuilder;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use auth::{Account, Authenticator};
use pki::{LabRoot, PkiError};
use proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use xds::Xds;

/// The names istiod's serving certificate carries by default (what `XDS_ADDRESS` names in a
/// cluster), besides the loopback names the lab's tests dial.
pub const DEFAULT_NAMES: [&str; 3] = ["istiod.istio-system.svc", "localhost", "127.0.0.1"];
/// How long [`FakeIstiod::stop`] lets connections close before cutting them.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum IstiodError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("the fake istiod's TLS configuration: {0}")]
    Tls(tonic::transport::Error),
    #[error("the fake istiod's listener: {0}")]
    Listener(std::io::Error),
}

/// What the fake is made of, before it serves.
pub struct Builder {
    auth: Authenticator,
    trust_domain: String,
    names: Vec<String>,
    root: LabRoot,
    routes: RoutesBuilder,
}

impl Builder {
    /// `token` authenticates as `account` (the table istiod would get from TokenReviews).
    pub fn token(mut self, token: &str, account: Account) -> Self {
        self.auth = self.auth.token(token, account);
        self
    }

    /// The trust domain of callers' identities (default `cluster.local`).
    pub fn trust_domain(mut self, trust_domain: &str) -> Self {
        self.trust_domain = trust_domain.into();
        self
    }

    /// The names (DNS or IP) its serving certificate carries, instead of [`DEFAULT_NAMES`].
    pub fn names(mut self, names: &[&str]) -> Self {
        self.names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// The root that signs its serving certificate (and the CA's certificates).
    pub fn root(&self) -> &LabRoot {
        &self.root
    }

    /// Who callers are: for a service added beside the xDS one.
    pub fn authenticator(&self) -> &Authenticator {
        &self.auth
    }

    /// The CA (`tests/src/istiod/ca.rs`) on the same listener: build it from
    /// [`Builder::root`] and [`Builder::authenticator`], then add it here.
    pub fn ca<S: IstioCertificateService>(mut self, ca: S) -> Self {
        self.routes.add_service(IstioCertificateServiceServer::new(ca));
        self
    }

    /// Serves on `listener` (bound by the caller, in whatever namespace it must answer).
    pub fn serve(mut self, listener: TcpListener) -> Result<FakeIstiod, IstiodError> {
        let addr = listener.local_addr().map_err(IstiodError::Listener)?;
        let serving = self.root.serving(&self.names)?;
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(&serving.cert_pem, &serving.key_pem));
        let xds = Xds::new(self.auth.clone(), &self.trust_domain);
        self.routes.add_service(xds.service());
        let router = Server::builder().tls_config(tls).map_err(IstiodError::Tls)?.add_routes(self.routes.routes());
        let (stop, stopped) = oneshot::channel::<()>();
        let incoming = TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, shutdown).await {
                tracing::warn!("fake istiod: the server failed: {e}");
            }
        });
        Ok(FakeIstiod { xds, addr, root_pem: self.root.pem().to_owned(), stop: Some(stop), task: Some(task) })
    }
}

/// A running fake istiod; stopped when dropped.
pub struct FakeIstiod {
    /// The xDS side: what it serves and what it recorded.
    pub xds: Xds,
    addr: SocketAddr,
    root_pem: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl FakeIstiod {
    /// A fake for cluster `cluster_id` with a fresh lab root, no tokens yet.
    pub fn builder(cluster_id: &str) -> Result<Builder, IstiodError> {
        Ok(Builder {
            auth: Authenticator::new(cluster_id),
            trust_domain: "cluster.local".into(),
            names: DEFAULT_NAMES.iter().map(|n| n.to_string()).collect(),
            root: LabRoot::generate("meshpath lab root")?,
            routes: RoutesBuilder::default(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The root its certificate chains to (PEM): a node proxy's root file.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Stops serving: streams end, then connections close (cut after a grace period).
    pub async fn stop(mut self) {
        self.xds.drop_streams();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(STOP_GRACE, &mut task).await.is_err()
        {
            task.abort();
        }
    }
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        self.xds.drop_streams();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
