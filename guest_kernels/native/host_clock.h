/*
 * The clocks of the native (Linux process) builds, build/bench-native and
 * build/webkv-native: CLOCK_MONOTONIC, the TSC, and the TSC's rate measured
 * against CLOCK_MONOTONIC.
 */
#ifndef NATIVE_HOST_CLOCK_H
#define NATIVE_HOST_CLOCK_H

#include <stdint.h>
#include <time.h>

static inline uint64_t host_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static inline uint64_t host_rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

/* TSC kHz, from TSC ticks over window_ns of CLOCK_MONOTONIC (spinning). */
static inline uint64_t host_tsc_khz(uint64_t window_ns)
{
	uint64_t n0 = host_now_ns(), t0 = host_rdtsc(), n1, t1;

	while ((n1 = host_now_ns()) - n0 < window_ns)
		;
	t1 = host_rdtsc();
	return (t1 - t0) * 1000000 / (n1 - n0);
}

#endif
