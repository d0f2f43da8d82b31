//! What the importer does with a request, with no vhost types: resolves UUIDs through
//! vhost-user-dmaheap's export socket, maps the fd it gets and checks and writes bytes.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::time::Duration;

use log::{debug, info, warn};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessageOwned, MsgFlags};

use crate::proto::{self, Req, Resp};

/// How long a lookup may take.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// `DMA_BUF_IOCTL_SYNC` (`_IOW('b', 0, u64)`) and its flags.
const DMA_BUF_IOCTL_SYNC: libc::c_ulong = 0x4008_6200;
const SYNC_RW: u64 = 3;
const SYNC_START: u64 = 0;
const SYNC_END: u64 = 4;

/// Errors of one lookup on the export socket.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Connecting failed.
    #[error("cannot connect to the export socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Talking to it failed.
    #[error("export socket i/o")]
    Io(#[source] nix::Error),
    /// Setting socket timeouts failed.
    #[error("export socket timeouts")]
    Timeout(#[source] io::Error),
    /// The reply is not what the protocol says.
    #[error("bad reply from the export socket: {0}")]
    Protocol(String),
}

/// What a lookup gave.
#[derive(Debug)]
pub struct Looked {
    /// 0 or a positive errno.
    pub status: u32,
    /// The buffer length reported.
    pub len: u64,
    /// The fd (status 0 only).
    pub file: Option<File>,
}

/// A client of the export socket, reconnecting when needed.
#[derive(Debug)]
pub struct ExportClient {
    path: PathBuf,
    conn: Option<UnixStream>,
}

impl ExportClient {
    /// A client of the socket at `path` (connected on first use).
    pub fn new(path: PathBuf) -> Self {
        Self { path, conn: None }
    }

    /// Looks `uuid` up; one retry on a fresh connection (the daemon may have closed an
    /// idle one).
    pub fn lookup(&mut self, uuid: &[u8; 16]) -> Result<Looked, LookupError> {
        match self.lookup_once(uuid) {
            Ok(l) => Ok(l),
            Err(e) => {
                debug!("lookup failed ({e}); reconnecting once");
                self.conn = None;
                self.lookup_once(uuid)
            }
        }
    }

    fn connection(&mut self) -> Result<&UnixStream, LookupError> {
        if self.conn.is_none() {
            let c = UnixStream::connect(&self.path).map_err(|source| LookupError::Connect {
                path: self.path.clone(),
                source,
            })?;
            c.set_read_timeout(Some(SOCKET_TIMEOUT))
                .map_err(LookupError::Timeout)?;
            c.set_write_timeout(Some(SOCKET_TIMEOUT))
                .map_err(LookupError::Timeout)?;
            self.conn = Some(c);
        }
        self.conn
            .as_ref()
            .ok_or_else(|| LookupError::Protocol("no connection".into()))
    }

    fn lookup_once(&mut self, uuid: &[u8; 16]) -> Result<Looked, LookupError> {
        let res = self.exchange(uuid);
        if res.is_err() {
            self.conn = None;
        }
        res
    }

    fn exchange(&mut self, uuid: &[u8; 16]) -> Result<Looked, LookupError> {
        let fd = self.connection()?.as_raw_fd();
        let sent = sendmsg::<()>(fd, &[IoSlice::new(uuid)], &[], MsgFlags::MSG_NOSIGNAL, None)
            .map_err(LookupError::Io)?;
        if sent != uuid.len() {
            return Err(LookupError::Protocol(format!("sent {sent} of 16 bytes")));
        }
        let mut buf = [0u8; 16];
        let mut got = 0;
        let mut fds: Vec<OwnedFd> = Vec::new();
        while got < buf.len() {
            let mut cmsg = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut buf[got..])];
            let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(LookupError::Io)?;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        // SAFETY: each fd was just received in this message and is owned
                        // by nothing else in this process.
                        fds.extend(v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
            }
            if msg.bytes == 0 {
                return Err(LookupError::Protocol(format!(
                    "connection closed after {got} of 16 reply bytes"
                )));
            }
            got += msg.bytes;
        }
        let status = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let pad = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let mut l = [0u8; 8];
        l.copy_from_slice(&buf[8..16]);
        let len = u64::from_le_bytes(l);
        if pad != 0 {
            return Err(LookupError::Protocol(format!("reserved field {pad:#x}")));
        }
        match (status, fds.len()) {
            (0, 1) => Ok(Looked {
                status,
                len,
                file: fds.pop().map(File::from),
            }),
            (0, n) => Err(LookupError::Protocol(format!("status 0 with {n} fds"))),
            (_, 0) if len == 0 => Ok(Looked {
                status,
                len,
                file: None,
            }),
            (s, n) => Err(LookupError::Protocol(format!(
                "status {s} with {n} fds and len {len}"
            ))),
        }
    }
}

/// A shared read/write mapping of a whole file, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; it can move between
// threads (the vring worker may change).
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(file: &File, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a new shared mapping of `len` bytes of an open file, at an address the
        // kernel chooses; nothing else in this process refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(p.cast::<u8>())
            .map(|ptr| Mapping { ptr, len })
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is live and `len` bytes long while `self` lives; the
        // exclusive borrow of `self` makes this the only slice of it here (the guest and
        // the exporter may write it concurrently: the test protocol orders that).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what mmap returned; no slice of it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A buffer kept by HOLD.
#[derive(Debug)]
struct Held {
    map: Mapping,
    file: File,
}

/// The importer's state: the client and at most one held buffer.
#[derive(Debug)]
pub struct Importer {
    client: ExportClient,
    held: Option<Held>,
}

/// A failed step: the status to answer and the response filled so far.
type Step<T> = Result<T, Resp>;

fn fd_size(f: &File) -> u64 {
    // SAFETY: lseek on an fd this function borrows; it changes only the file offset, which
    // nothing here uses (the bytes are reached through mmap).
    let end = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
    u64::try_from(end).unwrap_or(0)
}

/// DMA_BUF_IOCTL_SYNC on a dma-buf; `false` if `f` is not a dma-buf (a memfd).
fn dma_buf_sync(f: &File, flags: u64) -> bool {
    // SAFETY: the ioctl reads one u64 from the pointer, which is valid for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), DMA_BUF_IOCTL_SYNC, &flags) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOTTY) {
            warn!("DMA_BUF_IOCTL_SYNC {flags}: {e}");
        }
        return false;
    }
    true
}

/// Checks `seed_in` (0: skip) and writes `seed_out` (0: skip) over `map`.
fn check_and_write(map: &mut Mapping, file: &File, req: &Req, mut resp: Resp) -> Resp {
    let synced = dma_buf_sync(file, SYNC_START | SYNC_RW);
    let mem = map.as_mut_slice();
    if req.seed_in != 0 {
        if let Some((off, got, want)) = proto::first_mismatch(mem, req.seed_in) {
            info!("mismatch at byte {off}: {got:#04x}, want {want:#04x}");
            resp.status = libc::EILSEQ as u32;
            resp.bad_offset = off as u64;
            resp.bad_got = got;
            resp.bad_want = want;
        }
    }
    if resp.status == 0 && req.seed_out != 0 {
        proto::fill(mem, req.seed_out);
    }
    if synced {
        dma_buf_sync(file, SYNC_END | SYNC_RW);
    }
    resp
}

impl Importer {
    /// An importer resolving UUIDs through the export socket at `export_socket`.
    pub fn new(export_socket: PathBuf) -> Self {
        Self {
            client: ExportClient::new(export_socket),
            held: None,
        }
    }

    /// Serves one request (the device-readable bytes of a chain). Never fails: errors are
    /// statuses.
    pub fn handle(&mut self, bytes: &[u8]) -> Resp {
        let Some(req) = Req::decode(bytes) else {
            warn!(
                "request of {} bytes, want {}: EINVAL",
                bytes.len(),
                proto::REQ_SIZE
            );
            return Resp::status(libc::EINVAL);
        };
        if req.reserved != 0 {
            warn!("request with reserved {:#x}: EINVAL", req.reserved);
            return Resp::status(libc::EINVAL);
        }
        let resp = match req.op {
            proto::OP_CHECK => self.check(&req),
            proto::OP_HOLD => self.hold(&req),
            proto::OP_CHECK_HELD => self.check_held(&req),
            proto::OP_RELEASE => self.release(),
            proto::OP_LOOKUP_ONLY => self.lookup_only(&req),
            op => {
                warn!("unknown op {op}: EOPNOTSUPP");
                Ok(Resp::status(libc::EOPNOTSUPP))
            }
        };
        let resp = resp.unwrap_or_else(|r| r);
        info!(
            "op {} uuid {}: status {} len {} fd_size {}",
            req.op,
            hex(&req.uuid),
            resp.status,
            resp.len,
            resp.fd_size
        );
        resp
    }

    /// Looks up and checks that the fd has `req.len` bytes: the file and the response.
    fn open(&mut self, req: &Req) -> Step<(File, Resp)> {
        let looked = self.client.lookup(&req.uuid).map_err(|e| {
            warn!("lookup: {e}");
            let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
            while let Some(s) = src {
                warn!("  caused by: {s}");
                src = s.source();
            }
            Resp::status(libc::EIO)
        })?;
        let mut resp = Resp {
            status: looked.status,
            len: looked.len,
            ..Resp::default()
        };
        let Some(file) = looked.file else {
            return Err(resp);
        };
        resp.fd_size = fd_size(&file);
        if resp.len != req.len || resp.fd_size != req.len {
            resp.status = libc::EMSGSIZE as u32;
            return Err(resp);
        }
        Ok((file, resp))
    }

    fn map(file: &File, resp: Resp) -> Step<Mapping> {
        let len = usize::try_from(resp.fd_size).map_err(|_| Resp {
            status: libc::EMSGSIZE as u32,
            ..resp
        })?;
        Mapping::new(file, len).map_err(|e| {
            warn!("mmap of {len} bytes: {e}");
            Resp {
                status: libc::EIO as u32,
                ..resp
            }
        })
    }

    fn check(&mut self, req: &Req) -> Step<Resp> {
        let (file, resp) = self.open(req)?;
        let mut map = Self::map(&file, resp)?;
        Ok(check_and_write(&mut map, &file, req, resp))
    }

    fn hold(&mut self, req: &Req) -> Step<Resp> {
        if self.held.is_some() {
            return Err(Resp::status(libc::EBUSY));
        }
        let (file, resp) = self.open(req)?;
        let map = Self::map(&file, resp)?;
        self.held = Some(Held { map, file });
        Ok(resp)
    }

    fn check_held(&mut self, req: &Req) -> Step<Resp> {
        let Some(h) = self.held.as_mut() else {
            return Err(Resp::status(libc::ENXIO));
        };
        let resp = Resp {
            len: h.map.len as u64,
            fd_size: fd_size(&h.file),
            ..Resp::default()
        };
        Ok(check_and_write(&mut h.map, &h.file, req, resp))
    }

    fn release(&mut self) -> Step<Resp> {
        match self.held.take() {
            Some(h) => Ok(Resp {
                len: h.map.len as u64,
                ..Resp::default()
            }),
            None => Err(Resp::status(libc::ENXIO)),
        }
    }

    fn lookup_only(&mut self, req: &Req) -> Step<Resp> {
        let looked = self.client.lookup(&req.uuid).map_err(|e| {
            warn!("lookup: {e}");
            Resp::status(libc::EIO)
        })?;
        Ok(Resp {
            status: looked.status,
            len: looked.len,
            fd_size: looked.file.as_ref().map(fd_size).unwrap_or(0),
            ..Resp::default()
        })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
