// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-dmaheap: the host's DMA-BUF heaps as guest dma-heaps.
 *
 * The device allocates buffers on the host and maps them into a shared memory
 * region (the buffer window, a PCI BAR). The driver maps the window's heap
 * ranges with their memory types (vdh_window.c), registers one dma-heap per
 * host heap and exports every allocation as a dma-buf over its window range.
 *
 * Sessions (VIRTIO_DMAHEAP_F_SESSION): probe opens a session; before the
 * device is reset (unbind, shutdown and reboot, suspend) the driver closes it,
 * so that the window holds nothing at the reset (QEMU 11.1.3 crashes when a
 * device whose window was not empty starts again). At suspend the session is
 * suspended instead and resumed at restore: buffers, their user mappings and
 * their contents survive. If the device ends the session on its own, or
 * cannot resume it, every buffer is revoked and a new session opened.
 *
 * Lifetimes:
 *  - a dma-heap can never be removed, so each vdh_heap lives forever; after
 *    the device goes away it answers -ENODEV and a later device exporting a
 *    heap of the same name takes it over;
 *  - a vdh_dev lives as long as the virtio device is bound or one of its
 *    buffers is alive; it holds the vdh_window;
 *  - the window's mappings (and struct pages) stay until the last buffer
 *    using them is released, so kernel users of a buffer never see them go.
 *    Revoked buffers that kernel users can still reach keep their range out
 *    of every later session's buffers (see vdh_buffer.c).
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/err.h>
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/virtio_config.h>

#include "vdh.h"

/* ---- device ------------------------------------------------------------- */

static void vdh_dev_release(struct kref *ref)
{
	struct vdh_dev *vd = container_of(ref, struct vdh_dev, ref);

	if (vd->win)
		vdh_window_put(vd->win);
	mutex_destroy(&vd->buffers_lock);
	mutex_destroy(&vd->life_lock);
	kfree(vd->kobjs);
	kfree(vd->heaps);
	kfree(vd);
}

void vdh_dev_put(struct vdh_dev *vd)
{
	kref_put(&vd->ref, vdh_dev_release);
}

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

static void vdh_recover(struct work_struct *work);

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
	vd->state = VDH_REMOVED;
	spin_lock_init(&vd->vq_lock);
	init_waitqueue_head(&vd->space_wq);
	INIT_LIST_HEAD(&vd->pending);
	mutex_init(&vd->life_lock);
	init_rwsem(&vd->alloc_sem);
	INIT_WORK(&vd->recover_work, vdh_recover);
	mutex_init(&vd->buffers_lock);
	INIT_LIST_HEAD(&vd->buffers);
	vdh_pool_init(vd);
	vd->has_sync = virtio_has_feature(vdev, VIRTIO_DMAHEAP_F_SYNC);
	vd->has_session = virtio_has_feature(vdev, VIRTIO_DMAHEAP_F_SESSION);
	vd->has_no_sync = virtio_has_feature(vdev, VIRTIO_DMAHEAP_F_NO_SYNC);
	vd->has_batch = virtio_has_feature(vdev, VIRTIO_DMAHEAP_F_BATCH);
	vd->has_page_size = virtio_has_feature(vdev, VIRTIO_DMAHEAP_F_PAGE_SIZE);
	vd->has_heap_range = virtio_has_feature(vdev, VIRTIO_DMAHEAP_F_HEAP_RANGE);
	/* Not in the feature table without virtio_dma_buf: do not even ask. */
	vd->has_uuid = VDH_UUID && virtio_has_feature(vdev, VIRTIO_DMAHEAP_F_UUID);
	return vd;
}

/* ---- sessions ----------------------------------------------------------- */

/*
 * Open a new session and keep the ranges of old buffers that kernel users may
 * still reach out of it. Called in VDH_OPENING, with alloc_sem held.
 */
static int vdh_session_start(struct vdh_dev *vd)
{
	int ret;

	if (!vd->has_session) {
		/* Nothing could keep old users' ranges out of new buffers. */
		ret = vdh_window_reserve(vd->win, NULL);
		if (ret)
			dev_err(&vd->vdev->dev,
				"buffers of an earlier binding are still in use and the device has no sessions: not starting\n");
		return ret;
	}
	ret = vdh_remote_session_open(vd, 0, &vd->session);
	if (ret) {
		dev_err(&vd->vdev->dev, "cannot open a session: %d\n", ret);
		return ret;
	}
	return vdh_window_reserve(vd->win, vd);
}

/*
 * Take every buffer out of the window before a reset: release them, or keep
 * them for a resume (VIRTIO_DMAHEAP_CLOSE_SUSPEND). Returns 0 if the window is
 * empty now.
 */
static int vdh_session_end(struct vdh_dev *vd, u32 flags)
{
	int ret;

	lockdep_assert_held(&vd->life_lock);
	if (!vd->has_session || !vd->session)
		return -EOPNOTSUPP;
	vdh_set_state(vd, VDH_CLOSING);
	ret = vdh_remote_session_close(vd, flags);
	if (ret)
		dev_warn(&vd->vdev->dev,
			 "could not empty the buffer window before the reset: %d\n", ret);
	if (ret || !(flags & VIRTIO_DMAHEAP_CLOSE_SUSPEND))
		vd->session = 0;
	return ret;
}

/* The device ended the session (the operator's prepare-reset): start anew. */
void vdh_session_lost(struct vdh_dev *vd)
{
	unsigned long flags;

	spin_lock_irqsave(&vd->vq_lock, flags);
	if (vd->state == VDH_RUNNING && vd->has_session)
		queue_work(vdh_wq, &vd->recover_work);
	spin_unlock_irqrestore(&vd->vq_lock, flags);
}

/* Revoke every buffer and open a new session. Called with life_lock held. */
static int vdh_session_restart(struct vdh_dev *vd)
{
	int ret;

	down_write(&vd->alloc_sem);
	vdh_buffers_revoke(vd);
	vdh_drop_pending(vd);
	vdh_window_disown(vd->win, vd);
	vd->session = 0;
	vd->revoked = false;
	vdh_set_state(vd, VDH_OPENING);
	ret = vdh_session_start(vd);
	vdh_set_state(vd, VDH_RUNNING);
	up_write(&vd->alloc_sem);
	return ret;
}

static void vdh_recover(struct work_struct *work)
{
	struct vdh_dev *vd = container_of(work, struct vdh_dev, recover_work);
	int ret;

	mutex_lock(&vd->life_lock);
	if (READ_ONCE(vd->state) == VDH_RUNNING) {
		dev_warn(&vd->vdev->dev,
			 "the device ended the session: every buffer is revoked\n");
		ret = vdh_session_restart(vd);
		if (ret)
			dev_err(&vd->vdev->dev, "no new session: %d\n", ret);
	}
	mutex_unlock(&vd->life_lock);
}

/* ---- virtio driver ------------------------------------------------------ */

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

	ret = vdh_queue_start(vd, VDH_OPENING);
	if (ret)
		goto put_dev;
	virtio_device_ready(vdev);

	mutex_lock(&vd->life_lock);
	ret = vdh_session_start(vd);
	if (!ret) {
		vdh_set_state(vd, VDH_RUNNING);
		ret = vdh_heaps_probe(vd);
	}
	mutex_unlock(&vd->life_lock);
	if (ret)
		goto stop_dev;
	dev_info(&vdev->dev, "%u heap(s), buffer window %#llx+%#llx, queue %u%s%s%s%s%s%s\n",
		 num_heaps, (u64)win->base, win->size,
		 virtqueue_get_vring_size(vd->vq), vd->has_sync ? ", sync" : "",
		 vd->has_session ? ", sessions" : "", vd->has_batch ? ", batch" : "",
		 vd->has_uuid ? ", uuid" : "",
		 vd->has_page_size ? ", page-size" : "",
		 vd->has_heap_range ? ", heap-range" : "");
	return 0;

stop_dev:
	mutex_lock(&vd->life_lock);
	vdh_session_end(vd, 0);
	vdh_window_disown(win, vd);
	vdh_queue_stop(vd, VDH_REMOVED);
	mutex_unlock(&vd->life_lock);
put_dev:
	vdh_dev_put(vd);	/* and the window */
	return ret;
}

static void vdh_remove(struct virtio_device *vdev)
{
	struct vdh_dev *vd = vdev->priv;

	vdh_heaps_remove(vd);
	disable_work_sync(&vd->recover_work);
	vdh_pool_stop(vd);
	mutex_lock(&vd->life_lock);
	down_write(&vd->alloc_sem);
	vdh_buffers_revoke(vd);
	if (vd->state == VDH_RUNNING)
		vdh_session_end(vd, 0);
	vdh_window_disown(vd->win, vd);
	vdh_queue_stop(vd, VDH_REMOVED);
	up_write(&vd->alloc_sem);
	mutex_unlock(&vd->life_lock);
	vdh_dev_put(vd);
}

/* Reboot, power-off, kexec: leave the window empty for the next kernel. */
static void vdh_shutdown(struct virtio_device *vdev)
{
	struct vdh_dev *vd = vdev->priv;

	mutex_lock(&vd->life_lock);
	if (vd->state == VDH_RUNNING)
		vdh_session_end(vd, 0);
	mutex_unlock(&vd->life_lock);
	virtio_device_shutdown(vdev);
}

#ifdef CONFIG_PM_SLEEP
/* Suspend, hibernation: keep the buffers for the resume, out of the window. */
static int vdh_freeze(struct virtio_device *vdev)
{
	struct vdh_dev *vd = vdev->priv;

	mutex_lock(&vd->life_lock);
	down_write(&vd->alloc_sem);
	vd->suspended = vd->state == VDH_RUNNING &&
			!vdh_session_end(vd, VIRTIO_DMAHEAP_CLOSE_SUSPEND);
	vdh_queue_stop(vd, VDH_FROZEN);
	up_write(&vd->alloc_sem);
	mutex_unlock(&vd->life_lock);
	return 0;
}

/* Resume the suspended session, or revoke every buffer and start anew. */
static int vdh_resume_session(struct vdh_dev *vd)
{
	u64 id;
	int ret;

	if (!vd->suspended)
		return -ENOENT;
	vd->suspended = false;
	ret = vdh_remote_session_open(vd, vd->session, &id);
	if (ret)
		return ret;
	vdh_set_state(vd, VDH_RUNNING);
	return 0;
}

static int vdh_restore(struct virtio_device *vdev)
{
	struct vdh_dev *vd = vdev->priv;
	int ret;

	mutex_lock(&vd->life_lock);
	ret = vdh_queue_start(vd, VDH_OPENING);
	if (ret) {
		dev_err(&vdev->dev, "no request queue after the resume: %d\n", ret);
		goto unlock;
	}
	virtio_device_ready(vdev);
	ret = vdh_resume_session(vd);
	if (!ret) {
		dev_info(&vdev->dev, "session resumed with its buffers\n");
		goto unlock;
	}
	if (ret != -ENOENT)
		dev_warn(&vdev->dev, "cannot resume the session (%d): buffers revoked\n",
			 ret);
	ret = vdh_session_restart(vd);
	if (ret)
		dev_err(&vdev->dev, "no session after the resume: %d\n", ret);
unlock:
	mutex_unlock(&vd->life_lock);
	return 0;
}
#endif

static const struct virtio_device_id vdh_id_table[] = {
	{ VIRTIO_ID_DMAHEAP, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

static const unsigned int vdh_features[] = {
	VIRTIO_DMAHEAP_F_SYNC,
	VIRTIO_DMAHEAP_F_SESSION,
	VIRTIO_DMAHEAP_F_NO_SYNC,
	VIRTIO_DMAHEAP_F_BATCH,
	VIRTIO_DMAHEAP_F_PAGE_SIZE,
	VIRTIO_DMAHEAP_F_HEAP_RANGE,
#if VDH_UUID
	VIRTIO_DMAHEAP_F_UUID,
#endif
};

/* The page size travels in SESSION_OPEN: never accept it without sessions. */
static int vdh_validate(struct virtio_device *vdev)
{
	if (!virtio_has_feature(vdev, VIRTIO_DMAHEAP_F_SESSION))
		__virtio_clear_bit(vdev, VIRTIO_DMAHEAP_F_PAGE_SIZE);
	return 0;
}

static struct virtio_driver vdh_driver = {
	.driver.name = KBUILD_MODNAME,
	.id_table = vdh_id_table,
	.feature_table = vdh_features,
	.feature_table_size = ARRAY_SIZE(vdh_features),
	.validate = vdh_validate,
	.probe = vdh_probe,
	.remove = vdh_remove,
	.shutdown = vdh_shutdown,
#ifdef CONFIG_PM_SLEEP
	.freeze = vdh_freeze,
	.restore = vdh_restore,
#endif
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
