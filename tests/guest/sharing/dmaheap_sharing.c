// SPDX-License-Identifier: GPL-2.0
/*
 * Test-only driver of the test importer device (virtio device id 38, one
 * virtqueue, served on the host by tests/importer's dmaheap-test-importer):
 * what a camera or codec driver does with a virtio-dmaheap buffer. User space
 * hands it a dma-buf fd and an op through /dev/dmaheap_sharing
 * (DMAHEAP_SHARING_IOC_RUN); it checks is_virtio_dma_buf(), takes the UUID
 * with virtio_dma_buf_get_uuid(), sends the request to the importer and
 * waits for its answer (killable, bounded). Protocol: importer_proto.h (a
 * link to tests/importer/importer_proto.h).
 *
 * One request at a time. A request abandoned by a killed or timed-out waiter
 * stays owned by the virtqueue until the device returns it or the device goes
 * away (kref: the waiter and the queue each hold a reference).
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/dma-buf.h>
#include <linux/kref.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/uaccess.h>
#include <linux/uuid.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#if IS_ENABLED(CONFIG_VIRTIO_DMA_SHARED_BUFFER)
#include <linux/virtio_dma_buf.h>
#endif

#include "importer_proto.h"

#define SHR_TIMEOUT	(30 * HZ)

struct shr_dev {
	struct virtio_device *vdev;
	struct virtqueue *vq;
	spinlock_t vq_lock;	/* vq, broken */
	bool broken;
};

/* One request; the waiter and the virtqueue each hold a reference. */
struct shr_req {
	struct kref ref;
	struct completion done;
	struct dmaheap_imp_req req;
	struct dmaheap_imp_resp resp;
	unsigned int used;
	int err;
};

/* The device (at most one), under shr_lock; held across a request. */
static DEFINE_MUTEX(shr_lock);
static struct shr_dev *shr_dev;

static void shr_req_free(struct kref *ref)
{
	kfree(container_of(ref, struct shr_req, ref));
}

static void shr_req_finish(struct shr_req *r, unsigned int used, int err)
{
	r->used = used;
	r->err = err;
	complete(&r->done);
	kref_put(&r->ref, shr_req_free);
}

static void shr_vq_done(struct virtqueue *vq)
{
	struct shr_dev *d = vq->vdev->priv;
	struct shr_req *r;
	unsigned long flags;
	unsigned int len;

	spin_lock_irqsave(&d->vq_lock, flags);
	do {
		virtqueue_disable_cb(vq);
		while ((r = virtqueue_get_buf(vq, &len)))
			shr_req_finish(r, len, 0);
	} while (!virtqueue_enable_cb(vq));
	spin_unlock_irqrestore(&d->vq_lock, flags);
}

static int shr_queue(struct shr_dev *d, struct shr_req *r)
{
	struct scatterlist out, in, *sgs[] = { &out, &in };
	unsigned long flags;
	int ret;

	sg_init_one(&out, &r->req, sizeof(r->req));
	sg_init_one(&in, &r->resp, sizeof(r->resp));
	spin_lock_irqsave(&d->vq_lock, flags);
	if (d->broken) {
		ret = -ENODEV;
		goto unlock;
	}
	kref_get(&r->ref);
	ret = virtqueue_add_sgs(d->vq, sgs, 1, 1, r, GFP_ATOMIC);
	if (ret) {
		kref_put(&r->ref, shr_req_free);
		goto unlock;
	}
	virtqueue_kick(d->vq);
unlock:
	spin_unlock_irqrestore(&d->vq_lock, flags);
	return ret;
}

/* Sends @r and waits for the answer; the caller holds shr_lock. */
static int shr_transact(struct shr_dev *d, struct shr_req *r)
{
	long left;
	int ret;

	lockdep_assert_held(&shr_lock);
	ret = shr_queue(d, r);
	if (ret)
		return ret == -ENOSPC ? -EBUSY : ret;
	left = wait_for_completion_killable_timeout(&r->done, SHR_TIMEOUT);
	if (left < 0)
		return -EINTR;
	if (!left)
		return -ETIMEDOUT;
	if (r->err)
		return r->err;
	if (r->used < sizeof(r->resp)) {
		pr_warn("answer of %u bytes, want %zu\n", r->used, sizeof(r->resp));
		return -EIO;
	}
	return 0;
}

#if IS_ENABLED(CONFIG_VIRTIO_DMA_SHARED_BUFFER)
static int shr_uuid_of(struct dma_buf *db, u8 out[16])
{
	uuid_t uuid;
	int ret;

	if (!is_virtio_dma_buf(db))
		return -EMEDIUMTYPE;
	ret = virtio_dma_buf_get_uuid(db, &uuid);
	if (ret)
		return ret;
	memcpy(out, uuid.b, 16);
	return 0;
}
#else
static int shr_uuid_of(struct dma_buf *db, u8 out[16])
{
	return -EMEDIUMTYPE;
}
#endif

/* Fills the UUID and length of @run from its dma-buf fd. */
static int shr_resolve(struct dmaheap_sharing_run *run)
{
	struct dma_buf *db;
	int ret;

	db = dma_buf_get(run->fd);
	if (IS_ERR(db))
		return PTR_ERR(db);
	ret = shr_uuid_of(db, run->uuid);
	run->len = db->size;
	dma_buf_put(db);
	return ret;
}

static int shr_prepare(struct dmaheap_sharing_run *run)
{
	switch (run->op) {
	case DMAHEAP_IMP_OP_CHECK:
	case DMAHEAP_IMP_OP_HOLD:
		return shr_resolve(run);
	case DMAHEAP_IMP_OP_LOOKUP_ONLY:
		return run->fd < 0 ? 0 : shr_resolve(run);
	default:
		/* Any other op goes as it is: the device must answer it. */
		return 0;
	}
}

static long shr_run(struct dmaheap_sharing_run *run)
{
	struct shr_req *r;
	int ret;

	ret = shr_prepare(run);
	if (ret)
		return ret;
	r = kzalloc(sizeof(*r), GFP_KERNEL);
	if (!r)
		return -ENOMEM;
	kref_init(&r->ref);
	init_completion(&r->done);
	r->req.op = cpu_to_le32(run->op);
	memcpy(r->req.uuid, run->uuid, sizeof(r->req.uuid));
	r->req.len = cpu_to_le64(run->len);
	r->req.seed_in = cpu_to_le64(run->seed_in);
	r->req.seed_out = cpu_to_le64(run->seed_out);

	ret = mutex_lock_killable(&shr_lock);
	if (ret)
		goto put;
	ret = shr_dev ? shr_transact(shr_dev, r) : -ENODEV;
	mutex_unlock(&shr_lock);
	if (!ret)
		run->resp = r->resp;
put:
	kref_put(&r->ref, shr_req_free);
	return ret;
}

static long shr_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct dmaheap_sharing_run run;
	long ret;

	if (cmd != DMAHEAP_SHARING_IOC_RUN)
		return -ENOTTY;
	if (copy_from_user(&run, (void __user *)arg, sizeof(run)))
		return -EFAULT;
	ret = shr_run(&run);
	if (ret)
		return ret;
	if (copy_to_user((void __user *)arg, &run, sizeof(run)))
		return -EFAULT;
	return 0;
}

static const struct file_operations shr_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = shr_ioctl,
};

static struct miscdevice shr_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "dmaheap_sharing",
	.fops = &shr_fops,
	.mode = 0600,
};

static int shr_probe(struct virtio_device *vdev)
{
	struct shr_dev *d;
	int ret;

	d = kzalloc(sizeof(*d), GFP_KERNEL);
	if (!d)
		return -ENOMEM;
	d->vdev = vdev;
	spin_lock_init(&d->vq_lock);
	vdev->priv = d;
	d->vq = virtio_find_single_vq(vdev, shr_vq_done, "requests");
	if (IS_ERR(d->vq)) {
		ret = PTR_ERR(d->vq);
		goto free_dev;
	}
	virtio_device_ready(vdev);

	mutex_lock(&shr_lock);
	if (shr_dev) {
		ret = -EBUSY;
		goto unlock;
	}
	shr_dev = d;
	mutex_unlock(&shr_lock);
	dev_info(&vdev->dev, "test importer device ready\n");
	return 0;

unlock:
	mutex_unlock(&shr_lock);
	dev_err(&vdev->dev, "a second test importer device is not supported\n");
	virtio_reset_device(vdev);
	vdev->config->del_vqs(vdev);
free_dev:
	kfree(d);
	return ret;
}

static void shr_remove(struct virtio_device *vdev)
{
	struct shr_dev *d = vdev->priv;
	struct shr_req *r;
	unsigned long flags;

	/* No new requests; then the device stops and gives nothing back. */
	spin_lock_irqsave(&d->vq_lock, flags);
	d->broken = true;
	spin_unlock_irqrestore(&d->vq_lock, flags);
	virtio_reset_device(vdev);
	/* Wake the waiter, if any: it drops shr_lock, which we take next. */
	while ((r = virtqueue_detach_unused_buf(d->vq)))
		shr_req_finish(r, 0, -ENODEV);

	mutex_lock(&shr_lock);
	if (shr_dev == d)
		shr_dev = NULL;
	mutex_unlock(&shr_lock);
	vdev->config->del_vqs(vdev);
	kfree(d);
}

static const struct virtio_device_id shr_id_table[] = {
	{ DMAHEAP_IMP_DEVICE_ID, VIRTIO_DEV_ANY_ID },
	{ 0 },
};

static struct virtio_driver shr_driver = {
	.driver.name = KBUILD_MODNAME,
	.id_table = shr_id_table,
	.probe = shr_probe,
	.remove = shr_remove,
};

static int __init shr_init(void)
{
	int ret;

	ret = misc_register(&shr_misc);
	if (ret)
		return ret;
	ret = register_virtio_driver(&shr_driver);
	if (ret)
		goto deregister_misc;
	return 0;

deregister_misc:
	misc_deregister(&shr_misc);
	return ret;
}

static void __exit shr_exit(void)
{
	unregister_virtio_driver(&shr_driver);
	misc_deregister(&shr_misc);
}

module_init(shr_init);
module_exit(shr_exit);

MODULE_DEVICE_TABLE(virtio, shr_id_table);
MODULE_DESCRIPTION("virtio-dmaheap test: hands buffers to a host importer by UUID");
MODULE_LICENSE("GPL");
MODULE_IMPORT_NS("DMA_BUF");
