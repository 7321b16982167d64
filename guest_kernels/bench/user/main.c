/* bench.elf's CPL3 program: the platform of work.c on top of ulib. */
#include "ulib.h"
#include "work.h"

const int plat_has_portio = 1;
const int plat_has_timer = 1;
const int plat_has_cpu_ns = 0;		/* the host measures it (mark=1) */
uint64_t plat_tsc_khz;
const char *plat_tsc_source;

__attribute__((noinline)) void plat_null_syscall(void) { sys_null(); }
void plat_write(const char *s, size_t n) { sys_write(1, s, n); }
const char *plat_arg(const char *key) { return uarg(key); }
uint64_t plat_timer(uint64_t hz) { return sys_timer(hz); }
uint64_t plat_ticks(void) { return uticks(); }
uint64_t plat_cpu_ns(void) { return 0; }

static size_t heap_mark;

void *plat_alloc(size_t size) { return ualloc(size, 2UL << 20); }
void plat_free_all(void) { uheap_release(heap_mark); }

int umain(void)
{
	plat_tsc_khz = uinfo->tsc_khz;
	plat_tsc_source = uinfo->tsc_source;
	heap_mark = uheap_mark();
	return bench_main();
}
