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
 *
 * Memory types (a heap's cache attribute honoured): writing "FD ADDR" to
 * "memtype", ADDR an address of the writer's mapping of dma-buf FD, looks up
 * the memory type of the page table entry that maps ADDR, vmaps the buffer,
 * looks up the memory type of the vmap, and copies 4093 bytes into the vmap
 * at offset 3 and back. Reading "memtype" then gives one line:
 * "user=T kernel=T iomem=0|1 unaligned=ok|bad|skipped", T a name below
 * (imp_memtype_name): x86 the PAT type, arm64 the MAIR index of the entry.
 * The copy is skipped on a Device mapping (it would fault in the kernel).
 * Reading "memtype_check" tells what the kernel lookup says of a page vmapped
 * with PAGE_KERNEL, pgprot_writecombine() and pgprot_noncached(), a check of
 * the lookup itself: "kernel=T writecombine=T noncached=T".
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/dma-buf.h>
#include <linux/dma-mapping.h>
#include <linux/highmem.h>
#include <linux/iosys-map.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/platform_device.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/uuid.h>
#include <linux/vmalloc.h>
#include <linux/workqueue.h>
#if IS_ENABLED(CONFIG_VIRTIO_DMA_SHARED_BUFFER)
#include <linux/virtio_dma_buf.h>
#endif
#if defined(CONFIG_X86)
#include <asm/msr.h>
#include <asm/pgtable.h>
#elif defined(CONFIG_ARM64)
#include <linux/bitfield.h>
#include <asm/sysreg.h>
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

/* ---- memtype: the memory types of a buffer's user mapping and vmap ---- */

#define IMP_COPY_OFF 3
#define IMP_COPY_LEN 4093

/* What the last successful write to "memtype" found. */
static char imp_memtype[96];

#if defined(CONFIG_X86)
/*
 * The PAT entry that the PWT, PCD and PAT bits of a 4 KiB entry select, as the
 * CPU reads it: the IA32_PAT MSR (its power-on value if it cannot be read).
 */
static const char *imp_memtype_name(pteval_t flags)
{
	static const char *const names[8] = {
		[0] = "UC", [1] = "WC", [4] = "WT", [5] = "WP", [6] = "WB", [7] = "UC-",
	};
	u64 pat = 0x0007040600070406ULL;
	const char *name;

	rdmsrq_safe(MSR_IA32_CR_PAT, &pat);
	name = names[(pat >> (8 * __pte2cm_idx(flags))) & 7];
	return name ?: "reserved";
}

static const char *imp_user_memtype(const struct follow_pfnmap_args *args)
{
	pteval_t flags = pgprot_val(args->pgprot);

	if (args->addr_mask != PAGE_MASK)	/* a huge entry: PAT is bit 12 */
		flags = protval_large_2_4k(flags);
	return imp_memtype_name(flags);
}

static const char *imp_kernel_memtype(void *vaddr)
{
	unsigned int level;
	pteval_t flags;
	pte_t *pte;

	pte = lookup_address((unsigned long)vaddr, &level);
	if (!pte || !pte_present(*pte))
		return "unmapped";
	flags = pte_val(*pte);	/* a huge entry's PAT bit is in its pfn field */
	if (level != PG_LEVEL_4K)
		flags = protval_large_2_4k(flags);
	return imp_memtype_name(flags);
}

static bool imp_memtype_is_device(const char *name)
{
	return false;	/* every x86 type allows unaligned accesses */
}
#elif defined(CONFIG_ARM64)
static const char *const imp_attr_names[] = {
	[MT_NORMAL] = "NORMAL",
	[MT_NORMAL_TAGGED] = "NORMAL_TAGGED",
	[MT_NORMAL_NC] = "NORMAL_NC",
	[MT_DEVICE_nGnRnE] = "DEVICE_nGnRnE",
	[MT_DEVICE_nGnRE] = "DEVICE_nGnRE",
};

static const char *imp_memtype_name(unsigned int idx)
{
	if (idx >= ARRAY_SIZE(imp_attr_names) || !imp_attr_names[idx])
		return "unknown";
	return imp_attr_names[idx];
}

static const char *imp_user_memtype(const struct follow_pfnmap_args *args)
{
	return imp_memtype_name(FIELD_GET(PTE_ATTRINDX_MASK, pgprot_val(args->pgprot)));
}

/*
 * The kernel's page tables (init_mm) are not exported: ask the MMU. AT S1E1R
 * translates vaddr as a kernel read would; PAR_EL1.ATTR is then the MAIR_EL1
 * attribute of the entry, which names its index.
 */
static const char *imp_kernel_memtype(void *vaddr)
{
	unsigned long flags;
	u64 par, mair;
	unsigned int i;
	u8 attr;

	local_irq_save(flags);
	asm volatile("at s1e1r, %0" : : "r" (vaddr));
	isb();
	par = read_sysreg_par();
	mair = read_sysreg(mair_el1);
	local_irq_restore(flags);
	if (par & SYS_PAR_EL1_F)
		return "unmapped";
	attr = FIELD_GET(SYS_PAR_EL1_ATTR, par);
	for (i = 0; i < ARRAY_SIZE(imp_attr_names); i++)
		if (imp_attr_names[i] && ((mair >> (8 * i)) & 0xff) == attr)
			return imp_attr_names[i];
	return "unknown";
}

static bool imp_memtype_is_device(const char *name)
{
	return !strncmp(name, "DEVICE", 6) || !strcmp(name, "unknown") ||
	       !strcmp(name, "unmapped");
}
#else
static const char *imp_user_memtype(const struct follow_pfnmap_args *args)
{
	return "unknown";
}

static const char *imp_kernel_memtype(void *vaddr)
{
	return "unknown";
}

static bool imp_memtype_is_device(const char *name)
{
	return true;
}
#endif

/* The memory type of the entry that maps addr, in the caller's mapping of db. */
static int imp_user_lookup(struct dma_buf *db, unsigned long addr, const char **name)
{
	struct follow_pfnmap_args args = { .address = addr };
	struct mm_struct *mm = current->mm;
	int ret;

	mmap_read_lock(mm);
	args.vma = vma_lookup(mm, addr);
	if (!args.vma) {
		ret = -EFAULT;
		goto unlock;
	}
	if (args.vma->vm_file != db->file) {
		pr_err("memtype: %#lx is not in a mapping of the dma-buf\n", addr);
		ret = -EINVAL;
		goto unlock;
	}
	ret = follow_pfnmap_start(&args);
	if (ret) {
		pr_err("memtype: no pfn map entry at %#lx (flags %#lx): %d\n",
		       addr, args.vma->vm_flags, ret);
		goto unlock;
	}
	*name = imp_user_memtype(&args);
	follow_pfnmap_end(&args);
unlock:
	mmap_read_unlock(mm);
	return ret;
}

/* Unaligned copies into and out of the vmap: "ok" or "bad". */
static const char *imp_unaligned_copy(void *vaddr)
{
	u8 *src, *dst;
	bool same;
	size_t i;

	src = kmalloc(2 * IMP_COPY_LEN, GFP_KERNEL);
	if (!src)
		return "nomem";
	dst = src + IMP_COPY_LEN;
	for (i = 0; i < IMP_COPY_LEN; i++)
		src[i] = i * 7 + 1;
	memcpy(vaddr + IMP_COPY_OFF, src, IMP_COPY_LEN);
	memcpy(dst, vaddr + IMP_COPY_OFF, IMP_COPY_LEN);
	same = !memcmp(src, dst, IMP_COPY_LEN);
	kfree(src);
	return same ? "ok" : "bad";
}

static int imp_memtype_write(const char *val, const struct kernel_param *kp)
{
	const char *user, *kernel, *copy = "skipped";
	struct iosys_map map;
	struct dma_buf *db;
	unsigned long addr;
	bool iomem;
	int fd, ret;

	if (sscanf(val, "%d %lx", &fd, &addr) != 2)
		return -EINVAL;
	db = dma_buf_get(fd);
	if (IS_ERR(db))
		return PTR_ERR(db);
	if (db->size < IMP_COPY_OFF + IMP_COPY_LEN) {
		ret = -EINVAL;
		goto put;
	}
	ret = imp_user_lookup(db, addr, &user);
	if (ret)
		goto put;
	ret = dma_buf_vmap_unlocked(db, &map);
	if (ret) {
		pr_err("memtype: vmap: %d\n", ret);
		goto put;
	}
	/* The type of an iomem map is reported too; it is not copied through. */
	iomem = map.is_iomem;
	kernel = imp_kernel_memtype(iomem ? (void __force *)map.vaddr_iomem : map.vaddr);
	if (!iomem && !imp_memtype_is_device(kernel))
		copy = imp_unaligned_copy(map.vaddr);
	dma_buf_vunmap_unlocked(db, &map);
	mutex_lock(&imp_lock);
	snprintf(imp_memtype, sizeof(imp_memtype), "user=%s kernel=%s iomem=%d unaligned=%s",
		 user, kernel, iomem, copy);
	mutex_unlock(&imp_lock);
put:
	dma_buf_put(db);
	return ret;
}

/* What the kernel lookup says of a page vmapped with known protections. */
static int imp_memtype_check(char *buffer, const struct kernel_param *kp)
{
	static const char *const what[] = { "kernel", "writecombine", "noncached" };
	const pgprot_t prots[] = {
		PAGE_KERNEL, pgprot_writecombine(PAGE_KERNEL), pgprot_noncached(PAGE_KERNEL),
	};
	struct page *page;
	int i, len = 0;
	void *va;

	page = alloc_page(GFP_KERNEL);
	if (!page)
		return -ENOMEM;
	for (i = 0; i < ARRAY_SIZE(prots); i++) {
		/* Never accessed: no data passes through the other-type alias. */
		va = vmap(&page, 1, VM_MAP, prots[i]);
		if (!va) {
			len = -ENOMEM;
			break;
		}
		len += sysfs_emit_at(buffer, len, "%s%s=%s", i ? " " : "", what[i],
				     imp_kernel_memtype(va));
		vunmap(va);
	}
	__free_page(page);
	return len < 0 ? len : len + sysfs_emit_at(buffer, len, "\n");
}

static const struct kernel_param_ops imp_memtype_check_ops = {
	.get = imp_memtype_check,
};
module_param_cb(memtype_check, &imp_memtype_check_ops, NULL, 0400);
MODULE_PARM_DESC(memtype_check, "the memory types the kernel lookup gives known vmaps");

static int imp_memtype_read(char *buffer, const struct kernel_param *kp)
{
	int ret;

	mutex_lock(&imp_lock);
	ret = sysfs_emit(buffer, "%s\n", imp_memtype);
	mutex_unlock(&imp_lock);
	return ret;
}

static const struct kernel_param_ops imp_memtype_ops = {
	.set = imp_memtype_write,
	.get = imp_memtype_read,
};
module_param_cb(memtype, &imp_memtype_ops, NULL, 0600);
MODULE_PARM_DESC(memtype, "write \"FD ADDR\" to get the memory types of a buffer's mappings");

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
