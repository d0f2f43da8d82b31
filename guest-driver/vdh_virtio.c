// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-dmaheap: the host's DMA-BUF heaps as guest dma-heaps.
 *
 * The device allocates buffers on the host and maps them into a shared memory
 * region (the buffer window, a PCI BAR). The driver gives the window struct
 * pages (ZONE_DEVICE, MEMORY_DEVICE_GENERIC), registers one dma-heap per host
 * heap and exports every allocation as a dma-buf backed by window pages.
 *
 * Lifetimes:
 *  - a dma-heap can never be removed, so each vdh_heap lives forever; after
 *    the device goes away it answers -ENODEV and a later device exporting a
 *    heap of the same name takes it over;
 *  - a vdh_dev lives as long as the virtio device is bound or one of its
 *    buffers is alive; it holds the vdh_window;
 *  - the window's struct pages stay until the last buffer using them is
 *    released, so kernel users of a buffer never see freed struct pages.
 *    When the device is removed the host memory is gone: user mappings of
 *    live buffers are zapped (a later access gets SIGBUS) and new mappings
 *    are refused.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cache.h>
#include <linux/completion.h>
#include <linux/err.h>
#include <linux/ioport.h>
#include <linux/jiffies.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/virtio_config.h>

#include "vdh.h"

static unsigned int timeout_ms = 30000;
module_param(timeout_ms, uint, 0644);
MODULE_PARM_DESC(timeout_ms,
		 "Give up on a device request after this many ms (0: only when the device breaks)");

static DEFINE_MUTEX(vdh_windows_lock);
static LIST_HEAD(vdh_windows);

union vdh_req_buf {
	struct virtio_dmaheap_req_hdr hdr;
	struct virtio_dmaheap_heap_info_req info;
	struct virtio_dmaheap_alloc_req alloc;
	struct virtio_dmaheap_free_req free;
	struct virtio_dmaheap_sync_req sync;
};

union vdh_resp_buf {
	struct virtio_dmaheap_resp_hdr hdr;
	struct virtio_dmaheap_heap_info_resp info;
	struct virtio_dmaheap_alloc_resp alloc;
};

/*
 * A request in flight. The queue owns it between vdh_queue() and the callback
 * (or the detach on remove). A waiter that gives up marks it abandoned; a
 * request sent without waiting is nowait. Both are freed by whoever takes
 * them off the queue.
 */
struct vdh_req {
	struct completion done;
	unsigned int resp_len;		/* bytes the device wrote */
	int err;			/* -ENODEV: detached on remove */
	bool nowait;
	bool abandoned;
	union vdh_req_buf req;
	union vdh_resp_buf resp __aligned(ARCH_DMA_MINALIGN);
};

/* ---- requests ---------------------------------------------------------- */

static int vdh_status_to_errno(u32 status)
{
	switch (status) {
	case VIRTIO_DMAHEAP_S_OK:
		return 0;
	case VIRTIO_DMAHEAP_S_INVAL:
	case VIRTIO_DMAHEAP_S_TOO_BIG:
		return -EINVAL;
	case VIRTIO_DMAHEAP_S_NO_HEAP:
		return -ENODEV;
	case VIRTIO_DMAHEAP_S_NO_BUFFER:
		return -ENOENT;
	case VIRTIO_DMAHEAP_S_NOMEM:
	case VIRTIO_DMAHEAP_S_QUOTA:
	case VIRTIO_DMAHEAP_S_WINDOW_FULL:
		return -ENOMEM;
	case VIRTIO_DMAHEAP_S_UNSUPP:
		return -EOPNOTSUPP;
	case VIRTIO_DMAHEAP_S_IOERR:
	default:
		return -EIO;
	}
}

static const char *vdh_req_name(const struct vdh_req *r)
{
	switch (le32_to_cpu(r->req.hdr.type)) {
	case VIRTIO_DMAHEAP_REQ_HEAP_INFO:
		return "HEAP_INFO";
	case VIRTIO_DMAHEAP_REQ_ALLOC:
		return "ALLOC";
	case VIRTIO_DMAHEAP_REQ_FREE:
		return "FREE";
	case VIRTIO_DMAHEAP_REQ_SYNC:
		return "SYNC";
	default:
		return "unknown";
	}
}

static struct vdh_req *vdh_req_alloc(u32 type)
{
	struct vdh_req *r;

	r = kzalloc(sizeof(*r), GFP_KERNEL);
	if (!r)
		return NULL;
	init_completion(&r->done);
	r->req.hdr.type = cpu_to_le32(type);
	return r;
}

/* Called with vq_lock held. */
static int vdh_add(struct vdh_dev *vd, struct vdh_req *r, size_t req_len,
		   size_t resp_len)
{
	struct scatterlist out, in, *sgs[] = { &out, &in };

	sg_init_one(&out, &r->req, req_len);
	sg_init_one(&in, &r->resp, resp_len);
	return virtqueue_add_sgs(vd->vq, sgs, 1, 1, r, GFP_ATOMIC);
}

/*
 * An abandoned ALLOC that succeeded after all would leak a host buffer:
 * turn the request into a FREE. Called from the callback with vq_lock held,
 * right after the request's descriptors were returned.
 */
static bool vdh_req_free_leak(struct vdh_dev *vd, struct vdh_req *r,
			      unsigned int len)
{
	u64 id = le64_to_cpu(r->resp.alloc.buffer_id);

	if (le32_to_cpu(r->req.hdr.type) != VIRTIO_DMAHEAP_REQ_ALLOC ||
	    len < sizeof(r->resp.alloc) ||
	    r->resp.hdr.status != cpu_to_le32(VIRTIO_DMAHEAP_S_OK))
		return false;

	memset(&r->req, 0, sizeof(r->req));
	r->req.free.hdr.type = cpu_to_le32(VIRTIO_DMAHEAP_REQ_FREE);
	r->req.free.buffer_id = cpu_to_le64(id);
	r->nowait = true;
	if (vdh_add(vd, r, sizeof(r->req.free), sizeof(r->resp.hdr))) {
		pr_warn_ratelimited("leaking host buffer %llu\n", id);
		return false;
	}
	virtqueue_kick(vd->vq);
	return true;
}

static void vdh_req_done(struct vdh_dev *vd, struct vdh_req *r,
			 unsigned int len)
{
	if (r->abandoned && vdh_req_free_leak(vd, r, len))
		return;
	if (r->nowait || r->abandoned) {
		kfree(r);
		return;
	}
	r->resp_len = len;
	complete(&r->done);
}

static void vdh_vq_done(struct virtqueue *vq)
{
	struct vdh_dev *vd = vq->vdev->priv;
	struct vdh_req *r;
	unsigned long flags;
	unsigned int len;

	spin_lock_irqsave(&vd->vq_lock, flags);
	do {
		virtqueue_disable_cb(vq);
		while ((r = virtqueue_get_buf(vq, &len))) {
			vd->stalled = false;
			vdh_req_done(vd, r, len);
		}
		if (unlikely(virtqueue_is_broken(vq)))
			break;
	} while (!virtqueue_enable_cb(vq));
	spin_unlock_irqrestore(&vd->vq_lock, flags);
	wake_up_all(&vd->space_wq);
}

static bool vdh_may_add(struct vdh_dev *vd)
{
	bool ret;

	spin_lock_irq(&vd->vq_lock);
	ret = vd->removed || vd->vq->num_free || virtqueue_is_broken(vd->vq);
	spin_unlock_irq(&vd->vq_lock);
	return ret;
}

/*
 * Put a request on the queue, waiting for free descriptors when the queue is
 * full. On success the queue owns @r.
 */
static int vdh_queue(struct vdh_dev *vd, struct vdh_req *r, size_t req_len,
		     size_t resp_len)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(timeout_ms);
	unsigned long flags;
	bool notify;
	int ret;

	for (;;) {
		spin_lock_irqsave(&vd->vq_lock, flags);
		if (vd->removed) {
			spin_unlock_irqrestore(&vd->vq_lock, flags);
			return -ENODEV;
		}
		/*
		 * Once a request timed out, fail waiters at once instead of
		 * letting each wait timeout_ms for a dead back-end. FREE still
		 * goes out while there is room: it costs nothing to wait for.
		 */
		ret = vd->stalled && !r->nowait ? -EIO :
		      vdh_add(vd, r, req_len, resp_len);
		if (ret == -ENOSPC && vd->stalled)
			ret = -EIO;
		if (ret != -ENOSPC)
			break;
		if (timeout_ms && time_after(jiffies, deadline)) {
			vd->stalled = true;
			spin_unlock_irqrestore(&vd->vq_lock, flags);
			pr_warn_ratelimited("%s request: queue full, timed out\n",
					    vdh_req_name(r));
			return -ETIMEDOUT;
		}
		spin_unlock_irqrestore(&vd->vq_lock, flags);
		wait_event_timeout(vd->space_wq, vdh_may_add(vd), HZ);
	}
	notify = !ret && virtqueue_kick_prepare(vd->vq);
	spin_unlock_irqrestore(&vd->vq_lock, flags);
	if (notify)
		virtqueue_notify(vd->vq);
	if (ret == -EIO)
		pr_warn_ratelimited("%s request: device not answering\n",
				    vdh_req_name(r));
	return ret;
}

/*
 * Wait for the device to answer. Returns 0 once @r is completed (by the
 * device, or with r->err = -ENODEV by remove). Returns -EIO (broken queue) or
 * -ETIMEDOUT after marking @r abandoned: the queue then frees it.
 */
static int vdh_wait(struct vdh_dev *vd, struct vdh_req *r)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(timeout_ms);
	unsigned long flags;
	int ret = 0;

	while (!wait_for_completion_timeout(&r->done, HZ)) {
		spin_lock_irqsave(&vd->vq_lock, flags);
		if (completion_done(&r->done) || vd->removed) {
			/* remove() completes every waiter */
			spin_unlock_irqrestore(&vd->vq_lock, flags);
			continue;
		}
		if (virtqueue_is_broken(vd->vq))
			ret = -EIO;
		else if (timeout_ms && time_after(jiffies, deadline))
			ret = -ETIMEDOUT;
		if (ret) {
			r->abandoned = true;
			vd->stalled = true;
		}
		spin_unlock_irqrestore(&vd->vq_lock, flags);
		if (ret) {
			pr_warn_ratelimited("%s request: %s\n", vdh_req_name(r),
					    ret == -EIO ? "device broken" : "timed out");
			return ret;
		}
	}
	return 0;
}

/*
 * Send @r and wait for a complete, successful response of @resp_len bytes.
 * Returns 0 and leaves @r to the caller, or an errno after @r was freed or
 * handed to the queue.
 */
static int vdh_exec(struct vdh_dev *vd, struct vdh_req *r, size_t req_len,
		    size_t resp_len)
{
	int ret;

	ret = vdh_queue(vd, r, req_len, resp_len);
	if (ret)
		goto free_req;
	ret = vdh_wait(vd, r);
	if (ret)
		return ret;
	ret = r->err;
	if (ret)
		goto free_req;
	if (r->resp_len < sizeof(r->resp.hdr)) {
		ret = -EIO;
		goto free_req;
	}
	ret = vdh_status_to_errno(le32_to_cpu(r->resp.hdr.status));
	if (!ret && r->resp_len < resp_len)
		ret = -EIO;
	if (ret)
		goto free_req;
	return 0;

free_req:
	kfree(r);
	return ret;
}

/* Send a request without waiting for the answer; the callback frees it. */
static void vdh_send_nowait(struct vdh_dev *vd, struct vdh_req *r,
			    size_t req_len)
{
	r->nowait = true;
	if (vdh_queue(vd, r, req_len, sizeof(r->resp.hdr)))
		kfree(r);
}

void vdh_remote_free(struct vdh_dev *vd, u64 id)
{
	struct vdh_req *r;

	r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_FREE);
	if (!r) {
		pr_warn_ratelimited("leaking host buffer %llu\n", id);
		return;
	}
	r->req.free.buffer_id = cpu_to_le64(id);
	vdh_send_nowait(vd, r, sizeof(r->req.free));
}

int vdh_remote_alloc(struct vdh_dev *vd, u32 heap_id, size_t len,
		     struct virtio_dmaheap_alloc_resp *resp)
{
	struct vdh_req *r;
	int ret;

	r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_ALLOC);
	if (!r)
		return -ENOMEM;
	r->req.alloc.heap_id = cpu_to_le32(heap_id);
	r->req.alloc.len = cpu_to_le64(len);
	ret = vdh_exec(vd, r, sizeof(r->req.alloc), sizeof(r->resp.alloc));
	if (ret)
		return ret;
	*resp = r->resp.alloc;
	kfree(r);
	return 0;
}

int vdh_remote_sync(struct vdh_dev *vd, u64 id, u32 flags)
{
	struct vdh_req *r;
	int ret;

	r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_SYNC);
	if (!r)
		return -ENOMEM;
	r->req.sync.buffer_id = cpu_to_le64(id);
	r->req.sync.flags = cpu_to_le32(flags);
	ret = vdh_exec(vd, r, sizeof(r->req.sync), sizeof(r->resp.hdr));
	if (ret)
		return ret;
	kfree(r);
	return 0;
}

int vdh_remote_heap_info(struct vdh_dev *vd, u32 heap_id,
			 struct virtio_dmaheap_heap_info *info)
{
	struct vdh_req *r;
	int ret;

	r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_HEAP_INFO);
	if (!r)
		return -ENOMEM;
	r->req.info.heap_id = cpu_to_le32(heap_id);
	ret = vdh_exec(vd, r, sizeof(r->req.info), sizeof(r->resp.info));
	if (ret)
		return ret;
	*info = r->resp.info.info;
	kfree(r);
	return 0;
}

/* ---- buffer window and device lifetime --------------------------------- */

static void vdh_window_release(struct kref *ref)
{
	struct vdh_window *win = container_of(ref, struct vdh_window, ref);

	list_del(&win->node);
	mutex_unlock(&vdh_windows_lock);
	memunmap_pages(&win->pgmap);
	release_mem_region(win->base, win->size);
	kfree(win);
}

static void vdh_window_put(struct vdh_window *win)
{
	kref_put_mutex(&win->ref, vdh_window_release, &vdh_windows_lock);
}

static struct vdh_window *vdh_window_create(struct virtio_device *vdev,
					    const struct virtio_shm_region *reg)
{
	struct vdh_window *win;
	void *addr;
	int ret;

	win = kzalloc(sizeof(*win), GFP_KERNEL);
	if (!win)
		return ERR_PTR(-ENOMEM);
	kref_init(&win->ref);
	win->base = reg->addr;
	win->size = reg->len;
	win->res = request_mem_region(win->base, win->size, KBUILD_MODNAME);
	if (!win->res) {
		ret = -EBUSY;
		goto free_win;
	}
	win->pgmap.type = MEMORY_DEVICE_GENERIC;
	win->pgmap.range.start = win->base;
	win->pgmap.range.end = win->base + win->size - 1;
	win->pgmap.nr_range = 1;
	addr = memremap_pages(&win->pgmap, dev_to_node(&vdev->dev));
	if (IS_ERR(addr)) {
		ret = PTR_ERR(addr);
		goto release_region;
	}
	list_add(&win->node, &vdh_windows);
	return win;

release_region:
	release_mem_region(win->base, win->size);
free_win:
	kfree(win);
	return ERR_PTR(ret);
}

/*
 * Get the struct pages of the device's buffer window. A window of an earlier
 * binding of the same region is reused while its buffers are alive.
 */
static struct vdh_window *vdh_window_get(struct virtio_device *vdev)
{
	struct virtio_shm_region reg;
	unsigned long align = memremap_compat_align();
	struct vdh_window *win;

	if (!virtio_get_shm_region(vdev, &reg, VIRTIO_DMAHEAP_SHM_BUFFERS)) {
		dev_err(&vdev->dev, "no buffer window (shared memory region %d)\n",
			VIRTIO_DMAHEAP_SHM_BUFFERS);
		return ERR_PTR(-ENODEV);
	}
	if (!reg.len || !IS_ALIGNED(reg.addr, align) || !IS_ALIGNED(reg.len, align)) {
		dev_err(&vdev->dev, "buffer window %#llx+%#llx not %#lx-aligned\n",
			reg.addr, reg.len, align);
		return ERR_PTR(-EINVAL);
	}

	mutex_lock(&vdh_windows_lock);
	list_for_each_entry(win, &vdh_windows, node) {
		if (win->base == reg.addr && win->size == reg.len) {
			kref_get(&win->ref);
			goto unlock;
		}
	}
	win = vdh_window_create(vdev, &reg);
	if (IS_ERR(win))
		dev_err(&vdev->dev, "cannot map buffer window %#llx+%#llx: %pe\n",
			reg.addr, reg.len, win);
unlock:
	mutex_unlock(&vdh_windows_lock);
	return win;
}

static void vdh_dev_release(struct kref *ref)
{
	struct vdh_dev *vd = container_of(ref, struct vdh_dev, ref);

	if (vd->win)
		vdh_window_put(vd->win);
	kfree(vd->kobjs);
	kfree(vd->heaps);
	kfree(vd);
}

void vdh_dev_put(struct vdh_dev *vd)
{
	kref_put(&vd->ref, vdh_dev_release);
}

/* ---- virtio driver ------------------------------------------------------ */

static int vdh_read_config(struct virtio_device *vdev, u32 *num_heaps)
{
	u32 magic, version;

	virtio_cread_le(vdev, struct virtio_dmaheap_config, magic, &magic);
	virtio_cread_le(vdev, struct virtio_dmaheap_config, version, &version);
	if (magic != VIRTIO_DMAHEAP_MAGIC) {
		dev_err(&vdev->dev, "not a dma-heap device (magic %#x)\n", magic);
		return -ENODEV;
	}
	if (version != VIRTIO_DMAHEAP_VERSION) {
		dev_err(&vdev->dev, "unsupported device version %u\n", version);
		return -ENODEV;
	}
	virtio_cread_le(vdev, struct virtio_dmaheap_config, num_heaps, num_heaps);
	if (*num_heaps > VDH_MAX_HEAPS) {
		dev_warn(&vdev->dev, "using %u of %u heaps\n", VDH_MAX_HEAPS,
			 *num_heaps);
		*num_heaps = VDH_MAX_HEAPS;
	}
	return 0;
}

static struct vdh_dev *vdh_dev_alloc(struct virtio_device *vdev, u32 num_heaps)
{
	struct vdh_dev *vd;

	vd = kzalloc(sizeof(*vd), GFP_KERNEL);
	if (!vd)
		return NULL;
	vd->heaps = kcalloc(num_heaps, sizeof(*vd->heaps), GFP_KERNEL);
	vd->kobjs = kcalloc(num_heaps, sizeof(*vd->kobjs), GFP_KERNEL);
	if (!vd->heaps || !vd->kobjs) {
		kfree(vd->kobjs);
		kfree(vd->heaps);
		kfree(vd);
		return NULL;
	}
	kref_init(&vd->ref);
	vd->vdev = vdev;
	vd->num_heaps = num_heaps;
	spin_lock_init(&vd->vq_lock);
	init_waitqueue_head(&vd->space_wq);
	mutex_init(&vd->buffers_lock);
	INIT_LIST_HEAD(&vd->buffers);
	vd->has_sync = virtio_has_feature(vdev, VIRTIO_DMAHEAP_F_SYNC);
	return vd;
}

/* Reset the device, then fail what it did not answer. */
static void vdh_dev_stop(struct vdh_dev *vd)
{
	struct vdh_req *r;

	spin_lock_irq(&vd->vq_lock);
	vd->removed = true;
	spin_unlock_irq(&vd->vq_lock);

	virtio_reset_device(vd->vdev);

	spin_lock_irq(&vd->vq_lock);
	while ((r = virtqueue_detach_unused_buf(vd->vq))) {
		if (r->nowait || r->abandoned) {
			kfree(r);
			continue;
		}
		r->err = -ENODEV;
		complete(&r->done);
	}
	spin_unlock_irq(&vd->vq_lock);
	wake_up_all(&vd->space_wq);
	vd->vdev->config->del_vqs(vd->vdev);
}

static int vdh_probe(struct virtio_device *vdev)
{
	struct vdh_window *win;
	struct vdh_dev *vd;
	u32 num_heaps;
	int ret;

	ret = vdh_read_config(vdev, &num_heaps);
	if (ret)
		return ret;
	vd = vdh_dev_alloc(vdev, num_heaps);
	if (!vd)
		return -ENOMEM;
	vdev->priv = vd;
	win = vdh_window_get(vdev);
	if (IS_ERR(win)) {
		ret = PTR_ERR(win);
		goto put_dev;
	}
	vd->win = win;

	vd->vq = virtio_find_single_vq(vdev, vdh_vq_done, "requestq");
	if (IS_ERR(vd->vq)) {
		ret = PTR_ERR(vd->vq);
		goto put_dev;
	}
	virtio_device_ready(vdev);

	ret = vdh_heaps_probe(vd);
	if (ret)
		goto stop_dev;
	dev_info(&vdev->dev, "%u heap(s), buffer window %#llx+%#llx, queue %u%s\n",
		 num_heaps, (u64)win->base, win->size,
		 virtqueue_get_vring_size(vd->vq), vd->has_sync ? ", sync" : "");
	return 0;

stop_dev:
	vdh_dev_stop(vd);
put_dev:
	vdh_dev_put(vd);	/* and the window */
	return ret;
}

static void vdh_remove(struct virtio_device *vdev)
{
	struct vdh_dev *vd = vdev->priv;

	vdh_heaps_remove(vd);
	vdh_dev_stop(vd);
	vdh_buffers_revoke(vd);
	vdh_dev_put(vd);
}

static const struct virtio_device_id vdh_id_table[] = {
	{ VIRTIO_ID_DMAHEAP, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

static const unsigned int vdh_features[] = {
	VIRTIO_DMAHEAP_F_SYNC,
};

static struct virtio_driver vdh_driver = {
	.driver.name = KBUILD_MODNAME,
	.id_table = vdh_id_table,
	.feature_table = vdh_features,
	.feature_table_size = ARRAY_SIZE(vdh_features),
	.probe = vdh_probe,
	.remove = vdh_remove,
};

/*
 * No module_exit: a dma-heap cannot be unregistered, so the module must stay
 * loaded once it has registered one.
 */
static int __init vdh_init(void)
{
	return register_virtio_driver(&vdh_driver);
}
module_init(vdh_init);

MODULE_DEVICE_TABLE(virtio, vdh_id_table);
MODULE_DESCRIPTION("VIRTIO dma-heap: the host's DMA-BUF heaps in the guest");
MODULE_LICENSE("GPL");
MODULE_IMPORT_NS("DMA_BUF");
MODULE_IMPORT_NS("DMA_BUF_HEAP");
