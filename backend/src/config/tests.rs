//! Tests of the configuration built from the command line.

#![allow(clippy::unwrap_used)]
use super::*;
use crate::args::{Args, Command};
use clap::Parser;

fn cfg(argv: &[&str]) -> Result<Config, ConfigError> {
    let mut v = vec!["vhost-user-dmaheap"];
    v.extend_from_slice(argv);
    let args = Args::try_parse_from(v).unwrap();
    Config::from_args(args.daemon, Path::new("/nonexistent-dma-heap-dir"))
}

#[test]
fn sizes() {
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("4K"), Ok(4096));
    assert_eq!(parse_size("2m"), Ok(2 << 20));
    assert_eq!(parse_size("4G"), Ok(4 << 30));
    assert!(parse_size("").is_err());
    assert!(parse_size("4X").is_err());
    assert!(parse_size("-1").is_err());
    assert!(parse_size("99999999999T").is_err());
}

#[test]
fn defaults() {
    let c = cfg(&["--socket-path", "/tmp/s"]).unwrap();
    assert_eq!(c.socket, SocketSpec::Path("/tmp/s".into()));
    assert_eq!(c.limits.shm_size, 4 << 30);
    assert_eq!(c.limits.max_mappings, 128);
    assert_eq!(c.limits.max_bytes, 4 << 30);
    assert!(c.fallback_memfd);
    assert_eq!(c.heaps.len(), 1);
    assert_eq!(c.heaps[0].params.name, "system");
    assert_eq!(c.heaps[0].source, HeapSource::Memfd);
    assert_eq!(c.heaps[0].params.min_align, 4096);
    assert!(!c.control_debug);
    assert!(c.uuid);
    assert!(!c.shared_object_table);
    assert_eq!(c.export_socket, None);
}

#[test]
fn uuid_options() {
    let c = cfg(&[
        "--socket-path",
        "/tmp/s",
        "--export-socket",
        "/tmp/e",
        "--shared-object-table",
    ])
    .unwrap();
    assert!(c.uuid && c.shared_object_table);
    assert_eq!(c.export_socket, Some("/tmp/e".into()));
    let c = cfg(&["--socket-path", "/tmp/s", "--no-uuid"]).unwrap();
    assert!(!c.uuid);
    assert!(Args::try_parse_from([
        "x",
        "--socket-path",
        "/s",
        "--no-uuid",
        "--export-socket",
        "/e"
    ])
    .is_err());
}

#[test]
fn default_uses_host_system_heap() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("system"), b"").unwrap();
    let args = Args::try_parse_from(["x", "--socket-fd", "3"]).unwrap();
    let c = Config::from_args(args.daemon, dir.path()).unwrap();
    assert_eq!(c.socket, SocketSpec::Fd(3));
    assert!(!c.fallback_memfd);
    assert_eq!(c.heaps[0].source, HeapSource::DmaHeap("system".into()));
}

#[test]
fn heaps() {
    // Android's CMA heap name has a comma, on either side.
    let c = cfg(&[
        "--socket-fd",
        "3",
        "--heap",
        "linux,cma=dma-heap:linux,cma,max-bytes=8M",
        "--heap",
        "linux,cma2=dma-heap:default_cma_region",
    ])
    .unwrap();
    assert_eq!(c.heaps[0].params.name, "linux,cma");
    assert_eq!(c.heaps[0].source, HeapSource::DmaHeap("linux,cma".into()));
    assert_eq!(c.heaps[0].params.max_bytes, Some(8 << 20));
    assert!(c.heaps[0].params.contiguous);
    assert_eq!(c.heaps[1].params.name, "linux,cma2");
    assert_eq!(
        c.heaps[1].source,
        HeapSource::DmaHeap("default_cma_region".into())
    );
    let c = cfg(&["--socket-fd", "3", "--heap", "a=memfd,oops"]);
    assert!(c.is_err(), "an option without a value: {c:?}");
    let c = cfg(&[
        "--socket-fd",
        "3",
        "--heap",
        "sys=memfd,max-bytes=64M,max-size=8M,align=64K,cache=wc",
        "--heap",
        "cma=dma-heap:reserved",
        "--heap",
        "u=udmabuf,contiguous=yes,arena-size=4M",
    ])
    .unwrap();
    assert!(!c.fallback_memfd);
    let p = &c.heaps[0].params;
    assert_eq!(p.max_bytes, Some(64 << 20));
    assert_eq!(p.max_size, 8 << 20);
    assert_eq!(p.min_align, 64 << 10);
    assert_eq!(p.cache, CacheMode::WriteCombined);
    assert!(!p.contiguous);
    assert!(c.heaps[1].params.contiguous);
    assert_eq!(c.heaps[1].source, HeapSource::DmaHeap("reserved".into()));
    assert!(c.heaps[2].params.contiguous);
    assert_eq!(c.heaps[2].params.arena_size, 4 << 20);
}

#[test]
fn several_cache_attributes_split_the_window_and_bound_the_heaps() {
    let c = cfg(&[
        "--socket-path",
        "/s",
        "--shm-size",
        "1G",
        "--heap",
        "wc=memfd,cache=wc",
        "--heap",
        "sys=memfd",
        "--heap",
        "sys2=memfd,max-size=16M",
    ])
    .unwrap();
    // Two attributes: 512 MiB each; the default max-size is the range, not the window.
    assert_eq!(c.heaps[0].params.max_size, 512 << 20);
    assert_eq!(c.heaps[1].params.max_size, 512 << 20);
    assert_eq!(c.heaps[2].params.max_size, 16 << 20);
    // One attribute: the whole window, as before.
    let c = cfg(&[
        "--socket-path",
        "/s",
        "--shm-size",
        "8M",
        "--heap",
        "u=memfd,cache=uncached",
    ]);
    assert_eq!(c.unwrap().heaps[0].params.max_size, 8 << 20);
    // Three attributes in 8M: 2M each; the default arena-size shrinks to the range.
    let three = |extra: &str| {
        cfg(&[
            "--socket-path",
            "/s",
            "--shm-size",
            "8M",
            "--heap",
            "a=memfd",
            "--heap",
            "b=memfd,cache=uncached",
            "--heap",
            &format!("c=memfd,cache=wc{extra}"),
        ])
    };
    let c = three("").unwrap();
    assert!(c.heaps.iter().all(|h| h.params.max_size == 2 << 20));
    assert!(c.heaps.iter().all(|h| h.params.arena_size == 2 << 20));
    for extra in [",max-size=4M", ",arena-size=4M"] {
        let err = three(extra).unwrap_err().to_string();
        assert!(
            err.contains("range of 2097152 bytes")
                && err.contains("--shm-size 8388608 split evenly between 3"),
            "{err}"
        );
    }
}

#[test]
fn a_window_too_small_for_the_cache_attributes_is_refused_with_the_sizes() {
    let err = cfg(&[
        "--socket-path",
        "/s",
        "--shm-size",
        "4M",
        "--heap",
        "a=memfd",
        "--heap",
        "b=memfd,cache=uncached",
        "--heap",
        "c=memfd,cache=wc",
    ])
    .unwrap_err();
    let ConfigError::Layout(e) = &err else {
        panic!("{err:?}");
    };
    assert_eq!((e.shm_size, e.attrs, e.need), (4 << 20, 3, 8 << 20));
    let cause = std::error::Error::source(&err).unwrap().to_string();
    assert!(
        cause.contains("4194304") && cause.contains("8388608"),
        "{cause}"
    );
    // The same attribute twice needs no split.
    assert!(cfg(&[
        "--socket-path",
        "/s",
        "--shm-size",
        "2M",
        "--heap",
        "a=memfd,cache=wc",
        "--heap",
        "b=memfd,cache=wc",
    ])
    .is_ok());
}

#[test]
fn mapping_cap_stops_below_the_memory_slots() {
    let c = cfg(&["--socket-path", "/s", "--max-mappings", "480"]).unwrap();
    assert_eq!(c.limits.max_mappings, MAX_MAPPINGS_LIMIT);
    let err = cfg(&["--socket-path", "/s", "--max-mappings", "600"]).unwrap_err();
    assert_eq!(err, ConfigError::TooManyMappings(600));
    assert!(err.to_string().contains("memory slots"), "{err}");
}

#[test]
fn rejects() {
    for argv in [
        &["--shm-size", "4G"][..],
        &["--socket-path", "/s", "--shm-size", "3G"],
        &["--socket-path", "/s", "--shm-size", "1M"],
        &["--socket-path", "/s", "--max-mappings", "0"],
        &["--socket-path", "/s", "--max-mappings", "481"],
        &["--socket-path", "/s", "--max-buffers", "0"],
        &["--socket-path", "/s", "--max-bytes", "0"],
        &["--socket-path", "/s", "--heap", "a"],
        &["--socket-path", "/s", "--heap", "=memfd"],
        &["--socket-path", "/s", "--heap", "a=tmpfs"],
        &["--socket-path", "/s", "--heap", "a=memfd,align=3000"],
        &["--socket-path", "/s", "--heap", "a=memfd,max-size=5000"],
        &["--socket-path", "/s", "--heap", "a=memfd,max-size=8G"],
        &["--socket-path", "/s", "--heap", "a=memfd,cache=maybe"],
        &["--socket-path", "/s", "--heap", "a=memfd,arena-size=3M"],
        &["--socket-path", "/s", "--heap", "a=memfd,color=red"],
        &[
            "--socket-path",
            "/s",
            "--heap",
            "a=memfd,arena-size=2M,align=512K",
        ],
        &["--socket-path", "/s", "--max-buffers", "4294967296"],
        &[
            "--socket-path",
            "/s",
            "--heap",
            "a=memfd",
            "--heap",
            "a=memfd",
        ],
        &[
            "--socket-path",
            "/s",
            "--heap",
            "a-very-long-heap-name-of-more-than-31=memfd",
        ],
    ] {
        assert!(cfg(argv).is_err(), "{argv:?} accepted");
    }
}

#[test]
fn align_and_buffer_cap_fit_what_the_device_can_serve_and_state() {
    let ok = cfg(&[
        "--socket-path",
        "/s",
        "--heap",
        "a=memfd,arena-size=2M,align=256K",
    ]);
    assert_eq!(ok.unwrap().heaps[0].params.min_align, 256 << 10);
    let err = cfg(&[
        "--socket-path",
        "/s",
        "--heap",
        "a=memfd,arena-size=2M,align=512K",
    ]);
    assert!(err.unwrap_err().to_string().contains("arena-size/8"));
    let c = cfg(&["--socket-path", "/s", "--max-buffers", "4294967295"]).unwrap();
    assert_eq!(c.limits.max_buffers, u64::from(u32::MAX));
    assert_eq!(
        cfg(&["--socket-path", "/s", "--max-buffers", "4294967296"]).unwrap_err(),
        ConfigError::TooManyBuffers(1 << 32)
    );
}

#[test]
fn socket_activation() {
    let act = crate::systemd::Activation {
        fd: 3,
        name: Some("vm1".into()),
    };
    let from = |argv: &[&str]| {
        let mut v = vec!["x"];
        v.extend_from_slice(argv);
        let args = Args::try_parse_from(v).unwrap();
        Config::from_args_activated(args.daemon, Path::new("/nonexistent"), Some(act.clone()))
    };
    assert_eq!(
        from(&[]).unwrap().socket,
        SocketSpec::Activated(act.clone())
    );
    for argv in [&["--socket-path", "/s"][..], &["--socket-fd", "3"]] {
        assert_eq!(
            from(argv).unwrap_err(),
            ConfigError::SocketAndActivation,
            "{argv:?}"
        );
    }
    let err = cfg(&[]).unwrap_err();
    assert_eq!(err, ConfigError::Socket);
    assert!(err.to_string().contains("LISTEN_FDS"), "{err}");
}

#[test]
fn clap_level() {
    assert!(Args::try_parse_from(["x", "--socket-path", "/s", "--socket-fd", "3"]).is_err());
    assert!(Args::try_parse_from(["x", "--socket-path", "/s", "--control-debug"]).is_err());
    let a = Args::try_parse_from(["x", "stats", "--control-socket", "/c", "--json"]).unwrap();
    assert!(matches!(a.command, Some(Command::Stats { json: true, .. })));
    let a = Args::try_parse_from(["x", "ctl", "--control-socket", "/c", "peek", "1", "0", "16"])
        .unwrap();
    match a.command {
        Some(Command::Ctl { command, .. }) => assert_eq!(command, ["peek", "1", "0", "16"]),
        _ => panic!("not ctl"),
    }
}
