//! Compares the Rust ABI mirror (`src/abi.rs`) with the C header `spec/virtio_dmaheap.h`:
//! every struct's size and alignment, every field's offset and every `#define`. A C
//! program (compiled with `cc` from PATH) prints the C values; the header is also parsed
//! so that a struct, field or constant added to the header without a Rust mirror fails.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use vhost_user_dmaheap::abi::*;

struct StructDesc {
    c: &'static str,
    size: usize,
    align: usize,
    fields: Vec<(&'static str, usize)>,
}

macro_rules! s {
    ($c:literal, $t:ty, { $($cf:literal => $rf:ident),* $(,)? }) => {
        StructDesc {
            c: $c,
            size: size_of::<$t>(),
            align: align_of::<$t>(),
            fields: vec![$(($cf, offset_of!($t, $rf))),*],
        }
    };
}

fn rust_structs() -> Vec<StructDesc> {
    vec![
        s!("virtio_dmaheap_config", Config, {
            "magic" => magic, "version" => version, "num_heaps" => num_heaps,
            "max_buffers" => max_buffers,
        }),
        s!("virtio_dmaheap_req_hdr", ReqHdr, { "type" => type_, "reserved" => reserved }),
        s!("virtio_dmaheap_resp_hdr", RespHdr, { "status" => status, "reserved" => reserved }),
        s!("virtio_dmaheap_heap_info_req", HeapInfoReq, {
            "hdr" => hdr, "heap_id" => heap_id, "reserved" => reserved,
        }),
        s!("virtio_dmaheap_heap_info", HeapInfo, {
            "name" => name, "flags" => flags, "cache" => cache, "min_align" => min_align,
            "max_size" => max_size, "capacity" => capacity,
        }),
        s!("virtio_dmaheap_heap_info_resp", HeapInfoResp, { "hdr" => hdr, "info" => info }),
        s!("virtio_dmaheap_heap_range", HeapRange, { "offset" => offset, "len" => len }),
        s!("virtio_dmaheap_heap_info_range_resp", HeapInfoRangeResp, {
            "hdr" => hdr, "info" => info, "range" => range,
        }),
        s!("virtio_dmaheap_alloc_req", AllocReq, {
            "hdr" => hdr, "heap_id" => heap_id, "flags" => flags, "len" => len,
        }),
        s!("virtio_dmaheap_alloc_resp", AllocResp, {
            "hdr" => hdr, "buffer_id" => buffer_id, "offset" => offset, "len" => len,
        }),
        s!("virtio_dmaheap_alloc_batch_req", AllocBatchReq, {
            "hdr" => hdr, "heap_id" => heap_id, "count" => count, "len" => len,
        }),
        s!("virtio_dmaheap_buffer", BatchBuffer, {
            "buffer_id" => buffer_id, "offset" => offset, "len" => len,
        }),
        s!("virtio_dmaheap_alloc_batch_resp", AllocBatchResp, {
            "hdr" => hdr, "count" => count, "reserved" => reserved, "buffers" => buffers,
        }),
        s!("virtio_dmaheap_free_req", FreeReq, { "hdr" => hdr, "buffer_id" => buffer_id }),
        s!("virtio_dmaheap_sync_req", SyncReq, {
            "hdr" => hdr, "buffer_id" => buffer_id, "flags" => flags, "reserved" => reserved,
        }),
        s!("virtio_dmaheap_assign_uuid_req", AssignUuidReq, {
            "hdr" => hdr, "buffer_id" => buffer_id,
        }),
        s!("virtio_dmaheap_assign_uuid_resp", AssignUuidResp, { "hdr" => hdr, "uuid" => uuid }),
        s!("virtio_dmaheap_session_open_req", SessionOpenReq, {
            "hdr" => hdr, "resume_id" => resume_id,
        }),
        s!("virtio_dmaheap_session_open_page_req", SessionOpenPageReq, {
            "hdr" => hdr, "resume_id" => resume_id, "page_size" => page_size,
            "reserved" => reserved,
        }),
        s!("virtio_dmaheap_session_open_resp", SessionOpenResp, {
            "hdr" => hdr, "session_id" => session_id,
        }),
        s!("virtio_dmaheap_session_close_req", SessionCloseReq, {
            "hdr" => hdr, "flags" => flags, "reserved" => reserved,
        }),
        s!("virtio_dmaheap_reserve_req", ReserveReq, {
            "hdr" => hdr, "offset" => offset, "len" => len,
        }),
    ]
}

fn rust_consts() -> BTreeMap<&'static str, u64> {
    let c: Vec<(&str, u64)> = vec![
        ("VIRTIO_ID_DMAHEAP", VIRTIO_ID_DMAHEAP.into()),
        ("VIRTIO_DMAHEAP_F_SYNC", VIRTIO_DMAHEAP_F_SYNC.into()),
        ("VIRTIO_DMAHEAP_F_UUID", VIRTIO_DMAHEAP_F_UUID.into()),
        ("VIRTIO_DMAHEAP_F_SESSION", VIRTIO_DMAHEAP_F_SESSION.into()),
        ("VIRTIO_DMAHEAP_F_NO_SYNC", VIRTIO_DMAHEAP_F_NO_SYNC.into()),
        ("VIRTIO_DMAHEAP_F_BATCH", VIRTIO_DMAHEAP_F_BATCH.into()),
        (
            "VIRTIO_DMAHEAP_F_PAGE_SIZE",
            VIRTIO_DMAHEAP_F_PAGE_SIZE.into(),
        ),
        (
            "VIRTIO_DMAHEAP_PAGE_SIZE_MAX",
            VIRTIO_DMAHEAP_PAGE_SIZE_MAX.into(),
        ),
        (
            "VIRTIO_DMAHEAP_F_HEAP_RANGE",
            VIRTIO_DMAHEAP_F_HEAP_RANGE.into(),
        ),
        ("VIRTIO_DMAHEAP_RANGE_ALIGN", VIRTIO_DMAHEAP_RANGE_ALIGN),
        (
            "VIRTIO_DMAHEAP_REQ_ALLOC_BATCH",
            VIRTIO_DMAHEAP_REQ_ALLOC_BATCH.into(),
        ),
        ("VIRTIO_DMAHEAP_BATCH_MAX", VIRTIO_DMAHEAP_BATCH_MAX.into()),
        (
            "VIRTIO_DMAHEAP_REQ_SESSION_OPEN",
            VIRTIO_DMAHEAP_REQ_SESSION_OPEN.into(),
        ),
        (
            "VIRTIO_DMAHEAP_REQ_SESSION_CLOSE",
            VIRTIO_DMAHEAP_REQ_SESSION_CLOSE.into(),
        ),
        (
            "VIRTIO_DMAHEAP_REQ_RESERVE",
            VIRTIO_DMAHEAP_REQ_RESERVE.into(),
        ),
        (
            "VIRTIO_DMAHEAP_REQ_UNRESERVE",
            VIRTIO_DMAHEAP_REQ_UNRESERVE.into(),
        ),
        (
            "VIRTIO_DMAHEAP_S_NO_SESSION",
            VIRTIO_DMAHEAP_S_NO_SESSION.into(),
        ),
        (
            "VIRTIO_DMAHEAP_CLOSE_SUSPEND",
            VIRTIO_DMAHEAP_CLOSE_SUSPEND.into(),
        ),
        (
            "VIRTIO_DMAHEAP_CLOSE_VALID_MASK",
            VIRTIO_DMAHEAP_CLOSE_VALID_MASK.into(),
        ),
        (
            "VIRTIO_DMAHEAP_SHM_BUFFERS",
            VIRTIO_DMAHEAP_SHM_BUFFERS.into(),
        ),
        ("VIRTIO_DMAHEAP_MAGIC", VIRTIO_DMAHEAP_MAGIC.into()),
        ("VIRTIO_DMAHEAP_VERSION", VIRTIO_DMAHEAP_VERSION.into()),
        ("VIRTIO_DMAHEAP_PAGE_SIZE", VIRTIO_DMAHEAP_PAGE_SIZE.into()),
        (
            "VIRTIO_DMAHEAP_REQ_HEAP_INFO",
            VIRTIO_DMAHEAP_REQ_HEAP_INFO.into(),
        ),
        ("VIRTIO_DMAHEAP_REQ_ALLOC", VIRTIO_DMAHEAP_REQ_ALLOC.into()),
        ("VIRTIO_DMAHEAP_REQ_FREE", VIRTIO_DMAHEAP_REQ_FREE.into()),
        ("VIRTIO_DMAHEAP_REQ_SYNC", VIRTIO_DMAHEAP_REQ_SYNC.into()),
        (
            "VIRTIO_DMAHEAP_REQ_ASSIGN_UUID",
            VIRTIO_DMAHEAP_REQ_ASSIGN_UUID.into(),
        ),
        ("VIRTIO_DMAHEAP_S_OK", VIRTIO_DMAHEAP_S_OK.into()),
        ("VIRTIO_DMAHEAP_S_IOERR", VIRTIO_DMAHEAP_S_IOERR.into()),
        ("VIRTIO_DMAHEAP_S_INVAL", VIRTIO_DMAHEAP_S_INVAL.into()),
        ("VIRTIO_DMAHEAP_S_NO_HEAP", VIRTIO_DMAHEAP_S_NO_HEAP.into()),
        (
            "VIRTIO_DMAHEAP_S_NO_BUFFER",
            VIRTIO_DMAHEAP_S_NO_BUFFER.into(),
        ),
        ("VIRTIO_DMAHEAP_S_NOMEM", VIRTIO_DMAHEAP_S_NOMEM.into()),
        ("VIRTIO_DMAHEAP_S_QUOTA", VIRTIO_DMAHEAP_S_QUOTA.into()),
        (
            "VIRTIO_DMAHEAP_S_WINDOW_FULL",
            VIRTIO_DMAHEAP_S_WINDOW_FULL.into(),
        ),
        ("VIRTIO_DMAHEAP_S_UNSUPP", VIRTIO_DMAHEAP_S_UNSUPP.into()),
        ("VIRTIO_DMAHEAP_S_TOO_BIG", VIRTIO_DMAHEAP_S_TOO_BIG.into()),
        (
            "VIRTIO_DMAHEAP_HEAP_F_CONTIGUOUS",
            VIRTIO_DMAHEAP_HEAP_F_CONTIGUOUS.into(),
        ),
        (
            "VIRTIO_DMAHEAP_HEAP_F_NO_SYNC",
            VIRTIO_DMAHEAP_HEAP_F_NO_SYNC.into(),
        ),
        (
            "VIRTIO_DMAHEAP_CACHE_CACHED",
            VIRTIO_DMAHEAP_CACHE_CACHED.into(),
        ),
        (
            "VIRTIO_DMAHEAP_CACHE_UNCACHED",
            VIRTIO_DMAHEAP_CACHE_UNCACHED.into(),
        ),
        ("VIRTIO_DMAHEAP_CACHE_WC", VIRTIO_DMAHEAP_CACHE_WC.into()),
        ("VIRTIO_DMAHEAP_NAME_LEN", VIRTIO_DMAHEAP_NAME_LEN as u64),
        ("VIRTIO_DMAHEAP_SYNC_READ", VIRTIO_DMAHEAP_SYNC_READ.into()),
        (
            "VIRTIO_DMAHEAP_SYNC_WRITE",
            VIRTIO_DMAHEAP_SYNC_WRITE.into(),
        ),
        ("VIRTIO_DMAHEAP_SYNC_END", VIRTIO_DMAHEAP_SYNC_END.into()),
        (
            "VIRTIO_DMAHEAP_SYNC_VALID_MASK",
            VIRTIO_DMAHEAP_SYNC_VALID_MASK.into(),
        ),
        (
            "VIRTIO_DMAHEAP_HEAP_F_VALID_MASK",
            VIRTIO_DMAHEAP_HEAP_F_VALID_MASK.into(),
        ),
    ];
    c.into_iter().collect()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// (struct -> fields) and the names of the value #defines, parsed from the header.
fn parse_header(text: &str) -> (BTreeMap<String, Vec<String>>, BTreeSet<String>) {
    let mut structs = BTreeMap::new();
    let mut defines = BTreeSet::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for raw in text.lines() {
        let line = match raw.find("/*") {
            Some(i) => &raw[..i],
            None => raw,
        }
        .trim();
        if let Some(rest) = line.strip_prefix("#define ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().unwrap();
            if parts.next().is_some() {
                defines.insert(name.to_string());
            }
            continue;
        }
        if let Some((name, fields)) = current.as_mut() {
            if line.starts_with("};") {
                structs.insert(name.clone(), std::mem::take(fields));
                current = None;
            } else if let Some(decl) = line.strip_suffix(';') {
                let last = decl.split_whitespace().last().unwrap();
                let field = last.split('[').next().unwrap();
                fields.push(field.to_string());
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("struct ") {
            if let Some(name) = rest.strip_suffix('{') {
                current = Some((name.trim().to_string(), Vec::new()));
            }
        }
    }
    (structs, defines)
}

#[test]
fn rust_mirror_matches_c_header() {
    let root = repo_root();
    let header = root.join("spec/virtio_dmaheap.h");
    let text = std::fs::read_to_string(&header).unwrap();
    let (c_structs, c_defines) = parse_header(&text);
    assert!(c_structs.len() >= 16, "header parse found {c_structs:?}");

    let rust = rust_structs();
    let consts = rust_consts();

    // Same set of structs, fields (in order) and constants on both sides.
    let rust_names: BTreeMap<String, Vec<String>> = rust
        .iter()
        .map(|s| {
            (
                s.c.to_string(),
                s.fields.iter().map(|f| f.0.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(
        rust_names, c_structs,
        "structs/fields differ between abi.rs and the header"
    );
    let rust_defines: BTreeSet<String> = consts.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        rust_defines, c_defines,
        "constants differ between abi.rs and the header"
    );

    // A C program prints the real values.
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"spec/virtio_dmaheap.h\"\nint main(void) {\n",
    );
    for s in &rust {
        writeln!(
            c,
            "printf(\"size {0} %zu\\n\", sizeof(struct {0}));\nprintf(\"align {0} %zu\\n\", _Alignof(struct {0}));",
            s.c
        )
        .unwrap();
        for (f, _) in &s.fields {
            writeln!(
                c,
                "printf(\"offset {0}.{1} %zu\\n\", offsetof(struct {0}, {1}));",
                s.c, f
            )
            .unwrap();
        }
    }
    for name in consts.keys() {
        writeln!(
            c,
            "printf(\"define {name} %llu\\n\", (unsigned long long)({name}));"
        )
        .unwrap();
    }
    c.push_str("return 0;\n}\n");

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("layout.c");
    let exe = dir.path().join("layout");
    std::fs::write(&src, c).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg("-std=gnu11")
        .arg("-Wall")
        .arg("-Werror")
        .arg("-Wpadded")
        .arg("-I")
        .arg(&root)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"));
    assert!(
        out.status.success(),
        "{cc} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(run.status.success());
    let stdout = String::from_utf8(run.stdout).unwrap();

    let mut expected = String::new();
    for s in &rust {
        writeln!(expected, "size {} {}", s.c, s.size).unwrap();
        writeln!(expected, "align {} {}", s.c, s.align).unwrap();
        for (f, off) in &s.fields {
            writeln!(expected, "offset {}.{} {}", s.c, f, off).unwrap();
        }
    }
    for (name, v) in &consts {
        writeln!(expected, "define {name} {v}").unwrap();
    }
    let mut mismatches = Vec::new();
    for (c_line, r_line) in stdout.lines().zip(expected.lines()) {
        if c_line != r_line {
            mismatches.push(format!("C: {c_line:<60} Rust: {r_line}"));
        }
    }
    assert_eq!(stdout.lines().count(), expected.lines().count());
    assert!(
        mismatches.is_empty(),
        "ABI mismatches:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn header_parser_sees_everything() {
    let (s, d) = parse_header(
        "#define A 1 /* c */\n#define GUARD\nstruct x {\n\t__le32 a;\t/* y */\n\t__u8 n[4];\n};\n",
    );
    assert_eq!(s["x"], ["a", "n"]);
    assert_eq!(d.into_iter().collect::<Vec<_>>(), ["A"]);
}
