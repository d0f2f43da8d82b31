/* SPDX-License-Identifier: GPL-2.0 */
/*
 * virtio-dmaheap guest driver: shared definitions of its three parts,
 * vdh_virtio.c (device, requests, buffer window), vdh_heap.c (dma-heaps and
 * their sysfs directories) and vdh_buffer.c (allocation and dma-buf ops).
 */
#ifndef VDH_H
#define VDH_H

#include <linux/kobject.h>
#include <linux/kref.h>
#include <linux/list.h>
#include <linux/memremap.h>
#include <linux/mutex.h>
#include <linux/spinlock.h>
#include <linux/types.h>
#include <linux/virtio.h>
#include <linux/wait.h>

#include "virtio_dmaheap.h"

struct dma_heap_ops;
struct vdh_heap_kobj;

/* More heaps than dma-heap minors make no sense. */
#define VDH_MAX_HEAPS		64

/* The buffer window: struct pages over the shared memory region. */
struct vdh_window {
	struct kref ref;
	struct list_head node;		/* in vdh_windows */
	struct resource *res;
	phys_addr_t base;
	u64 size;
	struct dev_pagemap pgmap;
};

/* What the device said about a heap (HEAP_INFO), in CPU byte order. */
struct vdh_heap_props {
	u32 id;
	u32 flags;		/* VIRTIO_DMAHEAP_HEAP_F_* */
	u32 cache;		/* VIRTIO_DMAHEAP_CACHE_* */
	u64 min_align;
	u64 max_size;		/* never above the window size */
	u64 capacity;
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
};

/* One bound virtio device; outlives the binding while buffers use it. */
struct vdh_dev {
	struct kref ref;
	struct virtio_device *vdev;	/* only while !removed */
	struct virtqueue *vq;		/* only while !removed */
	spinlock_t vq_lock;		/* protects vq, removed, stalled, request flags */
	bool removed;
	bool stalled;			/* a request timed out; no answer since */
	wait_queue_head_t space_wq;	/* woken when descriptors come back */
	bool has_sync;
	struct vdh_window *win;
	u32 num_heaps;
	struct vdh_heap **heaps;	/* NULL slot: heap not registered */
	struct kobject *heaps_kobj;
	struct vdh_heap_kobj **kobjs;
	struct mutex buffers_lock;	/* protects buffers, revoked */
	struct list_head buffers;
	bool revoked;
};

/* vdh_virtio.c */
void vdh_dev_put(struct vdh_dev *vd);
int vdh_remote_heap_info(struct vdh_dev *vd, u32 heap_id,
			 struct virtio_dmaheap_heap_info *info);
int vdh_remote_alloc(struct vdh_dev *vd, u32 heap_id, size_t len,
		     struct virtio_dmaheap_alloc_resp *resp);
void vdh_remote_free(struct vdh_dev *vd, u64 id);
int vdh_remote_sync(struct vdh_dev *vd, u64 id, u32 flags);

/* vdh_heap.c */
int vdh_heaps_probe(struct vdh_dev *vd);
void vdh_heaps_remove(struct vdh_dev *vd);
struct vdh_dev *vdh_heap_get_dev(struct vdh_heap *vh,
				 struct vdh_heap_props *props);

/* vdh_buffer.c */
extern const struct dma_heap_ops vdh_heap_ops;
void vdh_buffers_revoke(struct vdh_dev *vd);

#endif /* VDH_H */
