/*
 * virtio-blk at CPL3 (virtio 1.x §5.2): asynchronous read, write and flush on one
 * request queue, plus a blocking helper for start-up.
 *
 * A request is three descriptors (header, data, status byte; flush has no data)
 * whose header and status live in a per-slot DMA area; data buffers must be in
 * the heap (identity mapped) and whole sectors.  Completions come back in any
 * order with the device's status byte: VBLK_S_OK, VBLK_S_IOERR, VBLK_S_UNSUPP,
 * or VBLK_S_BADLEN when the device wrote less than the status byte.
 *
 * A device that fails is set up again and the requests it had not returned are
 * submitted again, in their order (vblk.c says why a replay is safe): when it
 * reports NEEDS_RESET (pyvmm: its back-end process died or missed a time-out), or
 * when nothing completes for VBLK_TIMEOUT_NS while requests wait (a hung device).
 * Meanwhile vblk_submit queues, and vblk_complete returns nothing: the caller's
 * requests wait, they do not fail.  A try that finds the device still unusable is
 * repeated later (virtio.h: every 50 ms, then every second, ~22 s in all); after
 * the last one the device is left FAILED and every waiting request completes with
 * VBLK_S_IOERR.  vblk_complete drives all of this: call it a few times a second
 * while vblk_inflight(), VIRTIO_RETRY_HZ times while vblk_recovering(); console lines:
 *   vblk: device-reset why=<needs-reset|timeout> inflight=<n>
 *   vblk: reinitialised tries=<n> replayed=<n> ms=<n>
 *   vblk: error=reset-failed tries=<n> inflight=<n>
 */
#ifndef ULIB_DEV_VBLK_H
#define ULIB_DEV_VBLK_H

#include <stdint.h>
#include "dev/virtio.h"

#define VBLK_SECTOR		512
#define VBLK_T_IN		0
#define VBLK_T_OUT		1
#define VBLK_T_FLUSH		4
#define VBLK_S_OK		0
#define VBLK_S_IOERR		1
#define VBLK_S_UNSUPP		2
#define VBLK_S_BADLEN		0x100	/* ours: the device returned too few bytes */
/* A disk request usually completes within a millisecond or two: poll that long
 * before sleeping for the interrupt (which costs an interrupt entry at CPL0, and two
 * register exits to acknowledge it). */
#define VBLK_SPIN_NS		2000000ULL
#define VIRTIO_BLK_F_RO		(1ULL << 5)
#define VIRTIO_BLK_F_FLUSH	(1ULL << 9)
#define VBLK_QUEUE		64
#define VBLK_TIMEOUT_NS		5000000000ULL	/* no completion for this long: the device hangs */

struct vblk_slot;

struct vblk {
	struct virtio_dev dev;
	struct virtq q;
	uint64_t capacity;		/* sectors */
	int has_flush, read_only, ready;
	struct vblk_slot *slots;	/* DMA area: header + status per slot */
	uint16_t free_slots[VBLK_QUEUE];
	unsigned nfree, nslots;
	uint64_t requests, errors;
	/* re-initialisation (vblk.c) */
	uint64_t next_seq;		/* submission order, kept per slot for the replay */
	uint64_t progress_ns;		/* last completion (or submit onto an idle queue) */
	uint64_t retry_ns, recover_start_ns;
	unsigned tries;			/* while recovering: set-ups tried so far */
	uint8_t recovering, failed;	/* failed: gave up, requests end with VBLK_S_IOERR */
	uint64_t resets, replayed;	/* successful re-initialisations, requests replayed */
};

/* Set up the device found by virtio_find() (the nth blk); 0 or a VIRTIO_E_*. */
int vblk_init(struct vblk *b, int nth);
/* Reset the device: no request is served or completes after this returns. */
void vblk_stop(struct vblk *b);
/* Queue a request (not kicked: vblk_kick); 0, or -1 if the queue is full or the
 * request lies outside the disk. */
int vblk_submit(struct vblk *b, uint32_t type, uint64_t sector, void *buf, uint32_t len, void *cookie);
static inline void vblk_kick(struct vblk *b) { virtq_kick(&b->q); }
/* One completion: its status (VBLK_S_*), *cookie set; -1 if none. */
int vblk_complete(struct vblk *b, void **cookie);
static inline unsigned vblk_inflight(const struct vblk *b) { return b->nslots - b->nfree; }
/* The device is being set up again (requests wait): call vblk_complete now and then. */
static inline int vblk_recovering(const struct vblk *b) { return b->recovering; }
/* Blocking request for set-up and recovery (sleeps in SYS_wait_interrupt; the
 * IRQ bits it sees are OR-ed into *irqs for the caller's other devices). */
int vblk_sync(struct vblk *b, uint32_t type, uint64_t sector, void *buf, uint32_t len, uint64_t *irqs);
/* Before sleeping: interrupts on if requests are in flight; nonzero if a
 * completion is already there. */
int vblk_arm(struct vblk *b);
void vblk_disarm(struct vblk *b);
/* The IRQ fired: InterruptStatus once, acknowledged.  NEEDS_RESET starts the
 * re-initialisation; -1 only if the device has been given up (vblk.h, top). */
int vblk_interrupt(struct vblk *b);

#endif
