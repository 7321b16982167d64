/* build/webkv-native: start-up and the system calls of a Linux process (native.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/timerfd.h>
#include "uapi.h"
#include "host_clock.h"
#include "native.h"

#define MAX_FORWARDS	8
#define DEFAULT_HEAP	(256ULL << 20)

void ulib_start(const struct user_info *info);	/* ulib/ulib.c */
struct vsock;
struct virtq;

static struct user_info info;
static int epfd = -1, timerfd = -1;
static struct { uint32_t port; char from[64]; } forwards[MAX_FORWARDS];
static int nforwards;

void native_die(const char *what)
{
	perror(what);
	exit(1);
}

void native_irq_fd(int fd, unsigned irq, int ack)
{
	/* data: the fd (to ack it), whether to, and the bit */
	struct epoll_event ev = { .events = EPOLLIN,
				  .data.u64 = ((uint64_t)fd << 40) | ((uint64_t)!!ack << 32) | irq };

	if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev))
		native_die("webkv-native: epoll_ctl");
}

const char *native_forward(uint32_t vsock_port)
{
	for (int i = 0; i < nforwards; i++)
		if (forwards[i].port == vsock_port)
			return forwards[i].from;
	return NULL;
}

/* The TSC against CLOCK_MONOTONIC (20 ms), for ulib's uclock_ns(). */
static void calibrate_tsc(void)
{
	info.tsc_khz = host_tsc_khz(20000000);
	info.ns_mult = (uint64_t)((1000000ULL << 32) / info.tsc_khz);
	snprintf(info.tsc_source, sizeof(info.tsc_source), "clock_gettime");
}

static int64_t set_timer(uint64_t hz)
{
	struct itimerspec its = { 0 };
	uint64_t prev = info.hz;

	if (hz) {
		its.it_interval.tv_nsec = 1000000000 / hz;
		its.it_value = its.it_interval;
	}
	if (timerfd_settime(timerfd, 0, &its, NULL))
		return -E_INVAL;
	info.hz = hz;
	return prev;
}

/* Halt until a device or the timer fires; the pending device bits. */
static uint64_t wait_interrupt(void)
{
	struct epoll_event evs[16];
	uint64_t mask = 0;
	int n;

	do
		n = epoll_wait(epfd, evs, 16, -1);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		native_die("webkv-native: epoll_wait");
	for (int i = 0; i < n; i++) {
		uint64_t d = evs[i].data.u64, count;
		int fd = (int)(d >> 40);
		if ((d >> 32) & 1 && read(fd, &count, 8) == 8 && fd == timerfd)
			info.ticks += count;
		if (fd != timerfd)
			mask |= 1ULL << (d & 63);
	}
	return mask;
}

int64_t syscall3(uint64_t nr, uint64_t a, uint64_t b, uint64_t c)
{
	(void)c;
	switch (nr) {
	case SYS_null:
		return 0;
	case SYS_write:
		if (a != 1 && a != 2)
			return -E_INVAL;
		return write((int)a, (const void *)b, c) < 0 ? -E_FAULT : (int64_t)c;
	case SYS_exit:
		exit((int)a);
	case SYS_clock_ns:
		return ((unsigned __int128)host_rdtsc() * info.ns_mult) >> 32;
	case SYS_wait_interrupt:
		return wait_interrupt();
	case SYS_timer:
		return set_timer(a);
	case SYS_crash:		/* the injected crash-on-acquire fault */
		abort();
	default:	/* SYS_map, SYS_irq: there are no device windows */
		return -E_NOSYS;
	}
}

/* forward=[HOST:]PORT=VSOCK_PORT, as `pyvmm boot --forward` */
static int add_forward(const char *spec)
{
	const char *eq = strrchr(spec, '=');
	char *end;
	unsigned long port;

	if (!eq || nforwards == MAX_FORWARDS || (size_t)(eq - spec) >= sizeof(forwards[0].from))
		return -1;
	port = strtoul(eq + 1, &end, 10);
	if (*end || !eq[1] || port > 0xffffffffUL)
		return -1;
	forwards[nforwards].port = (uint32_t)port;
	memcpy(forwards[nforwards].from, spec, eq - spec);
	forwards[nforwards].from[eq - spec] = 0;
	nforwards++;
	return 0;
}

int main(int argc, char **argv)
{
	size_t len = 0;
	uint64_t heap = DEFAULT_HEAP;
	void *p;

	setvbuf(stdout, NULL, _IONBF, 0);
	for (int i = 1; i < argc; i++) {
		size_t n = strlen(argv[i]);
		if (!strncmp(argv[i], "forward=", 8) && add_forward(argv[i] + 8)) {
			fprintf(stderr, "webkv-native: bad %s (forward=[HOST:]PORT=VSOCK_PORT)\n", argv[i]);
			return 2;
		}
		if (!strncmp(argv[i], "heap=", 5))
			heap = strtoull(argv[i] + 5, NULL, 0);
		if (len + n + 2 > sizeof(info.cmdline)) {
			fprintf(stderr, "webkv-native: command line too long\n");
			return 2;
		}
		memcpy(info.cmdline + len, argv[i], n);
		len += n;
		info.cmdline[len++] = ' ';
	}
	info.cmdline[len] = 0;
	/* The guest's heap: one region, bump-allocated by ulib (umalloc on top). */
	p = mmap(NULL, heap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		native_die("webkv-native: heap");
	info.heap_base = (uint64_t)p;
	info.heap_size = heap;
	epfd = epoll_create1(EPOLL_CLOEXEC);
	timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (epfd < 0 || timerfd < 0)
		native_die("webkv-native: epoll/timerfd");
	native_irq_fd(timerfd, 0, 1);
	calibrate_tsc();
	ulib_start(&info);	/* exit(umain()) */
}

/* The loop polls the disk's queue before it sleeps, because a guest interrupt is
 * expensive; here the sleep (epoll_wait) is cheap and wakes on the completion. */
int virtq_poll_used(struct virtq *const *qs, int n, uint64_t ns)
{
	(void)qs, (void)n, (void)ns;
	return 0;
}
