/* GDT TSS descriptor, TSS (with an all-ports-allowed I/O bitmap), IDT, trap dispatch. */
#include "runtime.h"

extern uint64_t gdt[];			/* boot.S */
extern char isr_stubs[];		/* isr.S: 16 bytes per vector */

struct tss64 {
	uint32_t reserved0;
	uint64_t rsp[3];
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;
	uint8_t iomap[8192];		/* all zero: every port allowed at CPL3 */
	uint8_t iomap_end;		/* must be 0xff */
} __attribute__((packed));

struct idt_gate {
	uint16_t off0, sel;
	uint8_t ist, type;
	uint16_t off1;
	uint32_t off2, reserved;
};

static char kstack[16384] __noinit __attribute__((aligned(16)));
static char df_stack[4096] __noinit __attribute__((aligned(16)));

static struct tss64 tss __attribute__((aligned(16))) = {
	.rsp = { (uint64_t)(kstack + sizeof(kstack)) },
	.ist = { (uint64_t)(df_stack + sizeof(df_stack)) },	/* IST1: #DF */
	.iomap_base = offsetof(struct tss64, iomap),
	.iomap_end = 0xff,
};

static struct idt_gate idt[256] __zeroed __attribute__((aligned(16)));
static irq_handler_t handlers[256] __zeroed;

void tss_set_rsp0(uint64_t rsp0) { tss.rsp[0] = rsp0; }

static void set_gate_to(unsigned vec, uint64_t a, unsigned ist, unsigned dpl)
{
	idt[vec] = (struct idt_gate){
		.off0 = a, .sel = SEL_KCODE, .ist = ist, .type = 0x8e | (dpl << 5),
		.off1 = a >> 16, .off2 = a >> 32,
	};
}

static void set_gate(unsigned vec, unsigned ist, unsigned dpl)
{
	set_gate_to(vec, (uint64_t)(isr_stubs + 16 * vec), ist, dpl);
}

void idt_set(uint8_t vector, const void *entry, int dpl)
{
	set_gate_to(vector, (uint64_t)entry, 0, dpl ? 3 : 0);
}

void trap_init(void)
{
	uint64_t base = (uint64_t)&tss, limit = sizeof(tss) - 1;
	struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)idt };

	gdt[SEL_TSS / 8] = (limit & 0xffff) | (base & 0xffffff) << 16 | 0x89UL << 40 |
			   ((limit >> 16) & 0xf) << 48 | ((base >> 24) & 0xff) << 56;
	gdt[SEL_TSS / 8 + 1] = base >> 32;
	__asm__ volatile("ltr %w0" : : "r"(SEL_TSS));

	for (unsigned v = 0; v < 32; v++)
		set_gate(v, v == 8 ? 1 : 0, 0);
	set_gate(LAPIC_SPURIOUS_VECTOR, 0, 0);
	__asm__ volatile("lidt %0" : : "m"(idtr));
}

void irq_register(uint8_t vector, irq_handler_t fn, int dpl)
{
	if (vector < 32)
		return;
	handlers[vector] = fn;
	set_gate(vector, 0, dpl ? 3 : 0);
}

void crash(const struct trap_frame *tf)
{
	kprintf("CRASH vector=%lu error=0x%016lx rip=0x%016lx cr2=0x%016lx rsp=0x%016lx cpl=%lu\n",
		tf->vector & 0xff, tf->error, tf->rip, read_cr2(), tf->rsp, tf->cs & 3);
	debug_exit(3);
}

void trap_dispatch(struct trap_frame *tf);
void trap_dispatch(struct trap_frame *tf)
{
	unsigned v = tf->vector & 0xff;

	if (v >= 32 && handlers[v])
		handlers[v](tf);
	else if (v != LAPIC_SPURIOUS_VECTOR)	/* spurious: no EOI, just return */
		crash(tf);
}
