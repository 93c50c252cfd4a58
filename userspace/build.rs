//! Builds the eBPF object (crate `meshpath-ebpf`) and hands its path to the userspace crate,
//! which embeds it. The eBPF crate needs Debian's rustc (it ships `core` for
//! `bpfel-unknown-none`) and bpf-linker; `cargo xtask setup` installs both.
//!
//! Without them (a contributor's machine), the crate still builds for `cargo check`, clippy
//! and the unit tests, with an empty object and a warning: such a `meshpath node` refuses to
//! start. `cargo xtask` sets `MESHPATH_REQUIRE_EBPF`, which makes a missing toolchain an error.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const BPF_TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("userspace/ lives in the workspace").to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    protos(&manifest);
    for p in ["ebpf/src", "ebpf/Cargo.toml", "common/src", "common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=MESHPATH_BPF_RUSTC");
    println!("cargo:rerun-if-env-changed=MESHPATH_REQUIRE_EBPF");

    let bpf_rustc = env::var("MESHPATH_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    if !Path::new(&bpf_rustc).exists() || which("bpf-linker").is_none() {
        let missing = format!("the eBPF toolchain is missing ({bpf_rustc} and bpf-linker are needed)");
        if env::var_os("MESHPATH_REQUIRE_EBPF").is_some() {
            fail(&format!("{missing}: run `cargo xtask setup`"));
        }
        println!(
            "cargo:warning={missing}: this build embeds no eBPF object and `meshpath node` will refuse to start (`cargo xtask setup` installs it)"
        );
        std::fs::write(out_dir.join("meshpath-ebpf.o"), [])
            .unwrap_or_else(|e| fail(&format!("writing the empty eBPF object: {e}")));
        return;
    }

    // A target dir of its own (inside the shared one): the outer cargo holds the lock on
    // target/<profile> while this script runs.
    let target_dir =
        env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target")).join("ebpf");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root.join("ebpf"))
        .args(["build", "--release", "--package", "meshpath-ebpf", "--target", BPF_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC", &bpf_rustc)
        // Debian's prebuilt `core` for the BPF target is unstable-only.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", "bpf-linker")
        // BTF makes typed map dumps (bpftool, `meshpath map`) possible.
        .env("CARGO_ENCODED_RUSTFLAGS", ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"));
    for var in ["RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_BUILD_RUSTFLAGS"]
    {
        cmd.env_remove(var);
    }
    let status = cmd.status().unwrap_or_else(|e| fail(&format!("running cargo for the eBPF crate: {e}")));
    if !status.success() {
        fail("building the eBPF crate failed (see the output above)");
    }
    let obj = target_dir.join(BPF_TARGET).join("release").join("meshpath-ebpf");
    std::fs::copy(&obj, out_dir.join("meshpath-ebpf.o"))
        .unwrap_or_else(|e| fail(&format!("copying {}: {e}", obj.display())));
}

/// istiod's APIs (`proto/`), compiled by protox (no system protoc needed): the clients only,
/// the lab builds its own servers from the same files.
fn protos(manifest: &Path) {
    let dir = manifest.join("proto");
    println!("cargo:rerun-if-changed={}", dir.display());
    let files = ["xds.proto", "workload.proto", "authorization.proto", "citadel.proto"].map(|f| dir.join(f));
    let fds = protox::compile(files, [&dir]).unwrap_or_else(|e| fail(&format!("compiling the protos: {e}")));
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)
        .unwrap_or_else(|e| fail(&format!("generating code from the protos: {e}")));
}

fn which(bin: &str) -> Option<PathBuf> {
    env::var_os("PATH").and_then(|paths| env::split_paths(&paths).map(|d| d.join(bin)).find(|p| p.is_file()))
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
