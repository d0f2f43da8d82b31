//! The export socket (`--export-socket PATH`): other host processes (the back ends of
//! other devices of the same VM) resolve a buffer's UUID (ASSIGN_UUID) to a file that maps
//! exactly that buffer. QEMU 11.1.3's own shared-object lookup is broken (spec A.5), so
//! this is how importers reach exported buffers (spec A.6).
//!
//! Protocol (binary, little endian, many requests per connection): a request is the 16
//! bytes of a UUID; the reply is 16 bytes `{le32 status, le32 0, le64 len}` with exactly
//! one fd in `SCM_RIGHTS` when `status` is 0. `status` is otherwise a positive errno
//! (`ENOENT`: unknown or withdrawn UUID) and `len` is 0. A short request (the peer closes
//! or stalls in the middle of one) closes the connection.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once (more are closed at once), one
//! thread each; a connection idle for [`IDLE_TIMEOUT`] is closed, and a request must be
//! complete, and its reply taken, within [`IO_TIMEOUT`]. Nothing a peer sends panics.
//! The lookup closure runs on the connection's thread: it must not take the device lock
//! (see the design: the export table has its own small lock).

use std::fs::File;
use std::io::{self, IoSlice, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, info};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use crate::core::RateLimit;

/// Length of a request: one UUID.
pub const REQUEST_LEN: usize = 16;
/// Length of a reply.
pub const REPLY_LEN: usize = 16;
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// The rest of a started request, and the reply, must go through within this.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (e.g. out of fds), so that it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Resolves a UUID to a file mapping exactly that buffer and the buffer's length. Must
/// not take the device lock.
pub type Lookup = Arc<dyn Fn(&[u8; 16]) -> Option<(File, u64)> + Send + Sync>;

/// Export socket errors.
#[derive(Debug, thiserror::Error)]
pub enum ExportSocketError {
    /// Creating the socket failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Spawning the accept thread failed.
    #[error("cannot start the export socket thread")]
    Thread(#[source] io::Error),
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("malformed request: {0} of {REQUEST_LEN} bytes, then {1}")]
    Short(usize, &'static str),
    #[error("reading a request")]
    Read(#[source] io::Error),
    #[error("writing a reply")]
    Write(#[source] nix::Error),
    #[error("reply cut short ({0} of {REPLY_LEN} bytes)")]
    ShortWrite(usize),
    #[error("setting a timeout")]
    Timeout(#[source] io::Error),
}

/// The 16 bytes of a reply.
pub fn encode_reply(status: u32, len: u64) -> [u8; REPLY_LEN] {
    let mut r = [0u8; REPLY_LEN];
    r[0..4].copy_from_slice(&status.to_le_bytes());
    r[8..16].copy_from_slice(&len.to_le_bytes());
    r
}

/// Creates the listening socket at `path` (an existing file is replaced), mode 0600 from
/// the start, as the control socket ([`crate::control::bind_owner_only`]): call it during
/// start-up, before other threads create files.
pub fn bind(path: &Path) -> Result<UnixListener, ExportSocketError> {
    let listener =
        crate::control::bind_owner_only(path).map_err(|source| ExportSocketError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    info!("export socket on {}", path.display());
    Ok(listener)
}

/// Serves `listener` on a thread of its own (and one thread per connection) until the
/// process ends.
pub fn serve(listener: UnixListener, lookup: Lookup) -> Result<JoinHandle<()>, ExportSocketError> {
    thread::Builder::new()
        .name("export-socket".into())
        .spawn(move || accept_loop(&listener, &lookup))
        .map_err(ExportSocketError::Thread)
}

/// Counts a connection while it lives.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>) -> Option<Slot> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: &UnixListener, lookup: &Lookup) {
    let count = Arc::new(AtomicUsize::new(0));
    let ratelimit = Arc::new(Mutex::new(RateLimit::new()));
    let warn = |rl: &Mutex<RateLimit>, args: std::fmt::Arguments<'_>| {
        rl.lock().unwrap_or_else(PoisonError::into_inner).warn(args);
    };
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn(&ratelimit, format_args!("export socket: accept: {e}"));
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        let Some(slot) = Slot::take(&count) else {
            warn(
                &ratelimit,
                format_args!(
                    "export socket: {MAX_CONNECTIONS} connections already open; \
                     closing a new one"
                ),
            );
            continue;
        };
        let lookup = lookup.clone();
        let rl = ratelimit.clone();
        let spawned = thread::Builder::new()
            .name("export-conn".into())
            .spawn(move || {
                let _slot = slot;
                match serve_conn(&stream, &lookup) {
                    Ok(n) => debug!("export socket: connection closed after {n} requests"),
                    Err(e) => warn(
                        &rl,
                        format_args!("export socket: closing a connection: {e}"),
                    ),
                }
            });
        if let Err(e) = spawned {
            warn(
                &ratelimit,
                format_args!("export socket: cannot spawn a thread: {e}"),
            );
        }
    }
}

/// Reads one request; `None` at a clean end (EOF or idle timeout between requests).
fn read_request(stream: &UnixStream) -> Result<Option<[u8; REQUEST_LEN]>, ConnError> {
    let mut req = [0u8; REQUEST_LEN];
    let mut got = 0;
    stream
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(ConnError::Timeout)?;
    while got < REQUEST_LEN {
        match (&*stream).read(&mut req[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ConnError::Short(got, "end of stream")),
            Ok(n) => {
                if got == 0 {
                    stream
                        .set_read_timeout(Some(IO_TIMEOUT))
                        .map_err(ConnError::Timeout)?;
                }
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if got == 0
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                debug!("export socket: idle connection closed");
                return Ok(None);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ConnError::Short(got, "a timeout"));
            }
            Err(e) => return Err(ConnError::Read(e)),
        }
    }
    Ok(Some(req))
}

/// Sends a reply, with `fd` in SCM_RIGHTS if given.
fn send_reply(
    stream: &UnixStream,
    reply: &[u8; REPLY_LEN],
    fd: Option<&File>,
) -> Result<(), ConnError> {
    let iov = [IoSlice::new(reply)];
    let fds;
    let cmsgs: &[ControlMessage<'_>] = match fd {
        Some(f) => {
            fds = [f.as_raw_fd()];
            &[ControlMessage::ScmRights(&fds)]
        }
        None => &[],
    };
    let sent = loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(nix::Error::EINTR) => continue,
            r => break r.map_err(ConnError::Write)?,
        }
    };
    // A 16-byte message on a stream socket goes in one piece or not at all, short of an
    // interrupted send with a full buffer; treat a partial one as the end of the
    // connection (the fd went with the first part).
    if sent != REPLY_LEN {
        return Err(ConnError::ShortWrite(sent));
    }
    Ok(())
}

/// Serves requests until the peer closes; the number of requests served.
fn serve_conn(stream: &UnixStream, lookup: &Lookup) -> Result<u64, ConnError> {
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(ConnError::Timeout)?;
    let mut served = 0;
    while let Some(uuid) = read_request(stream)? {
        match lookup(&uuid) {
            Some((file, len)) => send_reply(stream, &encode_reply(0, len), Some(&file))?,
            None => send_reply(stream, &encode_reply(libc::ENOENT as u32, 0), None)?,
        }
        served += 1;
    }
    Ok(served)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;
    use std::io::{IoSliceMut, Write};
    use std::os::fd::{FromRawFd, RawFd};
    use std::os::unix::fs::{FileExt, PermissionsExt};

    use nix::sys::socket::{recvmsg, ControlMessageOwned};

    /// An independent client: sends `uuid`, returns (status, pad, len, fd).
    fn ask(s: &UnixStream, uuid: &[u8; 16]) -> (u32, u32, u64, Option<File>) {
        (&*s).write_all(uuid).unwrap();
        recv_reply(s).unwrap()
    }

    fn recv_reply(s: &UnixStream) -> Option<(u32, u32, u64, Option<File>)> {
        let mut buf = [0u8; REPLY_LEN];
        let mut cmsg = nix::cmsg_space!([RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            // Closed by the server with our request unread.
            Err(nix::Error::ECONNRESET) => return None,
            r => r.unwrap(),
        };
        if msg.bytes == 0 {
            return None;
        }
        assert_eq!(msg.bytes, REPLY_LEN);
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(v) = c {
                fds.extend(v);
            }
        }
        assert!(fds.len() <= 1, "{fds:?}");
        // SAFETY: the fd was just received and is owned by nobody else.
        let fd = fds.first().map(|&fd| unsafe { File::from_raw_fd(fd) });
        let u32_at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().unwrap());
        let len = u64::from_le_bytes(buf[8..16].try_into().unwrap());
        Some((u32_at(0), u32_at(4), len, fd))
    }

    fn memfd_with(data: &[u8]) -> File {
        let fd =
            nix::sys::memfd::memfd_create("export-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap();
        let f = File::from(fd);
        f.write_all_at(data, 0).unwrap();
        f
    }

    struct Server {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    /// A server over a table uuid -> (file, len).
    fn server(table: HashMap<[u8; 16], (File, u64)>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.sock");
        let listener = bind(&path).unwrap();
        let lookup: Lookup = Arc::new(move |u: &[u8; 16]| {
            table
                .get(u)
                .and_then(|(f, len)| f.try_clone().ok().map(|f| (f, *len)))
        });
        serve(listener, lookup).unwrap();
        Server { _dir: dir, path }
    }

    fn connect(s: &Server) -> UnixStream {
        let c = UnixStream::connect(&s.path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }

    #[test]
    fn the_socket_is_created_0600_and_replaces_a_stale_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.sock");
        std::fs::write(&path, b"stale").unwrap();
        let _l = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        assert!(UnixStream::connect(&path).is_ok());
    }

    #[test]
    fn known_uuids_give_their_file_and_len_many_per_connection() {
        let (a, b) = ([0xaa; 16], [0xbb; 16]);
        let mut t = HashMap::new();
        t.insert(a, (memfd_with(b"buffer a"), 4096));
        t.insert(b, (memfd_with(b"buffer b"), 65536));
        let s = server(t);
        let c = connect(&s);
        for _ in 0..3 {
            for (uuid, want, want_len) in [(a, b"buffer a", 4096), (b, b"buffer b", 65536)] {
                let (status, pad, len, fd) = ask(&c, &uuid);
                assert_eq!((status, pad, len), (0, 0, want_len));
                let mut got = [0u8; 8];
                fd.expect("an fd with an OK reply")
                    .read_exact_at(&mut got, 0)
                    .unwrap();
                assert_eq!(&got, want);
            }
        }
    }

    #[test]
    fn unknown_uuids_give_enoent_no_fd_and_the_connection_stays() {
        let mut t = HashMap::new();
        t.insert([1; 16], (memfd_with(b"x"), 4096));
        let s = server(t);
        let c = connect(&s);
        let (status, pad, len, fd) = ask(&c, &[2; 16]);
        assert_eq!((status, pad, len), (libc::ENOENT as u32, 0, 0));
        assert!(fd.is_none());
        let (status, _, len, fd) = ask(&c, &[1; 16]);
        assert_eq!((status, len), (0, 4096));
        assert!(fd.is_some());
    }

    #[test]
    fn a_short_request_closes_only_that_connection() {
        let mut t = HashMap::new();
        t.insert([7; 16], (memfd_with(b"x"), 4096));
        let s = server(t);
        let c = connect(&s);
        (&c).write_all(&[7; 5]).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(recv_reply(&c).is_none(), "a reply to a 5-byte request");
        // 17 bytes: one good request answered, then a short one closes.
        let c = connect(&s);
        (&c).write_all(&[7; 17]).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let (status, _, _, fd) = recv_reply(&c).unwrap();
        assert_eq!(status, 0);
        assert!(fd.is_some());
        assert!(recv_reply(&c).is_none());
        // The server carries on.
        let c = connect(&s);
        assert_eq!(ask(&c, &[7; 16]).0, 0);
    }

    #[test]
    fn a_stalled_request_is_closed_after_the_io_timeout() {
        let s = server(HashMap::new());
        let c = connect(&s);
        (&c).write_all(&[1; 3]).unwrap();
        let t0 = std::time::Instant::now();
        assert!(recv_reply(&c).is_none());
        let waited = t0.elapsed();
        assert!(
            waited >= IO_TIMEOUT - Duration::from_millis(100),
            "{waited:?}"
        );
        assert!(waited < IO_TIMEOUT + Duration::from_secs(3), "{waited:?}");
    }

    #[test]
    fn connections_are_bounded() {
        let s = server(HashMap::new());
        let held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let c = connect(&s);
                // Answered: the connection is being served.
                assert_eq!(ask(&c, &[0; 16]).0, libc::ENOENT as u32);
                c
            })
            .collect();
        let extra = connect(&s);
        let _ = (&extra).write_all(&[0; 16]);
        assert!(
            recv_reply(&extra).is_none(),
            "connection {} served",
            MAX_CONNECTIONS + 1
        );
        drop(held);
        // The slots come back once their threads saw the ends.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let c = connect(&s);
            let _ = (&c).write_all(&[0; 16]);
            if let Some((status, ..)) = recv_reply(&c) {
                assert_eq!(status, libc::ENOENT as u32);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no slot came back");
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn the_lookup_sees_the_exact_uuid() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.sock");
        let s2 = seen.clone();
        serve(
            bind(&path).unwrap(),
            Arc::new(move |u: &[u8; 16]| {
                s2.lock().unwrap().push(*u);
                None
            }),
        )
        .unwrap();
        let c = UnixStream::connect(&path).unwrap();
        let uuid: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        (&c).write_all(&uuid).unwrap();
        assert!(recv_reply(&c).is_some());
        assert_eq!(*seen.lock().unwrap(), vec![uuid]);
    }

    #[test]
    fn reply_encoding() {
        let r = encode_reply(2, 0x1122_3344_5566_7788);
        assert_eq!(
            r,
            [2, 0, 0, 0, 0, 0, 0, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
    }
}
