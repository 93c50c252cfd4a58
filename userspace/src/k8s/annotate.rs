//! The redirection annotation istio-cni sets on a captured pod
//! (`ambient.istio.io/redirection: enabled`): istiod tells peers to use HBONE toward a pod
//! only while it carries it. It is patched through `pods/status` (as istio-cni does, so the
//! DaemonSet needs no write access to pods themselves).

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use meshpath_common::names::{REDIRECTION_ANNOTATION, REDIRECTION_ENABLED};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum AnnotateError {
    #[error("{pod} is not a namespace/name")]
    BadName { pod: String },
    #[error("patching {pod}'s status: {source}")]
    Patch { pod: String, source: kube::Error },
}

/// What the patch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patched {
    Done,
    /// The pod is gone: nothing to annotate any more.
    NoPod,
}

/// Sets (`on`) or removes the annotation on pod `namespace/name`.
pub async fn set_redirection(client: &Client, pod: &str, on: bool) -> Result<Patched, AnnotateError> {
    let (namespace, name) = pod.split_once('/').ok_or_else(|| AnnotateError::BadName { pod: pod.to_owned() })?;
    let value = if on { json!(REDIRECTION_ENABLED) } else { serde_json::Value::Null };
    let patch = json!({ "metadata": { "annotations": { REDIRECTION_ANNOTATION: value } } });
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => Ok(Patched::Done),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Patched::NoPod),
        Err(source) => Err(AnnotateError::Patch { pod: pod.to_owned(), source }),
    }
}
