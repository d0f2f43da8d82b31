//! The ioctls the daemon issues on host heaps and dma-bufs: their argument structs (from
//! the kernel's uapi headers), their wrappers, and their request numbers, which the
//! seccomp filter ([`crate::sandbox`]) allows by value. Numbers are computed with nix's
//! `request_code_*` (the kernel's `_IOW`/`_IOWR`), or taken from `libc` where it has them.

use std::mem::size_of;

use nix::{request_code_readwrite, request_code_write};

/// `struct dma_heap_allocation_data` from `<linux/dma-heap.h>`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct DmaHeapAllocationData {
    /// Size of the allocation.
    pub len: u64,
    /// Out: the new dma-buf fd.
    pub fd: u32,
    /// Flags of the new fd (`O_RDWR | O_CLOEXEC`).
    pub fd_flags: u32,
    /// Heap flags (none defined).
    pub heap_flags: u64,
}

/// `struct dma_buf_sync` from `<linux/dma-buf.h>`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct DmaBufSync {
    /// `DMA_BUF_SYNC_*`.
    pub flags: u64,
}

/// `struct udmabuf_create` from `<linux/udmabuf.h>`.
#[repr(C)]
#[derive(Debug, Default)]
pub struct UdmabufCreate {
    /// The memfd to export.
    pub memfd: u32,
    /// `UDMABUF_FLAGS_*`.
    pub flags: u32,
    /// Start in the memfd.
    pub offset: u64,
    /// Length.
    pub size: u64,
}

/// `UDMABUF_FLAGS_CLOEXEC`.
pub const UDMABUF_FLAGS_CLOEXEC: u32 = 0x01;
/// `DMA_BUF_SYNC_WRITE`.
pub const DMA_BUF_SYNC_WRITE: u64 = 2;
/// `DMA_BUF_SYNC_END`.
pub const DMA_BUF_SYNC_END: u64 = 4;

nix::ioctl_readwrite!(dma_heap_alloc, b'H', 0, DmaHeapAllocationData);
nix::ioctl_write_ptr!(dma_buf_sync, b'b', 0, DmaBufSync);
nix::ioctl_write_ptr!(udmabuf_create, b'u', 0x42, UdmabufCreate);

/// `DMA_HEAP_IOCTL_ALLOC` = `_IOWR('H', 0, struct dma_heap_allocation_data)`.
pub const DMA_HEAP_IOCTL_ALLOC: u64 =
    request_code_readwrite!(b'H', 0, size_of::<DmaHeapAllocationData>()) as u64;
/// `DMA_BUF_IOCTL_SYNC` = `_IOW('b', 0, struct dma_buf_sync)`.
pub const DMA_BUF_IOCTL_SYNC: u64 = request_code_write!(b'b', 0, size_of::<DmaBufSync>()) as u64;
/// `UDMABUF_CREATE` = `_IOW('u', 0x42, struct udmabuf_create)`.
pub const UDMABUF_CREATE: u64 = request_code_write!(b'u', 0x42, size_of::<UdmabufCreate>()) as u64;
/// `FIONBIO` (std's `set_nonblocking`).
#[allow(clippy::unnecessary_cast)] // an `Ioctl` is not a u64 on every target
pub const FIONBIO: u64 = libc::FIONBIO as u64;
/// `FIOCLEX`.
#[allow(clippy::unnecessary_cast)] // an `Ioctl` is not a u64 on every target
pub const FIOCLEX: u64 = libc::FIOCLEX as u64;
/// `TCGETS` (`isatty`, from the logger).
#[allow(clippy::unnecessary_cast)] // an `Ioctl` is not a u64 on every target
pub const TCGETS: u64 = libc::TCGETS as u64;

/// Every ioctl request the daemon issues after start-up.
pub const ALL: [u64; 6] = [
    DMA_HEAP_IOCTL_ALLOC,
    DMA_BUF_IOCTL_SYNC,
    UDMABUF_CREATE,
    FIONBIO,
    FIOCLEX,
    TCGETS,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn request_numbers_are_the_kernel_ones() {
        // As printed by a C program including the uapi headers on x86_64.
        assert_eq!(DMA_HEAP_IOCTL_ALLOC, 0xc018_4800);
        assert_eq!(DMA_BUF_IOCTL_SYNC, 0x4008_6200);
        assert_eq!(UDMABUF_CREATE, 0x4018_7542);
        assert_eq!((FIONBIO, FIOCLEX, TCGETS), (0x5421, 0x5451, 0x5401));
    }
}
