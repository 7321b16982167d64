/*
 * umalloc: malloc/free for CPL3 services, on top of ulib's bump heap.
 *
 * Size classes of 4 steps per power of two (32, 40, 48, 56, 64, 80, ... bytes
 * including a 16-byte header), each with a free list; a block is carved from
 * ualloc() the first time its class is empty and never goes back to the bump
 * heap.  Memory is identity mapped (virtual == physical), so every block may be
 * handed to a device for DMA.  Not thread-safe (there is one thread).
 */
#ifndef ULIB_DEV_UMALLOC_H
#define ULIB_DEV_UMALLOC_H

#include <stddef.h>
#include <stdint.h>

void *umalloc(size_t size);			/* 16-byte aligned, or NULL */
void *ucalloc(size_t size);			/* zeroed */
void ufree(void *p);				/* NULL is fine */
void *urealloc(void *p, size_t size);		/* NULL on failure (p is kept) */
size_t umalloc_usable(const void *p);		/* bytes usable at p */

struct umalloc_stats {
	uint64_t in_use;	/* bytes of live blocks (class sizes) */
	uint64_t carved;	/* bytes taken from the bump heap */
	uint64_t failures;	/* allocations that returned NULL */
};
extern struct umalloc_stats umalloc_stats;

#endif
