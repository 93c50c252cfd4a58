//! The lab's fake istiod speaks the same APIs as meshpath's clients, from its own code
//! generated from the same files (`userspace/proto/`): servers only, so the two meet on the
//! wire, not through shared types.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let dir = manifest.parent().expect("tests/ lives in the workspace").join("userspace/proto");
    println!("cargo:rerun-if-changed={}", dir.display());
    let files = ["xds.proto", "workload.proto", "authorization.proto", "citadel.proto"].map(|f| dir.join(f));
    let fds = protox::compile(files, [&dir]).unwrap_or_else(|e| panic!("compiling the protos: {e}"));
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating code from the protos: {e}"));
}
