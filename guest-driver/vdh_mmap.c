// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-dmaheap: user mappings of a buffer.
 *
 * mmap fills the whole mapping at once, as the system heap does, so that
 * touching a new buffer costs no page fault: in one page-table walk, since a
 * buffer is one run of window frames. The fault handler only refills what was
 * zapped since (MADV_DONTNEED), and maps nothing of a revoked buffer.
 *
 * Revocation zaps user mappings through the dma-buf file's address space,
 * which finds only VMAs already linked into it. The kernel links a new VMA
 * after ->mmap returns, within the same hold of its mm's mmap_lock. So every
 * mmap leaves its mm on the buffer's list, and revocation takes each listed
 * mm's mmap_lock once before zapping: by then every VMA filled before the
 * buffer was revoked is linked, and the zap finds it. An entry goes when a
 * later mmap of the buffer finds that mm's lock free (or holds it itself).
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/dma-buf.h>
#include <linux/mm.h>
#include <linux/mmap_lock.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>

#include "vdh.h"

/* Pages a refill maps at once (TTM does 16): fewer faults after a zap. */
#define VDH_FAULT_AROUND	512

/* An mm that mapped the buffer, perhaps with its VMA not linked yet. */
struct vdh_mmap_mm {
	struct list_head node;
	struct mm_struct *mm;
};

static void vdh_mmap_mm_free(struct vdh_mmap_mm *e)
{
	list_del(&e->node);
	mmdrop(e->mm);
	kfree(e);
}

/*
 * Drop the entries whose mmap has certainly finished: @mine's, whose lock the
 * caller holds for writing, and any whose lock is free right now.
 */
static void vdh_mmaps_prune(struct vdh_buffer *buf, struct mm_struct *mine)
{
	struct vdh_mmap_mm *e, *tmp;

	lockdep_assert_held(&buf->lock);
	list_for_each_entry_safe(e, tmp, &buf->mmaps, node) {
		if (e->mm != mine) {
			if (!mmap_read_trylock(e->mm))
				continue;
			mmap_read_unlock(e->mm);
		}
		vdh_mmap_mm_free(e);
	}
}

/*
 * Revocation, before the zap: wait until every mm on @mmaps has linked the
 * VMA it filled, then forget them. False if a fatal signal cut the wait: a
 * filled VMA may then escape the zap.
 */
bool vdh_mmaps_settle(struct list_head *mmaps)
{
	struct vdh_mmap_mm *e, *tmp;
	bool settled = true;

	list_for_each_entry_safe(e, tmp, mmaps, node) {
		if (settled && !mmap_read_lock_killable(e->mm))
			mmap_read_unlock(e->mm);
		else
			settled = false;
		vdh_mmap_mm_free(e);
	}
	return settled;
}

/* The buffer's dma-buf is gone, and with it every VMA: forget the mms. */
void vdh_mmaps_drop(struct list_head *mmaps)
{
	struct vdh_mmap_mm *e, *tmp;

	list_for_each_entry_safe(e, tmp, mmaps, node)
		vdh_mmap_mm_free(e);
}

/* Filling a new mapping: the next frame, and the page protection. */
struct vdh_fill {
	struct mm_struct *mm;
	unsigned long pfn;
	pgprot_t prot;
};

/* One PTE of a new mapping: special, as vmf_insert_mixed makes them here. */
static int vdh_fill_pte(pte_t *pte, unsigned long addr, void *data)
{
	struct vdh_fill *fill = data;

	set_pte_at(fill->mm, addr, pte,
		   pte_mkspecial(pfn_pte(fill->pfn++, fill->prot)));
	return 0;
}

/*
 * Fill all of @vma, new and empty, with @buf's frames. vmf_insert_mixed per
 * page would walk the page table and look the memory type up (on x86 a walk
 * of the resource tree) once per page. The window range's own reservation
 * fixed the memory type, and vdh_pgprot agrees with it (vdh_window.c).
 */
static int vdh_fill_vma(struct vdh_buffer *buf, struct vm_area_struct *vma)
{
	struct vdh_fill fill = {
		.mm = vma->vm_mm,
		.pfn = buf->pfn + vma->vm_pgoff,
		.prot = vma->vm_page_prot,
	};

	lockdep_assert_held(&buf->lock);
	return apply_to_page_range(vma->vm_mm, vma->vm_start,
				   vma->vm_end - vma->vm_start, vdh_fill_pte,
				   &fill);
}

static vm_fault_t vdh_insert_range(struct vdh_buffer *buf,
				   struct vm_area_struct *vma,
				   unsigned long start, unsigned long end)
{
	pgoff_t pgoff = vma->vm_pgoff + ((start - vma->vm_start) >> PAGE_SHIFT);
	unsigned long addr;
	vm_fault_t ret;

	lockdep_assert_held(&buf->lock);
	for (addr = start; addr < end; addr += PAGE_SIZE, pgoff++) {
		ret = vmf_insert_mixed(vma, addr, buf->pfn + pgoff);
		if (ret & VM_FAULT_ERROR)
			return ret;
	}
	return VM_FAULT_NOPAGE;
}

/*
 * Refill what was zapped, VDH_FAULT_AROUND pages around the fault, under the
 * buffer lock: once the buffer is revoked (and its mappings zapped) no page
 * of it is mapped again.
 */
static vm_fault_t vdh_vm_fault(struct vm_fault *vmf)
{
	struct vm_area_struct *vma = vmf->vma;
	struct vdh_buffer *buf = vma->vm_private_data;
	unsigned long first, last;
	vm_fault_t ret = VM_FAULT_SIGBUS;

	if (vmf->pgoff >= buf->pagecount)
		return VM_FAULT_SIGBUS;
	first = max(vma->vm_start,
		    ALIGN_DOWN(vmf->address, VDH_FAULT_AROUND * PAGE_SIZE));
	last = min(vma->vm_end, first + VDH_FAULT_AROUND * PAGE_SIZE);

	mutex_lock(&buf->lock);
	if (buf->revoked)
		goto unlock;
	ret = vmf_insert_mixed(vma, vmf->address, buf->pfn + vmf->pgoff);
	if (ret & VM_FAULT_ERROR)
		goto unlock;
	/* Best effort around it; a page that fails is faulted in later. */
	vdh_insert_range(buf, vma, first, vmf->address);
	vdh_insert_range(buf, vma, vmf->address + PAGE_SIZE, last);
unlock:
	mutex_unlock(&buf->lock);
	return ret;
}

static const struct vm_operations_struct vdh_vm_ops = {
	.fault = vdh_vm_fault,
};

/* Shared or private, like the system heap (a private mapping copies on write). */
int vdh_buf_mmap(struct dma_buf *dmabuf, struct vm_area_struct *vma)
{
	struct vdh_buffer *buf = dmabuf->priv;
	unsigned long npages = vma_pages(vma);
	struct vdh_mmap_mm *entry;
	int ret = 0;

	if (vma->vm_pgoff >= buf->pagecount ||
	    npages > buf->pagecount - vma->vm_pgoff)
		return -EINVAL;
	entry = kmalloc(sizeof(*entry), GFP_KERNEL);
	if (!entry)
		return -ENOMEM;

	vm_flags_set(vma, VM_IO | VM_MIXEDMAP | VM_DONTEXPAND | VM_DONTDUMP);
	vma->vm_page_prot = vdh_pgprot(buf->cache, vma->vm_page_prot);
	vma->vm_ops = &vdh_vm_ops;
	vma->vm_private_data = buf;

	mutex_lock(&buf->lock);
	if (buf->revoked) {
		ret = -ENODEV;
		goto unlock;
	}
	vdh_mmaps_prune(buf, vma->vm_mm);
	/* On failure the caller zaps what was filled; nothing to undo here. */
	ret = vdh_fill_vma(buf, vma);
	if (ret)
		goto unlock;
	mmgrab(vma->vm_mm);
	entry->mm = vma->vm_mm;
	list_add(&entry->node, &buf->mmaps);
	entry = NULL;
unlock:
	mutex_unlock(&buf->lock);
	kfree(entry);
	return ret;
}
