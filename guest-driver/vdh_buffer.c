// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-dmaheap: allocation and the dma-buf side of a buffer. A buffer is a
 * physically contiguous range of the buffer window, so its sg_table, user
 * mappings and vmap are built from a pfn and a length, the way the system
 * and CMA heaps build theirs from their pages.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/dma-buf.h>
#include <linux/dma-heap.h>
#include <linux/dma-mapping.h>
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
#include <linux/vmalloc.h>

#include "vdh.h"

/* Largest scatterlist segment; sg->length is 32 bits. */
#define VDH_SEG_MAX		SZ_1G

struct vdh_buffer {
	struct vdh_heap *vh;
	struct vdh_dev *vd;
	struct dma_buf *dmabuf;
	struct list_head node;		/* in vd->buffers */
	struct mutex lock;		/* protects attachments, vmap, revoked */
	struct list_head attachments;
	u64 id;
	u32 cache;			/* VIRTIO_DMAHEAP_CACHE_* */
	unsigned long pfn;
	size_t len;
	pgoff_t pagecount;
	int vmap_cnt;
	void *vaddr;
	bool revoked;
};

struct vdh_attachment {
	struct device *dev;
	struct sg_table table;
	struct list_head list;
	bool mapped;
};

/*
 * On x86, memremap_pages() registered the whole window as write-back with
 * PAT, and remap_pfn_range() refuses a conflicting memory type. The window is
 * host RAM, cache-coherent with the guest, so write-back is right there.
 */
static pgprot_t vdh_pgprot(u32 cache, pgprot_t prot)
{
	if (IS_ENABLED(CONFIG_X86))
		return prot;
	switch (cache) {
	case VIRTIO_DMAHEAP_CACHE_UNCACHED:
		return pgprot_noncached(prot);
	case VIRTIO_DMAHEAP_CACHE_WC:
		return pgprot_writecombine(prot);
	default:
		return prot;
	}
}

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

		sg_set_page(sg, pfn_to_page(buf->pfn + PHYS_PFN(off)), n, 0);
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

static struct sg_table *vdh_buf_map(struct dma_buf_attachment *attachment,
				    enum dma_data_direction dir)
{
	struct vdh_attachment *a = attachment->priv;
	int ret;

	ret = dma_map_sgtable(attachment->dev, &a->table, dir, 0);
	if (ret)
		return ERR_PTR(ret);
	a->mapped = true;
	return &a->table;
}

static void vdh_buf_unmap(struct dma_buf_attachment *attachment,
			  struct sg_table *table, enum dma_data_direction dir)
{
	struct vdh_attachment *a = attachment->priv;

	a->mapped = false;
	dma_unmap_sgtable(attachment->dev, table, dir, 0);
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

	if (!buf->vd->has_sync || !flags)
		return 0;
	ret = vdh_remote_sync(buf->vd, buf->id, flags | end);
	/* Without a device there is no host side left to synchronise. */
	return ret == -ENODEV ? 0 : ret;
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
	if (buf->vmap_cnt)
		invalidate_kernel_vmap_range(buf->vaddr, buf->len);
	list_for_each_entry(a, &buf->attachments, list) {
		if (a->mapped)
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
	if (buf->vmap_cnt)
		flush_kernel_vmap_range(buf->vaddr, buf->len);
	list_for_each_entry(a, &buf->attachments, list) {
		if (a->mapped)
			dma_sync_sgtable_for_device(a->dev, &a->table, dir);
	}
	mutex_unlock(&buf->lock);

	return vdh_buf_sync_host(buf, dir, VIRTIO_DMAHEAP_SYNC_END);
}

/* Only reached after remove() zapped the mapping: the host memory is gone. */
static vm_fault_t vdh_vm_fault(struct vm_fault *vmf)
{
	return VM_FAULT_SIGBUS;
}

static const struct vm_operations_struct vdh_vm_ops = {
	.fault = vdh_vm_fault,
};

/*
 * Like the system heap: map everything at once, shared or private (a private
 * mapping copies on write).
 */
static int vdh_buf_mmap(struct dma_buf *dmabuf, struct vm_area_struct *vma)
{
	struct vdh_buffer *buf = dmabuf->priv;
	unsigned long npages = vma_pages(vma);
	int ret;

	if (vma->vm_pgoff >= buf->pagecount ||
	    npages > buf->pagecount - vma->vm_pgoff)
		return -EINVAL;

	mutex_lock(&buf->lock);
	if (buf->revoked) {
		ret = -ENODEV;
		goto unlock;
	}
	vma->vm_ops = &vdh_vm_ops;
	ret = remap_pfn_range(vma, vma->vm_start, buf->pfn + vma->vm_pgoff,
			      npages << PAGE_SHIFT,
			      vdh_pgprot(buf->cache, vma->vm_page_prot));
unlock:
	mutex_unlock(&buf->lock);
	return ret;
}

static void *vdh_buf_do_vmap(struct vdh_buffer *buf)
{
	struct page **pages;
	void *vaddr;
	pgoff_t i;

	pages = kvmalloc_array(buf->pagecount, sizeof(*pages), GFP_KERNEL);
	if (!pages)
		return ERR_PTR(-ENOMEM);
	for (i = 0; i < buf->pagecount; i++)
		pages[i] = pfn_to_page(buf->pfn + i);
	vaddr = vmap(pages, buf->pagecount, VM_MAP,
		     vdh_pgprot(buf->cache, PAGE_KERNEL));
	kvfree(pages);
	return vaddr ?: ERR_PTR(-ENOMEM);
}

static int vdh_buf_vmap(struct dma_buf *dmabuf, struct iosys_map *map)
{
	struct vdh_buffer *buf = dmabuf->priv;
	void *vaddr;
	int ret = 0;

	mutex_lock(&buf->lock);
	if (!buf->vmap_cnt) {
		vaddr = vdh_buf_do_vmap(buf);
		if (IS_ERR(vaddr)) {
			ret = PTR_ERR(vaddr);
			goto unlock;
		}
		buf->vaddr = vaddr;
	}
	buf->vmap_cnt++;
	iosys_map_set_vaddr(map, buf->vaddr);
unlock:
	mutex_unlock(&buf->lock);
	return ret;
}

static void vdh_buf_vunmap(struct dma_buf *dmabuf, struct iosys_map *map)
{
	struct vdh_buffer *buf = dmabuf->priv;

	mutex_lock(&buf->lock);
	if (!--buf->vmap_cnt) {
		vunmap(buf->vaddr);
		buf->vaddr = NULL;
	}
	mutex_unlock(&buf->lock);
	iosys_map_clear(map);
}

static void vdh_buf_release(struct dma_buf *dmabuf)
{
	struct vdh_buffer *buf = dmabuf->priv;
	struct vdh_dev *vd = buf->vd;

	if (WARN(buf->vmap_cnt, "%s: buffer still mapped in the kernel\n", __func__))
		vunmap(buf->vaddr);

	mutex_lock(&vd->buffers_lock);
	list_del(&buf->node);
	mutex_unlock(&vd->buffers_lock);

	vdh_remote_free(vd, buf->id);
	atomic64_sub(buf->len, &buf->vh->bytes_used);
	atomic_dec(&buf->vh->buffers_used);
	mutex_destroy(&buf->lock);
	kfree(buf);
	vdh_dev_put(vd);
}

static const struct dma_buf_ops vdh_buf_ops = {
	.attach = vdh_buf_attach,
	.detach = vdh_buf_detach,
	.map_dma_buf = vdh_buf_map,
	.unmap_dma_buf = vdh_buf_unmap,
	.begin_cpu_access = vdh_buf_begin_cpu_access,
	.end_cpu_access = vdh_buf_end_cpu_access,
	.mmap = vdh_buf_mmap,
	.vmap = vdh_buf_vmap,
	.vunmap = vdh_buf_vunmap,
	.release = vdh_buf_release,
};

/* Zap the user mappings of a buffer whose host memory went away. */
static void vdh_buf_revoke(struct vdh_buffer *buf)
{
	struct file *file;

	mutex_lock(&buf->lock);
	buf->revoked = true;
	mutex_unlock(&buf->lock);

	/* The file may be on its way out: release() then waits for us. */
	file = get_file_active(&buf->dmabuf->file);
	if (!file)
		return;
	unmap_mapping_range(file->f_mapping, 0, 0, 1);
	fput(file);
}

/* ---- dma-heap ----------------------------------------------------------- */

static int vdh_check_alloc(struct vdh_dev *vd, size_t len, u64 min_align,
			   const struct virtio_dmaheap_alloc_resp *resp)
{
	u64 off = le64_to_cpu(resp->offset);
	u64 rlen = le64_to_cpu(resp->len);

	if (!resp->buffer_id || !IS_ALIGNED(off, min_align) || rlen < len ||
	    off >= vd->win->size || len > vd->win->size - off) {
		pr_err_ratelimited("device returned a bad buffer (id %llu offset %#llx len %#llx)\n",
				   le64_to_cpu(resp->buffer_id), off, rlen);
		return -EIO;
	}
	return 0;
}

/* Publish and export a buffer, unless the device was removed meanwhile. */
static int vdh_buf_export(struct vdh_buffer *buf, u32 fd_flags)
{
	DEFINE_DMA_BUF_EXPORT_INFO(exp_info);
	struct vdh_dev *vd = buf->vd;
	int ret = 0;

	exp_info.exp_name = buf->vh->name;
	exp_info.ops = &vdh_buf_ops;
	exp_info.size = buf->len;
	exp_info.flags = fd_flags;
	exp_info.priv = buf;

	mutex_lock(&vd->buffers_lock);
	if (vd->revoked) {
		ret = -ENODEV;
		goto unlock;
	}
	buf->dmabuf = dma_buf_export(&exp_info);
	if (IS_ERR(buf->dmabuf)) {
		ret = PTR_ERR(buf->dmabuf);
		goto unlock;
	}
	list_add(&buf->node, &vd->buffers);
unlock:
	mutex_unlock(&vd->buffers_lock);
	return ret;
}

static struct dma_buf *vdh_heap_allocate(struct dma_heap *heap,
					 unsigned long len, u32 fd_flags,
					 u64 heap_flags)
{
	struct vdh_heap *vh = dma_heap_get_drvdata(heap);
	struct virtio_dmaheap_alloc_resp resp;
	struct vdh_heap_props props;
	struct vdh_buffer *buf;
	struct vdh_dev *vd;
	int ret;

	vd = vdh_heap_get_dev(vh, &props);
	if (!vd)
		return ERR_PTR(-ENODEV);
	ret = -EINVAL;
	if (!len || !PAGE_ALIGNED(len) || len > props.max_size)
		goto put_dev;

	ret = -ENOMEM;
	buf = kzalloc(sizeof(*buf), GFP_KERNEL);
	if (!buf)
		goto put_dev;
	INIT_LIST_HEAD(&buf->attachments);
	mutex_init(&buf->lock);
	buf->vh = vh;
	buf->vd = vd;
	buf->len = len;
	buf->pagecount = len >> PAGE_SHIFT;
	buf->cache = props.cache;

	ret = vdh_remote_alloc(vd, props.id, len, &resp);
	if (ret)
		goto free_buffer;
	buf->id = le64_to_cpu(resp.buffer_id);
	ret = vdh_check_alloc(vd, len, props.min_align, &resp);
	if (ret)
		goto free_remote;
	buf->pfn = PHYS_PFN(vd->win->base + le64_to_cpu(resp.offset));

	ret = vdh_buf_export(buf, fd_flags);
	if (ret)
		goto free_remote;
	atomic64_add(len, &vh->bytes_used);
	atomic_inc(&vh->buffers_used);
	return buf->dmabuf;

free_remote:
	vdh_remote_free(vd, buf->id);
free_buffer:
	mutex_destroy(&buf->lock);
	kfree(buf);
put_dev:
	vdh_dev_put(vd);
	return ERR_PTR(ret);
}

const struct dma_heap_ops vdh_heap_ops = {
	.allocate = vdh_heap_allocate,
};

/* The device is gone: revoke every buffer it handed out. */
void vdh_buffers_revoke(struct vdh_dev *vd)
{
	struct vdh_buffer *buf;

	mutex_lock(&vd->buffers_lock);
	vd->revoked = true;
	list_for_each_entry(buf, &vd->buffers, node)
		vdh_buf_revoke(buf);
	mutex_unlock(&vd->buffers_lock);
}
