// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-dmaheap: the buffer window (shared memory region 0) and its heap
 * ranges.
 *
 * Every heap's buffers lie in one range of the window (with
 * VIRTIO_DMAHEAP_F_HEAP_RANGE the device states it; without, it is the whole
 * window). Each range is mapped once, with the memory type of its heaps'
 * cache attribute, and never with another:
 *  - CACHED ranges get struct pages (ZONE_DEVICE, MEMORY_DEVICE_GENERIC),
 *    write-back in the direct map, as the system heap's pages are;
 *  - WC and UNCACHED ranges get no struct pages, which would put a
 *    write-back alias in the direct map, only a kernel mapping of their own
 *    type. On x86 that mapping also reserves the range's PAT memory type,
 *    which user mappings then get. UNCACHED is UC- on x86 and Normal-NC
 *    elsewhere (arm64 has no uncached normal type beyond it; its Device types
 *    fault on unaligned accesses, which user space copies make).
 * A CACHED range the direct map cannot reach (arm64 kernels with 39-bit
 * virtual addresses and a window above 256 GiB, as QEMU's virt machine puts
 * 64-bit BARs at 512 GiB) is mapped write-back without struct pages instead.
 * A range stays mapped until the window goes: buffers of an earlier binding
 * may still use it.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/err.h>
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/slab.h>
#include <linux/virtio_config.h>

#include "vdh.h"

static bool cached_pages = true;
module_param(cached_pages, bool, 0644);
MODULE_PARM_DESC(cached_pages,
		 "Give cached heap ranges struct pages, as importers that need pages expect (default: Y; N maps them like the others)");

static DEFINE_MUTEX(vdh_windows_lock);
static LIST_HEAD(vdh_windows);

/* ---- heap ranges -------------------------------------------------------- */

static bool vdh_span_uc_minus(u32 cache)
{
	return IS_ENABLED(CONFIG_X86) && cache == VIRTIO_DMAHEAP_CACHE_UNCACHED;
}

static void *vdh_span_map_pages(struct vdh_span *span, phys_addr_t start,
				int nid)
{
	span->pgmap.type = MEMORY_DEVICE_GENERIC;
	span->pgmap.range.start = start;
	span->pgmap.range.end = start + span->len - 1;
	span->pgmap.nr_range = 1;
	return memremap_pages(&span->pgmap, nid);
}

/* A kernel mapping of @span with its memory type, without struct pages. */
static void *vdh_span_remap(struct vdh_span *span, phys_addr_t start)
{
	void *vaddr;

	/* memremap() has no uncached type; ioremap() is UC- on x86. */
	if (vdh_span_uc_minus(span->cache))
		vaddr = (void __force *)ioremap(start, span->len);
	else
		vaddr = memremap(start, span->len,
				 span->cache == VIRTIO_DMAHEAP_CACHE_CACHED ?
				 MEMREMAP_WB : MEMREMAP_WC);
	return vaddr ?: ERR_PTR(-ENOMEM);
}

static void vdh_span_unmap(struct vdh_span *span)
{
	if (span->pages)
		memunmap_pages(&span->pgmap);
	else if (vdh_span_uc_minus(span->cache))
		iounmap((void __iomem __force *)span->vaddr);
	else
		memunmap(span->vaddr);
}

static struct vdh_span *vdh_span_create(struct vdh_window *win, u64 offset,
					u64 len, u32 cache, int nid)
{
	phys_addr_t start = win->base + offset;
	struct vdh_span *span;
	void *vaddr;

	span = kzalloc(sizeof(*span), GFP_KERNEL);
	if (!span)
		return ERR_PTR(-ENOMEM);
	span->offset = offset;
	span->len = len;
	span->cache = cache;
	span->pages = cache == VIRTIO_DMAHEAP_CACHE_CACHED && READ_ONCE(cached_pages);
	if (span->pages) {
		vaddr = vdh_span_map_pages(span, start, nid);
		if (IS_ERR(vaddr)) {
			pr_notice("window range %#llx+%#llx: cannot give it struct pages: %pe\n",
				  offset, len, vaddr);
			span->pages = false;
		}
	}
	if (!span->pages)
		vaddr = vdh_span_remap(span, start);
	if (IS_ERR(vaddr)) {
		kfree(span);
		return vaddr;
	}
	span->vaddr = vaddr;
	pr_info("window range %#llx+%#llx: %s, %s\n", offset, len,
		vdh_cache_name(cache), span->pages ? "struct pages" : "no struct pages");
	return span;
}

static bool vdh_range_ok(const struct vdh_window *win, u64 offset, u64 len)
{
	if (!len || offset >= win->size || len > win->size - offset)
		return false;
	if (!offset && len == win->size)
		return true;
	return IS_ALIGNED(offset, VIRTIO_DMAHEAP_RANGE_ALIGN) &&
	       IS_ALIGNED(len, VIRTIO_DMAHEAP_RANGE_ALIGN) &&
	       IS_ALIGNED(offset | len, memremap_compat_align());
}

/*
 * The mapping of the heap range @offset+@len with the memory type of @cache,
 * made now if the window has none yet. -EBUSY if the range overlaps one
 * mapped differently: mapping it too would give memory two types.
 */
struct vdh_span *vdh_window_span(struct vdh_window *win, u64 offset, u64 len,
				 u32 cache, int nid)
{
	struct vdh_span *span;

	if (!vdh_range_ok(win, offset, len))
		return ERR_PTR(-EINVAL);
	mutex_lock(&win->spans_lock);
	list_for_each_entry(span, &win->spans, node) {
		if (offset >= span->offset + span->len ||
		    span->offset >= offset + len)
			continue;
		if (span->offset != offset || span->len != len ||
		    span->cache != cache)
			span = ERR_PTR(-EBUSY);
		goto unlock;
	}
	span = vdh_span_create(win, offset, len, cache, nid);
	if (!IS_ERR(span))
		list_add(&span->node, &win->spans);
unlock:
	mutex_unlock(&win->spans_lock);
	return span;
}

/* ---- the window --------------------------------------------------------- */

static void vdh_window_release(struct kref *ref)
{
	struct vdh_window *win = container_of(ref, struct vdh_window, ref);
	struct vdh_span *span, *tmp;

	list_del(&win->node);
	mutex_unlock(&vdh_windows_lock);
	list_for_each_entry_safe(span, tmp, &win->spans, node) {
		vdh_span_unmap(span);
		kfree(span);
	}
	release_mem_region(win->base, win->size);
	mutex_destroy(&win->spans_lock);
	mutex_destroy(&win->lock);
	kfree(win);
}

void vdh_window_put(struct vdh_window *win)
{
	kref_put_mutex(&win->ref, vdh_window_release, &vdh_windows_lock);
}

static struct vdh_window *vdh_window_create(const struct virtio_shm_region *reg)
{
	struct vdh_window *win;

	win = kzalloc(sizeof(*win), GFP_KERNEL);
	if (!win)
		return ERR_PTR(-ENOMEM);
	kref_init(&win->ref);
	mutex_init(&win->lock);
	mutex_init(&win->spans_lock);
	INIT_LIST_HEAD(&win->quarantine);
	INIT_LIST_HEAD(&win->spans);
	win->base = reg->addr;
	win->size = reg->len;
	win->res = request_mem_region(win->base, win->size, KBUILD_MODNAME);
	if (!win->res) {
		mutex_destroy(&win->spans_lock);
		mutex_destroy(&win->lock);
		kfree(win);
		return ERR_PTR(-EBUSY);
	}
	list_add(&win->node, &vdh_windows);
	return win;
}

/*
 * Get the device's buffer window. A window of an earlier binding of the same
 * region is reused while its buffers are alive, with its mapped ranges.
 */
struct vdh_window *vdh_window_get(struct virtio_device *vdev)
{
	struct virtio_shm_region reg;
	struct vdh_window *win;

	if (!virtio_get_shm_region(vdev, &reg, VIRTIO_DMAHEAP_SHM_BUFFERS)) {
		dev_err(&vdev->dev, "no buffer window (shared memory region %d)\n",
			VIRTIO_DMAHEAP_SHM_BUFFERS);
		return ERR_PTR(-ENODEV);
	}
	if (!reg.len || !IS_ALIGNED(reg.addr | reg.len, memremap_compat_align())) {
		dev_err(&vdev->dev, "buffer window %#llx+%#llx not %#lx-aligned\n",
			reg.addr, reg.len, memremap_compat_align());
		return ERR_PTR(-EINVAL);
	}

	mutex_lock(&vdh_windows_lock);
	list_for_each_entry(win, &vdh_windows, node) {
		if (win->base == reg.addr && win->size == reg.len) {
			kref_get(&win->ref);
			goto unlock;
		}
	}
	win = vdh_window_create(&reg);
	if (IS_ERR(win))
		dev_err(&vdev->dev, "cannot claim buffer window %#llx+%#llx: %pe\n",
			reg.addr, reg.len, win);
unlock:
	mutex_unlock(&vdh_windows_lock);
	return win;
}
