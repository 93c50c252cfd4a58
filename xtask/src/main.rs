//! Developer tasks: `cargo xtask setup | build | run | lab | bench | lint | fuzz | test | interop`.
//!
//! Every task sets up what it needs first (the eBPF toolchain, bpffs) and says what it is
//! doing, so a fresh machine needs nothing but `cargo xtask test`.
#![forbid(unsafe_code)]

mod ztunnel;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Debian packages the build and the lab need. `libstd-rust-web-dev-bpf` ships a prebuilt
/// `core` for bpfel-unknown-none matching Debian's rustc, so no nightly is needed.
/// `curl` is for trying the lab by hand (`cargo xtask run` prints curl commands).
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "bpftool",
    "iproute2",
    "util-linux",
    "iptables",
    "ipset",
    "curl",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// How the lab and the kernel tests learn which meshpath binary to run.
const MESHPATH_BIN_ENV: &str = "MESHPATH_BIN";
/// How the lab's nodes are joined (read by the lab binary and the kernel tests).
const TOPOLOGY_ENV: &str = "MESHPATH_LAB_TOPOLOGY";
const TOPOLOGIES: [&str; 3] = ["routed", "bridge", "l3"];
/// The lab's control plane, passed to `meshpath-lab` (its `--control-plane`).
const CONTROL_PLANE_ENV: &str = "MESHPATH_LAB_CONTROL_PLANE";
const CONTROL_PLANES: [&str; 2] = ["standalone", "istiod"];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (Debian packages and bpf-linker); does nothing if present.
    Setup,
    /// Build meshpath (userspace with the eBPF object embedded).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run meshpath: as this host's node daemon when a Kubernetes config is around
    /// (KUBECONFIG or ~/.kube/config), else in the namespace lab.
    Run {
        /// Node name to run as with Kubernetes (default: the hostname).
        #[arg(long)]
        node: Option<String>,
        /// The lab's topology (lab mode): routed (veth node link), bridge (cni0 and VXLAN) or l3 (no Ethernet header).
        #[arg(long, value_parser = TOPOLOGIES)]
        topology: Option<String>,
        /// The lab's control plane (lab mode): standalone (the workload file) or istiod (the
        /// lab's API server and a fake istiod).
        #[arg(long, value_parser = CONTROL_PLANES)]
        control_plane: Option<String>,
        /// Extra arguments for `meshpath node` (Kubernetes mode).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build the two-node lab and run meshpath in it (`--smoke`: send traffic, report, tear down;
    /// `--upgrade`: take each node over under load).
    Lab {
        #[arg(long, conflicts_with = "upgrade")]
        smoke: bool,
        /// Take each node's daemon over under load; every connection and byte checked.
        #[arg(long)]
        upgrade: bool,
        /// routed (veth node link), bridge (cni0 and VXLAN) or l3 (no Ethernet header).
        #[arg(long, value_parser = TOPOLOGIES)]
        topology: Option<String>,
        /// standalone (the workload file) or istiod (the lab's API server and a fake istiod).
        #[arg(long, value_parser = CONTROL_PLANES)]
        control_plane: Option<String>,
    },
    /// Benchmark meshpath against the iptables designs and no proxy (release build); writes
    /// BENCHMARKS.md and benchmarks.svg at the top of the repository.
    Bench {
        /// Short rounds at 10 workloads only.
        #[arg(long, conflicts_with = "soak")]
        quick: bool,
        /// The soak: a minute of churn per path, 10 000 connections held, idle CPU and memory
        /// (about 6 minutes of fixed waits, 7 with ztunnel; a whole run with ztunnel took 8.1
        /// minutes on 2 cores, release build done). With MESHPATH_ZTUNNEL set, ztunnel's HBONE
        /// runs beside meshpath's.
        #[arg(long)]
        soak: bool,
        /// L4 authorization: new HBONE connections per second under the lab's fake istiod with
        /// no policy, 10 000 in other namespaces and 10 000 GLOBAL DENY (3 rounds of 20 s per
        /// configuration, about 10 minutes with ztunnel); ztunnel's rows too with
        /// MESHPATH_ZTUNNEL set. Writes its own section of BENCHMARKS.md.
        #[arg(long, conflicts_with_all = ["quick", "soak"])]
        policies: bool,
        /// The CNI plugin: the time of its ADD for 200 new pods of the mesh and 200 outside it
        /// (about a minute). Writes its own section of BENCHMARKS.md.
        #[arg(long, conflicts_with_all = ["quick", "soak", "policies"])]
        cni: bool,
    },
    /// `cargo fmt --check` and clippy (warnings denied) over every crate, the eBPF one too.
    Lint,
    /// Fuzz the parsers a hostile peer or a bad file reaches (cargo-fuzz, with ASan, on this
    /// stable toolchain): packet classification, HBONE requests, the workload file,
    /// `meshpath map` arguments.
    Fuzz {
        /// Inputs per target.
        #[arg(long, default_value_t = 1_000_000)]
        runs: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// Run every test: unit tests and the kernel tests in throwaway namespaces.
    Test {
        /// Build every kernel test's lab in this topology: routed, bridge or l3.
        #[arg(long, value_parser = TOPOLOGIES)]
        topology: Option<String>,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the interop tests against Istio's ztunnel (tests/interop.rs and
    /// tests/istiod_ztunnel.rs, ignored by `test`),
    /// with the ztunnel binary checked against the SHA256SUMS beside it first.
    Interop {
        /// Where ztunnel, its SHA256SUMS and its test CA (src/tls/) are
        /// [default: ../shared/peers/ztunnel beside this checkout].
        #[arg(long, env = "MESHPATH_ZTUNNEL_DIR")]
        ztunnel_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup(),
        Task::Build { release } => {
            setup()?;
            build(release).map(|_| ())
        }
        Task::Run { node, topology, control_plane, args } => {
            setup()?;
            if let Some(kubeconfig) = kubeconfig() {
                require_root("the node daemon")?;
                let bins = build(false)?;
                let mut cmd = Command::new(&bins.meshpath);
                cmd.arg("node").env("KUBECONFIG", &kubeconfig);
                if let Some(n) = node {
                    cmd.args(["--node", &n]);
                }
                step(&format!(
                    "running the node daemon on this host, following the cluster of {} (Ctrl-C stops it)",
                    kubeconfig.display()
                ));
                return status(cmd.args(&args));
            }
            if let (Some(_), Some(t)) = (kubeconfig(), &topology) {
                bail!("--topology {t} applies to the lab; a Kubernetes config was found, so this runs the node daemon");
            }
            if let (Some(_), Some(c)) = (kubeconfig(), &control_plane) {
                bail!(
                    "--control-plane {c} applies to the lab; a Kubernetes config was found, so this runs the node daemon (give `-- --control-plane {c}` for its flag)"
                );
            }
            if node.is_some() || !args.is_empty() {
                bail!(
                    "--node and daemon arguments apply to the Kubernetes mode; no KUBECONFIG or ~/.kube/config was found"
                );
            }
            require_root("the lab")?;
            let bins = build(false)?;
            step("starting the lab (Ctrl-C stops it and tears it down)");
            let mut cmd = bins.lab(["run"]);
            with_control_plane(&mut cmd, control_plane.as_deref());
            status(with_topology(&mut cmd, topology.as_deref()))
        }
        Task::Lab { smoke, upgrade, topology, control_plane } => {
            setup()?;
            require_root("the lab")?;
            let bins = build(false)?;
            let what = match (smoke, upgrade) {
                (true, _) => "smoke",
                (_, true) => "upgrade",
                _ => "run",
            };
            let mut cmd = bins.lab([what]);
            with_control_plane(&mut cmd, control_plane.as_deref());
            status(with_topology(&mut cmd, topology.as_deref()))
        }
        Task::Bench { quick, soak, policies, cni } => {
            setup()?;
            require_root("the benchmark")?;
            let bins = build(true)?;
            status(&mut bins.lab(["cleanup"]))?;
            step(match (quick, soak, policies, cni) {
                (true, ..) => "benchmarking (quick: 10 workloads, short rounds)",
                (_, true, ..) => "soaking (a minute of churn per path, 10 000 connections held)",
                (_, _, true, _) => "benchmarking L4 authorization (none, 10 000 elsewhere, 10 000 GLOBAL DENY)",
                (.., true) => "benchmarking the CNI plugin's ADD (200 pods in the mesh, 200 outside)",
                _ => "benchmarking (10, 1 000 and 10 000 workloads)",
            });
            let mut cmd = bins.lab(["bench", "--out", "BENCHMARKS.md", "--chart", "benchmarks.svg"]);
            let json = match (soak, policies, cni) {
                (true, ..) => "soak.json",
                (_, true, _) => "policies.json",
                (.., true) => "cni.json",
                _ => "benchmarks.json",
            };
            // Beside the build (CARGO_TARGET_DIR may be outside the checkout).
            cmd.current_dir(root()).arg("--json").arg(target_dir().join(json));
            if quick {
                cmd.arg("--quick");
            }
            if soak {
                cmd.arg("--soak");
            }
            if policies {
                cmd.arg("--policies");
            }
            if cni {
                cmd.arg("--cni");
            }
            let result = status(&mut cmd);
            status(&mut bins.lab(["cleanup"]))?;
            result
        }
        Task::Lint => {
            setup()?;
            lint()
        }
        Task::Fuzz { runs, targets } => {
            setup()?;
            fuzz(runs, &targets)
        }
        Task::Test { topology, args } => {
            setup()?;
            require_root("the kernel tests")?;
            let bins = build(false)?;
            // A crashed earlier run may have left namespaces or pins behind.
            status(&mut bins.lab(["cleanup"]))?;
            step("running unit and kernel tests");
            let mut cmd = cargo();
            // Every test binary runs even when an earlier one fails: one report shows all failures.
            cmd.args(["test", "--no-fail-fast", "--workspace", "--exclude", "meshpath-ebpf"])
                .env(MESHPATH_BIN_ENV, &bins.meshpath);
            with_topology(&mut cmd, topology.as_deref());
            if !args.is_empty() {
                cmd.arg("--").args(&args);
            }
            let result = run_tests(&mut cmd);
            status(&mut bins.lab(["cleanup"]))?;
            result.map(|_| ())
        }
        Task::Interop { ztunnel_dir } => interop(&ztunnel_dir.unwrap_or_else(|| ztunnel::default_dir(&root()))),
    }
}

/// How many tests `cargo xtask interop` runs: each must pass, none be skipped (both ways
/// with ztunnel's test CA, both ways under the fake istiod, ztunnel alone on the fake, the
/// policy cases side by side).
const INTEROP_TESTS: u64 = 4;

/// The interop test with the ztunnel in `dir`, checked before anything is built: a missing
/// or different binary fails at once, and a run where the test did not run fails too.
fn interop(dir: &Path) -> Result<()> {
    let binary = ztunnel::checked(dir)?;
    setup()?;
    require_root("the interop test")?;
    let bins = build(false)?;
    status(&mut bins.lab(["cleanup"]))?;
    step(&format!("running the interop test against {}", binary.display()));
    let mut cmd = cargo();
    // Both ways on the lab (ztunnel's test CA, then the fake istiod's), the policy cases
    // side by side, then ztunnel alone on the fake istiod (tests/istiod_ztunnel.rs).
    cmd.args(["test", "--package", "meshpath-lab", "--test", "interop", "--test", "istiod_ztunnel", "--", "--ignored"])
        .env(MESHPATH_BIN_ENV, &bins.meshpath)
        .env("MESHPATH_ZTUNNEL", &binary)
        .env("MESHPATH_ZTUNNEL_SRC", dir);
    let result = run_tests(&mut cmd);
    status(&mut bins.lab(["cleanup"]))?;
    if result?.passed < INTEROP_TESTS {
        bail!("the interop tests did not all run");
    }
    Ok(())
}

/// Names the lab's control plane to `cmd` (else standalone).
fn with_control_plane(cmd: &mut Command, control_plane: Option<&str>) {
    if let Some(c) = control_plane {
        cmd.env(CONTROL_PLANE_ENV, c);
    }
}

/// Names the lab's topology to `cmd` (else it inherits the environment's, or routed).
fn with_topology<'a>(cmd: &'a mut Command, topology: Option<&str>) -> &'a mut Command {
    if let Some(t) = topology {
        cmd.env(TOPOLOGY_ENV, t);
    }
    cmd
}

/// `cargo fmt --check` and clippy with warnings denied, over every crate (the eBPF one
/// checked for the host with `panic=abort`, as it has no unwinding).
fn lint() -> Result<()> {
    step("checking formatting (cargo fmt --check)");
    status(cargo().args(["fmt", "--all", "--check"]))?;
    step("clippy: userspace, lab, xtask, common");
    status(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "meshpath-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("clippy: the eBPF crate");
    status(cargo().args(["clippy", "--package", "meshpath-ebpf", "--", "-C", "panic=abort", "-D", "warnings"]))
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// The workspace `cargo xtask` runs in. `cargo run` names the invoking tree's xtask package
/// at run time; the path compiled in is only a fallback, since worktrees that share a target
/// directory share this binary too, and it must act on the caller's tree.
fn root() -> PathBuf {
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    manifest_dir.parent().expect("xtask/ is in the workspace").to_owned()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Set up by every task: a build without the eBPF object must not pass for a real one.
    c.current_dir(root()).env("MESHPATH_REQUIRE_EBPF", "1");
    c
}

fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("running {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

/// Runs cargo test, echoing its output, and ends with one summary line over every test
/// binary (cargo's own last line is often an empty doc-test run).
fn run_tests(cmd: &mut Command) -> Result<TestCounts> {
    use std::io::{BufRead, BufReader};
    let shown = format!("{cmd:?}");
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().with_context(|| format!("running {shown}"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let st = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(TestCounts { passed })
}

/// What a [`run_tests`] that succeeded ran.
struct TestCounts {
    passed: u64,
}

fn require_root(what: &str) -> Result<()> {
    let uid = Command::new("id").arg("-u").output().context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("{what} needs root (network namespaces, eBPF): run as root");
    }
    Ok(())
}

fn kubeconfig() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("KUBECONFIG").filter(|k| !k.is_empty()) {
        return Some(PathBuf::from(k));
    }
    let home = std::env::var_os("HOME")?;
    let p = Path::new(&home).join(".kube/config");
    p.exists().then_some(p)
}

/// Installs what is missing, and only that.
fn setup() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES.iter().copied().filter(|p| !deb_installed(p)).collect();
    if !missing.is_empty() {
        step(&format!("installing Debian packages: {}", missing.join(" ")));
        status(Command::new("apt-get").args(["update", "-q"]))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    if !bpf_linker_ok() {
        step(&format!("installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"));
        let mut c = cargo();
        c.args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX);
        status(&mut c)?;
    }
    Ok(())
}

fn deb_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

/// The fuzz targets (tests/fuzz/fuzz_targets) and the largest input each takes.
const FUZZ_TARGETS: &[(&str, usize)] =
    &[("packet", 256), ("hbone_request", 512), ("workload_file", 4096), ("map_args", 512)];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn fuzz(runs: u64, only: &[String]) -> Result<()> {
    if let Some(unknown) = only.iter().find(|t| !FUZZ_TARGETS.iter().any(|(n, _)| n == t)) {
        bail!(
            "no fuzz target {unknown:?}; there are: {}",
            FUZZ_TARGETS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        );
    }
    let have = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !have {
        step(&format!("installing cargo-fuzz {CARGO_FUZZ_VERSION}"));
        status(cargo().args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))?;
    }
    let dir = root().join("tests/fuzz");
    for (target, max_len) in FUZZ_TARGETS.iter().filter(|(n, _)| only.is_empty() || only.iter().any(|t| t == n)) {
        step(&format!("fuzzing {target}: {runs} inputs (the first build takes minutes)"));
        let mut c = cargo();
        // cargo-fuzz passes -Z flags (ASan, coverage); this stable toolchain takes them so.
        c.current_dir(&dir).env("RUSTC_BOOTSTRAP", "1").args(["fuzz", "run", "--fuzz-dir", "."]).arg(target);
        c.arg("--").arg(format!("-runs={runs}")).arg(format!("-max_len={max_len}"));
        status(&mut c)?;
    }
    Ok(())
}

/// Where the build put the binaries.
struct Binaries {
    meshpath: PathBuf,
    lab: PathBuf,
}

impl Binaries {
    /// `meshpath-lab <args>`, told which meshpath binary its nodes run.
    fn lab<const N: usize>(&self, args: [&str; N]) -> Command {
        let mut c = Command::new(&self.lab);
        c.args(args).env(MESHPATH_BIN_ENV, &self.meshpath);
        c
    }
}

/// Builds the meshpath binary and the lab that drives it.
/// Where cargo builds: CARGO_TARGET_DIR, else `target/` in the checkout.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

fn build(release: bool) -> Result<Binaries> {
    step(&format!("building meshpath and its lab ({})", if release { "release" } else { "debug" }));
    let mut c = cargo();
    c.args(["build", "--package", "meshpath", "--package", "meshpath-lab", "--bins"]);
    if release {
        c.arg("--release");
    }
    status(&mut c)?;
    let dir = target_dir().join(if release { "release" } else { "debug" });
    Ok(Binaries { meshpath: dir.join("meshpath"), lab: dir.join("meshpath-lab") })
}
