//! Dirty page tracking on real KVM: the test guest writes a known set of pages once per tick
//! (`workload=dirty`); with the log started, a fetch holds every one of them and not the whole
//! memory, a fetch clears the log, and a paused guest dirties nothing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;
use tests::{field, hex_field, vmm_ok, TempDir, Vmm};

const T: Duration = Duration::from_secs(30);
const PAGES: u64 = 32;

/// One request on the control socket; the reply as JSON.
fn call(sock: &str, request: &str) -> Value {
    let mut stream = UnixStream::connect(sock).expect("connect to the control socket");
    stream.write_all(format!("{request}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
}

fn dirty_log(sock: &str, op: &str) -> Value {
    let reply = call(sock, &format!(r#"{{"verb":"dirty-log","op":"{op}"}}"#));
    assert_eq!(reply["ok"], true, "dirty-log {op}: {reply}");
    reply
}

/// (dirty page count, ranges) of a fetch.
fn fetch(sock: &str) -> (u64, Vec<(u64, u64)>) {
    let reply = dirty_log(sock, "fetch");
    let d = &reply["dirty"];
    let ranges = d["ranges"].as_array().unwrap().iter().map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()));
    (d["pages"].as_u64().unwrap(), ranges.collect())
}

fn contains(ranges: &[(u64, u64)], gpa: u64) -> bool {
    ranges.iter().any(|&(a, len)| gpa >= a && gpa < a + len)
}

#[test]
fn the_log_holds_the_pages_the_guest_wrote_and_clears_on_fetch() {
    let dir = TempDir::new("dirty");
    let sock = dir.path().join("d.sock").display().to_string();
    let cmdline = format!("workload=dirty dirty.pages={PAGES} tick.ms=200");
    let mut vm = Vmm::testguest(&cmdline, &["--mem", "64M", "--api-sock", &sock]);
    let setup = vm.wait_for("testguest: dirty pages=", T);
    let (base, stride) = (hex_field(&setup, "base"), hex_field(&setup, "stride"));
    vm.wait_for("testguest: tick", T);

    // Not started: a fetch is refused, and says why.
    let refused = call(&sock, r#"{"verb":"dirty-log","op":"fetch"}"#);
    assert_eq!(refused["ok"], false);
    assert!(refused["error"].as_str().unwrap().contains("not started"), "{refused}");

    dirty_log(&sock, "start");
    // Two ticks: at least one whole round of writes after the start.
    let first = vm.wait_for("testguest: tick", T);
    loop {
        let line = vm.wait_for("testguest: tick", T);
        if field(&line, "cpu0") >= field(&first, "cpu0").map(|r| r + 1) {
            break;
        }
    }
    let (count, ranges) = fetch(&sock);
    for i in 0..PAGES {
        let page = base + i * stride;
        assert!(contains(&ranges, page), "page {page:#x} written by the guest is not in the log: {ranges:x?}");
    }
    let total_pages = (64u64 << 20) / 4096;
    assert!(
        count >= PAGES && count < total_pages / 4,
        "{count} dirty pages of {total_pages}: the log is not selective"
    );

    // Paused, the guest writes nothing: once the pages dirtied before the pause are fetched,
    // the log stays empty.
    vmm_ok(&["pause", "--api-sock", &sock]);
    fetch(&sock);
    let (paused_count, paused_ranges) = fetch(&sock);
    assert_eq!(paused_count, 0, "pages dirtied while paused: {paused_ranges:x?}");
    vmm_ok(&["continue", "--api-sock", &sock]);
    vm.wait_for("testguest: tick", T);
    vm.wait_for("testguest: tick", T);
    let (_, again) = fetch(&sock);
    assert!(contains(&again, base), "the log did not go on after a fetch: {again:x?}");

    dirty_log(&sock, "stop");
    dirty_log(&sock, "stop"); // idempotent
    let refused = call(&sock, r#"{"verb":"dirty-log","op":"fetch"}"#);
    assert_eq!(refused["ok"], false, "fetch after stop: {refused}");
    vm.wait_for("testguest: tick", T);
}
