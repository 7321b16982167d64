/* virtio-mmio (version 2) transport and split virtqueues at CPL3 (see virtio.h). */
#include "ulib.h"
#include "dev/virtio.h"

#define MAGIC_VALUE		0x000
#define VERSION			0x004
#define DEVICE_ID		0x008
#define DEVICE_FEATURES		0x010
#define DEVICE_FEATURES_SEL	0x014
#define DRIVER_FEATURES		0x020
#define DRIVER_FEATURES_SEL	0x024
#define QUEUE_SEL		0x030
#define QUEUE_NUM_MAX		0x034
#define QUEUE_NUM		0x038
#define QUEUE_READY		0x044
#define QUEUE_NOTIFY		0x050
#define INTERRUPT_STATUS	0x060
#define INTERRUPT_ACK		0x064
#define STATUS			0x070
#define QUEUE_DESC_LOW		0x080
#define QUEUE_DESC_HIGH		0x084
#define QUEUE_DRIVER_LOW	0x090
#define QUEUE_DRIVER_HIGH	0x094
#define QUEUE_DEVICE_LOW	0x0a0
#define QUEUE_DEVICE_HIGH	0x0a4
#define CONFIG_GENERATION	0x0fc
#define CONFIG			0x100

#define MMIO_MAGIC		0x74726976	/* "virt" */

static inline uint32_t rd(struct virtio_dev *d, unsigned off)
{
	return d->regs[off / 4];
}

static inline void wr(struct virtio_dev *d, unsigned off, uint32_t v)
{
	d->regs[off / 4] = v;
}

/* ---- command line ---- */

static int parse_num(const char **sp, uint64_t *out)
{
	const char *s = *sp;
	uint64_t v = 0;
	unsigned base = 10, digits = 0;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
		s += 2, base = 16;
	for (;; s++, digits++) {
		unsigned c = (unsigned char)*s, d;
		if (c >= '0' && c <= '9')
			d = c - '0';
		else if (base == 16 && (c | 0x20) >= 'a' && (c | 0x20) <= 'f')
			d = (c | 0x20) - 'a' + 10;
		else
			break;
		if (v > (~0ULL - d) / base)
			return -1;
		v = v * base + d;
	}
	if (!digits)
		return -1;
	*sp = s;
	*out = v;
	return 0;
}

/* "<size>[KMG]@<base>:<irq>[:<id>]" */
static int parse_device(const char *s, struct virtio_mmio_desc *d)
{
	uint64_t size, base, irq;

	if (parse_num(&s, &size))
		return -1;
	if (*s == 'K' || *s == 'k')
		size <<= 10, s++;
	else if (*s == 'M' || *s == 'm')
		size <<= 20, s++;
	else if (*s == 'G' || *s == 'g')
		size <<= 30, s++;
	if (*s++ != '@' || parse_num(&s, &base) || *s++ != ':' || parse_num(&s, &irq))
		return -1;
	if (*s && *s != ':')
		return -1;
	if (!size || size > (1UL << 20) || base >= (4UL << 30) || size > (4UL << 30) - base || irq >= 24)
		return -1;
	d->base = base;
	d->size = size;
	d->irq = irq;
	return 0;
}

int virtio_mmio_parse(struct virtio_mmio_desc *out, int max)
{
	static const char key[] = "virtio_mmio.device=";
	const char *s = uinfo->cmdline;
	int n = 0;

	while (*s && n < max) {
		const char *w = s;
		char word[128];
		size_t len = 0;

		while (*s && *s != ' ' && *s != '\t' && *s != '\n')
			s++;
		len = s - w;
		while (*s == ' ' || *s == '\t' || *s == '\n')
			s++;
		if (len <= sizeof(key) - 1 || len >= sizeof(word) || strncmp(w, key, sizeof(key) - 1))
			continue;
		memcpy(word, w + sizeof(key) - 1, len - (sizeof(key) - 1));
		word[len - (sizeof(key) - 1)] = 0;
		if (parse_device(word, &out[n]) == 0)
			n++;
		else
			uprintf("virtio: warning=bad-device-word word=\"%s\"\n", word);
	}
	return n;
}

int virtio_probe(const struct virtio_mmio_desc *d, struct virtio_dev *dev)
{
	int64_t m;

	memset(dev, 0, sizeof(*dev));
	if (d->size < 0x200)
		return VIRTIO_E_NODEV;
	m = sys_map(d->base, d->size, MAP_NOCACHE);
	if (m < 0)
		return VIRTIO_E_NODEV;
	dev->base = d->base;
	dev->size = d->size;
	dev->irq = d->irq;
	dev->regs = (volatile uint32_t *)(uintptr_t)d->base;
	if (rd(dev, MAGIC_VALUE) != MMIO_MAGIC || rd(dev, VERSION) != 2)
		return VIRTIO_E_NODEV;
	dev->device_id = rd(dev, DEVICE_ID);
	if (!dev->device_id)
		return VIRTIO_E_NODEV;
	return 0;
}

int virtio_find(uint32_t device_id, int nth, struct virtio_dev *dev)
{
	struct virtio_mmio_desc d[VIRTIO_MMIO_MAX];
	int n = virtio_mmio_parse(d, VIRTIO_MMIO_MAX);

	for (int i = 0; i < n; i++) {
		if (virtio_probe(&d[i], dev) == 0 && dev->device_id == device_id && nth-- == 0) {
			sys_irq(dev->irq, IRQ_EDGE_HIGH);
			return 0;
		}
	}
	memset(dev, 0, sizeof(*dev));
	return VIRTIO_E_NODEV;
}

/* ---- device status and features ---- */

void virtio_reset(struct virtio_dev *dev)
{
	wr(dev, STATUS, 0);
	for (int i = 0; i < 1000 && rd(dev, STATUS); i++)
		;
}

void virtio_failed(struct virtio_dev *dev)
{
	wr(dev, STATUS, rd(dev, STATUS) | VIRTIO_S_FAILED);
}

uint32_t virtio_status(struct virtio_dev *dev)
{
	return rd(dev, STATUS);
}

int virtio_begin(struct virtio_dev *dev, uint64_t wanted)
{
	uint64_t offered;
	uint32_t st = VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER;

	virtio_reset(dev);
	wr(dev, STATUS, VIRTIO_S_ACKNOWLEDGE);
	wr(dev, STATUS, st);
	wr(dev, DEVICE_FEATURES_SEL, 0);
	offered = rd(dev, DEVICE_FEATURES);
	wr(dev, DEVICE_FEATURES_SEL, 1);
	offered |= (uint64_t)rd(dev, DEVICE_FEATURES) << 32;
	dev->features = (wanted | VIRTIO_F_VERSION_1) & offered;
	if (!(dev->features & VIRTIO_F_VERSION_1)) {
		virtio_failed(dev);
		return VIRTIO_E_FEATURES;
	}
	wr(dev, DRIVER_FEATURES_SEL, 0);
	wr(dev, DRIVER_FEATURES, (uint32_t)dev->features);
	wr(dev, DRIVER_FEATURES_SEL, 1);
	wr(dev, DRIVER_FEATURES, (uint32_t)(dev->features >> 32));
	st |= VIRTIO_S_FEATURES_OK;
	wr(dev, STATUS, st);
	if (!(rd(dev, STATUS) & VIRTIO_S_FEATURES_OK)) {
		virtio_failed(dev);
		return VIRTIO_E_FEATURES;
	}
	return 0;
}

int virtio_driver_ok(struct virtio_dev *dev)
{
	uint32_t st = rd(dev, STATUS);

	wr(dev, STATUS, st | VIRTIO_S_DRIVER_OK);
	st = rd(dev, STATUS);
	if ((st & (VIRTIO_S_NEEDS_RESET | VIRTIO_S_FAILED)) || !(st & VIRTIO_S_DRIVER_OK))
		return VIRTIO_E_FAILED;
	return 0;
}

uint32_t virtio_isr(struct virtio_dev *dev)
{
	uint32_t isr = rd(dev, INTERRUPT_STATUS);

	if (isr)
		wr(dev, INTERRUPT_ACK, isr);
	dev->interrupts++;
	return isr;
}

uint32_t virtio_config32(struct virtio_dev *dev, unsigned off)
{
	return rd(dev, CONFIG + off);
}

uint64_t virtio_config64(struct virtio_dev *dev, unsigned off)
{
	uint32_t gen, lo, hi;

	do {
		gen = rd(dev, CONFIG_GENERATION);
		lo = rd(dev, CONFIG + off);
		hi = rd(dev, CONFIG + off + 4);
	} while (gen != rd(dev, CONFIG_GENERATION));
	return ((uint64_t)hi << 32) | lo;
}

/* ---- split virtqueue ---- */

static unsigned ring_bytes(unsigned n, unsigned *avail_off, unsigned *used_off)
{
	unsigned a = 16 * n;				/* descriptor table */
	unsigned u = (a + 6 + 2 * n + 4095) & ~4095u;	/* avail ring, then the used ring on its own page */

	*avail_off = a;
	*used_off = u;
	return u + ((6 + 8 * n + 4095) & ~4095u);
}

int virtq_setup(struct virtio_dev *dev, struct virtq *q, unsigned index, unsigned size)
{
	unsigned max, avail_off, used_off, bytes;
	uint64_t pa;

	wr(dev, QUEUE_SEL, index);
	if (rd(dev, QUEUE_READY))
		return VIRTIO_E_QUEUE;
	max = rd(dev, QUEUE_NUM_MAX);
	if (!max)
		return VIRTIO_E_QUEUE;
	if (size > max)
		size = max;
	if (size > 32768)
		size = 32768;
	while (size & (size - 1))
		size &= size - 1;		/* a power of two */
	if (size < 2)
		return VIRTIO_E_QUEUE;
	bytes = ring_bytes(size, &avail_off, &used_off);
	if (!q->mem || q->mem_size < bytes) {
		void *mem = ualloc(bytes, 4096);
		void **cookie = ualloc(size * sizeof(void *), 16);
		if (!mem || !cookie)
			return VIRTIO_E_NOMEM;
		q->mem = mem;
		q->mem_size = bytes;
		q->cookie = cookie;
	}
	memset(q->mem, 0, bytes);
	q->dev = dev;
	q->index = index;
	q->size = size;
	q->desc = q->mem;
	q->avail = (volatile uint16_t *)((char *)q->mem + avail_off);
	q->used_hdr = (volatile uint16_t *)((char *)q->mem + used_off);
	q->used_ring = (volatile struct virtq_used_elem *)((char *)q->mem + used_off + 4);
	for (unsigned i = 0; i < size; i++) {
		q->desc[i].next = i + 1 < size ? i + 1 : 0;
		q->cookie[i] = NULL;
	}
	q->free_head = 0;
	q->num_free = size;
	q->avail_idx = q->last_used = q->added = q->inflight = 0;
	q->intr_off = 0;
	pa = (uint64_t)(uintptr_t)q->mem;
	wr(dev, QUEUE_NUM, size);
	wr(dev, QUEUE_DESC_LOW, (uint32_t)pa);
	wr(dev, QUEUE_DESC_HIGH, (uint32_t)(pa >> 32));
	pa += avail_off;
	wr(dev, QUEUE_DRIVER_LOW, (uint32_t)pa);
	wr(dev, QUEUE_DRIVER_HIGH, (uint32_t)(pa >> 32));
	pa = (uint64_t)(uintptr_t)q->mem + used_off;
	wr(dev, QUEUE_DEVICE_LOW, (uint32_t)pa);
	wr(dev, QUEUE_DEVICE_HIGH, (uint32_t)(pa >> 32));
	wr(dev, QUEUE_READY, 1);
	return 0;
}

int virtq_add(struct virtq *q, const struct virtq_buf *bufs, unsigned out, unsigned in, void *cookie)
{
	unsigned n = out + in, head, i, last = 0;

	if (!n || n > q->num_free)
		return -1;
	head = i = q->free_head;
	for (unsigned k = 0; k < n; k++) {
		struct virtq_desc *d = &q->desc[i];
		d->addr = (uint64_t)(uintptr_t)bufs[k].addr;
		d->len = bufs[k].len;
		d->flags = (k >= out ? VIRTQ_DESC_F_WRITE : 0) | (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0);
		last = i;
		i = d->next;
	}
	q->free_head = q->desc[last].next;
	q->num_free -= n;
	q->cookie[head] = cookie;
	q->avail[2 + (q->avail_idx & (q->size - 1))] = head;
	virtio_barrier();		/* the entry before the index (x86 keeps store order) */
	q->avail[1] = ++q->avail_idx;
	q->added++;
	q->inflight++;
	return head;
}

void virtq_kick(struct virtq *q)
{
	if (!q->added)
		return;
	q->added = 0;
	virtio_mb();			/* avail.idx visible before we read used.flags */
	if (q->used_hdr[0] & VIRTQ_USED_F_NO_NOTIFY)
		return;
	q->dev->regs[QUEUE_NOTIFY / 4] = q->index;
	q->kicks++;
}

uint16_t virtq_used_idx(struct virtq *q)
{
	for (int tries = 0; tries < 64; tries++) {
		uint16_t idx = q->used_hdr[1];
		uint16_t n = idx - q->last_used;

		/* 0 is also what a half-written index looks like: confirm it.  (A
		 * byte-wise write can also show the low byte alone; with at most 256
		 * chains in flight that is never in range.) */
		if (!n || (n <= q->inflight && (idx || tries >= 32)))
			return idx;
		__asm__ volatile("pause" ::: "memory");
	}
	return q->last_used;		/* not plausible: nothing new yet */
}

void *virtq_get(struct virtq *q, uint32_t *len)
{
	uint16_t slot;
	uint32_t id, n = 1, i;
	void *cookie;

	if (virtq_used_idx(q) == q->last_used)
		return NULL;
	virtio_barrier();		/* the index before the entry */
	slot = q->last_used & (q->size - 1);
	id = q->used_ring[slot].id;
	if (len)
		*len = q->used_ring[slot].len;
	q->last_used++;
	if (id >= q->size || !(cookie = q->cookie[id])) {
		uprintf("virtio: error=bad-used-id queue=%u id=%u\n", q->index, id);
		return NULL;
	}
	q->cookie[id] = NULL;
	q->inflight--;
	for (i = id; q->desc[i].flags & VIRTQ_DESC_F_NEXT; i = q->desc[i].next)
		n++;
	q->desc[i].next = q->free_head;
	q->free_head = id;
	q->num_free += n;
	return cookie;
}

int virtq_poll_used(struct virtq *const *qs, int n, uint64_t ns)
{
	uint64_t until = uclock_ns() + ns;

	do {
		for (int i = 0; i < n; i++)
			if (virtq_has_used(qs[i]))
				return 1;
		__asm__ volatile("pause");
	} while (uclock_ns() < until);
	return 0;
}

void virtq_intr(struct virtq *q, int on)
{
	if (on == !q->intr_off)
		return;
	q->intr_off = !on;
	q->avail[0] = on ? 0 : VIRTQ_AVAIL_F_NO_INTERRUPT;
	if (on)
		virtio_mb();		/* the flag before we look at used.idx again */
}
