/*
 * The interface between the kernel runtime (CPL0) and the user program (CPL3):
 * system call numbers, flags, and the user_info block the kernel fills in before
 * it enters user mode.  Included by both sides; no code here.
 *
 * System calls: `int3` (#BP, a trap; see runtime/entry.S for why not `syscall`)
 * with rax = number, arguments in rdi, rsi, rdx, r10; result in rax (negative =
 * -error).  rcx, rdi, rsi, rdx,
 * r8, r9, r10, r11 are clobbered (the entry path saves nothing it does not have
 * to); rbx, rbp, rsp, r12-r15, the flags and all vector registers are preserved
 * (the kernel never touches SSE).  `int $0x80` and `syscall` reach the same
 * table where the CPU really enters CPL0 on them (hardware KVM, QEMU TCG; not
 * kvm_pvm); `syscall` also clobbers r11.
 */
#ifndef RT_UAPI_H
#define RT_UAPI_H

#ifndef __ASSEMBLER__
#include <stdint.h>
#endif

#define SYS_null		0	/* () -> 0 */
#define SYS_write		1	/* (fd 1 or 2, buf, len) -> len; the console UART */
#define SYS_exit		2	/* (code) -> does not return; outb(code, 0xf4) */
#define SYS_clock_ns		3	/* () -> TSC-based monotonic ns (same as uclock_ns()) */
#define SYS_wait_interrupt	4	/* () -> pending device-IRQ bitmask; halts until an interrupt if none pending */
#define SYS_map			5	/* (phys, len, flags) -> virtual address (== phys) or -error */
#define SYS_timer		6	/* (hz) -> previous hz; 0 stops the LAPIC timer */
#define SYS_irq			7	/* (pin, flags) -> vector; routes IOAPIC pin -> IRQ_VECTOR(pin) */
#define SYS_crash		8	/* () -> does not return: a triple fault (fault injection) */
#define NR_SYSCALLS		9

/* errors (returned negated) */
#define E_INVAL		22
#define E_FAULT		14
#define E_PERM		1
#define E_NOSYS		38

/* SYS_map flags */
#define MAP_NOCACHE	0x1	/* PCD|PWT on the covering 2 MiB pages (device MMIO) */

/* SYS_irq flags */
#define IRQ_EDGE_HIGH	0x0
#define IRQ_ACTIVE_LOW	0x1
#define IRQ_LEVEL	0x2
#define IRQ_MASK	0x4	/* mask the pin instead of routing it */

/*
 * Device interrupts: IOAPIC pin N (0..23) is routed to vector IRQ_VECTOR(N); the
 * kernel's stub for vector IRQ_VECTOR_BASE + b (b < 64, so MSI can use the other
 * vectors) sets bit b of the pending mask, sends EOI and returns.  Nothing is
 * masked.  SYS_wait_interrupt returns and clears the mask.
 */
#define IRQ_VECTOR_BASE		0x30
#define IRQ_VECTOR(pin)		(IRQ_VECTOR_BASE + (pin))
#define IRQ_VECTORS		64
#define TIMER_VECTOR		0x20	/* LAPIC timer: counts user_info.ticks */
#define SYSCALL_TRAP_VECTOR	3	/* int3 (#BP): system calls */
#define SYSCALL_VECTOR		0x80	/* int $0x80: system calls, where `int n` works */

#define UINFO_CMDLINE_MAX	2048
#define IRQ_LOG_LEN		256	/* handler runs kept in user_info.irq_log (a ring) */

#ifndef __ASSEMBLER__
/* Handed to the user program (rdi at entry), in the user region, filled by the kernel. */
struct user_info {
	uint64_t tsc_khz;		/* TSC frequency used by the clock */
	uint64_t ns_mult;		/* ns = (tsc * ns_mult) >> 32 (128-bit product) */
	volatile uint64_t ticks;	/* LAPIC timer interrupts so far (the kernel increments it) */
	uint64_t hz;			/* current timer rate, 0 = off */
	uint64_t heap_base;		/* free RAM, identity mapped (virtual == physical), User, 2 MiB aligned */
	uint64_t heap_size;
	uint64_t load_base;		/* physical address of the kernel image */
	uint64_t image_end;		/* physical end of the image (kernel + user region) */
	char tsc_source[16];		/* cmdline, cpuid-40000010, cpuid-15, kvmclock, cpuid-16, pit, guess */
	char cmdline[UINFO_CMDLINE_MAX];	/* copy of the kernel command line */
	/* Device interrupt handler runs, per vector IRQ_VECTOR_BASE + b (the stubs count). */
	volatile uint64_t irq_count[IRQ_VECTORS];
	/* With irqlog=1 on the command line, every device handler run is also logged:
	 * irq_log[n % IRQ_LOG_LEN] = (TSC at entry & ~0xff) | b for run n < irq_log_head.
	 * For tests (readable by the program and by the host); costs 10 more emulated
	 * instructions per interrupt, so it is off by default. */
	volatile uint64_t irq_log_head;
	volatile uint64_t irq_log[IRQ_LOG_LEN];
};

_Static_assert(__builtin_offsetof(struct user_info, ticks) == 16, "entry.S UINFO_TICKS");
_Static_assert(__builtin_offsetof(struct user_info, irq_count) == 2128, "entry.S UINFO_IRQ_COUNT");
_Static_assert(__builtin_offsetof(struct user_info, irq_log_head) == 2640, "entry.S UINFO_IRQ_LOG_HEAD");
_Static_assert(__builtin_offsetof(struct user_info, irq_log) == 2648, "entry.S UINFO_IRQ_LOG");
#endif

#endif
