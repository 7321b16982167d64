/*
 * The benchmark workloads (work.c), shared by bench.elf (CPL3, bench/user/main.c)
 * and build/bench-native (Linux, bench/native/native.c), compiled with the same
 * flags for both.  The platform supplies what differs.
 */
#ifndef BENCH_WORK_H
#define BENCH_WORK_H

#include <stddef.h>
#include <stdint.h>

/* ---- provided by the platform ---- */
void plat_write(const char *s, size_t n);	/* one output line, '\n' included */
const char *plat_arg(const char *key);		/* value of key=value, "" for a bare key, or NULL */
void *plat_alloc(size_t size);			/* 2 MiB aligned, contents undefined; NULL if no memory */
void plat_free_all(void);			/* free everything plat_alloc() returned */
uint64_t plat_timer(uint64_t hz);		/* periodic timer at hz (0 = off); returns the previous rate */
uint64_t plat_ticks(void);			/* timer interrupts so far */
extern const int plat_has_timer;		/* 0: plat_timer() does nothing, no ticks (native) */
void plat_null_syscall(void);			/* one cheap system call (guest SYS_null, Linux getppid) */
extern const int plat_has_portio;		/* outb to port 0x80 allowed (guest only) */
uint64_t plat_cpu_ns(void);			/* this thread's CPU time, ns (0 if unknown) */
extern const int plat_has_cpu_ns;		/* plat_cpu_ns() works (native) */
extern uint64_t plat_tsc_khz;			/* TSC frequency the platform uses */
extern const char *plat_tsc_source;

/* ---- provided by work.c ---- */
int bench_main(void);				/* runs run=...; returns the exit code */

#endif
