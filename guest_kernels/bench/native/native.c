/*
 * build/bench-native: the workloads of bench.elf (bench/user/work.c, same
 * compiler flags) as a Linux program, for guest/native ratios.
 *   build/bench-native [run=alu,...] [n_alu=...] [tsc_khz=...] [hugepages=1]
 * syscall uses getppid (a real, cheap Linux system call); timer reruns the ALU
 * loop with no timer (ticks 0); portio is not available.  Memory comes from
 * mmap (4 KiB pages, or transparent huge pages with hugepages=1).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include "host_clock.h"
#include "work.h"

const int plat_has_portio = 0;
const int plat_has_timer = 0;
const int plat_has_cpu_ns = 1;
uint64_t plat_tsc_khz;
const char *plat_tsc_source;

static int argc_;
static char **argv_;

#define MAX_ALLOCS 16
static struct { void *p; size_t n; } allocs[MAX_ALLOCS];
static int nallocs;

void plat_write(const char *s, size_t n)
{
	fwrite(s, 1, n, stdout);
	fflush(stdout);
}

const char *plat_arg(const char *key)
{
	size_t k = strlen(key);

	for (int i = 1; i < argc_; i++)
		if (!strncmp(argv_[i], key, k) && (argv_[i][k] == '=' || !argv_[i][k]))
			return argv_[i][k] ? argv_[i] + k + 1 : argv_[i] + k;
	return NULL;
}

/* the raw instruction, as the guest does it, not glibc's wrapper */
__attribute__((noinline)) void plat_null_syscall(void)
{
	uint64_t nr = SYS_getppid;

	__asm__ volatile("syscall" : "+a"(nr) : : "rcx", "r11", "memory");
}

uint64_t plat_timer(uint64_t hz) { (void)hz; return 0; }
uint64_t plat_ticks(void) { return 0; }

void *plat_alloc(size_t size)
{
	const size_t align = 2UL << 20;
	const char *huge = plat_arg("hugepages");
	char *p;

	if (nallocs == MAX_ALLOCS)
		return NULL;
	p = mmap(NULL, size + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
	allocs[nallocs].p = p;
	allocs[nallocs++].n = size + align;
	p = (char *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
	if (huge && strcmp(huge, "0"))
		madvise(p, size, MADV_HUGEPAGE);
	return p;
}

void plat_free_all(void)
{
	while (nallocs) {
		nallocs--;
		munmap(allocs[nallocs].p, allocs[nallocs].n);
	}
}

uint64_t plat_cpu_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	const char *khz = NULL;

	argc_ = argc, argv_ = argv;
	khz = plat_arg("tsc_khz");
	if (khz && *khz) {
		plat_tsc_khz = strtoull(khz, NULL, 10);
		plat_tsc_source = "cmdline";
	} else {
		plat_tsc_khz = host_tsc_khz(50000000);	/* 50 ms */
		plat_tsc_source = "clock_gettime";
	}
	return bench_main();
}
