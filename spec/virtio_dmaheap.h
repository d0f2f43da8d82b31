/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-3-Clause */
/*
 * virtio-dmaheap: wire ABI of the VIRTIO dma-heap device.
 *
 * This header is the single source of truth for the device's wire format. The Linux
 * guest driver includes it; the Rust back-end mirrors it in backend/src/abi.rs and a
 * test compares every size and field offset against this file. The prose and the
 * normative rules are in spec/virtio-dmaheap.md.
 *
 * All fields are little-endian. Every structure is naturally aligned and has no
 * implicit padding (checked with gcc -Wpadded).
 */
#ifndef _UAPI_LINUX_VIRTIO_DMAHEAP_H
#define _UAPI_LINUX_VIRTIO_DMAHEAP_H

#include <linux/types.h>

/*
 * Device ID. 37 is reserved in the VIRTIO registry as "virtio dmabuf" without a published
 * device section; QEMU 11.1 only accepts ids from its name table. The config-space magic
 * below keeps a driver from binding to any other device that uses the same id.
 */
#define VIRTIO_ID_DMAHEAP 37

/* Feature bits. */
/* The device accepts VIRTIO_DMAHEAP_REQ_SYNC. */
#define VIRTIO_DMAHEAP_F_SYNC 0
/* The device accepts VIRTIO_DMAHEAP_REQ_ASSIGN_UUID: buffers get UUIDs for other devices. */
#define VIRTIO_DMAHEAP_F_UUID 1
/*
 * Buffers belong to a driver session: SESSION_OPEN, SESSION_CLOSE (which can suspend the
 * session across a device reset), RESERVE and UNRESERVE.
 */
#define VIRTIO_DMAHEAP_F_SESSION 2
/* HEAP_INFO marks heaps whose SYNC does nothing (VIRTIO_DMAHEAP_HEAP_F_NO_SYNC). */
#define VIRTIO_DMAHEAP_F_NO_SYNC 3
/* The device accepts VIRTIO_DMAHEAP_REQ_ALLOC_BATCH. */
#define VIRTIO_DMAHEAP_F_BATCH 4
/*
 * SESSION_OPEN states the driver's page size (virtio_dmaheap_session_open_page_req); the
 * session's buffers and reservations are aligned to it. Needs VIRTIO_DMAHEAP_F_SESSION.
 */
#define VIRTIO_DMAHEAP_F_PAGE_SIZE 5
/*
 * HEAP_INFO also states the window range that holds the heap's buffers
 * (virtio_dmaheap_heap_info_range_resp). Heaps with different cache attributes get disjoint
 * ranges, so that the driver can map each range with one memory type.
 */
#define VIRTIO_DMAHEAP_F_HEAP_RANGE 6

/* Shared memory region id of the buffer window. */
#define VIRTIO_DMAHEAP_SHM_BUFFERS 0

/* Device configuration layout. */
#define VIRTIO_DMAHEAP_MAGIC 0x50414844 /* "DHAP" as little-endian bytes */
#define VIRTIO_DMAHEAP_VERSION 1
/* Smallest unit of the buffer window; every offset and length is a multiple of it. */
#define VIRTIO_DMAHEAP_PAGE_SIZE 4096
/* Largest page size a driver may state with VIRTIO_DMAHEAP_F_PAGE_SIZE. */
#define VIRTIO_DMAHEAP_PAGE_SIZE_MAX 65536
/* Alignment of a heap range (VIRTIO_DMAHEAP_F_HEAP_RANGE) that is not the whole window. */
#define VIRTIO_DMAHEAP_RANGE_ALIGN 0x200000

struct virtio_dmaheap_config {
	__le32 magic;		/* VIRTIO_DMAHEAP_MAGIC */
	__le32 version;		/* VIRTIO_DMAHEAP_VERSION */
	__le32 num_heaps;	/* heap ids are 0 .. num_heaps - 1 */
	__le32 max_buffers;	/* live buffers the device allows; 0: not stated */
};

/* Request types. */
#define VIRTIO_DMAHEAP_REQ_HEAP_INFO 1
#define VIRTIO_DMAHEAP_REQ_ALLOC 2
#define VIRTIO_DMAHEAP_REQ_FREE 3
#define VIRTIO_DMAHEAP_REQ_SYNC 4		/* needs VIRTIO_DMAHEAP_F_SYNC */
#define VIRTIO_DMAHEAP_REQ_ASSIGN_UUID 5	/* needs VIRTIO_DMAHEAP_F_UUID */
#define VIRTIO_DMAHEAP_REQ_SESSION_OPEN 6	/* needs VIRTIO_DMAHEAP_F_SESSION */
#define VIRTIO_DMAHEAP_REQ_SESSION_CLOSE 7	/* needs VIRTIO_DMAHEAP_F_SESSION */
#define VIRTIO_DMAHEAP_REQ_RESERVE 8		/* needs VIRTIO_DMAHEAP_F_SESSION */
#define VIRTIO_DMAHEAP_REQ_UNRESERVE 9		/* needs VIRTIO_DMAHEAP_F_SESSION */
#define VIRTIO_DMAHEAP_REQ_ALLOC_BATCH 10	/* needs VIRTIO_DMAHEAP_F_BATCH */

/* Response status codes; each maps to one errno (given in the comment). */
#define VIRTIO_DMAHEAP_S_OK 0
#define VIRTIO_DMAHEAP_S_IOERR 1	/* EIO: host-side failure */
#define VIRTIO_DMAHEAP_S_INVAL 2	/* EINVAL: malformed request or argument */
#define VIRTIO_DMAHEAP_S_NO_HEAP 3	/* ENODEV: heap id out of range */
#define VIRTIO_DMAHEAP_S_NO_BUFFER 4	/* ENOENT: unknown or freed buffer id */
#define VIRTIO_DMAHEAP_S_NOMEM 5	/* ENOMEM: the host heap is out of memory */
#define VIRTIO_DMAHEAP_S_QUOTA 6	/* ENOMEM: a per-VM or per-heap quota is reached */
#define VIRTIO_DMAHEAP_S_WINDOW_FULL 7	/* ENOMEM: no free range in the buffer window */
#define VIRTIO_DMAHEAP_S_UNSUPP 8	/* EOPNOTSUPP: request type not offered */
#define VIRTIO_DMAHEAP_S_TOO_BIG 9	/* EINVAL: length above the heap's max_size */
#define VIRTIO_DMAHEAP_S_NO_SESSION 10	/* ENODEV: no open session (or not the one named) */

/*
 * Every request starts with this header. The device-readable part of a chain is exactly
 * the request struct that `type` selects; any other length is malformed.
 */
struct virtio_dmaheap_req_hdr {
	__le32 type;		/* VIRTIO_DMAHEAP_REQ_* */
	__le32 reserved;	/* 0 */
};

/* Every response starts with this header. */
struct virtio_dmaheap_resp_hdr {
	__le32 status;		/* VIRTIO_DMAHEAP_S_* */
	__le32 reserved;	/* 0 */
};

/* HEAP_INFO: describe one heap. */
struct virtio_dmaheap_heap_info_req {
	struct virtio_dmaheap_req_hdr hdr;
	__le32 heap_id;
	__le32 reserved;
};

/* virtio_dmaheap_heap_info.flags */
#define VIRTIO_DMAHEAP_HEAP_F_CONTIGUOUS (1 << 0) /* host-physically contiguous buffers */
#define VIRTIO_DMAHEAP_HEAP_F_NO_SYNC (1 << 1)	/* SYNC does nothing on the host; needs F_NO_SYNC */
#define VIRTIO_DMAHEAP_HEAP_F_VALID_MASK \
	(VIRTIO_DMAHEAP_HEAP_F_CONTIGUOUS | VIRTIO_DMAHEAP_HEAP_F_NO_SYNC)

/* virtio_dmaheap_heap_info.cache: how the guest must map the buffers. */
#define VIRTIO_DMAHEAP_CACHE_CACHED 0
#define VIRTIO_DMAHEAP_CACHE_UNCACHED 1
#define VIRTIO_DMAHEAP_CACHE_WC 2

#define VIRTIO_DMAHEAP_NAME_LEN 32

struct virtio_dmaheap_heap_info {
	__u8 name[VIRTIO_DMAHEAP_NAME_LEN];	/* NUL-terminated, NUL-padded, no '/' */
	__le32 flags;		/* VIRTIO_DMAHEAP_HEAP_F_* */
	__le32 cache;		/* VIRTIO_DMAHEAP_CACHE_* */
	__le64 min_align;	/* power of two, >= the session's page size */
	__le64 max_size;	/* largest buffer, bytes; multiple of VIRTIO_DMAHEAP_PAGE_SIZE */
	__le64 capacity;	/* bytes the guest may hold from this heap; 0: unknown */
};

struct virtio_dmaheap_heap_info_resp {
	struct virtio_dmaheap_resp_hdr hdr;
	struct virtio_dmaheap_heap_info info;
};

/* The window range every buffer of a heap lies in. */
struct virtio_dmaheap_heap_range {
	__le64 offset;		/* in the window */
	__le64 len;
};

/* HEAP_INFO's answer with VIRTIO_DMAHEAP_F_HEAP_RANGE. */
struct virtio_dmaheap_heap_info_range_resp {
	struct virtio_dmaheap_resp_hdr hdr;
	struct virtio_dmaheap_heap_info info;
	struct virtio_dmaheap_heap_range range;
};

/* ALLOC: allocate a zeroed buffer and make it visible in the buffer window. */
struct virtio_dmaheap_alloc_req {
	struct virtio_dmaheap_req_hdr hdr;
	__le32 heap_id;
	__le32 flags;		/* no flags defined: 0 */
	__le64 len;		/* bytes, > 0, multiple of VIRTIO_DMAHEAP_PAGE_SIZE */
};

struct virtio_dmaheap_alloc_resp {
	struct virtio_dmaheap_resp_hdr hdr;
	__le64 buffer_id;	/* never 0; never reused by this device, resets included */
	__le64 offset;		/* in the buffer window, multiple of the heap's min_align */
	__le64 len;		/* bytes usable at offset, >= the requested len */
};

/* FREE: release a buffer; the driver need not wait for the response. */
struct virtio_dmaheap_free_req {
	struct virtio_dmaheap_req_hdr hdr;
	__le64 buffer_id;
};

/* SYNC: bracket CPU access to a buffer, forwarded to the host buffer. */
#define VIRTIO_DMAHEAP_SYNC_READ (1 << 0)
#define VIRTIO_DMAHEAP_SYNC_WRITE (1 << 1)
#define VIRTIO_DMAHEAP_SYNC_END (1 << 2)	/* clear: start of CPU access */
#define VIRTIO_DMAHEAP_SYNC_VALID_MASK \
	(VIRTIO_DMAHEAP_SYNC_READ | VIRTIO_DMAHEAP_SYNC_WRITE | VIRTIO_DMAHEAP_SYNC_END)

struct virtio_dmaheap_sync_req {
	struct virtio_dmaheap_req_hdr hdr;
	__le64 buffer_id;
	__le32 flags;		/* VIRTIO_DMAHEAP_SYNC_*; READ and/or WRITE must be set */
	__le32 reserved;	/* 0 */
};

/* ASSIGN_UUID (needs VIRTIO_DMAHEAP_F_UUID): give a buffer a UUID other devices resolve. */
struct virtio_dmaheap_assign_uuid_req {
	struct virtio_dmaheap_req_hdr hdr;
	__le64 buffer_id;
};

struct virtio_dmaheap_assign_uuid_resp {
	struct virtio_dmaheap_resp_hdr hdr;
	__u8 uuid[16];
};

/*
 * SESSION_OPEN: open a new session, ending any earlier one, or resume a session that
 * SESSION_CLOSE suspended.
 */
struct virtio_dmaheap_session_open_req {
	struct virtio_dmaheap_req_hdr hdr;
	__le64 resume_id;	/* 0: a new session; else the suspended session to resume */
};

/*
 * SESSION_OPEN with VIRTIO_DMAHEAP_F_PAGE_SIZE negotiated (instead of the request above):
 * the same fields, then the driver's page size.
 */
struct virtio_dmaheap_session_open_page_req {
	struct virtio_dmaheap_req_hdr hdr;
	__le64 resume_id;	/* as in virtio_dmaheap_session_open_req */
	__le32 page_size;	/* power of two, PAGE_SIZE .. VIRTIO_DMAHEAP_PAGE_SIZE_MAX */
	__le32 reserved;	/* 0 */
};

struct virtio_dmaheap_session_open_resp {
	struct virtio_dmaheap_resp_hdr hdr;
	__le64 session_id;	/* never 0 */
};

/* virtio_dmaheap_session_close_req.flags */
#define VIRTIO_DMAHEAP_CLOSE_SUSPEND (1 << 0)	/* keep the buffers for a resume */
#define VIRTIO_DMAHEAP_CLOSE_VALID_MASK VIRTIO_DMAHEAP_CLOSE_SUSPEND

/*
 * SESSION_CLOSE: remove every buffer of the session from the window, then release the
 * buffers or, with VIRTIO_DMAHEAP_CLOSE_SUSPEND, keep them for SESSION_OPEN(resume_id).
 */
struct virtio_dmaheap_session_close_req {
	struct virtio_dmaheap_req_hdr hdr;
	__le32 flags;		/* VIRTIO_DMAHEAP_CLOSE_* */
	__le32 reserved;	/* 0 */
};

/*
 * RESERVE / UNRESERVE: keep a window range out of every ALLOC of the session (the driver
 * still has users of that range from before a reset), and give it back.
 */
struct virtio_dmaheap_reserve_req {
	struct virtio_dmaheap_req_hdr hdr;
	__le64 offset;		/* multiple of the session's page size */
	__le64 len;		/* > 0, multiple of the session's page size */
};

/* ALLOC_BATCH: up to VIRTIO_DMAHEAP_BATCH_MAX zeroed buffers of one heap and size. */
#define VIRTIO_DMAHEAP_BATCH_MAX 16

struct virtio_dmaheap_alloc_batch_req {
	struct virtio_dmaheap_req_hdr hdr;
	__le32 heap_id;
	__le32 count;		/* buffers wanted, 1 .. VIRTIO_DMAHEAP_BATCH_MAX */
	__le64 len;		/* of each buffer, as in ALLOC */
};

/* One allocated buffer, as in virtio_dmaheap_alloc_resp. */
struct virtio_dmaheap_buffer {
	__le64 buffer_id;
	__le64 offset;
	__le64 len;
};

struct virtio_dmaheap_alloc_batch_resp {
	struct virtio_dmaheap_resp_hdr hdr;
	__le32 count;		/* buffers allocated: 1 .. the count asked for, on success */
	__le32 reserved;	/* 0 */
	struct virtio_dmaheap_buffer buffers[VIRTIO_DMAHEAP_BATCH_MAX]; /* count used, rest 0 */
};

#endif /* _UAPI_LINUX_VIRTIO_DMAHEAP_H */
