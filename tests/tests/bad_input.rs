//! Every kind of bad input gets one clear line on stderr and exit status 2, before any guest runs.

use std::time::Duration;

use tests::{require_kvm, run_vmm, testguest, TempDir};

const T: Duration = Duration::from_secs(30);

fn assert_bad_input(args: &[&str], expect: &str) {
    let (status, stderr) = run_vmm(args, T);
    assert_eq!(status.code(), Some(2), "args {args:?}: status {status:?}, stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "args {args:?}: expected one line, got: {stderr}");
    assert!(lines[0].contains(expect), "args {args:?}: '{}' does not mention '{expect}'", lines[0]);
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "panic: {stderr}");
}

#[test]
fn missing_kernel() {
    assert_bad_input(&["run", "--kernel", "/nonexistent/bzImage"], "cannot open kernel /nonexistent/bzImage");
}

#[test]
fn unreadable_kernel_directory() {
    let dir = TempDir::new("kdir");
    assert_bad_input(&["run", "--kernel", dir.path().to_str().unwrap()], "kernel");
}

#[test]
fn kernel_of_unknown_format() {
    let dir = TempDir::new("kfmt");
    let bogus = dir.path().join("notakernel");
    std::fs::write(&bogus, vec![0x5au8; 8192]).unwrap();
    assert_bad_input(&["run", "--kernel", bogus.to_str().unwrap()], "neither a bzImage nor an ELF");
}

#[test]
fn elf_without_pvh_note() {
    // Any ELF executable without the Xen PVH note: the test binary itself.
    let me = std::env::current_exe().unwrap();
    require_kvm();
    assert_bad_input(&["run", "--kernel", me.to_str().unwrap()], "PVH");
}

#[test]
fn missing_initrd() {
    let kernel = testguest();
    assert_bad_input(&["run", "--kernel", kernel.to_str().unwrap(), "--initrd", "/nonexistent/initrd"], "initrd");
}

#[test]
fn missing_disk() {
    let kernel = testguest();
    assert_bad_input(&["run", "--kernel", kernel.to_str().unwrap(), "--disk", "/nonexistent/disk.img"], "disk");
}

#[test]
fn bad_disk_option() {
    assert_bad_input(&["run", "--disk", "/tmp/x.img,rx"], "invalid disk");
}

#[test]
fn memory_too_small_or_unparseable() {
    assert_bad_input(&["run", "--mem", "32M"], "too small");
    assert_bad_input(&["run", "--mem", "lots"], "invalid size 'lots'");
    assert_bad_input(&["run", "--mem", "1T"], "invalid size");
}

#[test]
fn vcpu_count_limits() {
    require_kvm();
    assert_bad_input(&["run", "--vcpus", "0"], "at least 1");
    assert_bad_input(&["run", "--vcpus", "255"], "more than this host allows");
    assert_bad_input(&["run", "--vcpus", "100000"], "more than this host allows");
    assert_bad_input(&["run", "--vcpus", "two"], "invalid value 'two'");
}

#[test]
fn unknown_argument() {
    assert_bad_input(&["run", "--frobnicate"], "unexpected argument");
}

#[test]
fn api_socket_path_that_is_not_a_socket_is_left_alone() {
    let dir = TempDir::new("notsock");
    let file = dir.path().join("precious.img");
    std::fs::write(&file, b"data").unwrap();
    assert_bad_input(&["run", "--api-sock", file.to_str().unwrap()], "not a socket");
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
}

#[test]
fn no_kvm_device_is_a_runtime_error() {
    let (status, stderr) = tests::in_mount_namespace("mount -t tmpfs tmpfs /dev", "run --cmdline workload=poweroff");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot open /dev/kvm"), "{stderr}");
}

#[test]
fn a_kvm_device_that_is_not_kvm_is_a_runtime_error() {
    let (status, stderr) =
        tests::in_mount_namespace("mount --bind /dev/null /dev/kvm", "run --cmdline workload=poweroff");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("not a usable KVM device"), "{stderr}");
}

#[test]
fn a_missing_argument_is_named() {
    assert_bad_input(&["status"], "the following required arguments were not provided: --vm <NAME>");
    assert_bad_input(&["snapshot", "--vm", "x"], "the following required arguments were not provided: --out <OUT>");
    assert_bad_input(&["status", "--vm", "x", "--api-sock", "/tmp/x.sock"], "cannot be used with");
}
