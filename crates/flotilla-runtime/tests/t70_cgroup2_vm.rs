//! The runtime's whole test suite inside a VM whose kernel boots with a pure cgroup v2 layout
//! (`scripts/cgroup2-vm.sh`: Debian's kernel, this host's root over virtio-9p, cgroup2 alone at
//! /sys/fs/cgroup), so cgroup v2 is exercised on hosts that run v1 or hybrid.
//!
//! On the host this test lists the already built test binaries (`cargo nextest list`), boots
//! the VM and runs them there with nextest. Inside the VM (`FLOTILLA_IN_CGROUP2_VM` set by the
//! script) the same test checks that the host probe sees `CgroupLayout::V2`. Set
//! `FLOTILLA_SKIP_VM_TEST=1` to leave the VM out of a quick local run.
mod common;
use flotilla_runtime::{CgroupLayout, HostProbe, RuntimeConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The target directory holding this test binary (`<target>/<profile>/deps/<bin>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .find(|p| p.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(WORKSPACE).join("target"))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The host's target triple, as rustc reports it (`host: x86_64-unknown-linux-gnu`).
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = output_of(Command::new(rustc).arg("-vV"), "rustc -vV");
    String::from_utf8_lossy(&out)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("rustc -vV printed no host line"))
}

/// Runs `cmd`, failing the test with its output when it does not succeed.
fn output_of(cmd: &mut Command, what: &str) -> Vec<u8> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}", out.status);
    out.stdout
}

#[test]
fn t70_runtime_tests_pass_under_pure_cgroup_v2() {
    if std::env::var_os("FLOTILLA_IN_CGROUP2_VM").is_some() {
        let probe = HostProbe::run(&RuntimeConfig::new("/nonexistent", "/bin/true", vec![]));
        let cgroup_mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" - cgroup"))
            .map(str::to_string)
            .collect();
        println!(
            "FLOTILLA-VM-PROBE cgroup_layout={:?} kernel={}",
            probe.cgroup_layout, probe.kernel
        );
        assert_eq!(
            probe.cgroup_layout,
            CgroupLayout::V2,
            "cgroup mounts: {cgroup_mounts:#?}"
        );
        assert_eq!(cgroup_mounts.len(), 1, "only cgroup2: {cgroup_mounts:#?}");
        return;
    }
    if std::env::var_os("FLOTILLA_SKIP_VM_TEST").is_some() {
        eprintln!("!!!!! SKIPPING t70_cgroup2_vm: FLOTILLA_SKIP_VM_TEST is set !!!!!");
        return;
    }
    if !common::can_run() {
        return;
    }
    let workspace = PathBuf::from(WORKSPACE)
        .canonicalize()
        .expect("workspace dir");
    let script = workspace.join("scripts/cgroup2-vm.sh");
    // Inside the VM only the host's root is visible (its /tmp is a fresh tmpfs): keep the
    // build metadata next to the binaries.
    let meta = tempfile::Builder::new()
        .prefix("cgroup2-vm-")
        .tempdir_in(target_dir())
        .expect("metadata dir");
    let binaries = output_of(
        Command::new(cargo())
            .current_dir(&workspace)
            // The same package selection as `scripts/test.sh`: `-p flotilla-runtime` alone
            // unifies features differently and rebuilds most dependencies.
            .args(["nextest", "list", "--workspace"])
            .args(["--list-type", "binaries-only", "--message-format", "json"]),
        "cargo nextest list (needs cargo-nextest)",
    );
    // `--offline` alone needs every crate of every target platform in the local registry, and
    // a Linux build fetches only Linux's: filter to the host so a fresh cargo home works.
    let metadata = output_of(
        Command::new(cargo()).current_dir(&workspace).args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
            &host_triple(),
        ]),
        "cargo metadata",
    );
    let (bin_meta, cargo_meta) = (
        meta.path().join("binaries.json"),
        meta.path().join("cargo.json"),
    );
    std::fs::write(&bin_meta, binaries).expect("write binaries metadata");
    std::fs::write(&cargo_meta, metadata).expect("write cargo metadata");

    let started = std::time::Instant::now();
    let out = Command::new(&script)
        .current_dir(&workspace)
        .args(["cargo-nextest", "nextest", "run", "--no-fail-fast"])
        .args(["-E", "package(flotilla-runtime)"])
        .arg("--binaries-metadata")
        .arg(&bin_meta)
        .arg("--cargo-metadata")
        .arg(&cargo_meta)
        .arg("--workspace-remap")
        .arg(&workspace)
        // The VM's own deadline ends it (exit 124) before nextest's 600 s limit kills this test,
        // so a hung guest still prints its console.
        .env(
            "FLOTILLA_VM_TIMEOUT",
            std::env::var("FLOTILLA_VM_TIMEOUT").unwrap_or_else(|_| "540".into()),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    println!("{stdout}");
    eprintln!("VM run took {:?}", started.elapsed());
    let booted = stdout
        .lines()
        .find(|l| l.starts_with("FLOTILLA-VM-BOOTED"))
        .unwrap_or_else(|| {
            panic!(
                "the cgroup v2 VM did not boot ({}); see the output above, \
                 rerun with FLOTILLA_VM_VERBOSE=1",
                out.status
            )
        });
    assert!(
        booted.contains("cgroup_mounts=1 sys_fs_cgroup=cgroup2 "),
        "the VM must have cgroup2 alone at /sys/fs/cgroup: {booted}"
    );
    assert!(
        out.status.success(),
        "runtime tests failed under cgroup v2 ({}); see the output above",
        out.status
    );
    let summary = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("Summary"))
        .unwrap_or_else(|| panic!("no nextest summary in the VM output"));
    eprintln!("under cgroup v2: {}", summary.trim());
    assert!(
        stdout.lines().any(
            |l| l.contains("PASS") && l.contains("t70_runtime_tests_pass_under_pure_cgroup_v2")
        ),
        "the probe check ran inside the VM"
    );
}
