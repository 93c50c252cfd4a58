//! Another eBPF CNI's TCX programs, to chain before or after meshpath's: tiny classifiers
//! written in BPF assembly, assembled with LLVM's `llvm-mc` (installed with the eBPF
//! toolchain) and loaded with aya. Dropping a [`Foreign`] detaches its program.

use std::path::Path;
use std::process::Command;

use aya::Ebpf;
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};

use crate::lab::{LabError, Result};
use crate::traffic::in_netns;

/// What the program does with every packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `TCX_NEXT`: no opinion, the next program decides.
    Next,
    /// `TCX_PASS`: accepted, the chain ends here.
    Pass,
    /// `bpf_redirect` to the egress of this interface (of the same namespace).
    RedirectTo(u32),
}

impl Verdict {
    /// The program's name as the kernel reports it.
    pub fn program_name(self) -> &'static str {
        match self {
            Self::Next => "cni_next",
            Self::Pass => "cni_pass",
            Self::RedirectTo(_) => "cni_redirect",
        }
    }

    fn body(self) -> String {
        match self {
            Self::Next => "\tr0 = -1\n".into(),
            Self::Pass => "\tr0 = 0\n".into(),
            // bpf_redirect(ifindex, 0) is helper 23; it returns TC_ACT_REDIRECT.
            Self::RedirectTo(ifindex) => format!("\tr1 = {ifindex}\n\tr2 = 0\n\tcall 23\n"),
        }
    }

    fn assembly(self) -> String {
        let name = self.program_name();
        format!(
            "\t.section classifier,\"ax\",@progbits\n\t.globl {name}\n\t.type {name},@function\n{name}:\n{}\texit\n\
             .Lend:\n\t.size {name}, .Lend-{name}\n\t.section license,\"aw\",@progbits\n_license:\n\t.asciz \"GPL\"\n",
            self.body()
        )
    }
}

/// A foreign program attached to one interface's TCX ingress; detached on drop.
pub struct Foreign {
    _ebpf: Ebpf,
}

impl Foreign {
    /// Assembles `verdict` in `dir`, loads it and attaches it to `ifname` in namespace `ns`
    /// at `order` (`LinkOrder::first()`, `LinkOrder::last()`).
    pub fn attach(dir: &Path, ns: &str, ifname: &str, verdict: Verdict, order: LinkOrder) -> Result<Self> {
        let object = assemble(dir, verdict)?;
        let ifname = ifname.to_owned();
        let other = |e: String| LabError::Other(format!("{}: {e}", verdict.program_name()));
        let ebpf = in_netns(ns, move || -> std::result::Result<Ebpf, String> {
            let mut ebpf = Ebpf::load(&object).map_err(|e| format!("loading: {e}"))?;
            let prog: &mut SchedClassifier = ebpf
                .program_mut(verdict.program_name())
                .ok_or("no such program in the object")?
                .try_into()
                .map_err(|e| format!("not a classifier: {e}"))?;
            prog.load().map_err(|e| format!("verifier: {e}"))?;
            prog.attach_with_options(&ifname, TcAttachType::Ingress, TcAttachOptions::TcxOrder(order))
                .map_err(|e| format!("attaching to {ifname}: {e}"))?;
            Ok(ebpf)
        })?
        .map_err(other)?;
        Ok(Self { _ebpf: ebpf })
    }
}

/// The object file of `verdict`'s program.
fn assemble(dir: &Path, verdict: Verdict) -> Result<Vec<u8>> {
    let source = dir.join(format!("{}.s", verdict.program_name()));
    let object = source.with_extension("o");
    std::fs::write(&source, verdict.assembly())?;
    let llvm_mc = ["llvm-mc-22", "llvm-mc"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
        .ok_or_else(|| LabError::Other("llvm-mc is missing (run `cargo xtask setup`: it comes with llvm-22)".into()))?;
    crate::lab::run(Command::new(llvm_mc).args(["-triple=bpfel", "-filetype=obj", "-o"]).arg(&object).arg(&source))?;
    Ok(std::fs::read(&object)?)
}

/// The names of the programs on `ifname`'s TCX ingress in namespace `ns`, in chain order.
pub fn tcx_chain(ns: &str, ifname: &str) -> Result<Vec<String>> {
    let ifname = ifname.to_owned();
    let progs = in_netns(ns, move || SchedClassifier::query_tcx(&ifname, TcAttachType::Ingress))?
        .map_err(|e| LabError::Other(format!("querying tcx: {e}")))?
        .1;
    Ok(progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_owned()).collect())
}
