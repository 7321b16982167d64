/*
 * The shared runtime of the pyvmm guest kernels: PVH boot, GDT/TSS/IDT,
 * 16550 console, start-info and command-line parsing, printf, LAPIC/IOAPIC.
 * A kernel provides `int kmain(void)`; its return value becomes the exit code.
 */
#ifndef RT_RUNTIME_H
#define RT_RUNTIME_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include "x86.h"

/*
 * Every emulated instruction (and rep iteration) costs ~0.7 us, so .bss is
 * kept small: clearing it at boot is per quadword.  Big objects go to
 *   __noinit   not zeroed, not in the file (stacks, buffers written before use)
 *   __zeroed   zero bytes in the file (tables that must start zeroed)
 */
#define __noinit	__attribute__((section(".bss.noinit")))
#define __zeroed	__attribute__((section(".data.zeroed")))

#define KERNEL_VIRT_BASE	0xffffffff80000000UL	/* virtual 0xffffffff80000000 + x -> physical x + delta */
#define KERNEL_WINDOW_SIZE	(64UL << 20)		/* size of that high window */

/* Selectors of the fixed GDT (see README). */
#define SEL_KCODE	0x08
#define SEL_KDATA	0x10
#define SEL_UDATA	0x18
#define SEL_UCODE	0x20
#define SEL_TSS		0x28

/* ---- PVH start info (xen/include/public/arch-x86/hvm/start_info.h) ---- */
#define HVM_START_MAGIC	0x336ec578
#define E820_RAM	1

struct hvm_start_info {
	uint32_t magic, version, flags, nr_modules;
	uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	uint32_t memmap_entries, reserved;
};

struct hvm_memmap_entry {
	uint64_t addr, size;
	uint32_t type, reserved;
};

/* Filled by the runtime before kmain(). */
extern uint64_t boot_start_info_paddr;
extern const struct hvm_start_info *boot_start_info;	/* NULL if the magic was bad */
extern const struct hvm_memmap_entry *boot_memmap;
extern uint32_t boot_memmap_entries;
extern const char *boot_cmdline;			/* never NULL; "" if absent */
extern uint64_t boot_load_base;				/* physical address of the image */
extern uint64_t boot_link_base;				/* physical address it was linked at */

/* Physical address of a kernel-image object (the high window is offset by the load delta). */
static inline uint64_t virt_to_phys(const void *p)
{
	return (uint64_t)p - KERNEL_VIRT_BASE + (boot_load_base - boot_link_base);
}

/* Value of `key=value` on the command line ("" for a bare `key`), or NULL. */
const char *cmdline_get(const char *key);

int kmain(void);
__attribute__((noreturn)) void debug_exit(int code);	/* outb(code, 0xf4); cli; hlt forever */

/* ---- 16550 console ---- */
#define COM1	0x3f8
#define COM2	0x2f8
extern uint16_t console_port;
void serial_init(uint16_t port);
void serial_write(const char *s, size_t n);
int serial_rx_ready(void);
char serial_getc(void);		/* polls LSR.DR */
uint8_t serial_read_iir(void);
void serial_set_ier(uint8_t ier);
void serial_set_mcr(uint8_t mcr);

/* ---- formatted output and strings: klib.h ---- */
#include "klib.h"

/* ---- traps and interrupts ---- */
struct trap_frame {
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
	uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error;			/* pushed by the stub (error by the CPU for some) */
	uint64_t rip, cs, rflags, rsp, ss;	/* pushed by the CPU */
};
typedef void (*irq_handler_t)(struct trap_frame *tf);

/* Install a C handler for vector 32..255 (interrupt gate, IF=0 inside; the
 * handler sends its own EOI).  dpl=3 lets CPL3 code use `int vector`. */
void irq_register(uint8_t vector, irq_handler_t fn, int dpl);
__attribute__((noreturn)) void crash(const struct trap_frame *tf);	/* CRASH line, exit 3 */
/* Point a gate at an assembly entry of its own (no trap_frame, no C dispatch). */
void idt_set(uint8_t vector, const void *entry, int dpl);

/* Kernel stack used on CPL3->CPL0 transitions (TSS.rsp0). */
void tss_set_rsp0(uint64_t rsp0);

/* ---- LAPIC / IOAPIC ---- */
#define LAPIC_SPURIOUS_VECTOR	0xff
#define IOAPIC_BASE		0xfec00000UL
void lapic_enable(void);		/* SVR enable + spurious vector, TPR 0, LINT0 (ExtINT/PIC) masked */
void lapic_eoi(void);
uint32_t lapic_id(void);
#define IOAPIC_EDGE_HIGH	0		/* ISA default */
#define IOAPIC_ACTIVE_LOW	(1u << 13)
#define IOAPIC_LEVEL		(1u << 15)
void ioapic_route(unsigned pin, uint8_t vector, uint32_t dest_apic_id, uint32_t flags);	/* fixed, physical, unmasked */
void ioapic_mask(unsigned pin);
uint64_t lapic_phys_base(void);		/* valid after lapic_enable() */
#define LAPIC_TIMER_PERIODIC	(1u << 17)
#define LAPIC_LVT_MASKED	(1u << 16)
#define LAPIC_DIV16		0x3
void lapic_timer_set(uint32_t lvt, uint32_t divide, uint32_t initial);	/* TDCR, LVT timer, TICR */
uint32_t lapic_timer_current(void);

/* ---- TSC ---- */
static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

/* ---- user mode (user.c, entry.S; see README "User mode") ---- */
/* Enter the kernel's CPL3 program (<name>/user/, entry _ustart in ulib/crt0.S); never returns. */
__attribute__((noreturn)) void user_run(void);

#endif
