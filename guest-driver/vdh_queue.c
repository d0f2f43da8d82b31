// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-dmaheap: requests to the device.
 *
 * A request waits for its answer (vdh_exec) or is sent without waiting
 * (FREE, UNRESERVE). The latter never block and never fail: they go to the
 * pending list, which the queue drains whenever it has room (also from the
 * interrupt that returns descriptors), ahead of any new waiting request, so
 * the device sees them in order. A FREE is allocated together with its
 * buffer, so releasing a buffer needs no memory.
 *
 * Every wait is bounded (timeout_ms) and killable. A waiter that gives up
 * marks its request abandoned; whoever takes it off the queue frees it (an
 * abandoned ALLOC that succeeded becomes a FREE). After a request timed out,
 * waiting requests fail at once with -EIO until the device answers again.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cache.h>
#include <linux/completion.h>
#include <linux/jiffies.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/sched/signal.h>
#include <linux/slab.h>
#include <linux/timekeeping.h>
#include <linux/virtio_config.h>

#include "vdh.h"

static unsigned int timeout_ms = 30000;
module_param(timeout_ms, uint, 0644);
MODULE_PARM_DESC(timeout_ms,
		 "Give up on a device request after this many ms (0: only when the device breaks)");

#define VDH_SPIN_MAX_US 10000

static unsigned int spin_us = 50;
module_param(spin_us, uint, 0644);
MODULE_PARM_DESC(spin_us,
		 "Spin up to this many us (at most 10000) for a device answer before sleeping (0: never)");

union vdh_req_buf {
	struct virtio_dmaheap_req_hdr hdr;
	struct virtio_dmaheap_heap_info_req info;
	struct virtio_dmaheap_alloc_req alloc;
	struct virtio_dmaheap_free_req free;
	struct virtio_dmaheap_sync_req sync;
	struct virtio_dmaheap_assign_uuid_req assign_uuid;
	struct virtio_dmaheap_session_open_req open;
	struct virtio_dmaheap_session_open_page_req open_page;
	struct virtio_dmaheap_session_close_req close;
	struct virtio_dmaheap_reserve_req reserve;
	struct virtio_dmaheap_alloc_batch_req alloc_batch;
};

union vdh_resp_buf {
	struct virtio_dmaheap_resp_hdr hdr;
	struct virtio_dmaheap_heap_info_resp info;
	struct virtio_dmaheap_heap_info_range_resp info_range;
	struct virtio_dmaheap_alloc_resp alloc;
	struct virtio_dmaheap_assign_uuid_resp assign_uuid;
	struct virtio_dmaheap_session_open_resp open;
};

/*
 * What an ALLOC_BATCH needs beyond a request: its answer (too big for every
 * request to carry) and one FREE per buffer asked for, so that the buffers of
 * a batch whose waiter gave up are freed without allocating in the callback.
 */
struct vdh_batch {
	struct vdh_req *frees[VIRTIO_DMAHEAP_BATCH_MAX];
	unsigned int count;		/* asked for; frees[0..count) are ours */
	struct virtio_dmaheap_alloc_batch_resp resp __aligned(ARCH_DMA_MINALIGN);
};

/*
 * A request. The queue owns it between vdh_add() and the callback (or the
 * detach when the device stops); the pending list owns a request sent
 * without waiting until it is queued.
 */
struct vdh_req {
	struct list_head node;		/* in vd->pending */
	struct completion done;
	unsigned int resp_len;		/* bytes the device wrote */
	int err;			/* set when the device stopped */
	bool nowait;
	bool abandoned;
	bool device_polling;		/* no kick needed when queued */
	size_t req_size;
	size_t resp_size;
	struct vdh_batch *batch;	/* ALLOC_BATCH only */
	union vdh_req_buf req;
	union vdh_resp_buf resp __aligned(ARCH_DMA_MINALIGN);
};

static int vdh_status_to_errno(u32 status)
{
	switch (status) {
	case VIRTIO_DMAHEAP_S_OK:
		return 0;
	case VIRTIO_DMAHEAP_S_INVAL:
	case VIRTIO_DMAHEAP_S_TOO_BIG:
		return -EINVAL;
	case VIRTIO_DMAHEAP_S_NO_HEAP:
	case VIRTIO_DMAHEAP_S_NO_SESSION:
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

/* What a request gets when the device does not take requests now. */
static int vdh_state_errno(enum vdh_state state)
{
	return state == VDH_REMOVED ? -ENODEV : -EAGAIN;
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
	case VIRTIO_DMAHEAP_REQ_ASSIGN_UUID:
		return "ASSIGN_UUID";
	case VIRTIO_DMAHEAP_REQ_SESSION_OPEN:
		return "SESSION_OPEN";
	case VIRTIO_DMAHEAP_REQ_SESSION_CLOSE:
		return "SESSION_CLOSE";
	case VIRTIO_DMAHEAP_REQ_RESERVE:
		return "RESERVE";
	case VIRTIO_DMAHEAP_REQ_UNRESERVE:
		return "UNRESERVE";
	case VIRTIO_DMAHEAP_REQ_ALLOC_BATCH:
		return "ALLOC_BATCH";
	default:
		return "unknown";
	}
}

static struct vdh_req *vdh_req_alloc(u32 type, size_t req_size,
				     size_t resp_size, gfp_t gfp)
{
	struct vdh_req *r;

	r = kzalloc(sizeof(*r), gfp);
	if (!r)
		return NULL;
	INIT_LIST_HEAD(&r->node);
	init_completion(&r->done);
	r->req.hdr.type = cpu_to_le32(type);
	r->req_size = req_size;
	r->resp_size = resp_size;
	return r;
}

/* Free a request (NULL: nothing), with what it owns of a batch. */
static void vdh_req_free(struct vdh_req *r)
{
	unsigned int i;

	if (!r)
		return;
	if (r->batch) {
		for (i = 0; i < r->batch->count; i++)
			kfree(r->batch->frees[i]);
		kfree(r->batch);
	}
	kfree(r);
}

static int vdh_add(struct vdh_dev *vd, struct vdh_req *r)
{
	struct scatterlist out, in, *sgs[] = { &out, &in };
	void *resp = r->batch ? (void *)&r->batch->resp : (void *)&r->resp;

	lockdep_assert_held(&vd->vq_lock);
	sg_init_one(&out, &r->req, r->req_size);
	sg_init_one(&in, resp, r->resp_size);
	return virtqueue_add_sgs(vd->vq, sgs, 1, 1, r, GFP_ATOMIC);
}

/* Queue what fits of the pending list. Returns true if anything was queued. */
static bool vdh_flush_pending(struct vdh_dev *vd)
{
	struct vdh_req *r, *tmp;
	bool added = false;

	lockdep_assert_held(&vd->vq_lock);
	if (vd->state != VDH_RUNNING)
		return false;
	list_for_each_entry_safe(r, tmp, &vd->pending, node) {
		if (vdh_add(vd, r))
			break;
		list_del_init(&r->node);
		added = true;
	}
	return added;
}

/* Kick under the lock: the queue cannot be deleted meanwhile. */
static void vdh_kick_pending(struct vdh_dev *vd)
{
	lockdep_assert_held(&vd->vq_lock);
	if (vdh_flush_pending(vd))
		virtqueue_kick(vd->vq);
}

/*
 * An abandoned ALLOC that succeeded after all would leak a host buffer: turn
 * the request into a FREE, sent from the pending list.
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
	r->req_size = sizeof(r->req.free);
	r->resp_size = sizeof(r->resp.hdr);
	r->nowait = true;
	r->abandoned = false;
	list_add_tail(&r->node, &vd->pending);
	return true;
}

/*
 * The same for an abandoned ALLOC_BATCH: each buffer it got is freed with one
 * of the FREEs the batch carries.
 */
static void vdh_batch_free_leak(struct vdh_dev *vd, struct vdh_req *r,
				unsigned int len)
{
	struct vdh_batch *b = r->batch;
	unsigned int i, got = 0;
	struct vdh_req *f;

	if (len >= sizeof(b->resp) &&
	    b->resp.hdr.status == cpu_to_le32(VIRTIO_DMAHEAP_S_OK))
		got = min(le32_to_cpu(b->resp.count), b->count);
	for (i = 0; i < got; i++) {
		f = b->frees[i];
		b->frees[i] = NULL;
		f->req.free.buffer_id = b->resp.buffers[i].buffer_id;
		f->nowait = true;
		list_add_tail(&f->node, &vd->pending);
	}
}

static void vdh_req_done(struct vdh_dev *vd, struct vdh_req *r,
			 unsigned int len)
{
	if (r->abandoned && r->batch)
		vdh_batch_free_leak(vd, r, len);
	else if (r->abandoned && vdh_req_free_leak(vd, r, len))
		return;
	if (r->nowait || r->abandoned) {
		vdh_req_free(r);
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
	vdh_kick_pending(vd);
	spin_unlock_irqrestore(&vd->vq_lock, flags);
	wake_up_all(&vd->space_wq);
}

/* Whether a request of @type may go out in @state. */
static bool vdh_allowed(enum vdh_state state, u32 type)
{
	switch (state) {
	case VDH_RUNNING:
		return true;
	case VDH_OPENING:
		return type == VIRTIO_DMAHEAP_REQ_SESSION_OPEN ||
		       type == VIRTIO_DMAHEAP_REQ_RESERVE ||
		       type == VIRTIO_DMAHEAP_REQ_HEAP_INFO;
	case VDH_CLOSING:
		return type == VIRTIO_DMAHEAP_REQ_SESSION_CLOSE;
	default:
		return false;
	}
}

static bool vdh_may_add(struct vdh_dev *vd)
{
	bool ret;

	spin_lock_irq(&vd->vq_lock);
	ret = !vd->vq || vd->state == VDH_REMOVED || vd->state == VDH_FROZEN ||
	      virtqueue_is_broken(vd->vq) ||
	      (vd->vq->num_free &&
	       (list_empty(&vd->pending) || vd->state != VDH_RUNNING));
	spin_unlock_irq(&vd->vq_lock);
	return ret;
}

/*
 * Try to queue @r, after the pending list (which goes first while the device
 * runs; in the other states only the requests that change them go out).
 */
static int vdh_try_queue(struct vdh_dev *vd, struct vdh_req *r)
{
	int ret;

	lockdep_assert_held(&vd->vq_lock);
	if (!vdh_allowed(vd->state, le32_to_cpu(r->req.hdr.type)))
		return vdh_state_errno(vd->state);
	/* Once a request timed out, fail at once instead of waiting for a dead back end. */
	if (vd->stalled)
		return -EIO;
	vdh_kick_pending(vd);
	if (vd->state == VDH_RUNNING && !list_empty(&vd->pending))
		return -ENOSPC;
	ret = vdh_add(vd, r);
	if (ret)
		return ret;
	r->device_polling = !virtqueue_kick_prepare(vd->vq);
	if (!r->device_polling)
		virtqueue_notify(vd->vq);
	return 0;
}

/* Put @r on the queue, waiting for room. On success the queue owns @r. */
static int vdh_queue(struct vdh_dev *vd, struct vdh_req *r)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(timeout_ms);
	unsigned long flags;
	long wait;
	int ret;

	for (;;) {
		spin_lock_irqsave(&vd->vq_lock, flags);
		ret = vdh_try_queue(vd, r);
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
		wait = wait_event_killable_timeout(vd->space_wq, vdh_may_add(vd), HZ);
		if (wait < 0)
			return -EINTR;
	}
	spin_unlock_irqrestore(&vd->vq_lock, flags);
	if (ret == -EIO)
		pr_warn_ratelimited("%s request: device not answering\n",
				    vdh_req_name(r));
	return ret;
}

/* Give up on @r: the queue frees it. Returns false if it completed meanwhile. */
static bool vdh_abandon(struct vdh_dev *vd, struct vdh_req *r, bool stall)
{
	unsigned long flags;
	bool done;

	spin_lock_irqsave(&vd->vq_lock, flags);
	done = completion_done(&r->done);
	if (!done) {
		r->abandoned = true;
		vd->stalled |= stall;
	}
	spin_unlock_irqrestore(&vd->vq_lock, flags);
	return !done;
}

static bool vdh_vq_broken(struct vdh_dev *vd)
{
	bool broken;

	spin_lock_irq(&vd->vq_lock);
	broken = vd->vq && virtqueue_is_broken(vd->vq);
	spin_unlock_irq(&vd->vq_lock);
	return broken;
}

/*
 * The device polls its ring while requests come close together and then
 * answers within microseconds: spinning that long costs less than sleeping and
 * being woken. Only when it polls, though (it needed no kick for @r): a device
 * that was asleep has to be woken, maybe on this very host CPU, where spinning
 * would keep it from running. Gives way to anything else that wants the CPU.
 */
static bool vdh_spin(struct vdh_req *r)
{
	unsigned int us = min(READ_ONCE(spin_us), VDH_SPIN_MAX_US);
	u64 end;

	if (!us || !r->device_polling)
		return false;
	end = ktime_get_ns() + (u64)us * NSEC_PER_USEC;
	do {
		if (try_wait_for_completion(&r->done))
			return true;
		if (need_resched() || fatal_signal_pending(current))
			return false;
		cpu_relax();
	} while (ktime_get_ns() < end);
	return false;
}

/*
 * Wait for the device to answer. Returns 0 once @r is completed (by the
 * device, or with r->err set when the device stopped). Returns -EINTR (fatal
 * signal), -EIO (broken queue) or -ETIMEDOUT after marking @r abandoned.
 */
static int vdh_wait(struct vdh_dev *vd, struct vdh_req *r)
{
	unsigned long deadline = jiffies + msecs_to_jiffies(timeout_ms);
	long left;
	int ret;

	if (vdh_spin(r))
		return 0;
	for (;;) {
		left = wait_for_completion_killable_timeout(&r->done, HZ);
		if (left > 0)
			return 0;
		if (left < 0)
			ret = -EINTR;
		else if (vdh_vq_broken(vd))
			ret = -EIO;
		else if (timeout_ms && time_after(jiffies, deadline))
			ret = -ETIMEDOUT;
		else
			continue;
		if (!vdh_abandon(vd, r, ret != -EINTR))
			return 0;
		pr_warn_ratelimited("%s request: %s\n", vdh_req_name(r),
				    ret == -EINTR ? "interrupted" :
				    ret == -EIO ? "device broken" : "timed out");
		return ret;
	}
}

/*
 * Send @r and wait for a complete, successful response. Returns 0 and leaves
 * @r to the caller, or an errno after @r was freed or handed to the queue.
 */
static int vdh_exec(struct vdh_dev *vd, struct vdh_req *r)
{
	u32 status;
	int ret;

	ret = vdh_queue(vd, r);
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
	status = le32_to_cpu(r->batch ? r->batch->resp.hdr.status :
				 r->resp.hdr.status);
	if (status == VIRTIO_DMAHEAP_S_NO_SESSION &&
	    le32_to_cpu(r->req.hdr.type) != VIRTIO_DMAHEAP_REQ_SESSION_OPEN)
		vdh_session_lost(vd);
	ret = vdh_status_to_errno(status);
	if (!ret && r->resp_len < r->resp_size)
		ret = -EIO;
	if (ret)
		goto free_req;
	return 0;

free_req:
	vdh_req_free(r);
	return ret;
}

/* Send @r without waiting: it is queued as soon as there is room. */
static void vdh_send_nowait(struct vdh_dev *vd, struct vdh_req *r)
{
	unsigned long flags;

	r->nowait = true;
	spin_lock_irqsave(&vd->vq_lock, flags);
	if (vd->state == VDH_REMOVED) {
		spin_unlock_irqrestore(&vd->vq_lock, flags);
		vdh_req_free(r);
		return;
	}
	list_add_tail(&r->node, &vd->pending);
	vdh_kick_pending(vd);
	spin_unlock_irqrestore(&vd->vq_lock, flags);
}

/* ---- requests ---------------------------------------------------------- */

struct vdh_req *vdh_free_req_alloc(void)
{
	return vdh_req_alloc(VIRTIO_DMAHEAP_REQ_FREE, sizeof(struct virtio_dmaheap_free_req),
			     sizeof(struct virtio_dmaheap_resp_hdr), GFP_KERNEL);
}

void vdh_free_req_discard(struct vdh_req *r)
{
	vdh_req_free(r);
}

/* FREE buffer @id with @r, the request allocated with the buffer. */
void vdh_remote_free(struct vdh_dev *vd, struct vdh_req *r, u64 id)
{
	r->req.free.buffer_id = cpu_to_le64(id);
	vdh_send_nowait(vd, r);
}

int vdh_remote_alloc(struct vdh_dev *vd, u32 heap_id, size_t len,
		     struct virtio_dmaheap_alloc_resp *resp)
{
	struct vdh_req *r;
	int ret;

	r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_ALLOC, sizeof(r->req.alloc),
			  sizeof(r->resp.alloc), GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	r->req.alloc.heap_id = cpu_to_le32(heap_id);
	r->req.alloc.len = cpu_to_le64(len);
	ret = vdh_exec(vd, r);
	if (ret)
		return ret;
	*resp = r->resp.alloc;
	vdh_req_free(r);
	return 0;
}

/*
 * ALLOC_BATCH of up to @count buffers, with @frees[0..@count) the FREEs the
 * caller allocated for them. Returns how many buffers the device allocated
 * (described in @out) and gives @frees back; or an errno, and then @frees are
 * gone (freed, or sent for buffers of a batch given up on).
 */
int vdh_remote_alloc_batch(struct vdh_dev *vd, u32 heap_id, size_t len,
			   unsigned int count, struct vdh_req **frees,
			   struct virtio_dmaheap_buffer *out)
{
	struct vdh_batch *b;
	struct vdh_req *r;
	unsigned int i, got;
	int ret;

	r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_ALLOC_BATCH, sizeof(r->req.alloc_batch),
			  sizeof(b->resp), GFP_KERNEL);
	b = kzalloc(sizeof(*b), GFP_KERNEL);
	if (!r || !b) {
		kfree(b);
		kfree(r);
		for (i = 0; i < count; i++)
			kfree(frees[i]);
		return -ENOMEM;
	}
	memcpy(b->frees, frees, count * sizeof(*frees));
	b->count = count;
	r->batch = b;
	r->req.alloc_batch.heap_id = cpu_to_le32(heap_id);
	r->req.alloc_batch.count = cpu_to_le32(count);
	r->req.alloc_batch.len = cpu_to_le64(len);
	ret = vdh_exec(vd, r);
	if (ret)
		return ret;
	got = le32_to_cpu(b->resp.count);
	if (!got || got > count) {
		pr_err_ratelimited("ALLOC_BATCH of %u answered with %u buffers\n",
				   count, got);
		/* Free what the device may hold; the rest goes with the request. */
		for (i = 0; i < min(got, count); i++) {
			b->frees[i]->req.free.buffer_id = b->resp.buffers[i].buffer_id;
			vdh_send_nowait(vd, b->frees[i]);
			b->frees[i] = NULL;
		}
		vdh_req_free(r);
		return -EIO;
	}
	memcpy(out, b->resp.buffers, got * sizeof(*out));
	b->count = 0;	/* the FREEs are the caller's again */
	vdh_req_free(r);
	return got;
}

int vdh_remote_sync(struct vdh_dev *vd, u64 id, u32 flags)
{
	struct vdh_req *r;
	int ret;

	r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_SYNC, sizeof(r->req.sync),
			  sizeof(r->resp.hdr), GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	r->req.sync.buffer_id = cpu_to_le64(id);
	r->req.sync.flags = cpu_to_le32(flags);
	ret = vdh_exec(vd, r);
	if (ret)
		return ret;
	vdh_req_free(r);
	return 0;
}

/* ASSIGN_UUID: the UUID the device registered for buffer @id, in @uuid[16]. */
int vdh_remote_assign_uuid(struct vdh_dev *vd, u64 id, u8 *uuid)
{
	struct vdh_req *r;
	int ret;

	r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_ASSIGN_UUID, sizeof(r->req.assign_uuid),
			  sizeof(r->resp.assign_uuid), GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	r->req.assign_uuid.buffer_id = cpu_to_le64(id);
	ret = vdh_exec(vd, r);
	if (ret)
		return ret;
	memcpy(uuid, r->resp.assign_uuid.uuid, sizeof(r->resp.assign_uuid.uuid));
	vdh_req_free(r);
	return 0;
}

/* With VIRTIO_DMAHEAP_F_HEAP_RANGE the answer also says where the heap lies. */
int vdh_remote_heap_info(struct vdh_dev *vd, u32 heap_id,
			 struct virtio_dmaheap_heap_info *info,
			 struct virtio_dmaheap_heap_range *range)
{
	struct vdh_req *r;
	size_t resp_size = vd->has_heap_range ? sizeof(r->resp.info_range) :
						sizeof(r->resp.info);

	int ret;

	r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_HEAP_INFO, sizeof(r->req.info),
			  resp_size, GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	r->req.info.heap_id = cpu_to_le32(heap_id);
	ret = vdh_exec(vd, r);
	if (ret)
		return ret;
	*info = r->resp.info.info;
	if (vd->has_heap_range) {
		*range = r->resp.info_range.range;
	} else {
		range->offset = 0;
		range->len = cpu_to_le64(vd->win->size);
	}
	vdh_req_free(r);
	return 0;
}

int vdh_remote_session_open(struct vdh_dev *vd, u64 resume_id, u64 *id)
{
	struct vdh_req *r;
	int ret;

	/*
	 * With VIRTIO_DMAHEAP_F_PAGE_SIZE the device aligns the session's buffers
	 * to our page size. A resume states the same one: it is this kernel's.
	 */
	if (vd->has_page_size) {
		r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_SESSION_OPEN,
				  sizeof(r->req.open_page),
				  sizeof(r->resp.open), GFP_KERNEL);
		if (!r)
			return -ENOMEM;
		r->req.open_page.resume_id = cpu_to_le64(resume_id);
		r->req.open_page.page_size = cpu_to_le32(PAGE_SIZE);
	} else {
		r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_SESSION_OPEN,
				  sizeof(r->req.open), sizeof(r->resp.open),
				  GFP_KERNEL);
		if (!r)
			return -ENOMEM;
		r->req.open.resume_id = cpu_to_le64(resume_id);
	}
	ret = vdh_exec(vd, r);
	if (ret)
		return ret;
	*id = le64_to_cpu(r->resp.open.session_id);
	vdh_req_free(r);
	return *id ? 0 : -EIO;
}

int vdh_remote_session_close(struct vdh_dev *vd, u32 flags)
{
	struct vdh_req *r;
	int ret;

	r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_SESSION_CLOSE, sizeof(r->req.close),
			  sizeof(r->resp.hdr), GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	r->req.close.flags = cpu_to_le32(flags);
	ret = vdh_exec(vd, r);
	if (ret)
		return ret;
	vdh_req_free(r);
	return 0;
}

int vdh_remote_reserve(struct vdh_dev *vd, u64 offset, u64 len)
{
	struct vdh_req *r;
	int ret;

	r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_RESERVE, sizeof(r->req.reserve),
			  sizeof(r->resp.hdr), GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	r->req.reserve.offset = cpu_to_le64(offset);
	r->req.reserve.len = cpu_to_le64(len);
	ret = vdh_exec(vd, r);
	if (ret)
		return ret;
	vdh_req_free(r);
	return 0;
}

void vdh_remote_unreserve(struct vdh_dev *vd, u64 offset, u64 len)
{
	struct vdh_req *r;

	r = vdh_req_alloc(VIRTIO_DMAHEAP_REQ_UNRESERVE, sizeof(r->req.reserve),
			  sizeof(r->resp.hdr), GFP_KERNEL);
	if (!r) {
		/* The range stays out of new buffers until the session ends. */
		pr_warn_ratelimited("cannot give back window range %#llx+%#llx\n",
				    offset, len);
		return;
	}
	r->req.reserve.offset = cpu_to_le64(offset);
	r->req.reserve.len = cpu_to_le64(len);
	vdh_send_nowait(vd, r);
}

/* ---- the queue ---------------------------------------------------------- */

/*
 * Set up the request queue (probe, restore) in @state; requests may go out
 * after DRIVER_OK.
 */
int vdh_queue_start(struct vdh_dev *vd, enum vdh_state state)
{
	struct virtqueue *vq;

	vq = virtio_find_single_vq(vd->vdev, vdh_vq_done, "requestq");
	if (IS_ERR(vq))
		return PTR_ERR(vq);
	spin_lock_irq(&vd->vq_lock);
	vd->vq = vq;
	vd->state = state;
	vd->stalled = false;
	spin_unlock_irq(&vd->vq_lock);
	return 0;
}

void vdh_set_state(struct vdh_dev *vd, enum vdh_state state)
{
	spin_lock_irq(&vd->vq_lock);
	vd->state = state;
	if (state == VDH_RUNNING && vd->vq)
		vdh_kick_pending(vd);
	spin_unlock_irq(&vd->vq_lock);
	wake_up_all(&vd->space_wq);
}

/* Called with vq_lock held: what the device did not take when it was reset. */
static void vdh_detach_unused(struct vdh_dev *vd, enum vdh_state state)
{
	struct vdh_req *r;

	lockdep_assert_held(&vd->vq_lock);
	while ((r = virtqueue_detach_unused_buf(vd->vq))) {
		if (r->abandoned) {
			vdh_req_free(r);
		} else if (r->nowait) {
			/* A suspended session resumes: send it again then. */
			if (state == VDH_FROZEN)
				list_add(&r->node, &vd->pending);
			else
				vdh_req_free(r);
		} else {
			r->err = vdh_state_errno(state);
			complete(&r->done);
		}
	}
}

static void vdh_drop_pending_locked(struct vdh_dev *vd)
{
	struct vdh_req *r, *tmp;

	lockdep_assert_held(&vd->vq_lock);
	list_for_each_entry_safe(r, tmp, &vd->pending, node) {
		list_del(&r->node);
		vdh_req_free(r);
	}
}

/*
 * Reset the device and tear the queue down: @state is VDH_FROZEN (FREEs are
 * kept for the resumed session) or VDH_REMOVED (they are dropped).
 */
void vdh_queue_stop(struct vdh_dev *vd, enum vdh_state state)
{
	struct virtqueue *vq;

	spin_lock_irq(&vd->vq_lock);
	vd->state = state;
	spin_unlock_irq(&vd->vq_lock);

	virtio_reset_device(vd->vdev);

	spin_lock_irq(&vd->vq_lock);
	vq = vd->vq;
	if (vq)
		vdh_detach_unused(vd, state);
	if (state == VDH_REMOVED)
		vdh_drop_pending_locked(vd);
	vd->vq = NULL;
	spin_unlock_irq(&vd->vq_lock);
	wake_up_all(&vd->space_wq);
	if (vq)
		vd->vdev->config->del_vqs(vd->vdev);
}

/* Drop what waits to be sent (a resume failed: those ids are gone). */
void vdh_drop_pending(struct vdh_dev *vd)
{
	spin_lock_irq(&vd->vq_lock);
	vdh_drop_pending_locked(vd);
	spin_unlock_irq(&vd->vq_lock);
}
