//! The daemon's containment: the seccomp filter is on by default on every thread (those
//! that exist at start-up and those spawned per front end), `--seccomp=log|off` switch it,
//! `--user` drops to an unprivileged user after start-up while the device still works, and
//! the Landlock ruleset is enforced before any other thread starts, in every seccomp mode.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use common::*;

/// (Seccomp mode, number of filters, NoNewPrivs, Uid line) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String, String, String, String)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap();
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        v.push((
            field("Name:"),
            field("Seccomp:"),
            field("Seccomp_filters:"),
            field("NoNewPrivs:"),
            field("Uid:"),
        ));
    }
    v
}

fn serve_a_little(daemon: &mut Daemon) -> FrontEnd {
    let mut fe = FrontEnd::connect(daemon);
    let b = fe.alloc_ok(0, 4096);
    fe.write_buffer(&b, 0, b"hello");
    assert_eq!(daemon.peek(b.id, 0, 5), b"hello");
    assert_eq!(fe.sync(b.id, SYNC_READ), S_OK);
    let big = fe.alloc_ok(0, 12 << 20);
    fe.free_ok(big.id);
    fe.free_ok(b.id);
    daemon.assert_alive();
    fe
}

#[test]
fn seccomp_is_on_by_default_on_every_thread() {
    let mut daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M"]);
    daemon.wait_ready();
    let fe = serve_a_little(&mut daemon);
    let ts = threads(daemon.pid());
    // main, signals, control, and the per-connection handler and vring worker.
    assert!(ts.len() >= 5, "{ts:?}");
    for (name, mode, filters, nnp, _) in &ts {
        assert_eq!(mode, "2", "thread {name}: Seccomp");
        assert_eq!(filters, "3", "thread {name}: Seccomp_filters");
        assert_eq!(nnp, "1", "thread {name}: NoNewPrivs");
    }
    drop(fe);
    // A second front end (new threads) works as well.
    let fe = serve_a_little(&mut daemon);
    drop(fe);
    assert!(daemon.stderr().contains("seccomp filter installed"));
    assert!(daemon.terminate().success(), "clean exit under the filter");
}

fn spawn_with_seccomp(mode: &str) -> Daemon {
    Daemon::spawn([
        "--heap",
        "a=memfd",
        "--shm-size",
        "64M",
        &format!("--seccomp={mode}"),
    ])
}

#[test]
fn seccomp_log_and_off() {
    for (mode, want, filters) in [("log", "2", "1"), ("off", "0", "0")] {
        let mut daemon = spawn_with_seccomp(mode);
        daemon.wait_ready();
        drop(serve_a_little(&mut daemon));
        for (name, m, f, _, _) in threads(daemon.pid()) {
            assert_eq!(
                (m.as_str(), f.as_str()),
                (want, filters),
                "{mode}: thread {name}"
            );
        }
        assert!(daemon.terminate().success());
    }
}

/// Landlock is enforced on the main thread before it starts any other thread, whatever the
/// seccomp mode (without TSYNC the daemon refuses to start otherwise), and the device and
/// the socket cleanup at exit still work under it.
#[test]
fn landlock_is_enforced_before_any_thread_starts() {
    for mode in ["on", "off"] {
        let mut daemon = spawn_with_seccomp(mode);
        daemon.wait_ready();
        drop(serve_a_little(&mut daemon));
        let err = daemon.stderr();
        if err.contains("the kernel has no Landlock") {
            eprintln!("skipped: the kernel has no Landlock");
            return;
        }
        assert!(
            err.contains("Landlock ruleset enforced"),
            "{mode}: no Landlock line in\n{err}"
        );
        if mode == "off" {
            // no_new_privs is set on the main thread right before the ruleset, and with
            // seccomp off nothing else sets it: a thread without it was started before.
            for (name, _, _, nnp, _) in threads(daemon.pid()) {
                assert_eq!(nnp, "1", "thread {name} started before the ruleset");
            }
        }
        let ctl = daemon.control_path().to_path_buf();
        assert!(daemon.terminate().success(), "{mode}: exit");
        assert!(!ctl.exists(), "{mode}: control socket left behind");
    }
}

#[test]
fn bad_seccomp_mode_is_refused() {
    let out = std::process::Command::new(daemon::daemon_bin())
        .args(["--socket-path", "/nonexistent/x", "--seccomp=maybe"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn user_drops_privileges_after_start_up() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to switch users");
        return;
    }
    let mut daemon = Daemon::spawn(["--heap", "a=memfd", "--shm-size", "64M", "--user", "nobody"]);
    daemon.wait_ready();
    drop(serve_a_little(&mut daemon));
    for (name, _, _, _, uid) in threads(daemon.pid()) {
        let uids: Vec<&str> = uid.split_whitespace().collect();
        assert_eq!(uids, ["65534"; 4], "thread {name}: Uid");
    }
    assert!(daemon.stderr().contains("running as user nobody"));
    drop(serve_a_little(&mut daemon));
}

#[test]
fn unknown_user_is_a_start_up_error() {
    let mut daemon = Daemon::spawn([
        "--heap",
        "a=memfd",
        "--shm-size",
        "64M",
        "--user",
        "no-such-user-here",
    ]);
    let start = std::time::Instant::now();
    while !daemon.has_exited() {
        assert!(start.elapsed() < DEADLINE, "daemon did not exit");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!daemon.wait_exit().success());
    assert!(
        daemon.stderr().contains("no such user"),
        "{}",
        daemon.stderr()
    );
}
