/*
 * virtio 1.x over the modern virtio-mmio transport (version 2) with split
 * virtqueues, driven at CPL3.
 *
 * Devices are announced on the kernel command line the Linux way,
 * `virtio_mmio.device=<size>@<base>:<irq>` (size with K/M/G suffix, base in hex,
 * irq = IOAPIC pin), one word per device.  virtio_find() maps the window (SYS_map,
 * uncached), checks magic and version and matches the DeviceID; the IRQ pin is
 * routed with SYS_irq (edge, active high) and shows up as bit `irq` of
 * sys_wait_interrupt()'s mask.
 *
 * Every register access is a VM exit (tens of microseconds under pyvmm), so the
 * data path touches only QueueNotify (an ioeventfd) and, once per interrupt,
 * InterruptStatus/InterruptACK.  Rings and buffers live in the heap, which is
 * identity mapped: virtual address == guest-physical address.
 */
#ifndef ULIB_DEV_VIRTIO_H
#define ULIB_DEV_VIRTIO_H

#include <stddef.h>
#include <stdint.h>

#define VIRTIO_MMIO_MAX		16	/* devices parsed from the command line */

#define VIRTIO_ID_NET		1
#define VIRTIO_ID_BLOCK		2
#define VIRTIO_ID_VSOCK		19

#define VIRTIO_F_VERSION_1	(1ULL << 32)

/* Status bits */
#define VIRTIO_S_ACKNOWLEDGE	0x01
#define VIRTIO_S_DRIVER		0x02
#define VIRTIO_S_DRIVER_OK	0x04
#define VIRTIO_S_FEATURES_OK	0x08
#define VIRTIO_S_NEEDS_RESET	0x40
#define VIRTIO_S_FAILED		0x80

/* InterruptStatus bits */
#define VIRTIO_INT_USED		0x1
#define VIRTIO_INT_CONFIG	0x2

/*
 * Setting a device up again after NEEDS_RESET (vblk, vsock): pyvmm starts a new
 * back-end process in ~0.15-0.5 s, so a try that finds the device still unusable is
 * repeated every 50 ms for 2 s, then every second, VIRTIO_RESET_TRIES in all (~22 s);
 * then the driver gives up.  A failed try costs ~20 register exits.  A program
 * sleeping meanwhile keeps a VIRTIO_RETRY_HZ timer on to be woken for the retries.
 */
#define VIRTIO_RESET_TRIES	60
#define VIRTIO_RETRY_HZ		20
/* When the try after `tries` failed ones is due, from now (ns). */
static inline uint64_t virtio_retry_ns(unsigned tries)
{
	return tries < 40 ? 50000000ULL : 1000000000ULL;
}

/* errors (negative returns) */
#define VIRTIO_E_NODEV		(-19)	/* nothing there / wrong magic, version or ID */
#define VIRTIO_E_FEATURES	(-95)	/* FEATURES_OK refused, or VERSION_1 missing */
#define VIRTIO_E_NOMEM		(-12)
#define VIRTIO_E_QUEUE		(-22)	/* queue absent or too small */
#define VIRTIO_E_FAILED		(-5)	/* NEEDS_RESET after DRIVER_OK */

struct virtio_mmio_desc {
	uint64_t base, size;
	unsigned irq;
};

struct virtio_dev {
	uint64_t base, size;
	unsigned irq;
	uint32_t device_id;
	uint64_t features;		/* negotiated */
	volatile uint32_t *regs;
	uint64_t interrupts;		/* interrupts handled (virtio_isr calls) */
};

/* The command line's virtio_mmio.device= words, in order; returns how many. */
int virtio_mmio_parse(struct virtio_mmio_desc *out, int max);
/* The nth (0-based) device with this DeviceID: mapped and probed, IRQ routed.
 * Touches the device's registers only when the word's window could be it
 * (every window is probed until the nth match). */
int virtio_find(uint32_t device_id, int nth, struct virtio_dev *dev);
/* Map and probe one window (magic, version 2, DeviceID != 0); routes the IRQ. */
int virtio_probe(const struct virtio_mmio_desc *d, struct virtio_dev *dev);

/* Reset, ACKNOWLEDGE, DRIVER, feature negotiation (wanted & offered; VERSION_1
 * required), FEATURES_OK checked.  Queues are set up next, then virtio_driver_ok. */
int virtio_begin(struct virtio_dev *dev, uint64_t wanted);
int virtio_driver_ok(struct virtio_dev *dev);
void virtio_reset(struct virtio_dev *dev);		/* Status = 0: the device forgets everything */
void virtio_failed(struct virtio_dev *dev);		/* Status |= FAILED */
uint32_t virtio_status(struct virtio_dev *dev);
/* Once per interrupt: read InterruptStatus and acknowledge it; returns it. */
uint32_t virtio_isr(struct virtio_dev *dev);
uint32_t virtio_config32(struct virtio_dev *dev, unsigned off);
uint64_t virtio_config64(struct virtio_dev *dev, unsigned off);	/* generation-checked */

/* ---- split virtqueue ---- */

#define VIRTQ_DESC_F_NEXT	1
#define VIRTQ_DESC_F_WRITE	2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY	1

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags, next;
};

struct virtq_used_elem {
	uint32_t id, len;
};

struct virtq_buf {			/* one descriptor's worth */
	void *addr;
	uint32_t len;
};

struct virtq {
	struct virtio_dev *dev;
	uint16_t index, size;
	struct virtq_desc *desc;
	volatile uint16_t *avail;		/* flags, idx, ring[size], used_event */
	volatile uint16_t *used_hdr;		/* flags, idx */
	volatile struct virtq_used_elem *used_ring;
	void **cookie;				/* per head */
	uint16_t free_head, num_free;
	uint16_t avail_idx, last_used;
	uint16_t added;				/* entries published since the last kick */
	uint16_t inflight;			/* chains the device has not returned */
	uint16_t intr_off;			/* NO_INTERRUPT currently set */
	void *mem;				/* ring memory (kept across re-setup) */
	unsigned mem_size;
	uint64_t kicks;
};

/* Allocate (first time) and configure queue `index` with up to `size` entries
 * (clamped to QueueNumMax, a power of two).  Between virtio_begin and
 * virtio_driver_ok. */
int virtq_setup(struct virtio_dev *dev, struct virtq *q, unsigned index, unsigned size);
/* Add a chain: `out` device-readable buffers, then `in` device-writable ones.
 * Published at once (avail.idx); returns the head, or -1 if the ring is full. */
int virtq_add(struct virtq *q, const struct virtq_buf *bufs, unsigned out, unsigned in, void *cookie);
/* Notify the device if anything was added since the last kick (and it wants kicks). */
void virtq_kick(struct virtq *q);
/* The device's used.idx, validated: a value that would return more chains than
 * are in flight is not believed (re-read, else treated as "nothing new").  A
 * device model may publish the index non-atomically (CPython's struct.pack_into
 * zero-fills before it writes, so used.idx can read 0 for an instant). */
uint16_t virtq_used_idx(struct virtq *q);
/* The next used chain's cookie (its descriptors are freed), or NULL. */
void *virtq_get(struct virtq *q, uint32_t *len);
static inline int virtq_has_used(struct virtq *q)
{
	return virtq_used_idx(q) != q->last_used;
}
/* Interrupt suppression (VIRTQ_AVAIL_F_NO_INTERRUPT).  virtq_intr(q, 1) clears
 * it with a full fence; check virtq_has_used() afterwards before sleeping. */
void virtq_intr(struct virtq *q, int on);
/* Spin (at CPL3, no exits) until one of the queues has used buffers or ns have
 * passed; 1 if one has. */
int virtq_poll_used(struct virtq *const *qs, int n, uint64_t ns);
/* Entries the device has not returned yet. */
static inline unsigned virtq_outstanding(const struct virtq *q)
{
	return q->size - q->num_free;
}

static inline void virtio_mb(void) { __asm__ volatile("mfence" ::: "memory"); }
static inline void virtio_barrier(void) { __asm__ volatile("" ::: "memory"); }

#endif
