/* SPDX-License-Identifier: GPL-2.0 */
/*
 * virtio-dmaheap guest driver: shared definitions of its parts,
 * vdh_queue.c (requests), vdh_virtio.c (device life cycle, sessions),
 * vdh_window.c (the buffer window and its heap ranges), vdh_heap.c
 * (dma-heaps and their sysfs directories), vdh_buffer.c (allocation and
 * dma-buf ops), vdh_mmap.c (user mappings), vdh_pool.c (freed buffers kept
 * for reuse) and vdh_uuid.c (buffers as virtio_dma_bufs, with a UUID).
 */
#ifndef VDH_H
#define VDH_H

#include <linux/kobject.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/memremap.h>
#include <linux/mm.h>
#include <linux/mutex.h>
#include <linux/rwsem.h>
#include <linux/spinlock.h>
#include <linux/types.h>
#include <linux/uuid.h>
#include <linux/version.h>
#include <linux/virtio.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include "virtio_dmaheap.h"

struct dma_buf;
struct dma_heap_ops;
struct vdh_heap_kobj;
struct vdh_req;

/* system_wq and system_unbound_wq are deprecated since 6.17. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 17, 0)
#define vdh_wq	system_dfl_wq
#else
#define vdh_wq	system_unbound_wq
#endif

/*
 * Cross-device sharing (VIRTIO_DMAHEAP_F_UUID) needs the kernel's virtio_dma_buf
 * (CONFIG_VIRTIO_DMA_SHARED_BUFFER, which Kconfig selects in tree). Built
 * against a kernel without it, the driver does not offer the feature.
 */
#define VDH_UUID	IS_ENABLED(CONFIG_VIRTIO_DMA_SHARED_BUFFER)

/*
 * The page protection of @cache's memory type (see vdh_window.c). On x86 the
 * range's PAT reservation has the final say, and agrees.
 */
static inline pgprot_t vdh_pgprot(u32 cache, pgprot_t prot)
{
	switch (cache) {
	case VIRTIO_DMAHEAP_CACHE_UNCACHED:
		/* UC- on x86; elsewhere never Device memory, but Normal-NC. */
		if (IS_ENABLED(CONFIG_X86))
			return pgprot_noncached(prot);
		return pgprot_writecombine(prot);
	case VIRTIO_DMAHEAP_CACHE_WC:
		return pgprot_writecombine(prot);
	default:
		return prot;
	}
}

/* More heaps than dma-heap minors make no sense. */
#define VDH_MAX_HEAPS		64

/*
 * A heap range of the window, mapped with its memory type: with struct pages
 * if it is CACHED (@pgmap), else only by @vaddr. Lives as long as the window.
 */
struct vdh_span {
	struct list_head node;		/* in the window's spans */
	u64 offset;			/* in the window */
	u64 len;
	u32 cache;			/* VIRTIO_DMAHEAP_CACHE_* */
	bool pages;			/* struct pages (pgmap) */
	void *vaddr;			/* kernel mapping of the whole range */
	struct dev_pagemap pgmap;
};

/*
 * The buffer window: the shared memory region and its mapped heap ranges. It
 * outlives the device bindings while buffers use it. Buffers revoked while a kernel
 * user can still reach their range (a vmap, a DMA mapping) stay on the
 * quarantine list; every new session of a device on this window reserves
 * their ranges, so that no new buffer is placed where old users still write.
 */
struct vdh_window {
	struct kref ref;
	struct list_head node;		/* in vdh_windows */
	struct resource *res;
	phys_addr_t base;
	u64 size;
	struct mutex spans_lock;	/* protects spans */
	struct list_head spans;		/* of vdh_span.node */
	struct mutex lock;		/* protects quarantine, owner */
	struct list_head quarantine;	/* of vdh_buffer.qnode */
	struct vdh_dev *owner;		/* whose session holds the reservations */
};

/* What the device said about a heap (HEAP_INFO), in CPU byte order. */
struct vdh_heap_props {
	u32 id;
	u32 flags;		/* VIRTIO_DMAHEAP_HEAP_F_* */
	u32 cache;		/* VIRTIO_DMAHEAP_CACHE_* */
	u64 min_align;
	u64 max_size;		/* never above the window size */
	u64 capacity;
	struct vdh_span *span;	/* the heap range; the window's, so never freed before it */
};

/* One guest dma-heap; never freed (a dma-heap cannot be removed). */
struct vdh_heap {
	struct list_head node;		/* in vdh_heaps */
	struct dma_heap *heap;
	char *name;			/* guest name: heap_prefix + device name */
	spinlock_t lock;		/* protects vd, props */
	struct vdh_dev *vd;		/* NULL while no device exports the heap */
	struct vdh_heap_props props;
	atomic64_t bytes_used;
	atomic_t buffers_used;
	atomic64_t bytes_pooled;	/* freed buffers kept for reuse */
	atomic_t buffers_pooled;
};

/*
 * A buffer: a range of the window the device allocated, exported as a
 * dma-buf; or, between a release and its reuse, a freed buffer in the pool.
 */
struct vdh_buffer {
	struct vdh_heap *vh;
	struct vdh_dev *vd;
	struct dma_buf *dmabuf;
	struct list_head node;		/* in vd->buffers, or in vd->pool */
	struct mutex lock;		/* protects attachments, vmap, dma_mapped, revoked, mmaps */
	struct list_head attachments;
	struct vdh_req *free_req;	/* the FREE, allocated with the buffer */
	u64 id;
	u64 session;			/* the session the device allocated it in */
	u64 offset;			/* in the window */
	u32 cache;			/* VIRTIO_DMAHEAP_CACHE_* */
	const struct vdh_span *span;	/* the heap range it lies in */
	bool host_sync;			/* SYNC does something on the host */
	unsigned long pfn;
	size_t len;
	pgoff_t pagecount;
	int vmap_cnt;
	int dma_mapped;			/* attachments with a DMA mapping */
	bool revoked;
	bool unsettled;			/* revoked, but a user mapping may be left */
	struct list_head mmaps;		/* of vdh_mmap_mm: mms that mapped it */
	struct list_head qnode;		/* in the window's quarantine */
	bool quarantined;		/* protected by the window's lock */
	bool reserved;			/* idem: the window owner's session reserved it */
	unsigned long pooled_at;	/* jiffies: when it went into vd->pool */
	bool pool_clean;		/* zeroed while pooled; under vd->pool_lock */
	bool pool_reused;		/* handed out of the pool before: its size is in demand */
	struct mutex uuid_lock;		/* one ASSIGN_UUID at a time; protects the next four */
	uuid_t uuid;			/* valid if uuid_set */
	bool uuid_set;
	int uuid_err;			/* a cached failure (-EOPNOTSUPP only) */
	bool uuid_asked;		/* an ASSIGN_UUID went out: never pool the buffer */
};

/* The buffer in its range's kernel mapping. */
static inline void *vdh_buf_kaddr(const struct vdh_buffer *buf)
{
	return buf->span->vaddr + (buf->offset - buf->span->offset);
}

/* Which requests may go to the device. */
enum vdh_state {
	VDH_RUNNING,	/* any request */
	VDH_OPENING,	/* starting a session: SESSION_OPEN, RESERVE, HEAP_INFO */
	VDH_CLOSING,	/* only SESSION_CLOSE; FREEs wait */
	VDH_FROZEN,	/* no queue (suspended): FREEs wait for the resumed session */
	VDH_REMOVED,	/* no queue, for good: FREEs are dropped */
};

/* One bound virtio device; outlives the binding while buffers use it. */
struct vdh_dev {
	struct kref ref;
	struct virtio_device *vdev;	/* only while bound */
	struct virtqueue *vq;		/* only in VDH_RUNNING and VDH_CLOSING */
	spinlock_t vq_lock;		/* protects vq, state, stalled, pending, request flags */
	enum vdh_state state;
	bool stalled;			/* a request timed out; no answer since */
	wait_queue_head_t space_wq;	/* woken when descriptors come back */
	struct list_head pending;	/* requests sent without waiting, not yet queued */
	bool has_sync;
	bool has_session;
	bool has_no_sync;		/* heaps may say SYNC does nothing on the host */
	bool has_batch;			/* ALLOC_BATCH */
	bool has_page_size;		/* SESSION_OPEN states PAGE_SIZE */
	bool has_heap_range;		/* HEAP_INFO states each heap's range */
	bool has_uuid;			/* ASSIGN_UUID: buffers are virtio_dma_bufs */
	u64 session;			/* open (or suspended) session, 0: none */
	bool suspended;			/* SESSION_CLOSE suspended the session at freeze */
	struct mutex life_lock;		/* serialises remove, freeze, restore, recovery */
	struct rw_semaphore alloc_sem;	/* read: an allocation; write: its session changes */
	struct work_struct recover_work; /* the device ended the session: start a new one */
	struct vdh_window *win;
	u32 num_heaps;
	struct vdh_heap **heaps;	/* NULL slot: heap not registered */
	struct kobject *heaps_kobj;
	struct vdh_heap_kobj **kobjs;
	struct mutex buffers_lock;	/* protects buffers, revoked */
	struct list_head buffers;
	bool revoked;
	spinlock_t pool_lock;		/* protects pool, pool_count, pool_bytes, pool_zeroing */
	struct list_head pool;		/* of vdh_buffer.node, newest first */
	unsigned int pool_count;
	u64 pool_bytes;
	struct delayed_work pool_work;	/* frees what stayed unused too long */
	struct work_struct pool_zero_work; /* zeroes large pooled buffers ahead */
	struct vdh_buffer *pool_zeroing; /* the one it zeroes, off the pool list */
};

/* vdh_queue.c */
int vdh_queue_start(struct vdh_dev *vd, enum vdh_state state);
void vdh_queue_stop(struct vdh_dev *vd, enum vdh_state state);
void vdh_set_state(struct vdh_dev *vd, enum vdh_state state);
void vdh_drop_pending(struct vdh_dev *vd);
struct vdh_req *vdh_free_req_alloc(void);
void vdh_free_req_discard(struct vdh_req *r);
void vdh_remote_free(struct vdh_dev *vd, struct vdh_req *r, u64 id);
int vdh_remote_heap_info(struct vdh_dev *vd, u32 heap_id,
			 struct virtio_dmaheap_heap_info *info,
			 struct virtio_dmaheap_heap_range *range);
int vdh_remote_alloc(struct vdh_dev *vd, u32 heap_id, size_t len,
		     struct virtio_dmaheap_alloc_resp *resp);
int vdh_remote_alloc_batch(struct vdh_dev *vd, u32 heap_id, size_t len,
			   unsigned int count, struct vdh_req **frees,
			   struct virtio_dmaheap_buffer *out);
int vdh_remote_sync(struct vdh_dev *vd, u64 id, u32 flags);
int vdh_remote_assign_uuid(struct vdh_dev *vd, u64 id, u8 *uuid);
int vdh_remote_session_open(struct vdh_dev *vd, u64 resume_id, u64 *id);
int vdh_remote_session_close(struct vdh_dev *vd, u32 flags);
int vdh_remote_reserve(struct vdh_dev *vd, u64 offset, u64 len);
void vdh_remote_unreserve(struct vdh_dev *vd, u64 offset, u64 len);

/* vdh_window.c */
struct vdh_window *vdh_window_get(struct virtio_device *vdev);
void vdh_window_put(struct vdh_window *win);
struct vdh_span *vdh_window_span(struct vdh_window *win, u64 offset, u64 len,
				 u32 cache, int nid);

/* vdh_virtio.c */
void vdh_dev_put(struct vdh_dev *vd);
void vdh_session_lost(struct vdh_dev *vd);

/* vdh_heap.c */
const char *vdh_cache_name(u32 cache);
int vdh_heaps_probe(struct vdh_dev *vd);
void vdh_heaps_remove(struct vdh_dev *vd);
struct vdh_dev *vdh_heap_get_dev(struct vdh_heap *vh,
				 struct vdh_heap_props *props);

/* vdh_buffer.c */
extern const struct dma_heap_ops vdh_heap_ops;
void vdh_buf_destroy(struct vdh_buffer *buf);
void vdh_buffers_revoke(struct vdh_dev *vd);
int vdh_window_reserve(struct vdh_window *win, struct vdh_dev *vd);
void vdh_window_disown(struct vdh_window *win, struct vdh_dev *vd);

/* vdh_mmap.c */
int vdh_buf_mmap(struct dma_buf *dmabuf, struct vm_area_struct *vma);
bool vdh_mmaps_settle(struct list_head *mmaps);
void vdh_mmaps_drop(struct list_head *mmaps);

/* vdh_uuid.c */
#if VDH_UUID
int vdh_buf_get_uuid(struct dma_buf *dmabuf, uuid_t *uuid);
#endif

/* vdh_pool.c */
void vdh_pool_init(struct vdh_dev *vd);
bool vdh_pool_put(struct vdh_buffer *buf, bool zeroed);
unsigned int vdh_pool_batch(struct vdh_dev *vd, const struct vdh_heap_props *props,
			    size_t len);
struct vdh_buffer *vdh_pool_get(struct vdh_dev *vd, struct vdh_heap *vh,
				size_t len);
bool vdh_pool_flush(struct vdh_dev *vd);
void vdh_pool_drop(struct vdh_dev *vd);
void vdh_pool_stop(struct vdh_dev *vd);

#endif /* VDH_H */
