// SPDX-License-Identifier: GPL-2.0
/*
 * Test-only dma-buf importer: what another guest device driver does with a
 * buffer from a virtio-dmaheap heap. Writing a dma-buf fd to
 * /sys/module/dmaheap_importer/parameters/check (from the process that owns
 * the fd) runs the checks below and fails the write with an errno if one
 * fails (the reason goes to the kernel log).
 *
 * The buffer must hold the pattern byte(i) = i % 251. The importer checks it
 * through a kernel vmap, writes "importer" into the first and the last 8
 * bytes, and checks that the DMA mapping of an attachment covers the buffer
 * and that its first page holds what the vmap wrote.
 *
 * A kernel user that keeps a buffer: writing a dma-buf fd to "hold" takes a
 * reference, a vmap and a DMA-mapped attachment and keeps them (one buffer at
 * a time); writing a byte value to "poke" fills the held buffer through its
 * vmap, as a driver that kept writing after the buffer's device went away
 * would; writing anything to "release" lets it go.
 *
 * Cross-device sharing, what a virtio device's driver does before it hands a
 * buffer to its device: writing a dma-buf fd to "uuid" checks
 * is_virtio_dma_buf() (the write fails with EMEDIUMTYPE if it is not one)
 * and calls virtio_dma_buf_get_uuid() in the writer's context (the write
 * fails with its errno; a fatal signal ends a call that waits for the
 * device); reading "uuid" then gives the UUID, 36 characters and a newline
 * (an empty line before the first success). Writing the fd to "uuid_race"
 * does the same from IMP_RACERS workers at once (the write fails with the
 * first errno, or EILSEQ if they got different UUIDs). Built for a kernel
 * without virtio_dma_buf (CONFIG_VIRTIO_DMA_SHARED_BUFFER), nothing is one.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/dma-buf.h>
#include <linux/dma-mapping.h>
#include <linux/highmem.h>
#include <linux/iosys-map.h>
#include <linux/module.h>
#include <linux/platform_device.h>
#include <linux/scatterlist.h>
#include <linux/uuid.h>
#include <linux/workqueue.h>
#if IS_ENABLED(CONFIG_VIRTIO_DMA_SHARED_BUFFER)
#include <linux/virtio_dma_buf.h>
#endif

#define MARK "importer"
#define MARK_LEN 8

static struct platform_device *imp_pdev;

/* The buffer "hold" keeps. */
static DEFINE_MUTEX(imp_lock);
static struct dma_buf *imp_held;
static struct iosys_map imp_held_map;
static struct dma_buf_attachment *imp_held_att;
static struct sg_table *imp_held_sgt;

/* What the last successful write to "uuid" got. */
static uuid_t imp_uuid;
static bool imp_uuid_set;

static int imp_check_vmap(struct dma_buf *db)
{
	struct iosys_map map, again;
	size_t i;
	u8 *p;
	int ret;

	ret = dma_buf_vmap_unlocked(db, &map);
	if (ret) {
		pr_err("vmap: %d\n", ret);
		return ret;
	}
	ret = dma_buf_vmap_unlocked(db, &again);
	if (ret) {
		pr_err("second vmap: %d\n", ret);
		goto vunmap;
	}
	if (again.vaddr != map.vaddr) {
		pr_err("second vmap at another address (not refcounted)\n");
		ret = -EINVAL;
	}
	dma_buf_vunmap_unlocked(db, &again);
	if (ret)
		goto vunmap;
	p = map.vaddr;
	for (i = 0; i < db->size; i++) {
		if (p[i] != i % 251) {
			pr_err("vmap byte %zu is %u, want %zu\n", i, p[i], i % 251);
			ret = -EILSEQ;
			goto vunmap;
		}
	}
	memcpy(p, MARK, MARK_LEN);
	memcpy(p + db->size - MARK_LEN, MARK, MARK_LEN);
vunmap:
	dma_buf_vunmap_unlocked(db, &map);
	return ret;
}

static int imp_check_sgt(struct sg_table *sgt, size_t size)
{
	struct scatterlist *sg;
	size_t total = 0;
	bool same;
	void *va;
	int i;

	for_each_sgtable_dma_sg(sgt, sg, i) {
		if (!sg_dma_len(sg)) {
			pr_err("DMA segment %d has length 0\n", i);
			return -EINVAL;
		}
		total += sg_dma_len(sg);
	}
	if (total != size) {
		pr_err("DMA mapping covers %zu bytes of %zu\n", total, size);
		return -EINVAL;
	}
	/* A range without struct pages (a WC or uncached heap): DMA addresses only. */
	if (!sg_page(sgt->sgl))
		return 0;
	va = kmap_local_page(sg_page(sgt->sgl));
	same = !memcmp(va + sgt->sgl->offset, MARK, MARK_LEN);
	kunmap_local(va);
	if (!same) {
		pr_err("the sg_table's first page does not hold what the vmap wrote\n");
		return -EILSEQ;
	}
	return 0;
}

static int imp_check_attach(struct dma_buf *db)
{
	struct dma_buf_attachment *att;
	struct sg_table *sgt;
	int ret;

	att = dma_buf_attach(db, &imp_pdev->dev);
	if (IS_ERR(att)) {
		pr_err("attach: %ld\n", PTR_ERR(att));
		return PTR_ERR(att);
	}
	sgt = dma_buf_map_attachment_unlocked(att, DMA_BIDIRECTIONAL);
	if (IS_ERR(sgt)) {
		ret = PTR_ERR(sgt);
		pr_err("map_attachment: %d\n", ret);
		goto detach;
	}
	ret = imp_check_sgt(sgt, db->size);
	dma_buf_unmap_attachment_unlocked(att, sgt, DMA_BIDIRECTIONAL);
detach:
	dma_buf_detach(db, att);
	return ret;
}

static int imp_check_cpu_access(struct dma_buf *db)
{
	int ret;

	ret = dma_buf_begin_cpu_access(db, DMA_BIDIRECTIONAL);
	if (ret) {
		pr_err("begin_cpu_access: %d\n", ret);
		return ret;
	}
	ret = dma_buf_end_cpu_access(db, DMA_BIDIRECTIONAL);
	if (ret)
		pr_err("end_cpu_access: %d\n", ret);
	return ret;
}

static int imp_check(const char *val, const struct kernel_param *kp)
{
	struct dma_buf *db;
	int fd, ret;

	ret = kstrtoint(val, 0, &fd);
	if (ret)
		return ret;
	db = dma_buf_get(fd);
	if (IS_ERR(db))
		return PTR_ERR(db);
	if (db->size < MARK_LEN) {
		ret = -EINVAL;
		goto put;
	}
	ret = imp_check_vmap(db);
	if (!ret)
		ret = imp_check_attach(db);
	if (!ret)
		ret = imp_check_cpu_access(db);
put:
	dma_buf_put(db);
	return ret;
}

static const struct kernel_param_ops imp_check_ops = {
	.set = imp_check,
};
module_param_cb(check, &imp_check_ops, NULL, 0200);
MODULE_PARM_DESC(check, "write a dma-buf fd to check it (see the file comment)");

static void imp_release_held(void)
{
	lockdep_assert_held(&imp_lock);
	if (!imp_held)
		return;
	dma_buf_unmap_attachment_unlocked(imp_held_att, imp_held_sgt, DMA_BIDIRECTIONAL);
	dma_buf_detach(imp_held, imp_held_att);
	dma_buf_vunmap_unlocked(imp_held, &imp_held_map);
	dma_buf_put(imp_held);
	imp_held = NULL;
}

static int imp_hold_locked(struct dma_buf *db)
{
	int ret;

	lockdep_assert_held(&imp_lock);
	ret = dma_buf_vmap_unlocked(db, &imp_held_map);
	if (ret)
		return ret;
	imp_held_att = dma_buf_attach(db, &imp_pdev->dev);
	if (IS_ERR(imp_held_att)) {
		ret = PTR_ERR(imp_held_att);
		goto vunmap;
	}
	imp_held_sgt = dma_buf_map_attachment_unlocked(imp_held_att, DMA_BIDIRECTIONAL);
	if (IS_ERR(imp_held_sgt)) {
		ret = PTR_ERR(imp_held_sgt);
		goto detach;
	}
	imp_held = db;
	return 0;

detach:
	dma_buf_detach(db, imp_held_att);
vunmap:
	dma_buf_vunmap_unlocked(db, &imp_held_map);
	return ret;
}

static int imp_hold(const char *val, const struct kernel_param *kp)
{
	struct dma_buf *db;
	int fd, ret;

	ret = kstrtoint(val, 0, &fd);
	if (ret)
		return ret;
	db = dma_buf_get(fd);
	if (IS_ERR(db))
		return PTR_ERR(db);
	mutex_lock(&imp_lock);
	imp_release_held();
	ret = imp_hold_locked(db);
	mutex_unlock(&imp_lock);
	if (ret) {
		pr_err("hold: %d\n", ret);
		dma_buf_put(db);
	}
	return ret;
}

static const struct kernel_param_ops imp_hold_ops = {
	.set = imp_hold,
};
module_param_cb(hold, &imp_hold_ops, NULL, 0200);
MODULE_PARM_DESC(hold, "write a dma-buf fd to keep a vmap and a DMA mapping of it");

static int imp_poke(const char *val, const struct kernel_param *kp)
{
	u8 byte;
	int ret;

	ret = kstrtou8(val, 0, &byte);
	if (ret)
		return ret;
	mutex_lock(&imp_lock);
	if (imp_held)
		memset(imp_held_map.vaddr, byte, imp_held->size);
	else
		ret = -ENOENT;
	mutex_unlock(&imp_lock);
	return ret;
}

static const struct kernel_param_ops imp_poke_ops = {
	.set = imp_poke,
};
module_param_cb(poke, &imp_poke_ops, NULL, 0200);
MODULE_PARM_DESC(poke, "write a byte value to fill the held buffer through its vmap");

static int imp_release(const char *val, const struct kernel_param *kp)
{
	mutex_lock(&imp_lock);
	imp_release_held();
	mutex_unlock(&imp_lock);
	return 0;
}

static const struct kernel_param_ops imp_release_ops = {
	.set = imp_release,
};
module_param_cb(release, &imp_release_ops, NULL, 0200);
MODULE_PARM_DESC(release, "write anything to let the held buffer go");

#if IS_ENABLED(CONFIG_VIRTIO_DMA_SHARED_BUFFER)
#define IMP_RACERS 8

struct imp_racer {
	struct work_struct work;
	struct dma_buf *db;
	uuid_t uuid;
	int ret;
};

static void imp_racer_fn(struct work_struct *work)
{
	struct imp_racer *r = container_of(work, struct imp_racer, work);

	r->ret = virtio_dma_buf_get_uuid(r->db, &r->uuid);
}

/* get_uuid from IMP_RACERS workers at once: one answer for all of them. */
static int imp_get_uuid_race(struct dma_buf *db, uuid_t *uuid)
{
	struct imp_racer r[IMP_RACERS];
	int i, ret = 0;

	for (i = 0; i < IMP_RACERS; i++) {
		INIT_WORK_ONSTACK(&r[i].work, imp_racer_fn);
		r[i].db = db;
		queue_work(system_dfl_wq, &r[i].work);	/* unbound: all at once */
	}
	for (i = 0; i < IMP_RACERS; i++) {
		flush_work(&r[i].work);
		destroy_work_on_stack(&r[i].work);
	}
	for (i = 0; i < IMP_RACERS && !ret; i++) {
		ret = r[i].ret;
		if (ret)
			pr_info("uuid: get_uuid %d of %d: %d\n", i, IMP_RACERS, ret);
		else if (!uuid_equal(&r[i].uuid, &r[0].uuid))
			ret = -EILSEQ;
	}
	if (ret == -EILSEQ)
		pr_err("uuid: concurrent get_uuid calls got different UUIDs\n");
	if (!ret)
		uuid_copy(uuid, &r[0].uuid);
	return ret;
}

static int imp_get_uuid(struct dma_buf *db, uuid_t *uuid, bool race)
{
	int ret;

	if (!is_virtio_dma_buf(db))
		return -EMEDIUMTYPE;
	if (race)
		return imp_get_uuid_race(db, uuid);
	ret = virtio_dma_buf_get_uuid(db, uuid);
	if (ret)
		pr_info("uuid: get_uuid: %d\n", ret);
	return ret;
}
#else
static int imp_get_uuid(struct dma_buf *db, uuid_t *uuid, bool race)
{
	pr_info("uuid: this kernel has no virtio_dma_buf\n");
	return -EMEDIUMTYPE;
}
#endif

static int imp_uuid_store(const char *val, bool race)
{
	struct dma_buf *db;
	uuid_t uuid;
	int fd, ret;

	ret = kstrtoint(val, 0, &fd);
	if (ret)
		return ret;
	db = dma_buf_get(fd);
	if (IS_ERR(db))
		return PTR_ERR(db);
	ret = imp_get_uuid(db, &uuid, race);
	if (ret == -EMEDIUMTYPE)
		pr_info("uuid: fd %d (%s) is not a virtio_dma_buf\n", fd, db->exp_name);
	if (ret)
		goto put;
	mutex_lock(&imp_lock);
	uuid_copy(&imp_uuid, &uuid);
	imp_uuid_set = true;
	mutex_unlock(&imp_lock);
put:
	dma_buf_put(db);
	return ret;
}

static int imp_uuid_write(const char *val, const struct kernel_param *kp)
{
	return imp_uuid_store(val, false);
}

static int imp_uuid_read(char *buffer, const struct kernel_param *kp)
{
	int ret;

	mutex_lock(&imp_lock);
	ret = imp_uuid_set ? sysfs_emit(buffer, "%pUb\n", &imp_uuid) :
			     sysfs_emit(buffer, "\n");
	mutex_unlock(&imp_lock);
	return ret;
}

static const struct kernel_param_ops imp_uuid_ops = {
	.set = imp_uuid_write,
	.get = imp_uuid_read,
};
module_param_cb(uuid, &imp_uuid_ops, NULL, 0600);
MODULE_PARM_DESC(uuid, "write a dma-buf fd to get its virtio_dma_buf UUID, read it back");

static int imp_uuid_race_write(const char *val, const struct kernel_param *kp)
{
	return imp_uuid_store(val, true);
}

static const struct kernel_param_ops imp_uuid_race_ops = {
	.set = imp_uuid_race_write,
};
module_param_cb(uuid_race, &imp_uuid_race_ops, NULL, 0200);
MODULE_PARM_DESC(uuid_race, "as uuid, from 8 workers at once (read the UUID from uuid)");

static int __init imp_init(void)
{
	int ret;

	imp_pdev = platform_device_register_simple(KBUILD_MODNAME, -1, NULL, 0);
	if (IS_ERR(imp_pdev))
		return PTR_ERR(imp_pdev);
	ret = dma_coerce_mask_and_coherent(&imp_pdev->dev, DMA_BIT_MASK(64));
	if (ret)
		platform_device_unregister(imp_pdev);
	return ret;
}
module_init(imp_init);

static void __exit imp_exit(void)
{
	mutex_lock(&imp_lock);
	imp_release_held();
	mutex_unlock(&imp_lock);
	platform_device_unregister(imp_pdev);
}
module_exit(imp_exit);

MODULE_DESCRIPTION("virtio-dmaheap test: a kernel dma-buf importer");
MODULE_LICENSE("GPL");
MODULE_IMPORT_NS("DMA_BUF");
