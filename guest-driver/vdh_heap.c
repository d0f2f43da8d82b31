// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-dmaheap: the guest dma-heaps. Each device heap becomes the dma-heap
 * heap_prefix + name. A dma-heap cannot be removed, so a heap outlives the
 * device that exported it and is taken over by the next device exporting a
 * heap of that name. Properties: virtioN/heaps/<name>/ in sysfs.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/ctype.h>
#include <linux/dma-heap.h>
#include <linux/err.h>
#include <linux/log2.h>
#include <linux/module.h>
#include <linux/namei.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/sysfs.h>

#include "vdh.h"

static char *heap_prefix = "";
module_param(heap_prefix, charp, 0444);
MODULE_PARM_DESC(heap_prefix, "Prefix of the guest dma-heap names (default: none)");

static DEFINE_MUTEX(vdh_heaps_lock);	/* protects vdh_heaps, heap attach */
static LIST_HEAD(vdh_heaps);

/* A heap's directory in sysfs, created per device binding. */
struct vdh_heap_kobj {
	struct kobject kobj;
	struct vdh_heap *vh;
};

/* Take a reference on the device behind @vh and snapshot the heap's props. */
struct vdh_dev *vdh_heap_get_dev(struct vdh_heap *vh,
				 struct vdh_heap_props *props)
{
	struct vdh_dev *vd;

	spin_lock(&vh->lock);
	vd = vh->vd;
	if (vd)
		kref_get(&vd->ref);
	*props = vh->props;
	spin_unlock(&vh->lock);
	return vd;
}

/* ---- sysfs: virtioN/heaps/<name>/ --------------------------------------- */

#define to_vdh_heap(k) (container_of(k, struct vdh_heap_kobj, kobj)->vh)

static const char * const vdh_cache_names[] = {
	[VIRTIO_DMAHEAP_CACHE_CACHED] = "cached",
	[VIRTIO_DMAHEAP_CACHE_UNCACHED] = "uncached",
	[VIRTIO_DMAHEAP_CACHE_WC] = "write-combined",
};

const char *vdh_cache_name(u32 cache)
{
	return cache < ARRAY_SIZE(vdh_cache_names) ? vdh_cache_names[cache] : "unknown";
}

static struct vdh_heap_props vdh_heap_props(struct kobject *kobj)
{
	struct vdh_heap *vh = to_vdh_heap(kobj);
	struct vdh_heap_props props;

	spin_lock(&vh->lock);
	props = vh->props;
	spin_unlock(&vh->lock);
	return props;
}

static ssize_t heap_id_show(struct kobject *kobj, struct kobj_attribute *attr,
			    char *buf)
{
	return sysfs_emit(buf, "%u\n", vdh_heap_props(kobj).id);
}

static struct kobj_attribute heap_id_attr = __ATTR_RO(heap_id);

static ssize_t contiguous_show(struct kobject *kobj,
			       struct kobj_attribute *attr, char *buf)
{
	u32 flags = vdh_heap_props(kobj).flags;

	return sysfs_emit(buf, "%d\n", !!(flags & VIRTIO_DMAHEAP_HEAP_F_CONTIGUOUS));
}

static struct kobj_attribute contiguous_attr = __ATTR_RO(contiguous);

static ssize_t cache_show(struct kobject *kobj, struct kobj_attribute *attr,
			  char *buf)
{
	return sysfs_emit(buf, "%s\n", vdh_cache_names[vdh_heap_props(kobj).cache]);
}

static struct kobj_attribute cache_attr = __ATTR_RO(cache);

static ssize_t min_align_show(struct kobject *kobj,
			      struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%llu\n", vdh_heap_props(kobj).min_align);
}

static struct kobj_attribute min_align_attr = __ATTR_RO(min_align);

static ssize_t max_size_show(struct kobject *kobj, struct kobj_attribute *attr,
			     char *buf)
{
	return sysfs_emit(buf, "%llu\n", vdh_heap_props(kobj).max_size);
}

static struct kobj_attribute max_size_attr = __ATTR_RO(max_size);

static ssize_t capacity_show(struct kobject *kobj, struct kobj_attribute *attr,
			     char *buf)
{
	return sysfs_emit(buf, "%llu\n", vdh_heap_props(kobj).capacity);
}

static struct kobj_attribute capacity_attr = __ATTR_RO(capacity);

static ssize_t bytes_used_show(struct kobject *kobj,
			       struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%lld\n",
			  atomic64_read(&to_vdh_heap(kobj)->bytes_used));
}

static struct kobj_attribute bytes_used_attr = __ATTR_RO(bytes_used);

static ssize_t buffers_used_show(struct kobject *kobj,
				 struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%d\n",
			  atomic_read(&to_vdh_heap(kobj)->buffers_used));
}

static struct kobj_attribute buffers_used_attr = __ATTR_RO(buffers_used);

static ssize_t bytes_pooled_show(struct kobject *kobj,
				 struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%lld\n",
			  atomic64_read(&to_vdh_heap(kobj)->bytes_pooled));
}

static struct kobj_attribute bytes_pooled_attr = __ATTR_RO(bytes_pooled);

static ssize_t buffers_pooled_show(struct kobject *kobj,
				   struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%d\n",
			  atomic_read(&to_vdh_heap(kobj)->buffers_pooled));
}

static struct kobj_attribute buffers_pooled_attr = __ATTR_RO(buffers_pooled);

static struct attribute *vdh_heap_attrs[] = {
	&heap_id_attr.attr,
	&contiguous_attr.attr,
	&cache_attr.attr,
	&min_align_attr.attr,
	&max_size_attr.attr,
	&capacity_attr.attr,
	&bytes_used_attr.attr,
	&buffers_used_attr.attr,
	&bytes_pooled_attr.attr,
	&buffers_pooled_attr.attr,
	NULL,
};
ATTRIBUTE_GROUPS(vdh_heap);

static void vdh_heap_kobj_release(struct kobject *kobj)
{
	kfree(container_of(kobj, struct vdh_heap_kobj, kobj));
}

static const struct kobj_type vdh_heap_ktype = {
	.release = vdh_heap_kobj_release,
	.sysfs_ops = &kobj_sysfs_ops,
	.default_groups = vdh_heap_groups,
};

static struct vdh_heap_kobj *vdh_heap_kobj_add(struct vdh_dev *vd,
					       struct vdh_heap *vh)
{
	struct vdh_heap_kobj *hk;
	int ret;

	hk = kzalloc(sizeof(*hk), GFP_KERNEL);
	if (!hk)
		return ERR_PTR(-ENOMEM);
	hk->vh = vh;
	ret = kobject_init_and_add(&hk->kobj, &vdh_heap_ktype, vd->heaps_kobj,
				   "%s", vh->name);
	if (ret) {
		kobject_put(&hk->kobj);
		return ERR_PTR(ret);
	}
	kobject_uevent(&hk->kobj, KOBJ_ADD);
	return hk;
}

/* ---- heap registration -------------------------------------------------- */

/* A heap name becomes a device node name: keep it tame (`linux,cma` is fine). */
static bool vdh_name_ok(const char *name)
{
	if (!*name)
		return false;
	for (; *name; name++) {
		if (!isalnum(*name) && !strchr("_-.,", *name))
			return false;
	}
	return true;
}

static int vdh_check_info(const struct virtio_dmaheap_heap_info *info)
{
	u64 align = le64_to_cpu(info->min_align);

	if (strnlen(info->name, sizeof(info->name)) == sizeof(info->name) ||
	    !vdh_name_ok(info->name))
		return -EINVAL;
	if (!is_power_of_2(align) || align < VIRTIO_DMAHEAP_PAGE_SIZE)
		return -EINVAL;
	if (le32_to_cpu(info->cache) >= ARRAY_SIZE(vdh_cache_names))
		return -EINVAL;
	return 0;
}

/*
 * dma_heap_add() notices a taken name only after creating the device node,
 * with a sysfs warning and a stack dump: look for the heap class device
 * first. Without sysfs mounted this finds nothing and dma_heap_add() decides.
 */
static bool vdh_heap_name_taken(const char *name)
{
	struct path path;
	char *sysfs;
	int ret;

	sysfs = kasprintf(GFP_KERNEL, "/sys/class/dma_heap/%s", name);
	if (!sysfs)
		return false;
	ret = kern_path(sysfs, 0, &path);
	kfree(sysfs);
	if (ret)
		return false;
	path_put(&path);
	return true;
}

/* Find the guest heap called @name, registering it if it is new. */
static struct vdh_heap *vdh_heap_lookup(const char *name)
{
	struct dma_heap_export_info exp_info = {};
	struct vdh_heap *vh;
	int ret;

	lockdep_assert_held(&vdh_heaps_lock);
	list_for_each_entry(vh, &vdh_heaps, node) {
		if (strcmp(vh->name, name))
			continue;
		return vh->vd ? ERR_PTR(-EBUSY) : vh;
	}
	if (vdh_heap_name_taken(name))
		return ERR_PTR(-EEXIST);

	vh = kzalloc(sizeof(*vh), GFP_KERNEL);
	if (!vh)
		return ERR_PTR(-ENOMEM);
	ret = -ENOMEM;
	vh->name = kstrdup(name, GFP_KERNEL);
	if (!vh->name)
		goto free_heap;
	spin_lock_init(&vh->lock);
	exp_info.name = vh->name;
	exp_info.ops = &vdh_heap_ops;
	exp_info.priv = vh;
	vh->heap = dma_heap_add(&exp_info);
	if (IS_ERR(vh->heap)) {
		ret = PTR_ERR(vh->heap);
		goto free_name;
	}
	list_add(&vh->node, &vdh_heaps);
	return vh;

free_name:
	kfree(vh->name);
free_heap:
	kfree(vh);
	return ERR_PTR(ret);
}

static void vdh_heap_attach(struct vdh_heap *vh, struct vdh_dev *vd, u32 id,
			    const struct virtio_dmaheap_heap_info *info,
			    struct vdh_span *span)
{
	u64 max_size = le64_to_cpu(info->max_size);
	struct vdh_heap_props props = {
		.id = id,
		.flags = le32_to_cpu(info->flags),
		.cache = le32_to_cpu(info->cache),
		.min_align = le64_to_cpu(info->min_align),
		.max_size = max_size ? min(max_size, span->len) : span->len,
		.capacity = le64_to_cpu(info->capacity),
		.span = span,
	};

	kref_get(&vd->ref);
	spin_lock(&vh->lock);
	vh->vd = vd;
	vh->props = props;
	spin_unlock(&vh->lock);
}

static void vdh_heap_detach(struct vdh_heap *vh)
{
	struct vdh_dev *vd;

	spin_lock(&vh->lock);
	vd = vh->vd;
	vh->vd = NULL;
	spin_unlock(&vh->lock);
	if (vd)
		vdh_dev_put(vd);
}

/*
 * The mapping of the heap's range, with the memory type its cache attribute
 * names; refused if that would give memory a second type.
 */
static struct vdh_span *vdh_heap_span(struct vdh_dev *vd,
				      const struct virtio_dmaheap_heap_info *info,
				      const struct virtio_dmaheap_heap_range *range)
{
	u64 offset = le64_to_cpu(range->offset), len = le64_to_cpu(range->len);
	u32 cache = le32_to_cpu(info->cache);
	struct vdh_span *span;

	span = vdh_window_span(vd->win, offset, len, cache,
			       dev_to_node(&vd->vdev->dev));
	if (span == ERR_PTR(-EBUSY))
		pr_err("heap %s: its range %#llx+%#llx of the window overlaps one mapped with another cache attribute%s: heap not used\n",
		       info->name, offset, len,
		       vd->has_heap_range ? "" :
		       " (the device does not offer VIRTIO_DMAHEAP_F_HEAP_RANGE, so each heap's range is the whole window)");
	else if (IS_ERR(span))
		pr_err("heap %s: cannot map its range %#llx+%#llx of the window as %s: %pe\n",
		       info->name, offset, len, vdh_cache_name(cache), span);
	return span;
}

/* Ask the device about heap @id and make it a guest dma-heap. */
static int vdh_heap_probe(struct vdh_dev *vd, u32 id)
{
	struct virtio_dmaheap_heap_range range;
	struct virtio_dmaheap_heap_info info;
	struct vdh_heap_kobj *hk;
	struct vdh_span *span;
	struct vdh_heap *vh;
	char *name;
	int ret;

	ret = vdh_remote_heap_info(vd, id, &info, &range);
	if (ret) {
		pr_err("heap %u: HEAP_INFO failed: %d\n", id, ret);
		return ret;
	}
	if (vdh_check_info(&info)) {
		pr_err("heap %u: device sent an invalid description\n", id);
		return -EINVAL;
	}
	span = vdh_heap_span(vd, &info, &range);
	if (IS_ERR(span))
		return PTR_ERR(span);
	/* A buffer must not share a guest page with another one. */
	if (le64_to_cpu(info.min_align) < PAGE_SIZE) {
		if (vd->has_page_size)
			pr_err("heap %s: min_align %llu is below the page size %lu this driver stated at SESSION_OPEN: device bug, heap not used\n",
			       info.name, le64_to_cpu(info.min_align),
			       PAGE_SIZE);
		else
			pr_err("heap %s: min_align %llu is below the guest page size %lu and the device does not offer VIRTIO_DMAHEAP_F_PAGE_SIZE: heap not used. Give the heap align=%luK on the host (vhost-user-dmaheap --heap %s=SOURCE,align=%luK) or use a device that offers the feature\n",
			       info.name, le64_to_cpu(info.min_align),
			       PAGE_SIZE, PAGE_SIZE >> 10, info.name,
			       PAGE_SIZE >> 10);
		return -EINVAL;
	}
	name = kasprintf(GFP_KERNEL, "%s%s", heap_prefix, info.name);
	if (!name)
		return -ENOMEM;
	if (!vdh_name_ok(name)) {
		pr_err("heap %s: bad name (heap_prefix: letters, digits, '_-.' only)\n",
		       name);
		kfree(name);
		return -EINVAL;
	}

	mutex_lock(&vdh_heaps_lock);
	vh = vdh_heap_lookup(name);
	if (IS_ERR(vh)) {
		ret = PTR_ERR(vh);
		if (ret == -EEXIST || ret == -EBUSY)
			pr_err("heap %s: name already in use, not registered (see the heap_prefix parameter)\n",
			       name);
		else
			pr_err("heap %s: cannot register: %d\n", name, ret);
		goto unlock;
	}
	vdh_heap_attach(vh, vd, id, &info, span);
	vd->heaps[id] = vh;
	hk = vdh_heap_kobj_add(vd, vh);
	if (IS_ERR(hk))
		pr_warn("heap %s: no sysfs directory: %pe\n", name, hk);
	else
		vd->kobjs[id] = hk;
	pr_info("heap %s: device heap %u, %s, %s, max_size %llu%s\n", name, id,
		vh->props.flags & VIRTIO_DMAHEAP_HEAP_F_CONTIGUOUS ? "contiguous" :
		"scattered", vdh_cache_names[vh->props.cache], vh->props.max_size,
		vh->props.flags & VIRTIO_DMAHEAP_HEAP_F_NO_SYNC ? ", no host sync" : "");
unlock:
	mutex_unlock(&vdh_heaps_lock);
	kfree(name);
	return ret;
}

void vdh_heaps_remove(struct vdh_dev *vd)
{
	u32 i;

	mutex_lock(&vdh_heaps_lock);
	for (i = 0; i < vd->num_heaps; i++) {
		if (vd->kobjs[i])
			kobject_put(&vd->kobjs[i]->kobj);
		if (vd->heaps[i])
			vdh_heap_detach(vd->heaps[i]);
	}
	mutex_unlock(&vdh_heaps_lock);
	kobject_put(vd->heaps_kobj);
}

int vdh_heaps_probe(struct vdh_dev *vd)
{
	u32 i, ok = 0;

	vd->heaps_kobj = kobject_create_and_add("heaps", &vd->vdev->dev.kobj);
	if (!vd->heaps_kobj)
		return -ENOMEM;
	for (i = 0; i < vd->num_heaps; i++) {
		if (!vdh_heap_probe(vd, i))
			ok++;
	}
	if (!ok)
		dev_warn(&vd->vdev->dev, "no usable heap\n");
	return 0;
}

