//! Start-up as QEMU does it: negotiation, GET_SHMEM_CONFIG, config space, HEAP_INFO, and the
//! daemon's process life cycle.
#![allow(clippy::unwrap_used)]

use dmaheap_testkit as common;

use common::frontend::VIRTIO_F_VERSION_1;
use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn handshake_config_space_and_heap_info_match_the_heap_options() {
    let daemon = Daemon::spawn([
        "--heap",
        "cam=memfd,contiguous=yes,cache=wc,align=64K,max-size=1M,max-bytes=8M",
        "--heap",
        "plain=memfd",
        "--heap",
        "unc=memfd,cache=uncached,contiguous=no,max-size=2M",
        "--heap",
        "abcdefghijklmnopqrstuvwxyz01234=memfd",
        "--shm-size",
        "64M",
        "--max-buffers",
        "100",
    ]);
    let mut fe = FrontEnd::connect(&daemon);
    eprintln!("negotiated: {fe:?}");

    // Virtio features: VERSION_1, F_SYNC and F_UUID offered (the latter unless --no-uuid).
    assert_ne!(
        fe.offered_features & VIRTIO_F_VERSION_1,
        0,
        "VERSION_1 not offered"
    );
    assert_ne!(fe.offered_features & F_SYNC, 0, "F_SYNC not offered");
    assert_ne!(fe.offered_features & F_UUID, 0, "F_UUID not offered");

    // One shared memory region, the buffer window, of --shm-size bytes.
    assert_eq!(fe.shm_sizes, vec![64 * MIB], "GET_SHMEM_CONFIG sizes");

    // Config space.
    let want = Config {
        magic: MAGIC,
        version: VERSION,
        num_heaps: 4,
        max_buffers: 100,
    };
    assert_eq!(fe.config, want, "config space");

    // HEAP_INFO for each heap, in --heap order.
    let cam = fe
        .heap_info(0)
        .unwrap_or_else(|s| panic!("HEAP_INFO 0: {}", status_name(s)));
    eprintln!("heap 0: {cam:?}");
    assert_eq!(cam.name, "cam");
    assert!(
        cam.raw_name[3..].iter().all(|&b| b == 0),
        "name not NUL-padded: {:02x?}",
        cam.raw_name
    );
    assert!(cam.contiguous(), "contiguous=yes not reported: {cam:?}");
    assert_eq!(
        cam.flags & !HEAP_F_CONTIGUOUS,
        0,
        "unknown heap flags: {cam:?}"
    );
    assert_eq!(cam.cache, CACHE_WC, "cache=wc: {cam:?}");
    assert_eq!(cam.min_align, 64 * 1024, "align=64K: {cam:?}");
    assert_eq!(cam.max_size, MIB, "max-size=1M: {cam:?}");
    assert_eq!(cam.capacity, 8 * MIB, "max-bytes=8M: {cam:?}");

    let plain = fe
        .heap_info(1)
        .unwrap_or_else(|s| panic!("HEAP_INFO 1: {}", status_name(s)));
    eprintln!("heap 1: {plain:?}");
    assert_eq!(plain.name, "plain");
    assert!(
        !plain.contiguous(),
        "memfd heap reported contiguous: {plain:?}"
    );
    assert_eq!(plain.cache, CACHE_CACHED, "memfd default cache: {plain:?}");
    assert!(
        plain.min_align.is_power_of_two() && plain.min_align >= PAGE_SIZE,
        "min_align: {plain:?}"
    );
    assert!(
        plain.max_size >= PAGE_SIZE && plain.max_size.is_multiple_of(PAGE_SIZE),
        "max_size: {plain:?}"
    );
    assert!(
        plain.max_size <= 64 * MIB,
        "max_size larger than the window: {plain:?}"
    );

    let unc = fe
        .heap_info(2)
        .unwrap_or_else(|s| panic!("HEAP_INFO 2: {}", status_name(s)));
    eprintln!("heap 2: {unc:?}");
    assert_eq!(unc.name, "unc");
    assert!(!unc.contiguous());
    assert_eq!(unc.cache, CACHE_UNCACHED);
    assert_eq!(unc.max_size, 2 * MIB);

    // A 31-byte name fills the field but for the terminating NUL.
    let long = fe
        .heap_info(3)
        .unwrap_or_else(|s| panic!("HEAP_INFO 3: {}", status_name(s)));
    assert_eq!(long.name, "abcdefghijklmnopqrstuvwxyz01234");
    assert_eq!(long.raw_name[31], 0);

    // Heap ids are 0 .. num_heaps - 1.
    assert_eq!(
        fe.heap_info(4).map_err(status_name),
        Err(status_name(S_NO_HEAP)),
        "HEAP_INFO of heap id num_heaps"
    );
    assert_eq!(
        fe.heap_info(u32::MAX).map_err(status_name),
        Err(status_name(S_NO_HEAP)),
        "HEAP_INFO of heap id u32::MAX"
    );

    // Partial config reads (the guest reads single fields).
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::VhostUserFrontend;
    let (_, part) = fe
        .vhost()
        .get_config(8, 4, VhostUserConfigFlags::WRITABLE, &[0; 4])
        .expect("GET_CONFIG offset 8 size 4");
    assert_eq!(part, 4u32.to_le_bytes(), "num_heaps read alone");
    let (_, part) = fe
        .vhost()
        .get_config(12, 4, VhostUserConfigFlags::WRITABLE, &[0; 4])
        .expect("GET_CONFIG offset 12 size 4");
    assert_eq!(part, 100u32.to_le_bytes(), "max_buffers read alone");
    // (An out-of-range GET_CONFIG is not tried: the vhost crate's front end waits for a
    // payload the zero-size error reply does not have, and would hang.)
    assert_eq!(fe.heap_info(1).unwrap().name, "plain");

    // Nothing was mapped: QEMU crashes on SHMEM_MAP before the guest asks for a buffer.
    assert_eq!(fe.shm().events, vec![], "backend requests during start-up");
}

#[test]
fn without_heap_options_a_heap_named_system_is_exported() {
    let daemon = Daemon::spawn(Vec::<String>::new());
    let mut fe = FrontEnd::connect(&daemon);
    assert_eq!(fe.shm_sizes, vec![4 << 30], "default --shm-size is 4 GiB");
    assert_eq!(fe.config.magic, MAGIC);
    assert_eq!(fe.config.version, VERSION);
    assert_eq!(fe.config.num_heaps, 1, "config: {:?}", fe.config);
    eprintln!("default config: {:?}", fe.config);
    let info = fe
        .heap_info(0)
        .unwrap_or_else(|s| panic!("HEAP_INFO 0: {}", status_name(s)));
    eprintln!("default heap: {info:?}");
    assert_eq!(info.name, "system");
    // And it allocates.
    let b = fe.alloc_ok(0, PAGE_SIZE);
    assert_eq!(
        fe.read_buffer(&b, 0, PAGE_SIZE),
        vec![0; PAGE_SIZE as usize]
    );
}

#[test]
fn sigterm_exits_cleanly_with_and_without_a_front_end() {
    let mut daemon = Daemon::spawn(["--heap", "a=memfd"]);
    let status = daemon.terminate();
    assert!(status.success(), "idle daemon after SIGTERM: {status}");
    assert!(
        !daemon.control_path().exists(),
        "control socket left behind after SIGTERM"
    );

    let mut daemon = Daemon::spawn(["--heap", "a=memfd"]);
    let mut fe = FrontEnd::connect(&daemon);
    let _b = fe.alloc_ok(0, PAGE_SIZE);
    let status = daemon.terminate();
    assert!(status.success(), "busy daemon after SIGTERM: {status}");
    drop(fe);
}

#[test]
fn invalid_command_lines_are_refused() {
    let cases: &[&[&str]] = &[
        // The window size must be a power of two (QEMU asserts).
        &["--heap", "a=memfd", "--shm-size", "3M"],
        &["--heap", "a=nosuchsource"],
        &["--heap", "a=memfd,cache=sometimes"],
        &["--heap", "a=memfd,align=3000"],
        &["--heap", "a=memfd,bogus=1"],
        &["--heap", "a=memfd", "--heap", "a=memfd"],
        &["--heap", "a=dma-heap:does-not-exist-on-this-host"],
        // Heap names must fit the 32-byte NUL-terminated name field.
        &["--heap", "abcdefghijklmnopqrstuvwxyz0123456=memfd"],
        &["--heap", "=memfd"],
    ];
    let mut cases = cases.to_vec();
    if !std::path::Path::new("/dev/udmabuf").exists() {
        cases.push(&["--heap", "a=udmabuf"]);
    }
    for args in cases {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let out = std::process::Command::new(common::daemon::daemon_bin())
            .arg("--socket-path")
            .arg(&sock)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{args:?}: {} / stderr: {stderr}", out.status);
        assert!(
            !out.status.success(),
            "daemon accepted {args:?}: {} / stderr: {stderr}",
            out.status
        );
        assert!(!stderr.trim().is_empty(), "{args:?}: no error message");
    }
}

#[test]
fn socket_path_mode_serves_a_front_end() {
    // --socket-path instead of --socket-fd: wait for the socket file with a deadline.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vu.sock");
    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut child = std::process::Command::new(common::daemon::daemon_bin())
        .arg("--socket-path")
        .arg(&sock)
        .args(["--heap", "a=memfd", "--shm-size", "16M"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) => {
                if let Some(st) = child.try_wait().unwrap() {
                    panic!("daemon exited before listening: {st}");
                }
                assert!(
                    start.elapsed() < DEADLINE,
                    "socket {} not connectable after {DEADLINE:?}: {e}",
                    sock.display()
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    };
    let fe = vhost::vhost_user::Frontend::from_stream(stream, 1);
    use vhost::VhostBackend;
    let features = fe.get_features();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let features = features.unwrap_or_else(|e| {
        panic!(
            "GET_FEATURES: {e}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    drop(fe);
}
