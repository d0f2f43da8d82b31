//! The control socket and the `stats` / `ctl` client subcommands.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

#[test]
fn stats_show_what_the_guest_holds_per_heap() {
    let daemon = Daemon::spawn([
        "--heap",
        "a=memfd,max-size=64M",
        "--heap",
        "b=memfd",
        "--shm-size",
        "1G",
    ]);
    let st = daemon.stats();
    eprintln!("idle stats: {}", st.raw);
    assert_eq!(st.heap("a"), Counters::default());
    assert_eq!(st.heap("b"), Counters::default());
    assert_eq!(st.total, Counters::default());

    let mut fe = FrontEnd::connect(&daemon);
    let a1 = fe.alloc_ok(0, 4 * KIB);
    let a2 = fe.alloc_ok(0, 32 * MIB);
    let b1 = fe.alloc_ok(1, 8 * KIB);
    let b2 = fe.alloc_ok(1, 8 * KIB);
    let b3 = fe.alloc_ok(1, 16 * KIB);
    let st = daemon.stats();
    eprintln!("stats: {}", st.raw);
    let (a, b) = (st.heap("a"), st.heap("b"));
    assert_eq!(a.buffers, 2, "{}", st.raw);
    assert_eq!(b.buffers, 3, "{}", st.raw);
    assert_eq!(a.bytes, a1.len + a2.len, "{}", st.raw);
    assert_eq!(b.bytes, b1.len + b2.len + b3.len, "{}", st.raw);
    let live = fe.shm().live_mappings() as u64;
    assert!(
        a.mappings >= 2,
        "heap a has an arena and a large buffer: {}",
        st.raw
    );
    assert!(b.mappings >= 1, "{}", st.raw);
    assert_eq!(a.mappings + b.mappings, live, "{}", st.raw);
    assert_eq!(
        st.total,
        Counters {
            bytes: a.bytes + b.bytes,
            buffers: 5,
            mappings: live,
            ..Default::default()
        },
        "{}",
        st.raw
    );

    fe.free_ok(a2.id);
    fe.free_ok(b2.id);
    let st = daemon.stats();
    assert_eq!(st.heap("a").buffers, 1, "{}", st.raw);
    assert_eq!(st.heap("a").bytes, a1.len, "{}", st.raw);
    assert_eq!(st.heap("b").buffers, 2, "{}", st.raw);
    assert_eq!(
        st.total.mappings,
        fe.shm().live_mappings() as u64,
        "{}",
        st.raw
    );

    // The client subcommand prints the same numbers.
    let ctl = daemon.control_path().display().to_string();
    let out = daemon.run_client(&["stats", "--control-socket", &ctl, "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stats --json: {} {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let cli = Stats::parse(&stdout);
    assert_eq!(cli.heaps, st.heaps, "stats --json vs control socket");
    assert_eq!(cli.total, st.total);
    let out = daemon.run_client(&["stats", "--control-socket", &ctl]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("stats (text):\n{text}");
    assert!(out.status.success(), "stats: {}", out.status);
    assert!(
        text.contains('a') && text.contains('b'),
        "heap names missing: {text}"
    );
}

#[test]
fn ctl_buffers_peek_poke() {
    let daemon = Daemon::spawn([
        "--heap",
        "a=memfd",
        "--heap",
        "bee=memfd",
        "--shm-size",
        "64M",
    ]);
    let mut fe = FrontEnd::connect(&daemon);
    let x = fe.alloc_ok(0, 8 * KIB);
    let y = fe.alloc_ok(1, 4 * KIB);
    let listing = daemon.control("buffers");
    eprintln!("buffers:\n{listing}");
    let lines: Vec<Vec<String>> = listing
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert_eq!(lines.len(), 2, "one line per live buffer: {listing:?}");
    for (b, heap) in [(&x, "a"), (&y, "bee")] {
        let line = lines
            .iter()
            .find(|l| l.first().map(String::as_str) == Some(&b.id.to_string()))
            .unwrap_or_else(|| panic!("buffer {} not listed: {listing:?}", b.id));
        let num = |s: &str| -> u64 {
            s.strip_prefix("0x")
                .map(|h| u64::from_str_radix(h, 16).unwrap())
                .unwrap_or_else(|| s.parse().unwrap())
        };
        assert_eq!(line.len(), 4, "`ID HEAP OFFSET LEN`: {line:?}");
        assert_eq!(line[1], heap);
        assert_eq!(num(&line[2]), b.offset, "{line:?} vs {b:x?}");
        assert_eq!(num(&line[3]), b.len, "{line:?} vs {b:x?}");
    }

    // `ctl` prints the reply and fails on an error reply.
    let ctl = daemon.control_path().display().to_string();
    fe.write_buffer(&x, 4096, &[0xde, 0xad, 0xbe, 0xef]);
    let id = x.id.to_string();
    let out = daemon.run_client(&["ctl", "--control-socket", &ctl, "peek", &id, "4096", "4"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ctl peek: {} {stdout}", out.status);
    assert!(stdout.contains("deadbeef"), "ctl peek output: {stdout:?}");
    let out = daemon.run_client(&["ctl", "--control-socket", &ctl, "poke", &id, "0", "c0ffee"]);
    assert!(out.status.success(), "ctl poke: {}", out.status);
    assert_eq!(fe.read_buffer(&x, 0, 3), [0xc0, 0xff, 0xee]);
    for bad in [
        vec!["peek", "999999", "0", "4"],
        vec!["peek", &id, "8192", "4"],
        vec!["poke", &id, "8190", "c0ffee"],
        vec!["frobnicate"],
        vec!["peek", &id, "0", "18446744073709551615"],
        vec!["peek", &id, "18446744073709551615", "2"],
        vec!["poke", &id, "0", "xyz"],
        vec!["poke", &id, "0", "abc"],
    ] {
        let mut args = vec!["ctl", "--control-socket", &ctl];
        args.extend(bad.iter().copied());
        let out = daemon.run_client(&args);
        assert!(
            !out.status.success(),
            "ctl {bad:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let reply = daemon.control(&bad.join(" "));
        assert!(
            reply.trim_start().starts_with("error"),
            "{bad:?}: reply {reply:?}"
        );
    }
    // Nothing changed outside the buffer.
    assert_eq!(fe.read_buffer(&x, 8 * KIB - 2, 2), [0, 0]);
}

#[test]
fn debug_commands_need_control_debug() {
    let daemon = Daemon::builder()
        .args(["--heap", "a=memfd", "--shm-size", "64M"])
        .no_control_debug()
        .spawn();
    let mut fe = FrontEnd::connect(&daemon);
    let b = fe.alloc_ok(0, 4 * KIB);
    let st = daemon.stats();
    assert_eq!(st.total.buffers, 1, "{}", st.raw);
    for cmd in [
        "buffers".to_owned(),
        format!("peek {} 0 4", b.id),
        format!("poke {} 0 ff", b.id),
    ] {
        let reply = daemon.control(&cmd);
        assert!(
            reply.trim_start().starts_with("error"),
            "{cmd:?} without --control-debug: {reply:?}"
        );
    }
    assert_eq!(
        fe.read_buffer(&b, 0, 1),
        [0],
        "poke wrote without --control-debug"
    );
}

#[test]
fn a_silent_control_client_does_not_block_others() {
    use std::io::Write;
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    daemon.wait_ready();
    // One client connects and never finishes its line; another sends junk and hangs up.
    let mut silent = std::os::unix::net::UnixStream::connect(daemon.control_path()).unwrap();
    silent.write_all(b"sta").unwrap();
    let mut junk = std::os::unix::net::UnixStream::connect(daemon.control_path()).unwrap();
    let _ = junk.write_all(&[0xff; 100_000]);
    drop(junk);
    // Others are still served (control() fails after its deadline if not). The daemon may
    // make them wait for its per-client read timeout.
    let start = std::time::Instant::now();
    let st = daemon.stats();
    eprintln!(
        "stats answered after {:?} with a silent client connected",
        start.elapsed()
    );
    assert_eq!(st.total.buffers, 0, "{}", st.raw);
    let mut fe = FrontEnd::connect(&daemon);
    let b = fe.alloc_ok(0, 4 * KIB);
    assert_eq!(daemon.stats().total.buffers, 1);
    fe.free_ok(b.id);
    drop(silent);
}

#[test]
fn stats_answer_while_the_worker_waits_for_the_front_end() {
    // The worker holds the device while QEMU has not acknowledged a SHMEM_MAP: `stats`
    // answers from its snapshot, debug commands give up with an error.
    let daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    let mut fe = FrontEnd::connect(&daemon);
    let held = fe.alloc_ok(0, 4 * KIB);
    fe.stall_maps(true);
    let head = fe.submit(&[
        Seg::R(alloc_req(0, 0, 32 * MIB)),
        Seg::W(ALLOC_RESP_SIZE as u32),
    ]);
    fe.kick();
    let start = std::time::Instant::now();
    while fe.stalled_maps() == 0 {
        assert!(start.elapsed() < DEADLINE, "the ALLOC never sent SHMEM_MAP");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let t0 = std::time::Instant::now();
    let st = daemon.stats();
    let took = t0.elapsed();
    eprintln!(
        "stats while a SHMEM_MAP is pending, in {took:?}: {}",
        st.raw
    );
    assert!(
        took < std::time::Duration::from_secs(2),
        "stats took {took:?}"
    );
    assert_eq!(st.total.buffers, 1, "{}", st.raw);
    let reply = daemon.control("buffers");
    assert!(reply.starts_with("error"), "buffers while busy: {reply}");
    fe.stall_maps(false);
    let c = fe.wait(head);
    parse_alloc(&c, "the stalled ALLOC").unwrap();
    assert!(daemon.control("buffers").contains(&held.id.to_string()));
}

#[test]
fn clients_give_up_on_a_silent_daemon() {
    // A control socket that accepts and never answers (a hung daemon).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let keep = std::thread::spawn(move || {
        // Accept both clients and keep them waiting, answering nothing.
        let conns: Vec<_> = listener.incoming().take(2).collect();
        drop(conns);
    });
    let bin = common::daemon::daemon_bin();
    let p = path.display().to_string();
    for args in [
        vec!["stats", "--control-socket", &p, "--timeout", "1"],
        vec!["ctl", "--control-socket", &p, "--timeout", "1", "stats"],
    ] {
        let t0 = std::time::Instant::now();
        let out = std::process::Command::new(bin)
            .args(&args)
            .output()
            .unwrap();
        let took = t0.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("{args:?}: {} after {took:?}: {err}", out.status);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            took < std::time::Duration::from_secs(4),
            "{args:?} took {took:?}"
        );
    }
    keep.join().unwrap();
}
