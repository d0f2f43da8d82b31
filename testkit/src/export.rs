//! A client of the daemon's export socket (`--export-socket`): a UUID in, the buffer's
//! file (one fd in `SCM_RIGHTS`) and length out, as another device's back end resolves
//! the UUIDs the guest gives it.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::daemon::DEADLINE;

/// One connection to an export socket.
#[derive(Debug)]
pub struct ExportClient {
    stream: UnixStream,
}

impl ExportClient {
    /// Connects to `path`, waiting (up to the test deadline) for the daemon to create it.
    pub fn connect(path: &Path) -> ExportClient {
        let start = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(DEADLINE)).unwrap();
                    return ExportClient { stream };
                }
                Err(e) if start.elapsed() < DEADLINE => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("export socket {}: {e}", path.display()),
            }
        }
    }

    /// Resolves `uuid`: the file and the buffer length, or the errno the daemon answered.
    pub fn resolve(&mut self, uuid: &[u8; 16]) -> Result<(File, u64), u32> {
        self.stream.write_all(uuid).expect("export socket: send");
        let (reply, fd) = self.recv();
        let status = u32::from_le_bytes(reply[0..4].try_into().unwrap());
        let len = u64::from_le_bytes(reply[8..16].try_into().unwrap());
        match (status, fd) {
            (0, Some(f)) => Ok((f, len)),
            (0, None) => panic!("export socket: status 0 without an fd"),
            (s, None) => {
                assert_eq!(len, 0, "export socket: error {s} with len {len}");
                Err(s)
            }
            (s, Some(_)) => panic!("export socket: error {s} with an fd"),
        }
    }

    /// Reads one 16-byte reply and its fd, if any.
    fn recv(&mut self) -> ([u8; 16], Option<File>) {
        let mut reply = [0u8; 16];
        let mut got = 0;
        let mut file = None;
        while got < reply.len() {
            // SAFETY: CMSG_SPACE only computes a size.
            let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) };
            let mut cbuf = vec![0u8; space as usize];
            let mut iov = libc::iovec {
                iov_base: reply[got..].as_mut_ptr().cast(),
                iov_len: reply.len() - got,
            };
            // SAFETY: an all-zero msghdr is valid; the pointers set below are live.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = cbuf.len() as _;
            // SAFETY: `msg` points at live buffers of the sizes it states.
            let n =
                unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            assert!(
                n > 0,
                "export socket: recvmsg returned {n}: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: the kernel filled `msg`; the macros walk the control buffer it set.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                        assert!(file.is_none(), "export socket: two fds in one reply");
                        file = Some(File::from_raw_fd(fd));
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            got += n as usize;
        }
        (reply, file)
    }
}
