//! In-guest check, run by `tests/security/sigkill-guest`: the host daemon is killed with
//! SIGKILL while this guest holds mapped buffers.
//!
//! 1. allocate buffers from the guest dma-heap, map them, fill them with a pattern;
//! 2. `rg-host killdaemon` (a run-guest host hook) SIGKILLs the daemon;
//! 3. the mapped data is intact (QEMU keeps the host memory mapped);
//! 4. a new allocation fails with an error within a deadline instead of hanging; so does a
//!    SYNC (DMA_BUF_IOCTL_SYNC) on a held buffer;
//! 5. unmapping and closing the held buffers (the driver sends FREE without waiting)
//!    returns promptly.
//!
//! Every blocking step runs in a child process so that a hang is reported, not inherited.
//! The driver's request timeout (module parameter timeout_ms) is set to 5 s first; the
//! deadline here is 30 s (SIGKILL_DEADLINE).
//! Prints `ok NAME` / `FAIL NAME: why` lines; exits 1 on any failure.

use std::ffi::CString;
use std::time::{Duration, Instant};

const DMA_HEAP_IOCTL_ALLOC: libc::c_ulong = 0xc018_4800;
const DMA_BUF_IOCTL_SYNC: libc::c_ulong = 0x4008_6200;
const DMA_BUF_SYNC_READ: u64 = 1;
const DMA_BUF_SYNC_END: u64 = 4;
const LEN: usize = 1 << 20;

#[repr(C)]
#[derive(Default)]
struct AllocData {
    len: u64,
    fd: u32,
    fd_flags: u32,
    heap_flags: u64,
}

fn alloc(heap: libc::c_int, len: usize) -> Result<libc::c_int, i32> {
    let mut d = AllocData {
        len: len as u64,
        fd_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
        ..Default::default()
    };
    // SAFETY: `heap` is an open dma-heap fd and `d` a live struct of the ioctl's layout.
    let rc = unsafe { libc::ioctl(heap, DMA_HEAP_IOCTL_ALLOC, &mut d) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    Ok(d.fd as libc::c_int)
}

fn sync(fd: libc::c_int, flags: u64) -> Result<(), i32> {
    let f = flags;
    // SAFETY: `fd` is an open dma-buf fd and `f` a live u64 (struct dma_buf_sync).
    let rc = unsafe { libc::ioctl(fd, DMA_BUF_IOCTL_SYNC, &f) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    Ok(())
}

/// Runs `f` in a child process; returns its exit code, or None if it did not finish
/// within `deadline` (the child is left behind: it may be stuck in the kernel).
fn in_child(deadline: Duration, f: impl FnOnce() -> i32) -> Option<i32> {
    // SAFETY: the child only runs `f` (ioctls, munmap, close) and _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let rc = f();
        // SAFETY: terminating the child without running the parent's atexit handlers.
        unsafe { libc::_exit(rc) };
    }
    assert!(pid > 0, "fork failed");
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128
            });
        }
        if start.elapsed() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let heap_name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "host-system".into());
    let deadline = Duration::from_secs(
        std::env::var("SIGKILL_DEADLINE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    );
    // The driver gives up on an unanswered request after timeout_ms (default 30 s); make
    // that shorter than our deadline so that "fails" and "hangs" can be told apart.
    let param = "/sys/module/virtio_dmaheap/parameters/timeout_ms";
    if std::fs::write(param, "5000").is_ok() {
        println!("#    {param} = 5000");
    }
    let mut failed = false;
    let mut report = |name: &str, r: Result<(), String>| match r {
        Ok(()) => println!("ok   {name}"),
        Err(e) => {
            println!("FAIL {name}: {e}");
            failed = true;
        }
    };

    let path = CString::new(format!("/dev/dma_heap/{heap_name}")).unwrap();
    // SAFETY: valid C string; the result is checked.
    let heap = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if heap < 0 {
        println!(
            "FAIL open {}: {}",
            heap_name,
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    // 1. Buffers, mapped and filled.
    let mut held = Vec::new();
    for i in 0..4u8 {
        let fd = match alloc(heap, LEN) {
            Ok(fd) => fd,
            Err(e) => {
                println!("FAIL alloc before the kill: errno {e}");
                std::process::exit(1);
            }
        };
        // SAFETY: mapping LEN bytes of a dma-buf of LEN bytes, shared, read-write.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        // SAFETY: p maps LEN writable bytes.
        let s = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, LEN) };
        for (j, b) in s.iter_mut().enumerate() {
            *b = (j as u8).wrapping_mul(31).wrapping_add(i);
        }
        held.push((fd, p, i));
    }
    println!(
        "ok   setup: {} buffers of {LEN} bytes mapped and filled",
        held.len()
    );

    // 2. The host kills the daemon.
    let st = std::process::Command::new("rg-host")
        .arg("killdaemon")
        .status();
    report(
        "daemon-killed",
        match st {
            Ok(s) if s.success() => Ok(()),
            other => Err(format!("rg-host killdaemon: {other:?}")),
        },
    );
    std::thread::sleep(Duration::from_millis(500));

    // 3. Data intact.
    let mut bad = None;
    for &(_, p, i) in &held {
        // SAFETY: p still maps LEN readable bytes (we have not unmapped it).
        let s = unsafe { std::slice::from_raw_parts(p as *const u8, LEN) };
        if let Some(j) = s
            .iter()
            .enumerate()
            .position(|(j, &b)| b != (j as u8).wrapping_mul(31).wrapping_add(i))
        {
            bad = Some((i, j));
            break;
        }
    }
    report(
        "data-intact-after-kill",
        bad.map_or(Ok(()), |(i, j)| {
            Err(format!("buffer {i} differs at byte {j}"))
        }),
    );

    // 4. New allocations and syncs fail (do not hang).
    let r = in_child(deadline, || match alloc(heap, LEN) {
        Ok(_) => 0,
        Err(e) => e,
    });
    report(
        "alloc-fails-after-kill",
        match r {
            None => Err(format!("ALLOC did not return within {deadline:?}")),
            Some(0) => Err("ALLOC succeeded without a daemon".into()),
            Some(e) => {
                println!("#    ALLOC errno {e}");
                Ok(())
            }
        },
    );
    // Once one request timed out, the driver must not make every later caller wait
    // timeout_ms again for a back-end that is gone: they fail at once with EIO.
    let t0 = Instant::now();
    let r = alloc(heap, LEN);
    let took = t0.elapsed();
    report(
        "later-requests-fail-fast",
        match r {
            Err(libc::EIO) if took < Duration::from_secs(1) => Ok(()),
            Err(e) => Err(format!("errno {e} after {took:?} (want EIO within 1 s)")),
            Ok(_) => Err("ALLOC succeeded without a daemon".into()),
        },
    );
    let fd0 = held[0].0;
    let r = in_child(deadline, || match sync(fd0, DMA_BUF_SYNC_READ) {
        Ok(()) => match sync(fd0, DMA_BUF_SYNC_READ | DMA_BUF_SYNC_END) {
            Ok(()) => 0,
            Err(e) => e,
        },
        Err(e) => e,
    });
    report(
        "sync-returns-after-kill",
        match r {
            None => Err(format!("SYNC did not return within {deadline:?}")),
            Some(e) => {
                println!("#    SYNC result {e} (0: ok, else errno)");
                Ok(())
            }
        },
    );

    // 5. Releasing the held buffers returns promptly.
    let held2: Vec<(libc::c_int, usize)> =
        held.iter().map(|&(fd, p, _)| (fd, p as usize)).collect();
    let r = in_child(deadline, move || {
        for (fd, p) in held2 {
            // SAFETY: unmapping our own mapping and closing our own fd.
            unsafe {
                libc::munmap(p as *mut libc::c_void, LEN);
                libc::close(fd);
            }
        }
        0
    });
    report(
        "release-returns-after-kill",
        match r {
            None => Err(format!("munmap/close did not return within {deadline:?}")),
            Some(_) => Ok(()),
        },
    );
    std::process::exit(i32::from(failed));
}
