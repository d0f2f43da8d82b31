//! A front end that holds buffers in a running daemon, so that its counters are not all
//! zero (used by tests/check-metrics):
//!
//!     hold-buffers SOCKET HEAP_ID:LEN[xCOUNT]...
//!
//! Connects to the daemon's vhost-user SOCKET with the test kit's front end (what QEMU
//! does at start-up and at the guest's DRIVER_OK), allocates COUNT (default 1) buffers of
//! LEN bytes (K/M suffixes) from each heap id given, prints `ready` and the buffers'
//! total length, then holds them until killed (at most 10 minutes, to stay bounded).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use dmaheap_testkit::FrontEnd;

fn parse_len(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// `HEAP_ID:LEN[xCOUNT]`.
fn parse_spec(s: &str) -> Option<(u32, u64, u32)> {
    let (heap, rest) = s.split_once(':')?;
    let (len, count) = rest.split_once('x').unwrap_or((rest, "1"));
    Some((heap.parse().ok()?, parse_len(len)?, count.parse().ok()?))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((socket, specs)) = args.split_first() else {
        eprintln!("usage: hold-buffers SOCKET HEAP_ID:LEN[xCOUNT]...");
        return ExitCode::from(2);
    };
    let Some(specs) = specs
        .iter()
        .map(|s| parse_spec(s))
        .collect::<Option<Vec<_>>>()
    else {
        eprintln!("hold-buffers: bad spec in {specs:?} (want HEAP_ID:LEN[xCOUNT])");
        return ExitCode::from(2);
    };
    let stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hold-buffers: connect {socket}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The test kit panics with its reason on anything the daemon gets wrong.
    let mut fe = FrontEnd::handshake_stream(stream);
    fe.start_queue();
    let mut held = Vec::new();
    for (heap, len, count) in specs {
        for _ in 0..count {
            held.push(fe.alloc_ok(heap, len));
        }
    }
    let total: u64 = held.iter().map(|b| b.len).sum();
    println!("ready {} buffers {total} bytes", held.len());
    let _ = std::io::stdout().flush();
    std::thread::sleep(Duration::from_secs(600));
    ExitCode::SUCCESS
}
