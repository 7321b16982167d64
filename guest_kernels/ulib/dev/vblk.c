/* virtio-blk at CPL3 (see vblk.h). */
#include "ulib.h"
#include "dev/vblk.h"

struct vblk_slot {
	uint32_t type, reserved;
	uint64_t sector;
	uint8_t status;
	uint8_t pad[7];
	void *cookie;
	uint32_t len;
	uint32_t pad2;
};

int vblk_init(struct vblk *b, int nth)
{
	int r;

	b->ready = 0;
	if (!b->dev.regs && (r = virtio_find(VIRTIO_ID_BLOCK, nth, &b->dev)))
		return r;
	if ((r = virtio_begin(&b->dev, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_RO)))
		return r;
	if ((r = virtq_setup(&b->dev, &b->q, 0, VBLK_QUEUE))) {
		virtio_failed(&b->dev);
		return r;
	}
	b->capacity = virtio_config64(&b->dev, 0);
	b->has_flush = !!(b->dev.features & VIRTIO_BLK_F_FLUSH);
	b->read_only = !!(b->dev.features & VIRTIO_BLK_F_RO);
	if (!b->slots) {
		b->slots = ualloc(VBLK_QUEUE * sizeof(struct vblk_slot), 64);
		if (!b->slots)
			return VIRTIO_E_NOMEM;
	}
	b->nslots = b->q.size / 3;
	if (b->nslots > VBLK_QUEUE)
		b->nslots = VBLK_QUEUE;
	b->nfree = 0;
	for (unsigned i = b->nslots; i-- > 0;)
		b->free_slots[b->nfree++] = i;
	if ((r = virtio_driver_ok(&b->dev)))
		return r;
	b->ready = 1;
	return 0;
}

void vblk_stop(struct vblk *b)
{
	if (b->dev.regs)
		virtio_reset(&b->dev);
	b->ready = 0;
	b->nfree = 0;
}

int vblk_submit(struct vblk *b, uint32_t type, uint64_t sector, void *buf, uint32_t len, void *cookie)
{
	struct virtq_buf v[3];
	struct vblk_slot *s;
	unsigned slot, n = 0;

	if (!b->ready || !b->nfree)
		return -1;
	if (type != VBLK_T_FLUSH &&
	    (len % VBLK_SECTOR || sector > b->capacity || len / VBLK_SECTOR > b->capacity - sector))
		return -1;
	slot = b->free_slots[--b->nfree];
	s = &b->slots[slot];
	s->type = type;
	s->reserved = 0;
	s->sector = type == VBLK_T_FLUSH ? 0 : sector;
	s->status = 0xff;
	s->cookie = cookie;
	s->len = len;
	v[n++] = (struct virtq_buf){ s, 16 };
	if (type != VBLK_T_FLUSH && len)
		v[n++] = (struct virtq_buf){ buf, len };
	v[n++] = (struct virtq_buf){ &s->status, 1 };
	if (virtq_add(&b->q, v, type == VBLK_T_IN ? 1 : n - 1, type == VBLK_T_IN ? n - 1 : 1,
		      (void *)(uintptr_t)(slot + 1)) < 0) {
		b->free_slots[b->nfree++] = slot;
		return -1;
	}
	b->requests++;
	return 0;
}

int vblk_complete(struct vblk *b, void **cookie)
{
	uint32_t used;
	void *c = virtq_get(&b->q, &used);
	struct vblk_slot *s;
	unsigned slot;
	int status;

	if (!c)
		return -1;
	slot = (uintptr_t)c - 1;
	s = &b->slots[slot];
	status = s->status;
	/* The device wrote the data (reads) and the status byte: at least 1 byte. */
	if (used < 1 || (s->type == VBLK_T_IN && used < s->len + 1))
		status = VBLK_S_BADLEN;
	if (status != VBLK_S_OK)
		b->errors++;
	*cookie = s->cookie;
	b->free_slots[b->nfree++] = slot;
	return status;
}

int vblk_arm(struct vblk *b)
{
	if (!b->ready)
		return 0;
	virtq_intr(&b->q, vblk_inflight(b) > 0);
	return vblk_inflight(b) && virtq_has_used(&b->q);
}

void vblk_disarm(struct vblk *b)
{
	if (b->ready)
		virtq_intr(&b->q, 0);
}

int vblk_interrupt(struct vblk *b)
{
	uint32_t isr;

	if (!b->ready)
		return 0;
	isr = virtio_isr(&b->dev);
	if ((isr & VIRTIO_INT_CONFIG) && (virtio_status(&b->dev) & VIRTIO_S_NEEDS_RESET))
		return -1;
	return 0;
}

int vblk_sync(struct vblk *b, uint32_t type, uint64_t sector, void *buf, uint32_t len, uint64_t *irqs)
{
	void *cookie = NULL, *want = &cookie;
	int st;

	struct virtq *q = &b->q;

	if (vblk_submit(b, type, sector, buf, len, want))
		return VBLK_S_IOERR;
	vblk_kick(b);
	virtq_poll_used(&q, 1, VBLK_SPIN_NS);
	for (;;) {
		while ((st = vblk_complete(b, &cookie)) >= 0)
			if (cookie == want)
				return st;
		virtq_intr(&b->q, 1);
		if (virtq_has_used(&b->q))
			continue;
		uint64_t m = sys_wait_interrupt();
		if (irqs)
			*irqs |= m;
		if ((m >> b->dev.irq) & 1) {
			if (irqs)
				*irqs &= ~(1ULL << b->dev.irq);
			if (vblk_interrupt(b) < 0)
				return VBLK_S_IOERR;
		}
	}
}
