/*
 * ulib: the library of the CPL3 programs (<kernel>/user/).  A program
 * defines `int umain(void)`; its return value goes to exit().  Everything here
 * runs natively; only the sys_* calls enter the (emulated) kernel.
 *
 * The user program sees: its own code and data (the user region), the user
 * stack (64 KiB), the heap (uinfo->heap_base/heap_size, virtual == physical)
 * and whatever SYS_map adds.  Printing: uprintf() formats at CPL3 and makes one
 * SYS_write per 256 bytes.
 */
#ifndef ULIB_H
#define ULIB_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include "uapi.h"

int umain(void);

extern const struct user_info *uinfo;

/* ---- system calls: int3 (see runtime/entry.S); ULIB_TRAP may select "int $0x80"
 * or "syscall" where the CPU handles them (hardware KVM, QEMU TCG) ---- */
#ifdef ULIB_NATIVE
/* build/webkv-native: the same program as a Linux process (webkv/native/platform.c) */
int64_t syscall3(uint64_t nr, uint64_t a, uint64_t b, uint64_t c);
#else
#ifndef ULIB_TRAP
#define ULIB_TRAP "int3"
#endif
static inline int64_t syscall3(uint64_t nr, uint64_t a, uint64_t b, uint64_t c)
{
	register uint64_t r10 __asm__("r10");
	int64_t ret;

	__asm__ volatile(ULIB_TRAP
			 : "=a"(ret), "+D"(a), "+S"(b), "+d"(c), "=r"(r10)
			 : "a"(nr)
			 : "rcx", "r8", "r9", "r11", "memory");
	return ret;
}
#endif
static inline int64_t syscall0(uint64_t nr) { return syscall3(nr, 0, 0, 0); }

static inline int64_t sys_null(void) { return syscall0(SYS_null); }
static inline int64_t sys_write(int fd, const void *buf, size_t len) { return syscall3(SYS_write, fd, (uint64_t)buf, len); }
__attribute__((noreturn)) static inline void sys_exit(int code)
{
	syscall3(SYS_exit, code, 0, 0);
	__builtin_unreachable();
}
static inline uint64_t sys_clock_ns(void) { return syscall0(SYS_clock_ns); }
static inline uint64_t sys_wait_interrupt(void) { return syscall0(SYS_wait_interrupt); }
static inline int64_t sys_map(uint64_t phys, uint64_t len, uint64_t flags) { return syscall3(SYS_map, phys, len, flags); }
static inline int64_t sys_timer(uint64_t hz) { return syscall3(SYS_timer, hz, 0, 0); }
static inline int64_t sys_irq(unsigned pin, unsigned flags) { return syscall3(SYS_irq, pin, flags, 0); }
static inline void sys_crash(void) { syscall0(SYS_crash); }

/* ---- clock: the fast path reads the TSC natively, no kernel entry ---- */
static inline uint64_t urdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}
static inline uint64_t uclock_ns(void)	/* == sys_clock_ns() */
{
	return ((unsigned __int128)urdtsc() * uinfo->ns_mult) >> 32;
}
static inline uint64_t uticks(void) { return uinfo->ticks; }

/* ---- port I/O: allowed at CPL3 (TSS I/O bitmap); each access is a VM exit ---- */
static inline void uoutb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t uinb(uint16_t port)
{
	uint8_t v;

	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

/* ---- command line: value of key=value ("" for a bare key), or NULL ---- */
const char *uarg(const char *key);
uint64_t uarg_u64(const char *key, uint64_t dflt);	/* decimal or 0x hex */

/* ---- heap: bump allocation from uinfo's heap; NULL when it is used up ---- */
void *ualloc(size_t size, size_t align);
size_t uheap_mark(void);
void uheap_release(size_t mark);	/* free everything allocated since the mark */

/* ---- formatted output (runtime/printf.c compiled for CPL3) ---- */
#include "klib.h"
#define uprintf kprintf
#define usnprintf ksnprintf

#endif
