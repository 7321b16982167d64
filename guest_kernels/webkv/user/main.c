/*
 * webkv's CPL3 program: start-up, roles and the event loop.
 *
 * One loop over the vsock device and the disk: take what the devices returned,
 * answer requests, start the next log batch, send, and sleep in
 * SYS_wait_interrupt when nothing is ready (interrupts are suppressed on the
 * queues while the loop is busy and re-enabled, with a re-check, before it
 * sleeps).  A 4 Hz timer runs only while connections exist, for time-outs.
 */
#include "webkv.h"

#define RELEASE_WAIT_NS		(2ULL * 1000000000)	/* for the host to close port-80 streams */
#define TIMER_OFF_AFTER_NS	(2ULL * 1000000000)

struct vsock vs;
const char *instance_name = "webkv";
enum role role = ROLE_STANDBY;
int serving;
uint64_t start_ns, now_ns;
uint64_t pending_irqs;			/* IRQ bits seen but not yet handled */

static int releasing;
static uint64_t release_deadline, release_start;
static unsigned timer_on;		/* its rate (Hz), 0: off */
static uint64_t timer_idle_since, last_tick;
/* After work, poll the vsock rx ring this long before sleeping (poll_us=): under load
 * the next request usually comes sooner than waking costs (a system call and an
 * interrupt, both emulated at CPL0: ~75 us of the vCPU's time each time). */
static uint64_t poll_ns;
/* How long to poll for the disk's answer before sleeping for its interrupt
 * (disk_spin_us=, VBLK_SPIN_NS by default). */
static uint64_t disk_spin_ns = VBLK_SPIN_NS;

uint64_t uptime_ms(void)
{
	return (uclock_ns() - start_ns) / NS_PER_MS;
}

/* Streams on a port that are open or closing.  Handed-back ones do not count: the
 * host has taken everything we sent on them before it sees our later packets. */
static unsigned port_streams(uint32_t port)
{
	unsigned n = 0;

	for (unsigned i = 0; i < VS_MAX_CONNS; i++)
		if (vs.conns[i].state != VS_FREE && vs.conns[i].local_port == port &&
		    vs.conns[i].closing != VS_HAND_BACK)
			n++;
	return n;
}

/* ---- injected faults (tests and demos) ---- */

/*
 * never-serving: acquire gets no reply and nothing is served, ever (B);
 * vsock-ring-error: the vsock driver publishes a head index the device must refuse,
 * so the device needs a reset and the driver sets it up again (A);
 * release-refused: release answered "refused", serving on (A);
 * release-hang: release gets no reply and nothing is released: the agent hangs (A);
 * release-close: the release begins, and the agent closes its connection (A);
 * crash-on-acquire: acquire crashes the whole OS, a triple fault (B);
 * agent-close: acquire is answered, then the agent closes that connection (B).
 */
static const char *const fault_names[N_FAULTS] = {
	"none", "never-serving", "release-refused", "release-hang", "release-close",
	"crash-on-acquire", "agent-close", "vsock-ring-error"
};
static enum fault armed_fault;

int arm_fault(const char *name)
{
	for (int f = 0; f < N_FAULTS; f++)
		if (!strcmp(name, fault_names[f])) {
			armed_fault = f;
			uprintf("webkv: fault-armed=%s\n", fault_names[f]);
			return 0;
		}
	return -1;
}

/* Is fault f armed?  Then it fires, once: it is disarmed. */
int fault_fires(enum fault f)
{
	if (armed_fault != f)
		return 0;
	armed_fault = FAULT_NONE;
	uprintf("webkv: fault=%s\n", fault_names[f]);
	return 1;
}

/*
 * The vsock-ring-error fault: a head index >= the queue size in the tx ring's avail
 * ring, as a broken driver would publish it.  No descriptor has that index, so the
 * device cannot use the ring, and pyvmm's sets NEEDS_RESET: the same path as a vsock back-end process that dies, so
 * the driver's re-initialisation is tested with either back-end.  Fired after the
 * loop round's vs_flush, so the agent's "ok" is ahead of it in the ring.
 */
static void vsock_ring_error(void)
{
#ifdef ULIB_NATIVE
	wlog("webkv: warning=fault-unsupported native\n");	/* TCP sockets: no ring */
#else
	struct virtq *q = &vs.txq;

	q->avail[2 + (q->avail_idx & (q->size - 1))] = q->size;
	virtio_barrier();
	q->avail[1] = ++q->avail_idx;
	q->added++;
	virtq_kick(q);
#endif
}

/* ---- deferred console lines ---- */

static char wlog_buf[4096];
static size_t wlog_len;

void wlog_flush(void)
{
	if (wlog_len)
		sys_write(1, wlog_buf, wlog_len);
	wlog_len = 0;
}

void wlog(const char *fmt, ...)
{
	va_list ap;
	int n;

	for (int attempt = 0; attempt < 2; attempt++) {
		va_start(ap, fmt);
		n = kvsnprintf(wlog_buf + wlog_len, sizeof(wlog_buf) - wlog_len, fmt, ap);
		va_end(ap);
		if (n >= 0 && wlog_len + n < sizeof(wlog_buf) / 2) {
			wlog_len += n;
			return;
		}
		wlog_flush();	/* full: write what is queued, then try again */
	}
}

/* ---- release / acquire ---- */

int begin_release(void)
{
	if (!releasing && fault_fires(FAULT_RELEASE_REFUSED))
		return -1;		/* refused: still serving (if it was) */
	if (!releasing && fault_fires(FAULT_RELEASE_HANG))
		return 2;		/* no answer, nothing released */
	if (!serving && !releasing)
		return 1;
	if (!releasing) {
		wlog("webkv: releasing connections=%u\n", http_port_conns());
		releasing = 1;
		serving = 0;
		release_deadline = now_ns + RELEASE_WAIT_NS;
		release_start = now_ns;
		vs_listen_accept(&vs, HTTP_PORT, 0);
		http_drain();
	}
	return 0;
}

/* Every port-80 request answered and closed, the log idle: let go of the disk. */
static void check_release(void)
{
	if (http_port_conns() || !wal_idle())
		return;
	if (port_streams(HTTP_PORT) && now_ns < release_deadline)
		return;			/* the host is still delivering our last answers */
	wal_close();
	releasing = 0;
	role = ROLE_RELEASED;
	wlog("webkv: released keys=%lu us=%lu\n", (unsigned long)kv_count(),
		(unsigned long)((uclock_ns() - release_start) / 1000));
	wlog_flush();	/* now: the host pauses us once it has our answer */
	agent_reply_all(AGENT_WAIT_RELEASE, "released");
}

/* Mount the log and take requests: at start-up as primary, or on acquire. */
static int start_serving(const char **why)
{
	if (wal_open(why)) {
		wlog("webkv: error=%s\n", *why);
		return -1;
	}
	serving = 1;
	role = ROLE_PRIMARY;
	vs_listen_accept(&vs, HTTP_PORT, 1);
	wlog("webkv: serving keys=%lu\n", (unsigned long)kv_count());
	return 0;
}

int do_acquire(char *reply, size_t size)
{
	const char *why = "unknown";

	if (releasing) {
		ksnprintf(reply, size, "error releasing");
		return -1;
	}
	if (!serving && fault_fires(FAULT_NEVER_SERVING))
		return 1;		/* no answer and no service, ever */
	if (!serving && fault_fires(FAULT_CRASH_ON_ACQUIRE)) {
		wlog_flush();
		sys_crash();
	}
	if (!serving && start_serving(&why)) {
		ksnprintf(reply, size, "error %s", why);
		return -1;
	}
	ksnprintf(reply, size, "serving keys=%lu", (unsigned long)kv_count());
	return 0;
}

/* ---- the loop ---- */

static void timers(void)
{
	/* Also while a disk request is outstanding (the disk driver's time-out), and
	 * faster while a device is being set up again (the drivers' retries). */
	int recovering = vs.recovering || vblk_recovering(&disk);
	int need = http_busy() || vs.timed || releasing || wal_in_flight() || recovering;
	unsigned hz = recovering ? VIRTIO_RETRY_HZ : TIMER_HZ;

	if (need) {
		timer_idle_since = 0;
		if (timer_on != hz) {
			sys_timer(hz);
			timer_on = hz;
		}
	} else if (timer_on) {
		if (!timer_idle_since)
			timer_idle_since = now_ns;
		else if (now_ns - timer_idle_since > TIMER_OFF_AFTER_NS) {
			sys_timer(0);
			timer_on = 0;
		}
	}
	if (now_ns - last_tick >= 1000000000ULL / TIMER_HZ) {
		last_tick = now_ns;
		http_tick(now_ns);
		vs_timers(&vs, now_ns);
	}
}

static void handle_irqs(void)
{
	uint64_t irqs = pending_irqs;

	pending_irqs = 0;
	if (!irqs)
		return;
	if ((irqs >> vs.dev.irq) & 1)
		vs_interrupt(&vs);
	if ((irqs >> disk.dev.irq) & 1)
		wal_interrupt();
}

static __attribute__((noreturn)) void loop(void)
{
	for (;;) {
		int work;

		now_ns = uclock_ns();
		handle_irqs();
		work = vs_poll(&vs, now_ns);
		work |= wal_poll();
		http_resume();
		wal_pump();
		if (releasing)
			check_release();
		vs_flush(&vs, now_ns);
		if (fault_fires(FAULT_VSOCK_RING_ERROR))
			vsock_ring_error();
		http_reap();
		timers();
		if (work)
			continue;
		if (wal_in_flight() && !vblk_recovering(&disk)) {
			/* The disk usually answers within disk_spin_ns: poll rather than
			 * sleep for its interrupt (an entry at CPL0 and two exits). */
			struct virtq *qs[] = { &disk.q, &vs.rxq };
			if (virtq_poll_used(qs, 2, disk_spin_ns))
				continue;
		} else if (poll_ns) {
			struct virtq *qs[] = { &vs.rxq };
			if (virtq_poll_used(qs, 1, poll_ns))
				continue;
		}
		wlog_flush();	/* idle: a good time for console lines */
		/* Sleep unless something arrived while interrupts were off. */
		work = vs_arm(&vs);
		work |= wal_arm();
		if (!work)
			pending_irqs |= sys_wait_interrupt();
		vs_disarm(&vs);
		wal_disarm();
	}
}

int umain(void)
{
	const char *r = uarg("role"), *name = uarg("name"), *fault = uarg("fault"), *why = NULL;
	int standby = r && !strcmp(r, "standby");

	start_ns = now_ns = uclock_ns();
	poll_ns = uarg_u64("poll_us", 0) * 1000;
	disk_spin_ns = uarg_u64("disk_spin_us", VBLK_SPIN_NS / 1000) * 1000;
	if (name && *name)
		instance_name = name;
	if (r && strcmp(r, "standby") && strcmp(r, "primary"))
		uprintf("webkv: warning=unknown-role role=%s\n", r);
	if (fault && arm_fault(fault))
		uprintf("webkv: warning=unknown-fault fault=%s\n", fault);
	kv_init();
	http_init();
	sys_timer(TIMER_HZ);	/* the first use calibrates the LAPIC timer (2 ms): now, not on a request */
	sys_timer(0);
	if (vs_init(&vs, &webkv_callbacks)) {
		uprintf("webkv: error=no-vsock\n");
		return 1;
	}
	vs_listen(&vs, AGENT_PORT, 1);
	vs_listen(&vs, HTTP_PORT, 0);
	if (!standby) {
		start_serving(&why);
	} else if (wal_follow(&why)) {	/* read ahead now, so acquiring is quick */
		wlog("webkv: warning=cannot-follow error=%s\n", why);
	}
	wlog_flush();
	uprintf("webkv: ready version=" VERSION_NAME " role=%s keys=%lu instance=%s cid=%lu\n",
		role == ROLE_PRIMARY ? "primary" : "standby", (unsigned long)kv_count(), instance_name, vs.cid);
	loop();
}
