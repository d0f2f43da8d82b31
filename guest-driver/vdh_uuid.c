// SPDX-License-Identifier: GPL-2.0
/*
 * virtio-dmaheap: buffers as virtio_dma_bufs (VIRTIO_DMAHEAP_F_UUID), for
 * cross-device sharing. The driver of another virtio device that imports a
 * buffer asks for its UUID (virtio_dma_buf_get_uuid()) and hands it to its
 * device, whose back end looks the object up on the host.
 *
 * The first get_uuid sends ASSIGN_UUID; the UUID is kept for the buffer's
 * life (the device answers the same UUID for the same live buffer anyway).
 * Callers that come meanwhile wait for that one request, killably; its own
 * wait is bounded like every request's. A failure is not kept, except
 * -EOPNOTSUPP (S_UNSUPP: the device cannot export this buffer alone, or the
 * VMM cannot share objects), which does not change for a buffer.
 *
 * Once its session ended (device removed or reset, session lost) a buffer has
 * no UUID any more: -ENODEV, checked again after the answer, since the session
 * may end meanwhile (an answer for an id of the new session is dropped). No
 * session lock is held across the request: revocation takes dma_resv locks
 * with alloc_sem held for writing, and an importer may call get_uuid with a
 * reservation held.
 *
 * A buffer that was ever asked for a UUID never goes into the pool: its host
 * buffer may be held by an importer, so it goes back to the device with FREE,
 * which withdraws the UUID.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/dma-buf.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/uuid.h>
#include <linux/virtio_dma_buf.h>

#include "vdh.h"

/* Whether @buf still belongs to its device's current session. */
static bool vdh_buf_live(struct vdh_buffer *buf)
{
	return !READ_ONCE(buf->revoked) && buf->session == READ_ONCE(buf->vd->session);
}

/* Ask the device. Called with buf->uuid_lock held. */
static int vdh_buf_assign_uuid(struct vdh_buffer *buf)
{
	u8 raw[UUID_SIZE];
	int ret;

	lockdep_assert_held(&buf->uuid_lock);
	if (!vdh_buf_live(buf))
		return -ENODEV;
	/* Even if we give up waiting, the device may assign one. */
	buf->uuid_asked = true;
	ret = vdh_remote_assign_uuid(buf->vd, buf->id, raw);
	if (!vdh_buf_live(buf))
		return -ENODEV;
	if (ret == -EOPNOTSUPP)
		buf->uuid_err = ret;
	if (ret)
		return ret;
	import_uuid(&buf->uuid, raw);
	if (uuid_is_null(&buf->uuid)) {
		pr_err_ratelimited("device assigned the nil UUID to buffer %llu\n",
				   buf->id);
		return -EIO;
	}
	buf->uuid_set = true;
	return 0;
}

/* virtio_dma_buf_ops.get_uuid */
int vdh_buf_get_uuid(struct dma_buf *dmabuf, uuid_t *uuid)
{
	struct vdh_buffer *buf = dmabuf->priv;
	int ret;

	ret = mutex_lock_killable(&buf->uuid_lock);
	if (ret)
		return ret;
	if (READ_ONCE(buf->revoked))
		ret = -ENODEV;	/* the UUID went with the session */
	else if (!buf->uuid_set)
		ret = buf->uuid_err ?: vdh_buf_assign_uuid(buf);
	if (!ret)
		uuid_copy(uuid, &buf->uuid);
	mutex_unlock(&buf->uuid_lock);
	return ret;
}
