/* virtio-blk at CPL3 (see vblk.h). */
#include "ulib.h"
#include "dev/vblk.h"

struct vblk_slot {
	/* the request header and status byte the device reads and writes */
	uint32_t type, reserved;
	uint64_t sector;
	uint8_t status;
	uint8_t inflight;		/* submitted, not yet returned by vblk_complete */
	uint8_t pad[6];
	/* the driver's own: what a replay needs */
	void *cookie, *buf;
	uint32_t len;
	uint32_t pad2;
	uint64_t seq;
};

/* Negotiate, set up the queue, DRIVER_OK; the slots are untouched. */
static int setup(struct vblk *b)
{
	int r;

	if ((r = virtio_begin(&b->dev, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_RO)))
		return r;
	if ((r = virtq_setup(&b->dev, &b->q, 0, VBLK_QUEUE))) {
		virtio_failed(&b->dev);
		return r;
	}
	b->capacity = virtio_config64(&b->dev, 0);
	b->has_flush = !!(b->dev.features & VIRTIO_BLK_F_FLUSH);
	b->read_only = !!(b->dev.features & VIRTIO_BLK_F_RO);
	return virtio_driver_ok(&b->dev);
}

int vblk_init(struct vblk *b, int nth)
{
	int r;

	b->ready = 0;
	b->recovering = b->failed = 0;
	if (!b->dev.regs && (r = virtio_find(VIRTIO_ID_BLOCK, nth, &b->dev)))
		return r;
	if (!b->slots) {
		b->slots = ualloc(VBLK_QUEUE * sizeof(struct vblk_slot), 64);
		if (!b->slots)
			return VIRTIO_E_NOMEM;
	}
	b->nfree = 0;
	if ((r = setup(b)))
		return r;
	b->nslots = b->q.size / 3;
	if (b->nslots > VBLK_QUEUE)
		b->nslots = VBLK_QUEUE;
	for (unsigned i = b->nslots; i-- > 0;) {
		b->slots[i].inflight = 0;
		b->free_slots[b->nfree++] = i;
	}
	b->ready = 1;
	return 0;
}

void vblk_stop(struct vblk *b)
{
	if (b->dev.regs)
		virtio_reset(&b->dev);
	b->ready = 0;
	b->recovering = b->failed = 0;
	b->nfree = 0;
}

/* Put a slot's request on the ring (3 descriptors, or 2 for a flush). */
static int post(struct vblk *b, unsigned slot)
{
	struct vblk_slot *s = &b->slots[slot];
	struct virtq_buf v[3];
	unsigned n = 0;

	s->status = 0xff;
	v[n++] = (struct virtq_buf){ s, 16 };
	if (s->type != VBLK_T_FLUSH && s->len)
		v[n++] = (struct virtq_buf){ s->buf, s->len };
	v[n++] = (struct virtq_buf){ &s->status, 1 };
	return virtq_add(&b->q, v, s->type == VBLK_T_IN ? 1 : n - 1, s->type == VBLK_T_IN ? n - 1 : 1,
			 (void *)(uintptr_t)(slot + 1));
}

int vblk_submit(struct vblk *b, uint32_t type, uint64_t sector, void *buf, uint32_t len, void *cookie)
{
	struct vblk_slot *s;
	unsigned slot;

	if (!b->ready || b->failed || !b->nfree)
		return -1;
	if (type != VBLK_T_FLUSH &&
	    (len % VBLK_SECTOR || sector > b->capacity || len / VBLK_SECTOR > b->capacity - sector))
		return -1;
	if (!vblk_inflight(b))
		b->progress_ns = uclock_ns();	/* the time-out counts from here */
	slot = b->free_slots[--b->nfree];
	s = &b->slots[slot];
	s->type = type;
	s->reserved = 0;
	s->sector = type == VBLK_T_FLUSH ? 0 : sector;
	s->cookie = cookie;
	s->buf = buf;
	s->len = len;
	s->seq = b->next_seq++;
	/* While recovering, the request waits in its slot and goes out with the replay. */
	if (!b->recovering && post(b, slot) < 0) {
		b->free_slots[b->nfree++] = slot;
		return -1;
	}
	s->inflight = 1;
	b->requests++;
	return 0;
}

/* ---- re-initialisation ---- */

/*
 * Why a replay is safe.  A request the device has not returned may have been
 * carried out, partly or fully, or not at all; after the reset the device forgets
 * it (virtio 1.x §2.4: a reset device uses no buffer it was given before; pyvmm
 * starts a new back-end process only once the old one is reaped, so nothing of it
 * writes later).  Writing it again is harmless: a write carries its data and its
 * sector, so writing it twice leaves the same bytes; a flush twice is a flush; a
 * read is read again into the same buffer.  In submission order, because the device
 * had them in that order (virtio does not order requests in flight, and a driver
 * that has two overlapping writes in flight has no order to keep: webkv has one
 * request in flight at a time).  The caller has not been told of any of them, so
 * for it the requests simply took longer: nothing acknowledged depends on them.
 */
static unsigned replay(struct vblk *b)
{
	unsigned order[VBLK_QUEUE], n = 0;

	for (unsigned i = 0; i < b->nslots; i++) {	/* in-flight slots by seq (insertion sort) */
		unsigned k = n;
		if (!b->slots[i].inflight)
			continue;
		for (; k && b->slots[order[k - 1]].seq > b->slots[i].seq; k--)
			order[k] = order[k - 1];
		order[k] = i;
		n++;
	}
	for (unsigned i = 0; i < n; i++)
		post(b, order[i]);	/* cannot fail: the ring has room for every slot's chain */
	b->replayed += n;
	virtq_kick(&b->q);
	return n;
}

static void begin_recovery(struct vblk *b, const char *why, uint64_t now)
{
	if (b->recovering || b->failed)
		return;
	uprintf("vblk: device-reset why=%s inflight=%u\n", why, vblk_inflight(b));
	b->recovering = 1;
	b->tries = 0;
	b->retry_ns = b->recover_start_ns = now;
}

static void give_up(struct vblk *b)
{
	uprintf("vblk: error=reset-failed tries=%u inflight=%u\n", b->tries, vblk_inflight(b));
	virtio_failed(&b->dev);
	b->recovering = 0;
	b->failed = 1;
}

/* One set-up attempt if one is due; the next is scheduled if it fails. */
static void recover_step(struct vblk *b, uint64_t now)
{
	if (!b->recovering || now < b->retry_ns)
		return;
	b->tries++;
	if (setup(b) == 0 && b->q.size / 3 >= b->nslots) {
		b->recovering = 0;
		b->resets++;
		b->progress_ns = now;
		uprintf("vblk: reinitialised tries=%u replayed=%u ms=%lu\n", b->tries, replay(b),
			(unsigned long)((uclock_ns() - b->recover_start_ns) / 1000000));
		return;
	}
	if (b->tries >= VIRTIO_RESET_TRIES) {
		give_up(b);
		return;
	}
	b->retry_ns = now + virtio_retry_ns(b->tries);
}

/* Given up: the requests that waited end, one per call, with an I/O error. */
static int complete_failed(struct vblk *b, void **cookie)
{
	for (unsigned i = 0; i < b->nslots; i++) {
		struct vblk_slot *s = &b->slots[i];
		if (!s->inflight)
			continue;
		s->inflight = 0;
		b->errors++;
		*cookie = s->cookie;
		b->free_slots[b->nfree++] = i;
		return VBLK_S_IOERR;
	}
	return -1;
}

int vblk_complete(struct vblk *b, void **cookie)
{
	uint32_t used;
	void *c;
	struct vblk_slot *s;
	unsigned slot;
	int status;
	uint64_t now;

	if (!b->ready)
		return -1;
	if (b->recovering || vblk_inflight(b)) {
		now = uclock_ns();
		if (!b->recovering && !b->failed && now - b->progress_ns > VBLK_TIMEOUT_NS &&
		    !virtq_has_used(&b->q))
			begin_recovery(b, "timeout", now);
		recover_step(b, now);
	}
	if (b->failed)
		return complete_failed(b, cookie);
	if (b->recovering || !(c = virtq_get(&b->q, &used)))
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
	s->inflight = 0;
	b->free_slots[b->nfree++] = slot;
	b->progress_ns = uclock_ns();
	return status;
}

int vblk_arm(struct vblk *b)
{
	if (!b->ready || b->recovering)
		return 0;
	if (b->failed)
		return vblk_inflight(b) > 0;	/* their errors are ready */
	virtq_intr(&b->q, vblk_inflight(b) > 0);
	return vblk_inflight(b) && virtq_has_used(&b->q);
}

void vblk_disarm(struct vblk *b)
{
	if (b->ready && !b->recovering && !b->failed)
		virtq_intr(&b->q, 0);
}

int vblk_interrupt(struct vblk *b)
{
	uint32_t isr;

	if (!b->ready)
		return 0;
	isr = virtio_isr(&b->dev);
	/* While recovering, a try that failed raises NEEDS_RESET again: the schedule
	 * decides when to try next, not the interrupt. */
	if (!b->recovering && !b->failed && (isr & VIRTIO_INT_CONFIG) &&
	    (virtio_status(&b->dev) & VIRTIO_S_NEEDS_RESET)) {
		uint64_t now = uclock_ns();
		begin_recovery(b, "needs-reset", now);
		recover_step(b, now);	/* at once: a device reset may be all it takes */
	}
	return b->failed ? -1 : 0;
}

/* Sleep until an interrupt, with the timer at VIRTIO_RETRY_HZ meanwhile (then back to what it
 * was), so that a request that never completes, or a retry, is not waited for forever. */
static uint64_t wait_for_device(void)
{
	int64_t hz = sys_timer(VIRTIO_RETRY_HZ);
	uint64_t m = sys_wait_interrupt();

	sys_timer(hz);
	return m;
}

int vblk_sync(struct vblk *b, uint32_t type, uint64_t sector, void *buf, uint32_t len, uint64_t *irqs)
{
	void *cookie = NULL, *want = &cookie;
	int st;

	struct virtq *q = &b->q;

	if (vblk_submit(b, type, sector, buf, len, want))
		return VBLK_S_IOERR;
	vblk_kick(b);
	if (!b->recovering)
		virtq_poll_used(&q, 1, VBLK_SPIN_NS);
	for (;;) {
		while ((st = vblk_complete(b, &cookie)) >= 0)
			if (cookie == want)
				return st;
		if (!b->recovering) {
			virtq_intr(&b->q, 1);
			if (virtq_has_used(&b->q))
				continue;
		}
		uint64_t m = wait_for_device();
		if (irqs)
			*irqs |= m;
		if ((m >> b->dev.irq) & 1) {
			if (irqs)
				*irqs &= ~(1ULL << b->dev.irq);
			vblk_interrupt(b);	/* a give-up shows in vblk_complete */
		}
	}
}
