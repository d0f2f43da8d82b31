// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-dmaheap: allocation and the dma-buf side of a buffer. A buffer is a
 * physically contiguous range of the buffer window, so its sg_table, user
 * mappings and vmap are built from a pfn and a length, the way the system
 * and CMA heaps build theirs from their pages.
 *
 * Revocation: when the buffer's session ends (device removed, session lost or
 * not resumed) the buffer is revoked: user mappings are zapped and can never
 * come back (vdh_mmap.c); new mmaps, attachments, DMA mappings and vmaps are
 * refused. Kernel users that mapped the buffer before (a vmap, a DMA mapping)
 * cannot be forced out: such a buffer is quarantined in its window, and every
 * later session reserves its range until the last of those users lets go.
 *
 * With VIRTIO_DMAHEAP_F_UUID every buffer is a virtio_dma_buf: the same ops,
 * wrapped in struct virtio_dma_buf_ops, whose attach is virtio_dma_buf_attach
 * (it calls ours) and whose get_uuid is in vdh_uuid.c.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/dma-buf.h>
#include <linux/dma-heap.h>
#include <linux/dma-mapping.h>
#include <linux/dma-resv.h>
#include <linux/err.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/iosys-map.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/sizes.h>
#include <linux/slab.h>
#include <linux/virtio_dma_buf.h>
#include <linux/vmalloc.h>

#include "vdh.h"

/* Largest scatterlist segment; sg->length is 32 bits. */
#define VDH_SEG_MAX		SZ_1G

struct vdh_attachment {
	struct device *dev;
	struct sg_table table;
	struct list_head list;
	bool mapped;
};

/* Pageless (a range that is not CACHED): lengths only, see vdh_buf_dma_map(). */
static int vdh_buf_sgt(const struct vdh_buffer *buf, struct sg_table *table)
{
	unsigned int nents = DIV_ROUND_UP(buf->len, VDH_SEG_MAX);
	struct scatterlist *sg;
	size_t off = 0;
	int i, ret;

	ret = sg_alloc_table(table, nents, GFP_KERNEL);
	if (ret)
		return ret;
	for_each_sgtable_sg(table, sg, i) {
		size_t n = min_t(size_t, buf->len - off, VDH_SEG_MAX);

		sg_set_page(sg, buf->span->pages ?
			    pfn_to_page(buf->pfn + PHYS_PFN(off)) : NULL, n, 0);
		off += n;
	}
	return 0;
}

static int vdh_buf_attach(struct dma_buf *dmabuf,
			  struct dma_buf_attachment *attachment)
{
	struct vdh_buffer *buf = dmabuf->priv;
	struct vdh_attachment *a;
	int ret;

	a = kzalloc(sizeof(*a), GFP_KERNEL);
	if (!a)
		return -ENOMEM;
	ret = vdh_buf_sgt(buf, &a->table);
	if (ret) {
		kfree(a);
		return ret;
	}
	a->dev = attachment->dev;
	INIT_LIST_HEAD(&a->list);
	attachment->priv = a;

	mutex_lock(&buf->lock);
	if (buf->revoked) {
		mutex_unlock(&buf->lock);
		sg_free_table(&a->table);
		kfree(a);
		return -ENODEV;
	}
	list_add(&a->list, &buf->attachments);
	mutex_unlock(&buf->lock);
	return 0;
}

static void vdh_buf_detach(struct dma_buf *dmabuf,
			   struct dma_buf_attachment *attachment)
{
	struct vdh_buffer *buf = dmabuf->priv;
	struct vdh_attachment *a = attachment->priv;

	mutex_lock(&buf->lock);
	list_del(&a->list);
	mutex_unlock(&buf->lock);
	sg_free_table(&a->table);
	kfree(a);
}

static bool vdh_buf_reachable(struct vdh_buffer *buf)
{
	lockdep_assert_held(&buf->lock);
	return buf->vmap_cnt || buf->dma_mapped || buf->unsettled;
}

/*
 * A revoked buffer that kernel users can still reach: keep its range out of
 * every later session of the window. Called with buf->lock held.
 */
static void vdh_buf_quarantine(struct vdh_buffer *buf)
{
	struct vdh_window *win = buf->vd->win;

	lockdep_assert_held(&buf->lock);
	mutex_lock(&win->lock);
	if (!buf->quarantined) {
		list_add_tail(&buf->qnode, &win->quarantine);
		buf->quarantined = true;
		buf->reserved = false;
	}
	mutex_unlock(&win->lock);
}

/* Its last kernel user let go: new buffers may use the range again. */
static void vdh_buf_unquarantine(struct vdh_buffer *buf)
{
	struct vdh_window *win = buf->vd->win;

	mutex_lock(&win->lock);
	if (buf->quarantined) {
		list_del(&buf->qnode);
		buf->quarantined = false;
		if (buf->reserved && win->owner)
			vdh_remote_unreserve(win->owner, buf->offset, buf->len);
		buf->reserved = false;
	}
	mutex_unlock(&win->lock);
}

/* Called with buf->lock held after a kernel user let go. */
static void vdh_buf_put_user(struct vdh_buffer *buf)
{
	lockdep_assert_held(&buf->lock);
	if (buf->revoked && !vdh_buf_reachable(buf))
		vdh_buf_unquarantine(buf);
}

static void vdh_buf_dma_unmap(const struct vdh_buffer *buf, struct device *dev,
			      struct sg_table *table, enum dma_data_direction dir)
{
	struct scatterlist *sg;
	int i;

	if (buf->span->pages) {
		dma_unmap_sgtable(dev, table, dir, 0);
		return;
	}
	for_each_sgtable_dma_sg(table, sg, i)
		dma_unmap_resource(dev, sg_dma_address(sg), sg_dma_len(sg), dir, 0);
	table->nents = 0;
}

/*
 * A range without struct pages is mapped for DMA as a resource, like other
 * PCI BAR memory: its sg_table carries DMA addresses only. The CPU does not
 * cache it, so there is nothing to sync either.
 */
static int vdh_buf_dma_map(const struct vdh_buffer *buf, struct device *dev,
			   struct sg_table *table, enum dma_data_direction dir)
{
	phys_addr_t phys = PFN_PHYS(buf->pfn);
	struct scatterlist *sg;
	int i;

	if (buf->span->pages)
		return dma_map_sgtable(dev, table, dir, 0);
	for_each_sgtable_sg(table, sg, i) {
		sg_dma_address(sg) = dma_map_resource(dev, phys, sg->length, dir, 0);
		if (dma_mapping_error(dev, sg_dma_address(sg))) {
			table->nents = i;
			vdh_buf_dma_unmap(buf, dev, table, dir);
			return -ENOMEM;
		}
		sg_dma_len(sg) = sg->length;
		phys += sg->length;
	}
	table->nents = table->orig_nents;
	return 0;
}

static struct sg_table *vdh_buf_map(struct dma_buf_attachment *attachment,
				    enum dma_data_direction dir)
{
	struct vdh_attachment *a = attachment->priv;
	struct vdh_buffer *buf = attachment->dmabuf->priv;
	int ret;

	mutex_lock(&buf->lock);
	ret = buf->revoked ? -ENODEV :
	      vdh_buf_dma_map(buf, attachment->dev, &a->table, dir);
	if (!ret) {
		a->mapped = true;
		buf->dma_mapped++;
	}
	mutex_unlock(&buf->lock);
	return ret ? ERR_PTR(ret) : &a->table;
}

static void vdh_buf_unmap(struct dma_buf_attachment *attachment,
			  struct sg_table *table, enum dma_data_direction dir)
{
	struct vdh_attachment *a = attachment->priv;
	struct vdh_buffer *buf = attachment->dmabuf->priv;

	vdh_buf_dma_unmap(buf, attachment->dev, table, dir);
	mutex_lock(&buf->lock);
	a->mapped = false;
	buf->dma_mapped--;
	vdh_buf_put_user(buf);
	mutex_unlock(&buf->lock);
}

static u32 vdh_sync_flags(enum dma_data_direction dir)
{
	switch (dir) {
	case DMA_TO_DEVICE:
		return VIRTIO_DMAHEAP_SYNC_WRITE;
	case DMA_FROM_DEVICE:
		return VIRTIO_DMAHEAP_SYNC_READ;
	case DMA_BIDIRECTIONAL:
		return VIRTIO_DMAHEAP_SYNC_READ | VIRTIO_DMAHEAP_SYNC_WRITE;
	default:
		return 0;
	}
}

/* Forward a CPU access bracket to the host buffer. */
static int vdh_buf_sync_host(struct vdh_buffer *buf,
			     enum dma_data_direction dir, u32 end)
{
	u32 flags = vdh_sync_flags(dir);
	int ret;

	if (!buf->host_sync || !flags || READ_ONCE(buf->revoked))
		return 0;
	ret = vdh_remote_sync(buf->vd, buf->id, flags | end);
	/*
	 * Without a device (removed, or suspended: the session's buffers are out
	 * of the window) there is no host side left to synchronise.
	 */
	return ret == -ENODEV || ret == -EAGAIN ? 0 : ret;
}

static int vdh_buf_begin_cpu_access(struct dma_buf *dmabuf,
				    enum dma_data_direction dir)
{
	struct vdh_buffer *buf = dmabuf->priv;
	struct vdh_attachment *a;
	int ret;

	ret = vdh_buf_sync_host(buf, dir, 0);
	if (ret)
		return ret;

	mutex_lock(&buf->lock);
	list_for_each_entry(a, &buf->attachments, list) {
		if (a->mapped && buf->span->pages)
			dma_sync_sgtable_for_cpu(a->dev, &a->table, dir);
	}
	mutex_unlock(&buf->lock);
	return 0;
}

static int vdh_buf_end_cpu_access(struct dma_buf *dmabuf,
				  enum dma_data_direction dir)
{
	struct vdh_buffer *buf = dmabuf->priv;
	struct vdh_attachment *a;

	mutex_lock(&buf->lock);
	list_for_each_entry(a, &buf->attachments, list) {
		if (a->mapped && buf->span->pages)
			dma_sync_sgtable_for_device(a->dev, &a->table, dir);
	}
	mutex_unlock(&buf->lock);

	return vdh_buf_sync_host(buf, dir, VIRTIO_DMAHEAP_SYNC_END);
}

static int vdh_buf_vmap(struct dma_buf *dmabuf, struct iosys_map *map)
{
	struct vdh_buffer *buf = dmabuf->priv;
	int ret = 0;

	mutex_lock(&buf->lock);
	if (buf->revoked) {
		ret = -ENODEV;
		goto unlock;
	}
	/* The range's own mapping, of the buffer's memory type. */
	buf->vmap_cnt++;
	iosys_map_set_vaddr(map, vdh_buf_kaddr(buf));
unlock:
	mutex_unlock(&buf->lock);
	return ret;
}

static void vdh_buf_vunmap(struct dma_buf *dmabuf, struct iosys_map *map)
{
	struct vdh_buffer *buf = dmabuf->priv;

	mutex_lock(&buf->lock);
	buf->vmap_cnt--;
	vdh_buf_put_user(buf);
	mutex_unlock(&buf->lock);
	iosys_map_clear(map);
}

/*
 * Free a buffer that no dma-buf uses any more, on the device too unless its
 * session ended (the device has forgotten it then) or the caller already
 * dropped its FREE.
 */
void vdh_buf_destroy(struct vdh_buffer *buf)
{
	struct vdh_dev *vd = buf->vd;

	if (buf->free_req && buf->session == READ_ONCE(vd->session))
		vdh_remote_free(vd, buf->free_req, buf->id);
	else
		vdh_free_req_discard(buf->free_req);
	mutex_destroy(&buf->uuid_lock);
	mutex_destroy(&buf->lock);
	kfree(buf);
	vdh_dev_put(vd);
}

static void vdh_buf_release(struct dma_buf *dmabuf)
{
	struct vdh_buffer *buf = dmabuf->priv;
	struct vdh_dev *vd = buf->vd;
	bool pooled;

	if (WARN(buf->vmap_cnt, "%s: buffer still mapped in the kernel\n", __func__))
		buf->revoked = true;	/* never reuse what a kernel user may write */
	vdh_buf_unquarantine(buf);
	vdh_mmaps_drop(&buf->mmaps);
	atomic64_sub(buf->len, &buf->vh->bytes_used);
	atomic_dec(&buf->vh->buffers_used);

	/* Under buffers_lock: a revocation either saw the buffer or sees the pool. */
	mutex_lock(&vd->buffers_lock);
	list_del(&buf->node);
	pooled = !vd->revoked && vdh_pool_put(buf, false);
	mutex_unlock(&vd->buffers_lock);
	if (!pooled)
		vdh_buf_destroy(buf);
}

/*
 * What every table below shares; they differ in attach (virtio_dma_buf's
 * wraps ours) and in vmap (none once revoked).
 */
#define VDH_BUF_OPS_COMMON					\
	.detach = vdh_buf_detach,				\
	.map_dma_buf = vdh_buf_map,				\
	.unmap_dma_buf = vdh_buf_unmap,				\
	.begin_cpu_access = vdh_buf_begin_cpu_access,		\
	.end_cpu_access = vdh_buf_end_cpu_access,		\
	.mmap = vdh_buf_mmap,					\
	.vunmap = vdh_buf_vunmap,				\
	.release = vdh_buf_release

static const struct dma_buf_ops vdh_buf_ops = {
	VDH_BUF_OPS_COMMON,
	.attach = vdh_buf_attach,
	.vmap = vdh_buf_vmap,
};

/*
 * A revoked buffer's operations: the same, without vmap. dma_buf_vmap() WARNs
 * when an exporter's vmap fails, but fails quietly (-EINVAL) when there is
 * none: a kernel user asking a revoked buffer for a new vmap is no kernel bug.
 * (A vmap taken before the revocation stays, refcounted by the core.)
 */
static const struct dma_buf_ops vdh_buf_revoked_ops = {
	VDH_BUF_OPS_COMMON,
	.attach = vdh_buf_attach,
};

#if VDH_UUID
/* The same two, as virtio_dma_bufs (VIRTIO_DMAHEAP_F_UUID). */
static const struct virtio_dma_buf_ops vdh_vbuf_ops = {
	.ops = {
		VDH_BUF_OPS_COMMON,
		.attach = virtio_dma_buf_attach,
		.vmap = vdh_buf_vmap,
	},
	.device_attach = vdh_buf_attach,
	.get_uuid = vdh_buf_get_uuid,
};

/* Still a virtio_dma_buf: virtio_dma_buf_get_uuid() reads the ops twice. */
static const struct virtio_dma_buf_ops vdh_vbuf_revoked_ops = {
	.ops = {
		VDH_BUF_OPS_COMMON,
		.attach = virtio_dma_buf_attach,
	},
	.device_attach = vdh_buf_attach,
	.get_uuid = vdh_buf_get_uuid,
};
#endif

static const struct dma_buf_ops *vdh_buf_revoked_ops_of(struct vdh_buffer *buf)
{
#if VDH_UUID
	if (buf->dmabuf->ops == &vdh_vbuf_ops.ops)
		return &vdh_vbuf_revoked_ops.ops;
#endif
	return &vdh_buf_revoked_ops;
}

/*
 * The buffer's session ended: zap its user mappings (the fault handler maps
 * nothing any more) and quarantine it while kernel users can reach it.
 */
static void vdh_buf_revoke(struct vdh_buffer *buf)
{
	LIST_HEAD(mmaps);
	struct file *file;

	/*
	 * dma_buf_vmap() looks at the ops twice with the reservation lock held:
	 * switch them with it held. The buffer is on vd->buffers, so its
	 * dma-buf is not freed meanwhile (release waits for buffers_lock).
	 */
	dma_resv_lock(buf->dmabuf->resv, NULL);
	mutex_lock(&buf->lock);
	buf->revoked = true;
	list_splice_init(&buf->mmaps, &mmaps);
	if (vdh_buf_reachable(buf))
		vdh_buf_quarantine(buf);
	mutex_unlock(&buf->lock);
	WRITE_ONCE(buf->dmabuf->ops, vdh_buf_revoked_ops_of(buf));
	dma_resv_unlock(buf->dmabuf->resv);

	/* Killed before every mapping was linked: one may escape the zap. */
	if (!vdh_mmaps_settle(&mmaps)) {
		mutex_lock(&buf->lock);
		buf->unsettled = true;
		vdh_buf_quarantine(buf);
		mutex_unlock(&buf->lock);
	}

	/* The file may be on its way out: release() then waits for us. */
	file = get_file_active(&buf->dmabuf->file);
	if (!file)
		return;
	unmap_mapping_range(file->f_mapping, 0, 0, 1);
	fput(file);
}

/* ---- dma-heap ----------------------------------------------------------- */

/*
 * Give @buf the range the device allocated (@got), after checking it lies
 * inside the heap's range of the window, as the heap requires. Called with
 * alloc_sem held.
 */
static int vdh_buf_place(struct vdh_buffer *buf, u64 min_align,
			 const struct virtio_dmaheap_buffer *got)
{
	struct vdh_dev *vd = buf->vd;
	u64 off = le64_to_cpu(got->offset);
	u64 rlen = le64_to_cpu(got->len);

	buf->id = le64_to_cpu(got->buffer_id);
	buf->session = vd->session;
	if (!buf->id || !IS_ALIGNED(off, min_align) || rlen < buf->len ||
	    off < buf->span->offset || off - buf->span->offset >= buf->span->len ||
	    buf->len > buf->span->offset + buf->span->len - off) {
		pr_err_ratelimited("device returned a bad buffer (id %llu offset %#llx len %#llx)\n",
				   buf->id, off, rlen);
		return -EIO;
	}
	buf->offset = off;
	buf->pfn = PHYS_PFN(vd->win->base + off);
	return 0;
}

/* A plain dma-buf, or a virtio_dma_buf if the device gives buffers UUIDs. */
static struct dma_buf *vdh_dma_buf_export(struct vdh_dev *vd,
					  struct dma_buf_export_info *exp_info)
{
#if VDH_UUID
	if (vd->has_uuid) {
		exp_info->ops = &vdh_vbuf_ops.ops;
		return virtio_dma_buf_export(exp_info);
	}
#endif
	exp_info->ops = &vdh_buf_ops;
	return dma_buf_export(exp_info);
}

/* Publish and export a buffer, unless the device was removed meanwhile. */
static int vdh_buf_export(struct vdh_buffer *buf, u32 fd_flags)
{
	DEFINE_DMA_BUF_EXPORT_INFO(exp_info);
	struct vdh_dev *vd = buf->vd;
	int ret = 0;

	exp_info.exp_name = buf->vh->name;
	exp_info.size = buf->len;
	exp_info.flags = fd_flags;
	exp_info.priv = buf;

	mutex_lock(&vd->buffers_lock);
	if (vd->revoked) {
		ret = -ENODEV;
		goto unlock;
	}
	buf->dmabuf = vdh_dma_buf_export(vd, &exp_info);
	if (IS_ERR(buf->dmabuf)) {
		ret = PTR_ERR(buf->dmabuf);
		goto unlock;
	}
	list_add(&buf->node, &vd->buffers);
unlock:
	mutex_unlock(&vd->buffers_lock);
	return ret;
}

/* The allocation itself, with vd->alloc_sem held: no session change meanwhile. */
static int vdh_buf_alloc(struct vdh_buffer *buf, struct vdh_heap_props *props,
			 u32 fd_flags)
{
	struct virtio_dmaheap_alloc_resp resp;
	struct virtio_dmaheap_buffer got;
	int ret;

	ret = vdh_remote_alloc(buf->vd, props->id, buf->len, &resp);
	if (ret)
		return ret;
	got.buffer_id = resp.buffer_id;
	got.offset = resp.offset;
	got.len = resp.len;
	ret = vdh_buf_place(buf, props->min_align, &got);
	if (!ret)
		ret = vdh_buf_export(buf, fd_flags);
	if (ret) {
		vdh_remote_free(buf->vd, buf->free_req, buf->id);
		buf->free_req = NULL;
	}
	return ret;
}

/*
 * A freed buffer of the same heap and size from the pool, zeroed by us as the
 * device would have (here, or ahead in the pool): no round trip to the device.
 * Called with alloc_sem held.
 */
static struct dma_buf *vdh_buf_reuse(struct vdh_dev *vd, struct vdh_heap *vh,
				     size_t len, u32 fd_flags)
{
	struct vdh_buffer *buf;
	int ret;

	buf = vdh_pool_get(vd, vh, len);
	if (!buf)
		return NULL;
	/* Out of the pool, the buffer is ours alone: no lock for pool_clean. */
	if (!buf->pool_clean)
		memset(vdh_buf_kaddr(buf), 0, buf->len);
	ret = vdh_buf_export(buf, fd_flags);
	if (ret) {
		vdh_buf_destroy(buf);
		return ERR_PTR(ret);
	}
	return buf->dmabuf;
}

static struct vdh_buffer *vdh_buf_new(struct vdh_dev *vd, struct vdh_heap *vh,
				      size_t len, const struct vdh_heap_props *props)
{
	struct vdh_buffer *buf;

	buf = kzalloc(sizeof(*buf), GFP_KERNEL);
	if (!buf)
		return NULL;
	/* Its FREE, so that releasing the buffer never needs memory. */
	buf->free_req = vdh_free_req_alloc();
	if (!buf->free_req) {
		kfree(buf);
		return NULL;
	}
	INIT_LIST_HEAD(&buf->attachments);
	INIT_LIST_HEAD(&buf->qnode);
	INIT_LIST_HEAD(&buf->mmaps);
	mutex_init(&buf->lock);
	mutex_init(&buf->uuid_lock);
	buf->vh = vh;
	buf->vd = vd;
	buf->len = len;
	buf->pagecount = len >> PAGE_SHIFT;
	buf->cache = props->cache;
	buf->span = props->span;
	buf->host_sync = vd->has_sync &&
			 !(vd->has_no_sync &&
			   (props->flags & VIRTIO_DMAHEAP_HEAP_F_NO_SYNC));
	return buf;
}

/* A buffer the device never allocated (or that was given back already). */
static void vdh_buf_discard(struct vdh_buffer *buf)
{
	vdh_free_req_discard(buf->free_req);
	mutex_destroy(&buf->uuid_lock);
	mutex_destroy(&buf->lock);
	kfree(buf);
}

/* A new buffer from the device. Called with alloc_sem held. */
static struct dma_buf *vdh_buf_create(struct vdh_dev *vd, struct vdh_heap *vh,
				      size_t len, u32 fd_flags,
				      struct vdh_heap_props *props)
{
	struct vdh_buffer *buf;
	int ret;

	buf = vdh_buf_new(vd, vh, len, props);
	if (!buf)
		return ERR_PTR(-ENOMEM);
	ret = vdh_buf_alloc(buf, props, fd_flags);
	/* Out of quota or window space: what the pool holds may be in the way. */
	if (ret == -ENOMEM && buf->free_req && vdh_pool_flush(vd))
		ret = vdh_buf_alloc(buf, props, fd_flags);
	if (ret) {
		vdh_buf_discard(buf);
		return ERR_PTR(ret);
	}
	/* The buffer's reference to the device. */
	kref_get(&vd->ref);
	return buf->dmabuf;
}

/*
 * Pool a buffer of a batch beside the one handed out, or give it back. The
 * device zeroed it, and nobody has mapped it since.
 */
static void vdh_buf_pool_spare(struct vdh_buffer *buf)
{
	struct vdh_dev *vd = buf->vd;
	bool pooled;

	kref_get(&vd->ref);
	mutex_lock(&vd->buffers_lock);
	pooled = !vd->revoked && vdh_pool_put(buf, true);
	mutex_unlock(&vd->buffers_lock);
	if (!pooled)
		vdh_buf_destroy(buf);
}

/*
 * No pooled buffer of this size: ask the device for @n at once (ALLOC_BATCH),
 * hand out the first and pool the others. NULL: try a plain ALLOC instead (no
 * memory for the batch, or the device is short of quota or window space).
 * Called with alloc_sem held.
 */
static struct dma_buf *vdh_buf_create_batch(struct vdh_dev *vd, struct vdh_heap *vh,
					    size_t len, u32 fd_flags,
					    struct vdh_heap_props *props, unsigned int n)
{
	struct virtio_dmaheap_buffer got[VIRTIO_DMAHEAP_BATCH_MAX];
	struct vdh_req *frees[VIRTIO_DMAHEAP_BATCH_MAX];
	struct vdh_buffer *bufs[VIRTIO_DMAHEAP_BATCH_MAX];
	unsigned int i, count = 0;
	int ret;

	for (i = 0; i < n; i++) {
		bufs[i] = vdh_buf_new(vd, vh, len, props);
		if (!bufs[i])
			break;
		frees[i] = bufs[i]->free_req;
		bufs[i]->free_req = NULL;
	}
	n = i;
	ret = n ? vdh_remote_alloc_batch(vd, props->id, len, n, frees, got) : -ENOMEM;
	/* On success the FREEs are ours again; on failure they are gone. */
	for (i = 0; i < n; i++)
		bufs[i]->free_req = ret > 0 ? frees[i] : NULL;
	if (ret > 0) {
		count = ret;
		ret = 0;
	}
	for (i = 0; i < count && !ret; i++)
		ret = vdh_buf_place(bufs[i], props->min_align, &got[i]);
	if (!ret && count)
		ret = vdh_buf_export(bufs[0], fd_flags);
	if (ret || !count) {
		/* Give back whatever the device allocated; bufs[i] hold no reference. */
		for (i = 0; i < count; i++)
			vdh_remote_free(vd, bufs[i]->free_req, le64_to_cpu(got[i].buffer_id));
		for (i = 0; i < n; i++) {
			if (i < count)
				bufs[i]->free_req = NULL;
			vdh_buf_discard(bufs[i]);
		}
		if (ret != -ENOMEM)
			return ERR_PTR(ret);
		/* Out of quota or window space: make room for the plain ALLOC. */
		vdh_pool_flush(vd);
		return NULL;
	}
	for (i = count; i < n; i++)
		vdh_buf_discard(bufs[i]);
	for (i = 1; i < count; i++)
		vdh_buf_pool_spare(bufs[i]);
	kref_get(&vd->ref);
	return bufs[0]->dmabuf;
}

static struct dma_buf *vdh_heap_allocate(struct dma_heap *heap,
					 unsigned long len, u32 fd_flags,
					 u64 heap_flags)
{
	struct vdh_heap *vh = dma_heap_get_drvdata(heap);
	struct vdh_heap_props props;
	struct dma_buf *dmabuf;
	struct vdh_dev *vd;
	unsigned int n;
	int ret;

	vd = vdh_heap_get_dev(vh, &props);
	if (!vd)
		return ERR_PTR(-ENODEV);
	dmabuf = ERR_PTR(-EINVAL);
	if (!len || !PAGE_ALIGNED(len) || len > props.max_size)
		goto put_dev;

	ret = down_read_killable(&vd->alloc_sem);
	if (ret) {
		dmabuf = ERR_PTR(ret);
		goto put_dev;
	}
	dmabuf = vdh_buf_reuse(vd, vh, len, fd_flags);
	n = dmabuf ? 0 : vdh_pool_batch(vd, &props, len);
	if (n > 1)
		dmabuf = vdh_buf_create_batch(vd, vh, len, fd_flags, &props, n);
	if (!dmabuf)
		dmabuf = vdh_buf_create(vd, vh, len, fd_flags, &props);
	up_read(&vd->alloc_sem);
	if (!IS_ERR(dmabuf)) {
		atomic64_add(len, &vh->bytes_used);
		atomic_inc(&vh->buffers_used);
	}
put_dev:
	vdh_dev_put(vd);
	return dmabuf;
}

const struct dma_heap_ops vdh_heap_ops = {
	.allocate = vdh_heap_allocate,
};

/* The session ends: revoke every buffer it handed out. */
void vdh_buffers_revoke(struct vdh_dev *vd)
{
	struct vdh_buffer *buf;

	mutex_lock(&vd->buffers_lock);
	vd->revoked = true;
	list_for_each_entry(buf, &vd->buffers, node)
		vdh_buf_revoke(buf);
	mutex_unlock(&vd->buffers_lock);
	/* Nothing is pooled once vd->revoked is set. */
	vdh_pool_drop(vd);
}

/* ---- quarantine: window ranges of revoked buffers ----------------------- */

/*
 * A new session of @vd begins on @win: reserve the range of every quarantined
 * buffer in it. Without sessions (@vd NULL) nothing can be reserved: -EBUSY
 * while anything is quarantined.
 */
int vdh_window_reserve(struct vdh_window *win, struct vdh_dev *vd)
{
	struct vdh_buffer *buf;
	int ret = 0;

	mutex_lock(&win->lock);
	if (!vd) {
		ret = list_empty(&win->quarantine) ? 0 : -EBUSY;
		goto unlock;
	}
	win->owner = vd;
	list_for_each_entry(buf, &win->quarantine, qnode) {
		ret = vdh_remote_reserve(vd, buf->offset, buf->len);
		if (ret) {
			dev_err(&vd->vdev->dev,
				"cannot keep window range %#llx+%#zx of an old buffer out of new buffers: %d\n",
				buf->offset, buf->len, ret);
			break;
		}
		buf->reserved = true;
	}
unlock:
	mutex_unlock(&win->lock);
	return ret;
}

/* @vd's session ends: its reservations go with it. */
void vdh_window_disown(struct vdh_window *win, struct vdh_dev *vd)
{
	struct vdh_buffer *buf;

	mutex_lock(&win->lock);
	if (win->owner == vd) {
		win->owner = NULL;
		list_for_each_entry(buf, &win->quarantine, qnode)
			buf->reserved = false;
	}
	mutex_unlock(&win->lock);
}
