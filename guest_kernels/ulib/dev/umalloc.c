/* umalloc: size-class allocator over ualloc() (see umalloc.h). */
#include "ulib.h"
#include "dev/umalloc.h"

#define HDR		16
#define MIN_SHIFT	5			/* smallest class: 32 bytes */
#define MAX_SHIFT	40
#define NCLASSES	((MAX_SHIFT - MIN_SHIFT) * 4 + 1)
#define MAGIC		0x6b6c6275u		/* "ublk" */
#define FREED		0x65657266u		/* "free" */

struct hdr {
	uint32_t cls;
	uint32_t magic;
	uint64_t pad;
};

struct umalloc_stats umalloc_stats;
static void *free_list[NCLASSES];

static size_t class_size(unsigned c)
{
	unsigned s, sub;

	if (c == 0)
		return 1UL << MIN_SHIFT;
	s = (c - 1) / 4 + MIN_SHIFT;		/* (2^s, 2^(s+1)] in 4 steps */
	sub = (c - 1) % 4;
	return (1UL << s) + (sub + 1) * (1UL << (s - 2));
}

/* The smallest class holding n bytes (header included); NCLASSES if too big. */
static unsigned size_class(size_t n)
{
	unsigned s, sub;

	if (n <= (1UL << MIN_SHIFT))
		return 0;
	s = 63 - __builtin_clzl(n - 1);		/* 2^s < n <= 2^(s+1) */
	if (s >= MAX_SHIFT)
		return NCLASSES;
	sub = (unsigned)((n - 1 - (1UL << s)) >> (s - 2));	/* 0..3 */
	return (s - MIN_SHIFT) * 4 + sub + 1;
}

void *umalloc(size_t size)
{
	unsigned c;
	struct hdr *h;

	if (size > (1UL << (MAX_SHIFT - 1)) || (c = size_class(size + HDR)) >= NCLASSES) {
		umalloc_stats.failures++;
		return NULL;
	}
	if (free_list[c]) {
		h = free_list[c];
		free_list[c] = *(void **)(h + 1);
	} else {
		h = ualloc(class_size(c), 16);
		if (!h) {
			umalloc_stats.failures++;
			return NULL;
		}
		umalloc_stats.carved += class_size(c);
	}
	h->cls = c;
	h->magic = MAGIC;
	umalloc_stats.in_use += class_size(c);
	return h + 1;
}

void *ucalloc(size_t size)
{
	void *p = umalloc(size);

	if (p)
		memset(p, 0, size);
	return p;
}

void ufree(void *p)
{
	struct hdr *h;

	if (!p)
		return;
	h = (struct hdr *)p - 1;
	if (h->magic != MAGIC || h->cls >= NCLASSES) {
		uprintf("umalloc: error=bad-free ptr=%p\n", p);
		sys_exit(5);
	}
	h->magic = FREED;
	umalloc_stats.in_use -= class_size(h->cls);
	*(void **)p = free_list[h->cls];
	free_list[h->cls] = h;
}

size_t umalloc_usable(const void *p)
{
	const struct hdr *h = (const struct hdr *)p - 1;

	return class_size(h->cls) - HDR;
}

void *urealloc(void *p, size_t size)
{
	void *q;
	size_t have;

	if (!p)
		return umalloc(size);
	have = umalloc_usable(p);
	if (size <= have)
		return p;
	q = umalloc(size);
	if (!q)
		return NULL;
	memcpy(q, p, have);
	ufree(p);
	return q;
}
