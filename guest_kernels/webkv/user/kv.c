/* The in-memory index: a chained hash table in the CPL3 heap, doubled as it grows. */
#include "webkv.h"

static struct kv_entry **buckets;
static size_t nbuckets, count;
static uint64_t live_bytes, seed;

static uint64_t hash(const char *k, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ULL ^ seed;

	for (size_t i = 0; i < n; i++)
		h = (h ^ (uint8_t)k[i]) * 0x100000001b3ULL;
	h ^= h >> 29;
	h *= 0xbf58476d1ce4e5b9ULL;
	return h ^ (h >> 32);
}

void kv_init(void)
{
	seed = urdtsc() * 0x9e3779b97f4a7c15ULL;
	nbuckets = 1024;
	buckets = ucalloc(nbuckets * sizeof(*buckets));
	count = 0;
	live_bytes = 0;
	if (!buckets) {
		uprintf("webkv: error=out-of-memory\n");
		sys_exit(1);
	}
}

void kv_clear(void)
{
	for (size_t i = 0; i < nbuckets; i++) {
		for (struct kv_entry *e = buckets[i], *n; e; e = n) {
			n = e->next;
			ufree(e->val);
			ufree(e);
		}
		buckets[i] = NULL;
	}
	count = 0;
	live_bytes = 0;
}

static struct kv_entry **slot(const char *key, size_t klen, uint64_t h)
{
	struct kv_entry **pp = &buckets[h & (nbuckets - 1)];

	for (; *pp; pp = &(*pp)->next)
		if ((*pp)->hash == h && (*pp)->klen == klen && !memcmp((*pp)->key, key, klen))
			break;
	return pp;
}

struct kv_entry *kv_get(const char *key, size_t klen)
{
	return *slot(key, klen, hash(key, klen));
}

static void grow(void)
{
	size_t n = nbuckets * 2;
	struct kv_entry **b = ucalloc(n * sizeof(*b));

	if (!b)
		return;			/* stay at this size: longer chains, still correct */
	for (size_t i = 0; i < nbuckets; i++) {
		for (struct kv_entry *e = buckets[i], *next; e; e = next) {
			next = e->next;
			e->next = b[e->hash & (n - 1)];
			b[e->hash & (n - 1)] = e;
		}
	}
	ufree(buckets);
	buckets = b;
	nbuckets = n;
}

int kv_put(const char *key, size_t klen, uint8_t *val, uint32_t vlen)
{
	uint64_t h = hash(key, klen);
	struct kv_entry **pp = slot(key, klen, h), *e = *pp;

	if (e) {
		live_bytes -= wal_record_size(e->klen, e->vlen);
		ufree(e->val);
		e->val = val;
		e->vlen = vlen;
		live_bytes += wal_record_size(klen, vlen);
		return 0;
	}
	e = umalloc(sizeof(*e) + klen);
	if (!e)
		return -1;
	e->hash = h;
	e->claim = 0;
	e->klen = klen;
	e->val = val;
	e->vlen = vlen;
	memcpy(e->key, key, klen);
	e->next = NULL;
	*pp = e;
	count++;
	live_bytes += wal_record_size(klen, vlen);
	if (count > nbuckets)
		grow();
	return 1;
}

int kv_del(const char *key, size_t klen)
{
	struct kv_entry **pp = slot(key, klen, hash(key, klen)), *e = *pp;

	if (!e)
		return 0;
	*pp = e->next;
	live_bytes -= wal_record_size(e->klen, e->vlen);
	ufree(e->val);
	ufree(e);
	count--;
	return 1;
}

size_t kv_count(void) { return count; }
uint64_t kv_live_bytes(void) { return live_bytes; }

void kv_iter_start(struct kv_iter *it)
{
	it->bucket = 0;
	it->e = NULL;
}

struct kv_entry *kv_iter_next(struct kv_iter *it)
{
	if (it->e)
		it->e = it->e->next;
	while (!it->e && it->bucket < nbuckets)
		it->e = buckets[it->bucket++];
	return it->e;
}
