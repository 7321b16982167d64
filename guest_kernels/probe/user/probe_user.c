/*
 * probe.elf's CPL3 actions (kmain hands over with user_run() for these):
 *   user-exit:N  exit(N) from CPL3
 *   user-exit-rep:N  exit(N) from CPL3 with a string OUT (rep outsb) to the
 *                debug-exit port: KVM completes it in its instruction emulator
 *   user-fault   read an unmapped address: CRASH ... cpl=3, exit 3
 *   clock        steps=+1 clock_ns lines 100 ms apart (steps= default 10;
 *                busy-waiting on the clock), then clock_t0 (when the first was due)
 *   timer        LAPIC timer at hz= (default 100), wait_interrupt until 1 s passed
 *   syscall      1000 null syscalls, cycles per call
 *   user-map     SYS_map: the IOAPIC window (read its version register at CPL3),
 *                the kernel image (refused), RAM above 4 GiB (refused)
 *   user-echo-irq  a user-mode UART driver: SYS_irq routes the console's IOAPIC
 *                pin, SYS_wait_interrupt reports it; the line is echoed
 *   idle         an idle OS: no timer, waits for interrupts forever (tickless);
 *                the microvisor's "idle second instance"
 *   compute      fills a buffer (mib=, default 16) with a function of round and
 *                index and checks every word, forever (or rounds=); a line every
 *                16 rounds; a word that changed in between is an error
 *   scribble     maps [target=, target+size=) (another partition) and, once a
 *                byte arrives on its console, reads then writes one word in every
 *                4 KiB page of it, passes= times (default 1); then idles;
 *                with exec=1 it jumps into the range instead
 *   irq-count    routes the IOAPIC pins of pins=P,Q,... (edge) and alternates a
 *                busy spin of up to spin_us= (default 2000, pseudo-random length)
 *                with wait_interrupt (syscalls=1: the spin reads the clock by
 *                system call, so it is often at CPL0); the runtime counts (and with irqlog=1 logs)
 *                each handler run in user_info, which the host reads; after
 *                seconds= (default: never) prints the counts and exits 0
 *   sweep        touches one word in every 4 KiB page of a mib= buffer (default
 *                32), over and over, timing each page; a page that took over
 *                gap_us= (default 300) was a switch-out. After gaps= of them
 *                (default 40) it prints the median sweep and the median extra
 *                time of the two sweeps around each switch-out (the pages that
 *                fault in again), in TSC cycles, and exits
 */
#include "ulib.h"

#define UNMAPPED	0x0000100000000000UL

static int parse_u8(const char *s)
{
	int v = 0;

	if (!*s)
		return -1;
	for (; *s; s++)
		if (*s < '0' || *s > '9' || (v = v * 10 + *s - '0') > 255)
			return -1;
	return v;
}

static int clock_lines(void)
{
	uint64_t steps = uarg_u64("steps", 10), t0 = sys_clock_ns();

	for (uint64_t i = 0; i <= steps; i++) {
		uint64_t due = t0 + i * 100000000UL;
		while (uclock_ns() < due)
			;
		uprintf("probe: clock_ns=%lu\n", sys_clock_ns());
	}
	uprintf("probe: clock_t0=%lu\n", t0);	/* reading i is due at t0 + i * 100 ms */
	return 0;
}

static int timer(void)
{
	uint64_t hz = uarg_u64("hz", 100), t0, t1, k0, k1;

	sys_timer(hz);
	hz = uinfo->hz;			/* as clamped by the kernel */
	k0 = uticks();
	t0 = uclock_ns();
	do
		sys_wait_interrupt();
	while ((t1 = uclock_ns()) - t0 < 1000000000UL);
	k1 = uticks();
	sys_timer(0);
	uprintf("probe: ticks=%lu hz=%lu elapsed_ns=%lu\n", k1 - k0, hz, t1 - t0);
	return 0;
}

static int syscalls(void)
{
	const unsigned n = 1000;
	uint64_t t0, t1;

	sys_null();
	t0 = urdtsc();
	for (unsigned i = 0; i < n; i++)
		sys_null();
	t1 = urdtsc();
	uprintf("probe: syscalls=%u cycles_per_call=%lu\n", n, (t1 - t0) / n);
	return 0;
}

#define LINE_MAX	128
#define IOAPIC		0xfec00000UL

static int map(void)
{
	int64_t io = sys_map(IOAPIC, 0x20, MAP_NOCACHE);
	int64_t kern = sys_map(uinfo->load_base, 4096, 0);
	int64_t high = sys_map(1UL << 32, 4096, 0);
	uint32_t ver = 0;

	if (io == (int64_t)IOAPIC) {
		*(volatile uint32_t *)IOAPIC = 1;		/* IOREGSEL: IOAPICVER */
		ver = *(volatile uint32_t *)(IOAPIC + 0x10);	/* IOWIN */
	}
	uprintf("probe: map=0x%lx ioapic_ver=0x%08x kernel=%ld above_4g=%ld\n", io, ver, kern, high);
	return io == (int64_t)IOAPIC && kern == -E_PERM && high == -E_INVAL ? 0 : 1;
}

static int console_com2(void)
{
	const char *con = uarg("console");

	return con && !strncmp(con, "ttyS1", 5) && (!con[5] || con[5] == ',');
}

static int echo_irq(void)
{
	int com2 = console_com2();
	uint16_t port = com2 ? 0x2f8 : 0x3f8;
	unsigned pin = com2 ? 3 : 4, irqs = 0, n = 0, done = 0;
	char line[LINE_MAX + 1];

	sys_irq(pin, IRQ_EDGE_HIGH);
	uoutb(port + 4, 0x0b);		/* MCR: DTR | RTS | OUT2 */
	uoutb(port + 1, 0x01);		/* IER: received data available */
	while (!done) {
		if (sys_wait_interrupt() & (1UL << pin))
			irqs++;
		while (!done && (uinb(port + 5) & 0x01)) {	/* LSR.DR */
			char c = uinb(port);
			if (c == '\n')
				done = 1;
			else if (c != '\r' && n < LINE_MAX)
				line[n++] = c;
		}
	}
	uoutb(port + 1, 0x00);
	sys_irq(pin, IRQ_MASK);
	line[n] = 0;
	uprintf("probe: echo=\"%s\" irqs=%u\n", line, irqs);
	return 0;
}

static uint64_t mix(uint64_t x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdUL;
	x ^= x >> 33;
	return x;
}

static int compute(void)
{
	uint64_t words = uarg_u64("mib", 16) << 17, rounds = uarg_u64("rounds", 0), errors = 0;
	uint64_t *buf = ualloc(words * 8, 4096);

	if (!buf) {
		uprintf("probe: error=out-of-memory\n");
		return 1;
	}
	for (uint64_t r = 1; !rounds || r <= rounds; r++) {
		for (uint64_t i = 0; i < words; i++)
			((volatile uint64_t *)buf)[i] = mix(r * words + i);
		for (uint64_t i = 0; i < words; i++)
			if (((volatile uint64_t *)buf)[i] != mix(r * words + i))
				errors++;
		if (r % 16 == 0 || r == rounds)
			uprintf("probe: compute rounds=%lu errors=%lu\n", r, errors);
	}
	return errors ? 1 : 0;
}

#define SWEEP_MAX_GAPS	256

static void sort_u64(uint64_t *v, unsigned n)
{
	for (unsigned i = 1; i < n; i++)
		for (unsigned j = i; j > 0 && v[j - 1] > v[j]; j--) {
			uint64_t t = v[j];
			v[j] = v[j - 1];
			v[j - 1] = t;
		}
}

static int sweep(void)
{
	uint64_t pages = uarg_u64("mib", 32) << 8, want = uarg_u64("gaps", 40);
	uint64_t gap = uarg_u64("gap_us", 300) * uinfo->tsc_khz / 1000;
	static uint64_t steady[4096], extra[SWEEP_MAX_GAPS];
	unsigned n_steady = 0, n_extra = 0, after = 0;
	uint64_t around = 0;
	volatile uint64_t *buf = ualloc(pages * 4096, 4096);

	if (!buf || !want || want > SWEEP_MAX_GAPS) {
		uprintf("probe: error=sweep-args\n");
		return 1;
	}
	for (uint64_t p = 0; p < pages; p++)
		buf[p * 512] = p;
	while (n_extra < want) {
		uint64_t busy = 0, t = urdtsc();
		int gapped = 0;

		for (uint64_t p = 0; p < pages; p++) {
			uint64_t now;

			buf[p * 512]++;
			now = urdtsc();
			if (now - t > gap)
				gapped = 1;	/* switched out: not the sweep's own time */
			else
				busy += now - t;
			t = now;
		}
		if (gapped) {		/* this sweep's rest and the next one's start fault again */
			around = busy;
			after = 1;
		} else if (after) {
			around += busy;
			after = 0;
			if (n_steady)
				extra[n_extra++] = around;
		} else if (n_steady < 4096) {
			steady[n_steady++] = busy;
		}
	}
	sort_u64(steady, n_steady);
	sort_u64(extra, n_extra);
	uprintf("probe: sweep pages=%lu sweeps=%u steady_cycles=%lu around_switch_cycles=%lu gaps=%u\n",
		pages, n_steady, steady[n_steady / 2], extra[n_extra / 2], n_extra);
	return 0;
}

#define SCRIBBLE_OFFSET	0x7f8UL
#define SCRIBBLE_MAGIC	0x5c21bb1e00000000UL	/* | the page number */

static int scribble(void)
{
	uint64_t target = uarg_u64("target", 0), size = uarg_u64("size", 0);
	uint64_t passes = uarg_u64("passes", 1);
	uint16_t port = console_com2() ? 0x2f8 : 0x3f8;

	if (!size || sys_map(target, size, 0) != (int64_t)target) {
		uprintf("probe: error=scribble-map\n");
		return 1;
	}
	if (uarg_u64("exec", 0)) {
		uprintf("probe: scribble exec=0x%lx\n", target + 4096);
		((void (*)(void))(target + 4096))();
		uprintf("probe: scribble exec returned\n");
		return 1;
	}
	uprintf("probe: scribble ready\n");
	while (!(uinb(port + 5) & 0x01))	/* LSR.DR: the go */
		;
	(void)uinb(port);
	for (uint64_t p = 1; p <= passes; p++) {
		uint64_t pages = 0, ones = 0;

		for (uint64_t a = target; a < target + size; a += 4096, pages++) {
			volatile uint64_t *word = (volatile uint64_t *)(a + SCRIBBLE_OFFSET);

			if (*word == ~0UL)
				ones++;
			*word = SCRIBBLE_MAGIC | (a >> 12);
		}
		uprintf("probe: scribble pass=%lu pages=%lu all_ones=%lu\n", p, pages, ones);
	}
	uprintf("probe: scribble done\n");
	for (;;)
		sys_wait_interrupt();
}

static int irq_count(void)
{
	const char *p = uarg("pins");
	uint64_t spin_ns = uarg_u64("spin_us", 2000) * 1000, seconds = uarg_u64("seconds", 0);
	uint64_t t0 = uclock_ns(), seed = 0x9e3779b97f4a7c15UL ^ urdtsc(), routed = 0;
	int syscalls = uarg_u64("syscalls", 0) != 0;

	while (p && *p >= '0' && *p <= '9') {
		unsigned pin = 0;

		while (*p >= '0' && *p <= '9')
			pin = pin * 10 + *p++ - '0';
		if (pin < 24 && sys_irq(pin, IRQ_EDGE_HIGH) >= 0)
			routed |= 1UL << pin;
		if (*p == ',')
			p++;
	}
	uprintf("probe: irq-count routed=0x%lx\n", routed);
	while (!seconds || uclock_ns() - t0 < seconds * 1000000000UL) {
		seed = seed * 6364136223846793005UL + 1442695040888963407UL;
		uint64_t until = uclock_ns() + (spin_ns ? (seed >> 33) % spin_ns : 0);

		while ((syscalls ? sys_clock_ns() : uclock_ns()) < until)
			__asm__ volatile("pause");
		sys_wait_interrupt();
	}
	uprintf("probe: irq-count");
	for (unsigned b = 0; b < 24; b++)
		if (routed & (1UL << b))
			uprintf(" pin%u=%lu", b, uinfo->irq_count[b]);
	uprintf("\n");
	return 0;
}

int umain(void)
{
	const char *action = uarg("probe");
	int code;

	if (!action)
		action = "";
	if (!strncmp(action, "user-exit:", 10) && (code = parse_u8(action + 10)) >= 0)
		sys_exit(code);
	if (!strncmp(action, "user-exit-rep:", 14) && (code = parse_u8(action + 14)) >= 0) {
		uint8_t bytes[2] = { (uint8_t)code, (uint8_t)code };
		const uint8_t *p = bytes;
		uint64_t count = 2;

		__asm__ volatile("rep outsb" : "+S"(p), "+c"(count) : "d"(0xf4) : "memory");
		return 1;
	}
	if (!strcmp(action, "user-fault"))
		return *(volatile uint8_t *)UNMAPPED;
	if (!strcmp(action, "clock"))
		return clock_lines();
	if (!strcmp(action, "timer"))
		return timer();
	if (!strcmp(action, "syscall"))
		return syscalls();
	if (!strcmp(action, "user-map"))
		return map();
	if (!strcmp(action, "idle")) {
		uprintf("probe: idle\n");
		for (;;)
			sys_wait_interrupt();
	}
	if (!strcmp(action, "user-echo-irq"))
		return echo_irq();
	if (!strcmp(action, "compute"))
		return compute();
	if (!strcmp(action, "sweep"))
		return sweep();
	if (!strcmp(action, "scribble"))
		return scribble();
	if (!strcmp(action, "irq-count"))
		return irq_count();
	uprintf("probe: error=unknown-action\n");
	return 2;
}
