/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 OR BSD-3-Clause */
/*
 * The test importer's protocol (issue 13): the one definition file.
 *
 * A guest kernel module (tests/guest/sharing, dmaheap_sharing.ko) drives a
 * second vhost-user device of the VM, device id 38 with one virtqueue, served
 * by the host test daemon dmaheap-test-importer (tests/importer), which
 * resolves a buffer's UUID through vhost-user-dmaheap's export socket and
 * maps what it gets. Mirrored in Rust by tests/importer/src/proto.rs (the
 * daemon) and tests/guest/src/sharing.rs (the in-guest cases), each with size
 * asserts and a test that reads this file.
 *
 * Queue: each chain is one device-readable struct dmaheap_imp_req followed by
 * one device-writable struct dmaheap_imp_resp. All fields little endian.
 *
 * Pattern of a seed: the buffer is split into 8-byte chunks; chunk i holds the
 * little-endian u64 pattern(seed, i) (the last chunk cut to the buffer):
 *	x = seed ^ (i * 0x9E3779B97F4A7C15); x ^= x >> 31;
 *	x *= 0xBF58476D1CE4E5B9; pattern = x ^ (x >> 29)	(wrapping u64)
 * A seed of 0 means "skip": no check (seed_in) or no write (seed_out).
 */
#ifndef DMAHEAP_IMPORTER_PROTO_H
#define DMAHEAP_IMPORTER_PROTO_H

#include <linux/types.h>

#define DMAHEAP_IMP_DEVICE_ID		38

/* Ops. */
/* Look uuid up, check len, map, check seed_in, write seed_out, unmap, close. */
#define DMAHEAP_IMP_OP_CHECK		1
/* Look uuid up, check len, map, and keep the fd and the mapping (one at a time). */
#define DMAHEAP_IMP_OP_HOLD		2
/* Check seed_in and write seed_out on the held mapping. */
#define DMAHEAP_IMP_OP_CHECK_HELD	3
/* Unmap and close the held buffer. */
#define DMAHEAP_IMP_OP_RELEASE		4
/* Look uuid up only (close what comes back): the lookup's status, len, fd size. */
#define DMAHEAP_IMP_OP_LOOKUP_ONLY	5

/*
 * Statuses: 0 or a positive errno:
 *	ENOENT		the export socket does not know the UUID
 *	EMSGSIZE	len differs from what the lookup reported or the fd's size
 *	EILSEQ		the bytes differ from pattern(seed_in): see bad_*
 *	EBUSY		HOLD while a buffer is held
 *	ENXIO		CHECK_HELD or RELEASE with nothing held
 *	EINVAL		malformed request (short, reserved fields not 0)
 *	EOPNOTSUPP	unknown op
 *	EIO		the export socket or the mapping failed (the daemon logs why)
 */
struct dmaheap_imp_req {
	__le32 op;
	__le32 reserved;	/* 0 */
	__u8 uuid[16];		/* CHECK, HOLD, LOOKUP_ONLY */
	__le64 len;		/* CHECK, HOLD: the buffer's length */
	__le64 seed_in;		/* CHECK, CHECK_HELD: what the guest wrote */
	__le64 seed_out;	/* CHECK, CHECK_HELD: what the importer writes */
};

struct dmaheap_imp_resp {
	__le32 status;
	__le32 reserved;
	__le64 len;		/* the length the export socket reported, 0 if none */
	__le64 fd_size;		/* the size of the fd it got, 0 if none */
	__le64 bad_offset;	/* EILSEQ: the first differing byte */
	__u8 bad_got;		/* EILSEQ: the byte found there */
	__u8 bad_want;		/* EILSEQ: the byte pattern(seed_in) has there */
	__u8 reserved2[6];
};

#define DMAHEAP_IMP_REQ_SIZE		48
#define DMAHEAP_IMP_RESP_SIZE		40

/*
 * The module's user interface: /dev/dmaheap_sharing, one ioctl. fd is a
 * dma-buf (CHECK, HOLD, LOOKUP_ONLY) or -1 (LOOKUP_ONLY of the UUID given in
 * uuid; CHECK_HELD, RELEASE). The module checks is_virtio_dma_buf() (else
 * EMEDIUMTYPE) and takes the UUID with virtio_dma_buf_get_uuid() (its error
 * is the ioctl's), fills uuid and len, sends the request and waits (killable,
 * at most 30 s: ETIMEDOUT). On success resp is the device's answer.
 */
struct dmaheap_sharing_run {
	__s32 fd;
	__u32 op;
	__u64 seed_in;
	__u64 seed_out;
	__u8 uuid[16];			/* in (fd -1) or out */
	__u64 len;			/* out: the dma-buf's size */
	struct dmaheap_imp_resp resp;	/* out */
};

#define DMAHEAP_SHARING_RUN_SIZE	88
#define DMAHEAP_SHARING_IOC_RUN	_IOWR('S', 0x38, struct dmaheap_sharing_run)

#ifdef __KERNEL__
static_assert(sizeof(struct dmaheap_imp_req) == DMAHEAP_IMP_REQ_SIZE);
static_assert(sizeof(struct dmaheap_imp_resp) == DMAHEAP_IMP_RESP_SIZE);
static_assert(sizeof(struct dmaheap_sharing_run) == DMAHEAP_SHARING_RUN_SIZE);
#endif

#endif /* DMAHEAP_IMPORTER_PROTO_H */
