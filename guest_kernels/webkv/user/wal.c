/*
 * The write-ahead log on the virtio-blk disk (format in the README, "WAL").
 *
 *   sector 0, 1      superblocks (generation g lives in sector g % 2; the valid one
 *                    with the highest generation wins)
 *   sector 8 ...     half 0, then half 1 (half_sectors each): the log is in the
 *                    active half; compaction writes a snapshot of the live keys
 *                    into the other half and switches the superblock over
 *
 * Records are appended in batches (group commit): all PUT/DELETEs queued in one
 * event-loop round become one write starting on a sector boundary, then one
 * flush; only then are they applied to the index and answered.  One batch is in
 * flight at a time, so there is at most one outstanding disk request.
 *
 * Recovery replays the active half from its start: a record counts if its magic,
 * CRC, sequence number (exactly the next one) and epoch (not lower than the
 * previous record's) check out.  At the first bad one it skips to the next
 * sector boundary once (a batch's zero padding) and stops at the next failure.
 * Each mount starts a new epoch in the superblock before writing, so leftovers
 * of a torn batch from an earlier mount can never be taken for new records.
 *
 * A standby follows the log (wal_follow): it replays what is on the disk now
 * through its own read-only view (pyvmm's disk front-end without the write
 * lease) and remembers where it stopped.  Its mount then only replays the rest,
 * because records are never rewritten in place: if the superblock generation is
 * still the one it followed (no compaction or mount since), the active half's
 * prefix it replayed is unchanged; otherwise it recovers from scratch.
 */
#include "webkv.h"
#include "dev/crc32.h"

#define SB_MAGIC	"WEBKVLOG"
#define SB_VERSION	1
#define REC_MAGIC	0x3152564bu	/* "KVR1" */
#define LOG_BASE	8		/* first sector of half 0 */
#define SECTOR		512
#define IOBUF_SIZE	(1u << 20)	/* batch, snapshot chunk and recovery window */
#define MIN_HALF	(320u << 10)	/* bytes: a quarter of a half (batch_limit) holds the largest record */

struct sb {
	char magic[8];
	uint32_t version;
	uint32_t crc;			/* crc32 of the 512-byte sector with this field 0 */
	uint64_t generation;
	uint64_t epoch;
	uint64_t half_sectors;
	uint64_t log_base;
	uint32_t active;
	uint32_t reserved;
	uint64_t start_seq;		/* sequence number of the active half's first record */
};

struct rec {
	uint32_t magic;
	uint32_t crc;			/* crc32 of bytes [8, 32 + klen + vlen) */
	uint64_t seq;
	uint32_t epoch;
	uint8_t op;
	uint8_t flags;
	uint16_t klen;
	uint32_t vlen;
	uint32_t reserved;
};
_Static_assert(sizeof(struct rec) == 32, "record header is 32 bytes");

enum wstate { W_IDLE, W_WRITE, W_FLUSH, W_SNAP_WRITE, W_SNAP_FLUSH, W_SB_WRITE, W_SB_FLUSH };

struct vblk disk;
struct wal_stats wal_stats;
extern uint64_t pending_irqs;	/* main.c */

static int is_open, failed;
static struct sb sb;			/* the current superblock */
static uint8_t *iobuf, *sbbuf;
static uint64_t half_bytes, batch_limit, budget, reserved;
static uint64_t tail;			/* byte offset in the active half of the next batch */
static uint64_t next_seq;
static enum wstate state;
static struct op *pending, **pending_end = &pending;
static struct op *batch;
static uint32_t batch_bytes;		/* records of the batch, unpadded */
static uint32_t batch_n;
/* compaction */
static struct kv_iter snap_it;
static struct kv_entry *snap_e;
static uint64_t snap_pos, snap_seq0;
static uint32_t snap_target;

static uint64_t up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

static uint64_t half_sector(uint32_t half) { return sb.log_base + (uint64_t)half * sb.half_sectors; }

int wal_is_open(void) { return is_open; }
int wal_failed(void) { return failed; }

/* ---- records ---- */

static uint32_t put_record(uint8_t *p, uint64_t seq, uint8_t op, const char *key, uint16_t klen,
			   const uint8_t *val, uint32_t vlen)
{
	struct rec *r = (struct rec *)p;
	uint32_t size = wal_record_size(klen, vlen);

	r->magic = REC_MAGIC;
	r->seq = seq;
	r->epoch = (uint32_t)sb.epoch;
	r->op = op;
	r->flags = 0;
	r->klen = klen;
	r->vlen = vlen;
	r->reserved = 0;
	memcpy(p + 32, key, klen);
	if (vlen)
		memcpy(p + 32 + klen, val, vlen);
	memset(p + 32 + klen + vlen, 0, size - (32 + klen + vlen));
	r->crc = crc32(0, p + 8, 24 + klen + vlen);
	return size;
}

/* ---- superblock ---- */

static uint32_t sb_crc(const uint8_t *sector)
{
	uint8_t tmp[SECTOR];

	memcpy(tmp, sector, SECTOR);
	memset(tmp + 12, 0, 4);
	return crc32(0, tmp, SECTOR);
}

static int sb_valid(const uint8_t *sector, uint64_t capacity)
{
	const struct sb *s = (const struct sb *)sector;

	return !memcmp(s->magic, SB_MAGIC, 8) && s->version == SB_VERSION && s->crc == sb_crc(sector) &&
	       s->active < 2 && s->log_base >= 2 && s->half_sectors * SECTOR >= MIN_HALF &&
	       s->log_base + 2 * s->half_sectors <= capacity;
}

/* The superblock's sector, ready to write (sb.generation decides which sector). */
static uint64_t sb_prepare(void)
{
	memset(sbbuf, 0, SECTOR);
	memcpy(sbbuf, &sb, sizeof(sb));
	((struct sb *)sbbuf)->crc = sb_crc(sbbuf);
	return sb.generation % 2;
}

static int sync_io(uint32_t type, uint64_t sector, void *buf, uint32_t len)
{
	return vblk_sync(&disk, type, sector, buf, len, &pending_irqs);
}

static int sb_write_sync(void)
{
	uint64_t sector = sb_prepare();

	if (sync_io(VBLK_T_OUT, sector, sbbuf, SECTOR) != VBLK_S_OK)
		return -1;
	if (disk.has_flush && sync_io(VBLK_T_FLUSH, 0, NULL, 0) != VBLK_S_OK)
		return -1;
	return 0;
}

_Static_assert(MIN_HALF / 4 >= ((32 + MAX_KEY + MAX_BODY + 7) & ~7u) + SECTOR, "a batch holds the largest record");

static void set_geometry(void)
{
	half_bytes = sb.half_sectors * SECTOR;
	batch_limit = half_bytes / 4;
	if (batch_limit > IOBUF_SIZE)
		batch_limit = IOBUF_SIZE;
	batch_limit &= ~(uint64_t)(SECTOR - 1);
	budget = half_bytes / 2 - half_bytes / 64 - SECTOR;
}

/* ---- recovery ---- */

static uint64_t win_lo, win_hi, base_byte;

/* Bytes [pos, pos + n) of the active half in memory, or NULL (beyond the half, I/O error). */
static const uint8_t *window(uint64_t pos, uint32_t n, int *ioerr)
{
	uint64_t len;

	if (pos + n > half_bytes)
		return NULL;
	if (pos >= win_lo && pos + n <= win_hi)
		return iobuf + (pos - win_lo);
	win_lo = pos & ~(uint64_t)(SECTOR - 1);
	len = half_bytes - win_lo;
	if (len > IOBUF_SIZE)
		len = IOBUF_SIZE;
	if (sync_io(VBLK_T_IN, (base_byte + win_lo) / SECTOR, iobuf, len) != VBLK_S_OK) {
		win_lo = win_hi = 0;
		*ioerr = 1;
		return NULL;
	}
	win_hi = win_lo + len;
	return iobuf + (pos - win_lo);
}

/* Where replay stopped: after the last valid record. */
struct cursor {
	uint64_t end, expect;
	uint32_t last_epoch;
	uint64_t records;
};

static struct {
	int valid;
	uint64_t generation;
	struct cursor at;
} followed;

/* 1 applied, 0 not a valid next record, -1 fatal (*why set). */
static int replay_one(uint64_t pos, uint64_t expect, uint32_t *epoch, uint32_t *size, int *looked_valid,
		      const char **why)
{
	int ioerr = 0;
	const uint8_t *p = window(pos, 32, &ioerr);
	struct rec r;
	uint8_t *val = NULL;

	if (ioerr)
		return *why = "disk-io", -1;
	if (!p)
		return 0;
	memcpy(&r, p, 32);
	if (r.magic != REC_MAGIC)
		return 0;
	*looked_valid = r.seq == expect;	/* an attempt at the next record (not an older lap's) */
	if (r.seq != expect || r.epoch < *epoch || r.epoch > (uint32_t)sb.epoch || r.flags ||
	    (r.op != OP_PUT && r.op != OP_DEL) || !r.klen || r.klen > MAX_KEY || r.vlen > MAX_BODY ||
	    (r.op == OP_DEL && r.vlen))
		return 0;
	*size = wal_record_size(r.klen, r.vlen);
	p = window(pos, *size, &ioerr);
	if (ioerr)
		return *why = "disk-io", -1;
	if (!p || crc32(0, p + 8, 24 + r.klen + r.vlen) != r.crc)
		return 0;
	*epoch = r.epoch;
	if (r.op == OP_DEL) {
		kv_del((const char *)p + 32, r.klen);
		return 1;
	}
	if (r.vlen) {
		if (!(val = umalloc(r.vlen)))
			return *why = "out-of-memory", -1;
		memcpy(val, p + 32 + r.klen, r.vlen);
	}
	if (kv_put((const char *)p + 32, r.klen, val, r.vlen) < 0) {
		ufree(val);
		return *why = "out-of-memory", -1;
	}
	return 1;
}

/* Replay the active half from *c on (a fresh cursor: from its start, into an
 * empty index) and leave *c after the last valid record. */
static int replay(struct cursor *c, const char **why)
{
	uint64_t pos = c->end;
	uint32_t size = 0;
	int r, looked_valid = 0;

	base_byte = half_sector(sb.active) * SECTOR;
	win_lo = win_hi = 0;		/* the disk may have changed since the last read */
	for (;;) {
		looked_valid = 0;
		r = replay_one(pos, c->expect, &c->last_epoch, &size, &looked_valid, why);
		if (r < 0)
			return -1;
		if (r == 0) {
			if (pos % SECTOR) {	/* the batch's padding: its next sector */
				pos = up(pos, SECTOR);
				continue;
			}
			break;
		}
		c->expect++;
		pos += size;
		c->end = pos;
		c->records++;
	}
	wal_stats.torn_tail = looked_valid;
	return 0;
}

static void fresh_cursor(struct cursor *c)
{
	c->end = 0;
	c->expect = sb.start_seq;
	c->last_epoch = 0;
	c->records = 0;
	kv_clear();
}

/* The device and the superblock: 1 no superblock (a blank disk), 0 read, -1 error. */
static int read_superblock(const char **why)
{
	uint64_t cap;
	int best = -1;

	if (!iobuf) {
		iobuf = ualloc(IOBUF_SIZE, 4096);
		sbbuf = ualloc(2 * SECTOR, 4096);
		if (!iobuf || !sbbuf)
			return *why = "out-of-memory", -1;
	}
	if (!disk.ready && vblk_init(&disk, 0)) {
		*why = disk.dev.regs ? "disk-init" : "no-disk";
		return -1;
	}
	cap = disk.capacity;
	if (cap < LOG_BASE + 2 * (MIN_HALF / SECTOR))
		return *why = "disk-too-small", -1;
	if (sync_io(VBLK_T_IN, 0, sbbuf, 2 * SECTOR) != VBLK_S_OK)
		return *why = "disk-io", -1;
	for (int i = 0; i < 2; i++)
		if (sb_valid(sbbuf + i * SECTOR, cap) &&
		    (best < 0 || ((struct sb *)(sbbuf + i * SECTOR))->generation >
				 ((struct sb *)(sbbuf + best * SECTOR))->generation))
			best = i;
	if (best < 0) {
		for (int i = 0; i < 2 * SECTOR; i++)
			if (sbbuf[i])
				return *why = "bad-superblock", -1;
		return 1;
	}
	memcpy(&sb, sbbuf + best * SECTOR, sizeof(sb));
	set_geometry();
	return 0;
}

int wal_follow(const char **why)
{
	int r = read_superblock(why);

	followed.valid = 0;
	if (r)
		return r < 0 ? -1 : 0;	/* a blank disk: nothing to follow */
	fresh_cursor(&followed.at);
	if (replay(&followed.at, why)) {
		kv_clear();
		return -1;
	}
	followed.valid = 1;
	followed.generation = sb.generation;
	wlog("webkv: following records=%lu keys=%lu log_bytes=%lu generation=%lu\n",
	     followed.at.records, (unsigned long)kv_count(), followed.at.end, sb.generation);
	return 0;
}

/* ---- open / close ---- */

int wal_open(const char **why)
{
	uint64_t t0 = uclock_ns(), t_sb, t_rec;
	struct cursor at;
	int r, continued = 0;

	failed = 0;
	state = W_IDLE;
	reserved = 0;
	r = read_superblock(why);
	if (r >= 0 && disk.read_only) {
		*why = "disk-read-only";
		r = -1;
	}
	if (r < 0) {
		followed.valid = 0;
		if (disk.dev.regs)
			vblk_stop(&disk);
		return -1;
	}
	if (r == 1) {
		memset(&sb, 0, sizeof(sb));
		memcpy(sb.magic, SB_MAGIC, 8);
		sb.version = SB_VERSION;
		sb.generation = 1;
		sb.epoch = 0;
		sb.log_base = LOG_BASE;
		sb.active = 0;
		sb.start_seq = 1;
		sb.half_sectors = ((disk.capacity - LOG_BASE) / 2) & ~7ULL;
		if (sb_write_sync())
			return *why = "disk-io", vblk_stop(&disk), -1;
		set_geometry();
		wlog("webkv: formatted half_sectors=%lu\n", sb.half_sectors);
	}
	t_sb = uclock_ns();
	if (followed.valid && followed.generation == sb.generation) {
		at = followed.at;	/* nothing replayed so far has changed: go on from there */
		continued = 1;
	} else {
		fresh_cursor(&at);
	}
	followed.valid = 0;
	if (replay(&at, why)) {
		kv_clear();
		vblk_stop(&disk);
		return -1;
	}
	wal_stats.recovered_records = at.records;
	wal_stats.recovered_bytes = at.end;
	tail = up(at.end, SECTOR);
	next_seq = at.expect;
	t_rec = uclock_ns();
	/* A new epoch before anything is appended. Written, not flushed: the first
	 * batch's flush makes it durable with the batch, and no record of this epoch
	 * is durable (or acknowledged) before that flush, so a crash finds either
	 * superblock valid for what is on the disk. One flush less on the way to
	 * serving: an upgrade's clients wait for it. */
	sb.epoch++;
	sb.generation++;
	if (sync_io(VBLK_T_OUT, sb_prepare(), sbbuf, SECTOR) != VBLK_S_OK) {
		kv_clear();
		vblk_stop(&disk);
		return *why = "disk-io", -1;
	}
	is_open = 1;
	wlog("webkv: recovered records=%lu keys=%lu log_bytes=%lu ignored_tail=%d epoch=%lu half=%u "
	     "continued=%d open_us=%lu replay_us=%lu commit_us=%lu\n",
	     wal_stats.recovered_records, (unsigned long)kv_count(), wal_stats.recovered_bytes,
	     wal_stats.torn_tail, sb.epoch, sb.active, continued, (t_sb - t0) / 1000,
	     (t_rec - t_sb) / 1000, (uclock_ns() - t_rec) / 1000);
	return 0;
}

void wal_close(void)
{
	if (!is_open)
		return;
	/* No flush: with the log idle, every write it made was flushed before it was
	 * acknowledged (batches, snapshots and superblocks alike). */
	vblk_stop(&disk);
	is_open = 0;
}

/* ---- budget ---- */

/*
 * A pending PUT reserves its record size minus the value it replaces, if it is the
 * one pending PUT that claimed that value (kv_entry.claim), and at least 0.  Live
 * data after any prefix of the pending writes commits then stays within what was
 * reserved: per key, the change is (last value - value at claim time), which the
 * claimer's and the others' reservations cover.
 */
int wal_reserve(uint32_t bytes)
{
	if (kv_live_bytes() + reserved + bytes > budget)
		return -1;
	reserved += bytes;
	return 0;
}

void wal_unreserve(uint32_t bytes)
{
	reserved = reserved >= bytes ? reserved - bytes : 0;
}

/* ---- commit pipeline ---- */

void wal_submit(struct op *op)
{
	op->next = NULL;
	*pending_end = op;
	pending_end = &op->next;
}

int wal_idle(void)
{
	return state == W_IDLE && !pending && !batch;
}

static void finish(struct op *list, int result)
{
	for (struct op *op = list, *next; op; op = next) {
		next = op->next;
		http_commit_done(op, result);
	}
}

static void fail_all(const char *what)
{
	struct op *b = batch, *p = pending;

	if (!failed)
		uprintf("webkv: error=disk-io during=%s\n", what);
	failed = 1;
	state = W_IDLE;
	batch = pending = NULL;
	pending_end = &pending;
	finish(b, COMMIT_IOERR);
	finish(p, COMMIT_IOERR);
}

static int submit(uint32_t type, uint64_t sector, void *buf, uint32_t len, enum wstate next)
{
	if (vblk_submit(&disk, type, sector, buf, len, &state)) {
		fail_all("submit");
		return -1;
	}
	vblk_kick(&disk);
	state = next;
	return 0;
}

static void write_batch(void)
{
	uint32_t len = 0;
	uint64_t seq = next_seq;

	for (struct op *op = batch; op; op = op->next)
		len += put_record(iobuf + len, seq++, op->type, op->key, op->klen, op->val, op->vlen);
	memset(iobuf + len, 0, up(len, SECTOR) - len);
	wal_stats.bytes_written += up(len, SECTOR);
	submit(VBLK_T_OUT, half_sector(sb.active) + tail / SECTOR, iobuf, up(len, SECTOR), W_WRITE);
}

/* Bytes a snapshot of the live keys takes (records packed into chunks of batch_limit). */
static uint64_t snapshot_size(void)
{
	struct kv_iter it;
	struct kv_entry *e;
	uint64_t total = 0, chunk = 0;

	kv_iter_start(&it);
	while ((e = kv_iter_next(&it))) {
		uint32_t r = wal_record_size(e->klen, e->vlen);
		if (chunk && chunk + r > batch_limit) {
			total += up(chunk, SECTOR);
			chunk = 0;
		}
		chunk += r;
	}
	return total + up(chunk, SECTOR);
}

/* The snapshot is durable: point the superblock at it. */
static void switch_halves(void)
{
	sb.generation++;
	sb.active = snap_target;
	sb.start_seq = snap_seq0;
	submit(VBLK_T_OUT, sb_prepare(), sbbuf, SECTOR, W_SB_WRITE);
}

static void snap_step(void)
{
	uint32_t len = 0;

	while (snap_e && (!len || len + wal_record_size(snap_e->klen, snap_e->vlen) <= batch_limit)) {
		len += put_record(iobuf + len, next_seq++, OP_PUT, snap_e->key, snap_e->klen, snap_e->val,
				  snap_e->vlen);
		snap_e = kv_iter_next(&snap_it);
	}
	if (!len) {			/* all written */
		if (disk.has_flush)
			submit(VBLK_T_FLUSH, 0, NULL, 0, W_SNAP_FLUSH);
		else
			switch_halves();
		return;
	}
	memset(iobuf + len, 0, up(len, SECTOR) - len);
	wal_stats.bytes_written += up(len, SECTOR);
	submit(VBLK_T_OUT, half_sector(snap_target) + snap_pos / SECTOR, iobuf, up(len, SECTOR), W_SNAP_WRITE);
	snap_pos += up(len, SECTOR);
}

static void start_compaction(void)
{
	uint64_t need = snapshot_size();

	if (need + up(batch_bytes, SECTOR) > half_bytes) {
		struct op *b = batch;
		uprintf("webkv: warning=log-full live_bytes=%lu half_bytes=%lu\n",
			(unsigned long)kv_live_bytes(), half_bytes);
		batch = NULL;
		finish(b, COMMIT_FULL);
		return;
	}
	snap_target = 1 - sb.active;
	snap_pos = 0;
	snap_seq0 = next_seq;
	kv_iter_start(&snap_it);
	snap_e = kv_iter_next(&snap_it);
	snap_step();
}

static void compaction_done(void)
{
	tail = snap_pos;
	wal_stats.compactions++;
	wlog("webkv: compacted keys=%lu bytes=%lu half=%u seq=%lu\n", (unsigned long)kv_count(),
		snap_pos, sb.active, snap_seq0);
	write_batch();
}

void wal_pump(void)
{
	struct op **pp = &pending;
	uint32_t bytes = 0, n = 0;

	if (!is_open || failed || state != W_IDLE || batch || !pending)
		return;
	while (*pp && (!n || bytes + wal_record_size((*pp)->klen, (*pp)->vlen) <= batch_limit)) {
		bytes += wal_record_size((*pp)->klen, (*pp)->vlen);
		n++;
		pp = &(*pp)->next;
	}
	batch = pending;
	pending = *pp;
	*pp = NULL;
	if (!pending)
		pending_end = &pending;
	batch_bytes = bytes;
	batch_n = n;
	if (tail + up(bytes, SECTOR) > half_bytes)
		start_compaction();
	else
		write_batch();
}

static void batch_done(void)
{
	struct op *b = batch;

	tail += up(batch_bytes, SECTOR);
	next_seq += batch_n;
	wal_stats.batches++;
	wal_stats.records += batch_n;
	batch = NULL;
	state = W_IDLE;
	finish(b, COMMIT_OK);
}

int wal_poll(void)
{
	void *cookie;
	int st, work = 0;

	if (!is_open)
		return 0;
	while ((st = vblk_complete(&disk, &cookie)) >= 0) {
		work = 1;
		if (st != VBLK_S_OK) {
			fail_all("write");
			continue;
		}
		switch (state) {
		case W_WRITE:
			if (disk.has_flush)
				submit(VBLK_T_FLUSH, 0, NULL, 0, W_FLUSH);
			else
				batch_done();
			break;
		case W_FLUSH:
			wal_stats.flushes++;
			batch_done();
			break;
		case W_SNAP_WRITE:
			snap_step();
			break;
		case W_SNAP_FLUSH:
			switch_halves();
			break;
		case W_SB_WRITE:
			if (disk.has_flush) {
				submit(VBLK_T_FLUSH, 0, NULL, 0, W_SB_FLUSH);
				break;
			}
			/* fall through */
		case W_SB_FLUSH:
			state = W_IDLE;
			compaction_done();
			break;
		case W_IDLE:
			break;
		}
	}
	return work;
}

int wal_arm(void) { return is_open ? vblk_arm(&disk) : 0; }

int wal_in_flight(void) { return is_open && state != W_IDLE; }
void wal_disarm(void) { if (is_open) vblk_disarm(&disk); }

/* Also while the log is not mounted but the device is set up (a standby that
 * followed the log): a NEEDS_RESET then starts the driver's re-initialisation,
 * which the next request (acquire's) finishes, instead of that request waiting
 * out the driver's time-out.  After a release the device is not touched (ready 0). */
void wal_interrupt(void)
{
	if (disk.ready && vblk_interrupt(&disk) < 0 && is_open)
		fail_all("device-reset");
}
