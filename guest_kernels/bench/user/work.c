/*
 * Benchmark workloads: each does a fixed amount of work, times it with the TSC
 * and prints one JSON line
 *   {"bench": "alu", "work": N, "unit": "iterations", "cycles": C, "result": "0x..."}
 * where result is a checksum of what was computed (equal on every platform).
 * Selected by run=alu,stream,... (default: all but portio); sizes by n_<name>=
 * and <name>_mib= (see README).  The default sizes take about 1 s each (natively
 * and at CPL3 in a guest), so fixed per-run costs (TSC reads, loop entry, a host
 * timer tick) stay below 0.1% of a run.  wait_ms=N spins N ms before the first
 * workload (and prints {"bench": "waited"}), so a host can change the guest's
 * mode (virtualize, devirtualize) before anything is measured.  Built unchanged
 * for bench.elf (CPL3) and for build/bench-native; platform differences live
 * behind work.h.
 */
#include "work.h"

#define MIB	(1UL << 20)

/* ---- output ---- */

static uint64_t cpu_spent;	/* CPU time of the last timed part (plat_has_cpu_ns) */

struct line {
	char b[384];
	size_t n;
};

static void put(struct line *l, const char *s)
{
	while (*s && l->n < sizeof(l->b) - 2)
		l->b[l->n++] = *s++;
}

static void put_u64(struct line *l, uint64_t v)
{
	char t[24];
	int i = sizeof(t);

	t[--i] = 0;
	do
		t[--i] = '0' + v % 10;
	while (v /= 10);
	put(l, t + i);
}

static void put_hex(struct line *l, uint64_t v)
{
	char t[19];

	t[0] = '0', t[1] = 'x', t[18] = 0;
	for (int i = 17; i >= 2; i--, v >>= 4)
		t[i] = "0123456789abcdef"[v & 15];
	put(l, t);
}

static void put_kv_u64(struct line *l, const char *key, uint64_t v)
{
	put(l, ", \"");
	put(l, key);
	put(l, "\": ");
	put_u64(l, v);
}

static void emit(struct line *l)
{
	put(l, "}");
	l->b[l->n++] = '\n';
	plat_write(l->b, l->n);
}

static void begin(struct line *l, const char *name)
{
	l->n = 0;
	put(l, "{\"bench\": \"");
	put(l, name);
	put(l, "\"");
}

static void report(const char *name, uint64_t work, const char *unit, uint64_t cycles, uint64_t result,
		   struct line *l)
{
	begin(l, name);
	put_kv_u64(l, "work", work);
	put(l, ", \"unit\": \"");
	put(l, unit);
	put(l, "\"");
	put_kv_u64(l, "cycles", cycles);
	put(l, ", \"result\": \"");
	put_hex(l, result);
	put(l, "\"");
	if (plat_has_cpu_ns)
		put_kv_u64(l, "cpu_ns", cpu_spent);
}

static int error(const char *name, const char *what)
{
	struct line l;

	begin(&l, name);
	put(&l, ", \"error\": \"");
	put(&l, what);
	put(&l, "\"");
	emit(&l);
	return 1;
}

/* ---- helpers ---- */

static inline uint64_t tsc_begin(void)
{
	uint32_t lo, hi;

	__asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
	return ((uint64_t)hi << 32) | lo;
}

static inline uint64_t tsc_end(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtscp; lfence" : "=a"(lo), "=d"(hi) : : "rcx", "memory");
	return ((uint64_t)hi << 32) | lo;
}

/*
 * The timed part of a workload: between timed_begin() and timed_end().  With mark=1
 * each prints a line there ({"bench": "mark"|"end", "name": ...}), so a host can
 * read the vCPU thread's CPU time at both ends (its console sees the lines as they
 * are written); a platform with its own CPU clock (native) adds "cpu_ns" to the
 * workload's line.
 */
static uint64_t cpu_at_begin;

static void mark(const char *what, const char *name)
{
	struct line l;

	if (!plat_arg("mark"))
		return;
	begin(&l, what);
	put(&l, ", \"name\": \"");
	put(&l, name);
	put(&l, "\"");
	emit(&l);
}

static uint64_t timed_begin(const char *name)
{
	mark("mark", name);
	cpu_at_begin = plat_cpu_ns();
	return tsc_begin();
}

static uint64_t timed_end(const char *name)
{
	uint64_t t = tsc_end();

	cpu_spent = plat_cpu_ns() - cpu_at_begin;
	mark("end", name);
	return t;
}

static uint64_t arg_u64(const char *key, uint64_t dflt)
{
	const char *s = plat_arg(key);
	uint64_t v = 0;

	if (!s || !*s)
		return dflt;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return dflt;
		v = v * 10 + (*s - '0');
	}
	return v;
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* splitmix64: the fixed-seed generator of every workload's data */
static inline uint64_t next_rand(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15UL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

/* ---- workloads ---- */

/* Integer ALU: three dependent chains of add/xor/rotate/multiply, no memory. */
static __attribute__((noinline)) uint64_t alu_loop(uint64_t n)
{
	uint64_t a = 0x0123456789abcdefUL, b = 0xfedcba9876543210UL, c = 1;

	for (uint64_t i = 0; i < n; i++) {
		a += b ^ i;
		b = rotl(b, 13) + c;
		c = c * 0x2545f4914f6cdd1dUL + (a >> 7);
		__asm__("" : "+r"(a), "+r"(b), "+r"(c));	/* keep the loop a loop */
	}
	return a ^ rotl(b, 21) ^ rotl(c, 42);
}

static int bench_alu(const char *name, uint64_t n, struct line *l)
{
	uint64_t t0 = timed_begin(name), r = alu_loop(n), t1 = timed_end(name);

	report(name, n, "iterations", t1 - t0, r, l);
	return 0;
}

/* Memory stream: a[i] = a[i] * 3 + pass over the whole buffer, read and written. */
static int bench_stream(struct line *l)
{
	uint64_t size = arg_u64("stream_mib", 64) * MIB, passes = arg_u64("n_stream", 300);
	uint64_t n = size / 8, t0, t1, sum = 0;
	uint64_t *a = plat_alloc(size);

	if (!a)
		return error("stream", "out-of-memory");
	for (uint64_t i = 0; i < n; i++)	/* touch every page before timing */
		a[i] = i * 0x9e3779b97f4a7c15UL;
	t0 = timed_begin("stream");
	for (uint64_t p = 0; p < passes; p++) {
		for (uint64_t i = 0; i < n; i++)
			a[i] = a[i] * 3 + p;
		__asm__ volatile("" : : : "memory");
	}
	t1 = timed_end("stream");
	for (uint64_t i = 0; i < n; i++)
		sum = rotl(sum, 5) ^ a[i];
	report("stream", passes * size, "bytes", t1 - t0, sum, l);
	return 0;
}

/* Pointer chasing: one random cycle (Sattolo, fixed seed) through the buffer. */
static int bench_chase(struct line *l)
{
	uint64_t size = arg_u64("chase_mib", 32) * MIB, steps = arg_u64("n_chase", 10000000);
	uint64_t n = size / 8, seed = 42, p = 0, sum = 0, t0, t1;
	uint64_t *next = plat_alloc(size);

	if (!next || n < 2)
		return error("chase", "out-of-memory");
	for (uint64_t i = 0; i < n; i++)
		next[i] = i;
	for (uint64_t i = n - 1; i > 0; i--) {	/* j uniform in [0, i) */
		uint64_t j = (uint64_t)(((unsigned __int128)next_rand(&seed) * i) >> 64), t = next[i];
		next[i] = next[j];
		next[j] = t;
	}
	t0 = timed_begin("chase");
	for (uint64_t s = 0; s < steps; s++) {
		p = next[p];
		sum += p;
	}
	t1 = timed_end("chase");
	report("chase", steps, "steps", t1 - t0, sum ^ rotl(p, 32), l);
	return 0;
}

/* CRC-32 (IEEE, reflected, 0xedb88320), one table lookup per byte, over a buffer of random bytes. */
static int bench_crc32(struct line *l)
{
	uint64_t size = arg_u64("crc32_kib", 1024) * 1024, passes = arg_u64("n_crc32", 420);
	uint64_t seed = 7, t0, t1;
	uint32_t table[256], crc = 0xffffffffu;
	uint8_t *buf = plat_alloc(size);

	if (!buf)
		return error("crc32", "out-of-memory");
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? (c >> 1) ^ 0xedb88320u : c >> 1;
		table[i] = c;
	}
	for (uint64_t i = 0; i < size; i += 8) {
		uint64_t r = next_rand(&seed);
		for (int k = 0; k < 8 && i + k < size; k++)
			buf[i + k] = r >> (8 * k);
	}
	t0 = timed_begin("crc32");
	for (uint64_t p = 0; p < passes; p++) {
		for (uint64_t i = 0; i < size; i++)
			crc = table[(crc ^ buf[i]) & 0xff] ^ (crc >> 8);
		__asm__ volatile("" : "+r"(crc));
	}
	t1 = timed_end("crc32");
	report("crc32", passes * size, "bytes", t1 - t0, crc ^ 0xffffffffu, l);
	return 0;
}

/* Null system call round trips (after one warm-up call): plat_null_syscall() is
 * the platform's cheapest kernel entry and exit. */
static int bench_syscall(struct line *l)
{
	uint64_t n = arg_u64("n_syscall", 80000), t0, t1;

	plat_null_syscall();
	t0 = timed_begin("syscall");
	for (uint64_t i = 0; i < n; i++)
		plat_null_syscall();
	t1 = timed_end("syscall");
	report("syscall", n, "calls", t1 - t0, n, l);
	return 0;
}

/* The ALU loop again with the timer at timer_hz (default 1000) during the phase. */
static int bench_timer(struct line *l)
{
	uint64_t n = arg_u64("n_timer", arg_u64("n_alu", 800000000)), hz = arg_u64("timer_hz", 1000);
	uint64_t prev = plat_timer(hz), k0 = plat_ticks(), t0, t1, r, k1;

	t0 = timed_begin("timer");
	r = alu_loop(n);
	t1 = timed_end("timer");
	k1 = plat_ticks();
	plat_timer(prev);
	report("timer", n, "iterations", t1 - t0, r, l);
	put_kv_u64(l, "ticks", k1 - k0);
	put_kv_u64(l, "hz", plat_has_timer ? hz : 0);
	return 0;
}

/* outb to port 0x80 (no device): each one is an exit to the VMM and back. */
static int bench_portio(struct line *l)
{
	uint64_t n = arg_u64("n_portio", 40000), t0, t1;

	if (!plat_has_portio) {		/* bench-native: no port I/O in a Linux process */
		begin(l, "portio");
		put(l, ", \"skipped\": \"no port I/O\"");
		return 0;
	}
	t0 = timed_begin("portio");
	for (uint64_t i = 0; i < n; i++)
		__asm__ volatile("outb %%al, $0x80" : : "a"((uint8_t)i));
	t1 = timed_end("portio");
	report("portio", n, "outb", t1 - t0, n, l);
	return 0;
}

static int run_one(const char *name, size_t len, struct line *l)
{
#define IS(s) (len == sizeof(s) - 1 && !__builtin_memcmp(name, s, len))
	int rc;

	if (IS("alu"))
		rc = bench_alu("alu", arg_u64("n_alu", 800000000), l);
	else if (IS("stream"))
		rc = bench_stream(l);
	else if (IS("chase"))
		rc = bench_chase(l);
	else if (IS("crc32"))
		rc = bench_crc32(l);
	else if (IS("syscall"))
		rc = bench_syscall(l);
	else if (IS("timer"))
		rc = bench_timer(l);
	else if (IS("portio"))
		rc = bench_portio(l);
	else {
		char n[32];
		size_t k = len < sizeof(n) - 1 ? len : sizeof(n) - 1;
		for (size_t i = 0; i < k; i++)
			n[i] = name[i];
		n[k] = 0;
		return error(n, "unknown-workload");
	}
	plat_free_all();
	if (!rc)
		emit(l);
	return rc;
#undef IS
}

int bench_main(void)
{
	const char *run = plat_arg("run");
	struct line l;
	int rc = 0;

	if (!run || !*run)
		run = "alu,stream,chase,crc32,syscall,timer";
	begin(&l, "start");
	put_kv_u64(&l, "tsc_khz", plat_tsc_khz);
	put(&l, ", \"tsc_source\": \"");
	put(&l, plat_tsc_source);
	put(&l, "\"");
	emit(&l);
	if (plat_arg("wait_ms")) {
		uint64_t ms = arg_u64("wait_ms", 0), t0 = tsc_begin();

		while (tsc_begin() - t0 < ms * plat_tsc_khz)
			__asm__ volatile("pause");
		begin(&l, "waited");
		put_kv_u64(&l, "ms", ms);
		emit(&l);
	}
	while (*run) {
		size_t len = 0;
		while (run[len] && run[len] != ',')
			len++;
		if (len && run_one(run, len, &l))
			rc = 1;
		run += len + (run[len] == ',');
	}
	begin(&l, "done");
	emit(&l);
	return rc;
}
