// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-dmaheap: the pool of freed buffers. Every ALLOC and FREE is a round
 * trip to the host, and the host zeroes every freed buffer beside it, which
 * costs more than the whole allocation does in the guest's own system heap, up
 * to a few MiB. So a released buffer of a cached heap is kept, still allocated
 * on the device, and handed out again for the next allocation of the same heap
 * and size, zeroed by the driver (as the guest's own heap zeroes its pages).
 * Buffers over VDH_POOL_ZERO_AHEAD_LEN are zeroed ahead, by a worker, while
 * they wait in the pool: reusing one costs no memset in the allocating task
 * (as the Android kernel's system heap zeroes freed pages in the background).
 * The worker starts when a buffer the pool handed out before comes back, or
 * when an allocation finds only unzeroed ones of its size, and then zeroes
 * every unzeroed large one. A buffer freed while neither happens goes back to
 * the host unwritten: zeroing writes every page, touched or not.
 * An allocation that finds only one not yet zeroed asks the device for
 * another until the pool holds two of the size, and zeroes it itself after.
 *
 * The device still counts pooled buffers (the host sees them in its stats and
 * quotas). They go back to it after pool_idle_ms unused, when an allocation
 * finds the quota or the window full, and with their session.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/jiffies.h>
#include <linux/list.h>
#include <linux/module.h>
#include <linux/sizes.h>
#include <linux/spinlock.h>
#include <linux/workqueue.h>

#include "vdh.h"

static unsigned int pool_buffers = 64;
module_param(pool_buffers, uint, 0644);
MODULE_PARM_DESC(pool_buffers,
		 "Freed buffers each device keeps for reuse (0: none, every allocation goes to the host)");

static unsigned int pool_max_len = SZ_4M;
module_param(pool_max_len, uint, 0644);
MODULE_PARM_DESC(pool_max_len, "Largest buffer (bytes) the pool keeps");

static unsigned int pool_max_bytes = SZ_32M;
module_param(pool_max_bytes, uint, 0644);
MODULE_PARM_DESC(pool_max_bytes, "Most bytes of freed buffers each device keeps");

/* Larger buffers are not batched: the round trip is small beside their cost. */
#define VDH_POOL_BATCH_MAX_LEN	SZ_256K

/* Larger pooled buffers are zeroed ahead; smaller ones cost less than a wakeup. */
#define VDH_POOL_ZERO_AHEAD_LEN	SZ_16K
/* Pooled buffers of a size that let the zeroing worker keep up (vdh_pool_find). */
#define VDH_POOL_ZERO_AHEAD_DEPTH	2

static unsigned int pool_batch = 4;
module_param(pool_batch, uint, 0644);
MODULE_PARM_DESC(pool_batch,
		 "Buffers one request to the host allocates when the pool has none of the size (the rest are pooled)");

static unsigned int pool_idle_ms = 1000;
module_param(pool_idle_ms, uint, 0644);
MODULE_PARM_DESC(pool_idle_ms,
		 "Give a pooled buffer back to the host after this many ms unused");

static unsigned long vdh_pool_idle(void)
{
	return msecs_to_jiffies(READ_ONCE(pool_idle_ms));
}

static void vdh_pool_account(struct vdh_buffer *buf, int sign)
{
	lockdep_assert_held(&buf->vd->pool_lock);
	buf->vd->pool_bytes += sign * (s64)buf->len;
	atomic64_add(sign * (s64)buf->len, &buf->vh->bytes_pooled);
	atomic_add(sign, &buf->vh->buffers_pooled);
}

/* Free what was taken out of the pool on the device (or forget it). */
static void vdh_pool_destroy_list(struct list_head *list, bool tell_device)
{
	struct vdh_buffer *buf, *tmp;

	list_for_each_entry_safe(buf, tmp, list, node) {
		list_del(&buf->node);
		if (!tell_device) {
			/* The device forgot it with its session. */
			vdh_free_req_discard(buf->free_req);
			buf->free_req = NULL;
		}
		vdh_buf_destroy(buf);
	}
}

/*
 * Take every pooled buffer out. One the zeroing worker holds is left to it:
 * callers that must see it go first flush that worker and keep it from
 * starting again.
 */
static void vdh_pool_take_all(struct vdh_dev *vd, struct list_head *list)
{
	struct vdh_buffer *buf;

	spin_lock(&vd->pool_lock);
	list_for_each_entry(buf, &vd->pool, node) {
		vdh_pool_account(buf, -1);
		vd->pool_count--;
	}
	list_splice_init(&vd->pool, list);
	spin_unlock(&vd->pool_lock);
}

/*
 * The oldest pooled buffer to zero ahead, taken off the list (still counted)
 * and noted in vd->pool_zeroing, or NULL.
 */
static struct vdh_buffer *vdh_pool_take_dirty(struct vdh_dev *vd)
{
	struct vdh_buffer *buf;

	spin_lock(&vd->pool_lock);
	list_for_each_entry_reverse(buf, &vd->pool, node) {
		if (!buf->pool_clean && buf->len > VDH_POOL_ZERO_AHEAD_LEN) {
			list_del(&buf->node);
			vd->pool_zeroing = buf;
			spin_unlock(&vd->pool_lock);
			return buf;
		}
	}
	spin_unlock(&vd->pool_lock);
	return NULL;
}

/* Zero large pooled buffers ahead of their reuse. */
static void vdh_pool_zero(struct work_struct *work)
{
	struct vdh_dev *vd = container_of(work, struct vdh_dev, pool_zero_work);
	struct vdh_buffer *buf;

	while ((buf = vdh_pool_take_dirty(vd))) {
		memset(vdh_buf_kaddr(buf), 0, buf->len);
		spin_lock(&vd->pool_lock);
		vd->pool_zeroing = NULL;
		buf->pool_clean = true;
		/* Newest first, as the trim expects: its idle time starts now. */
		buf->pooled_at = jiffies;
		list_add(&buf->node, &vd->pool);
		spin_unlock(&vd->pool_lock);
		/* A trim that ran meanwhile did not see it. */
		queue_delayed_work(vdh_wq, &vd->pool_work, vdh_pool_idle());
		cond_resched();
	}
}

/* Give back what stayed unused for pool_idle_ms; come back for the rest. */
static void vdh_pool_trim(struct work_struct *work)
{
	struct vdh_dev *vd = container_of(to_delayed_work(work), struct vdh_dev,
					  pool_work);
	unsigned long idle = vdh_pool_idle();
	struct vdh_buffer *buf, *tmp;
	unsigned long next = 0;
	LIST_HEAD(old);

	spin_lock(&vd->pool_lock);
	/* Newest first: the old ones are at the tail. */
	list_for_each_entry_safe_reverse(buf, tmp, &vd->pool, node) {
		if (time_before(jiffies, buf->pooled_at + idle)) {
			next = buf->pooled_at + idle;
			break;
		}
		vdh_pool_account(buf, -1);
		list_move(&buf->node, &old);
		vd->pool_count--;
	}
	spin_unlock(&vd->pool_lock);
	vdh_pool_destroy_list(&old, true);
	if (next)
		queue_delayed_work(vdh_wq, &vd->pool_work,
				   max_t(long, next - jiffies, 1));
}

void vdh_pool_init(struct vdh_dev *vd)
{
	spin_lock_init(&vd->pool_lock);
	INIT_LIST_HEAD(&vd->pool);
	INIT_DELAYED_WORK(&vd->pool_work, vdh_pool_trim);
	INIT_WORK(&vd->pool_zero_work, vdh_pool_zero);
}

/* The device goes away: no more trimming or zeroing ahead. */
void vdh_pool_stop(struct vdh_dev *vd)
{
	disable_delayed_work_sync(&vd->pool_work);
	disable_work_sync(&vd->pool_zero_work);
}

/* Whether buffers of heap @props and @len bytes may be pooled. */
static bool vdh_pool_fits(u32 cache, size_t len)
{
	return cache == VIRTIO_DMAHEAP_CACHE_CACHED &&
	       len <= READ_ONCE(pool_max_len) && READ_ONCE(pool_buffers);
}

/*
 * How many buffers to ask the device for when an allocation found none in
 * the pool: one, or (with ALLOC_BATCH) up to pool_batch, as many as the pool
 * has room for beside the one handed out.
 */
unsigned int vdh_pool_batch(struct vdh_dev *vd, const struct vdh_heap_props *props,
			    size_t len)
{
	unsigned int room, limit = READ_ONCE(pool_buffers);
	u64 max_bytes = READ_ONCE(pool_max_bytes);

	if (!vd->has_batch || len > VDH_POOL_BATCH_MAX_LEN ||
	    !vdh_pool_fits(props->cache, len))
		return 1;
	spin_lock(&vd->pool_lock);
	room = vd->pool_count < limit ? limit - vd->pool_count : 0;
	if (vd->pool_bytes < max_bytes)
		room = min_t(u64, room, div_u64(max_bytes - vd->pool_bytes, len));
	else
		room = 0;
	spin_unlock(&vd->pool_lock);
	return clamp(min(READ_ONCE(pool_batch), room + 1), 1U,
		     (unsigned int)VIRTIO_DMAHEAP_BATCH_MAX);
}

/*
 * Keep released @buf for reuse, if it is worth it and safe: a buffer of at
 * most pool_max_len bytes, while the pool holds at most pool_max_bytes, of a
 * cached heap (the driver zeroes it through the kernel's write-back
 * mapping), of the current session, that no kernel user still maps, and that
 * never was offered a UUID (the host buffer behind a UUID may be held by an
 * importer on the host: only a FREE ends its export). @zeroed: the device
 * zeroed it and nobody mapped it since. Called with vd->buffers_lock held,
 * after the buffer left vd->buffers.
 */
bool vdh_pool_put(struct vdh_buffer *buf, bool zeroed)
{
	struct vdh_dev *vd = buf->vd;
	bool pooled = false;

	lockdep_assert_held(&vd->buffers_lock);
	if (!vdh_pool_fits(buf->cache, buf->len) || buf->revoked ||
	    buf->dma_mapped || buf->vmap_cnt || buf->uuid_asked ||
	    buf->session != READ_ONCE(vd->session))
		return false;

	spin_lock(&vd->pool_lock);
	if (vd->pool_count < READ_ONCE(pool_buffers) &&
	    vd->pool_bytes + buf->len <= READ_ONCE(pool_max_bytes)) {
		buf->dmabuf = NULL;
		buf->pooled_at = jiffies;
		buf->pool_clean = zeroed;
		list_add(&buf->node, &vd->pool);
		vd->pool_count++;
		vdh_pool_account(buf, 1);
		pooled = true;
	}
	spin_unlock(&vd->pool_lock);
	if (!pooled)
		return false;
	queue_delayed_work(vdh_wq, &vd->pool_work, vdh_pool_idle());
	/* Only for a size in demand: zeroing writes every page, touched or not. */
	if (!zeroed && buf->pool_reused && buf->len > VDH_POOL_ZERO_AHEAD_LEN)
		queue_work(vdh_wq, &vd->pool_zero_work);
	return true;
}

/*
 * The pooled buffer of heap @vh and @len bytes to hand out, or NULL. Small
 * ones newest first: a burst's extras stay unused and go back when idle.
 * Large ones oldest first: each gets the most time to be zeroed ahead, and
 * none idles out while its size is in use. A large one not zeroed yet is
 * handed out (the caller zeroes it) only once the pool holds
 * VDH_POOL_ZERO_AHEAD_DEPTH of the size; until then the device's fresh buffer
 * costs the caller less than a memset, and deepens the pool so that the
 * worker can keep up. Beyond that depth a late worker costs a memset, not a
 * first touch of fresh host memory (in a nested guest, 50-100 times a warm
 * one).
 */
static struct vdh_buffer *vdh_pool_find(struct vdh_dev *vd, struct vdh_heap *vh,
					size_t len, bool *demand)
{
	struct vdh_buffer *buf, *dirty = NULL;
	unsigned int depth = 0;

	lockdep_assert_held(&vd->pool_lock);
	if (len <= VDH_POOL_ZERO_AHEAD_LEN) {
		list_for_each_entry(buf, &vd->pool, node)
			if (buf->vh == vh && buf->len == len)
				return buf;
		return NULL;
	}
	list_for_each_entry_reverse(buf, &vd->pool, node) {
		if (buf->vh != vh || buf->len != len)
			continue;
		if (buf->pool_clean)
			return buf;
		dirty = dirty ?: buf;
		depth++;
	}
	buf = vd->pool_zeroing;
	if (buf && buf->vh == vh && buf->len == len)
		depth++;
	*demand = !!dirty;
	return depth >= VDH_POOL_ZERO_AHEAD_DEPTH ? dirty : NULL;
}

/*
 * A pooled buffer of heap @vh and @len bytes (see vdh_pool_find()), or NULL.
 * pool_clean says whether it is zeroed already. Called with vd->alloc_sem
 * held, so the session cannot change meanwhile.
 */
struct vdh_buffer *vdh_pool_get(struct vdh_dev *vd, struct vdh_heap *vh,
				size_t len)
{
	struct vdh_buffer *buf;
	bool demand = false;

	lockdep_assert_held(&vd->alloc_sem);
	if (!READ_ONCE(pool_buffers))
		return NULL;	/* no pool any more: what it holds goes when idle */
	spin_lock(&vd->pool_lock);
	buf = vdh_pool_find(vd, vh, len, &demand);
	if (buf) {
		list_del(&buf->node);
		vd->pool_count--;
		vdh_pool_account(buf, -1);
		buf->pool_reused = true;
	}
	spin_unlock(&vd->pool_lock);
	/* Its size is wanted, and what the pool holds of it is not zeroed. */
	if (demand && !buf)
		queue_work(vdh_wq, &vd->pool_zero_work);
	return buf;
}

/*
 * Give every pooled buffer back to the device (an allocation was refused for
 * quota or window space). The FREEs go out ahead of the next request. Returns
 * whether there was anything to give back.
 */
bool vdh_pool_flush(struct vdh_dev *vd)
{
	LIST_HEAD(all);

	/* What the worker zeroes now counts too; a buffer pooled later may not. */
	flush_work(&vd->pool_zero_work);
	vdh_pool_take_all(vd, &all);
	if (list_empty(&all))
		return false;
	vdh_pool_destroy_list(&all, true);
	return true;
}

/*
 * The session ends: the device forgets the pooled buffers with it. Called
 * with vd->revoked set, so that nothing is pooled any more.
 */
void vdh_pool_drop(struct vdh_dev *vd)
{
	LIST_HEAD(all);

	/* Nothing is pooled any more, so the worker does not start again. */
	flush_work(&vd->pool_zero_work);
	vdh_pool_take_all(vd, &all);
	vdh_pool_destroy_list(&all, false);
}
