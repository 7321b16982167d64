/* Minimal local APIC (xAPIC MMIO) and IOAPIC helpers; both reached through the identity map. */
#include "runtime.h"

#define LAPIC_DEFAULT_BASE	0xfee00000UL
#define LAPIC_ID	0x020
#define LAPIC_TPR	0x080
#define LAPIC_EOI	0x0b0
#define LAPIC_SVR	0x0f0
#define LAPIC_LVT_TIMER	0x320
#define LAPIC_LVT_LINT0	0x350
#define LAPIC_TICR	0x380
#define LAPIC_TCCR	0x390
#define LAPIC_TDCR	0x3e0
#define LVT_MASKED	(1u << 16)
#define SVR_ENABLE	(1u << 8)

#define IOREGSEL	0x00
#define IOWIN		0x10
#define IOAPIC_REDTBL(pin)	(0x10 + 2 * (pin))
#define REDIR_MASKED	(1u << 16)

static uintptr_t lapic_base = LAPIC_DEFAULT_BASE;

void lapic_enable(void)
{
	uint64_t msr = rdmsr(MSR_APIC_BASE);

	lapic_base = msr & 0xfffff000UL;	/* below 4 GiB in practice; identity mapped */
	if (!(msr & (1u << 11)))
		wrmsr(MSR_APIC_BASE, msr | (1u << 11));
	mmio_write32(lapic_base + LAPIC_TPR, 0);
	/* LINT0 is ExtINT (virtual wire) after reset: mask it so the unprogrammed PIC
	 * cannot inject vectors 0-15 alongside the IOAPIC. */
	mmio_write32(lapic_base + LAPIC_LVT_LINT0, LVT_MASKED);
	mmio_write32(lapic_base + LAPIC_SVR, SVR_ENABLE | LAPIC_SPURIOUS_VECTOR);
}

void lapic_eoi(void) { mmio_write32(lapic_base + LAPIC_EOI, 0); }

uint32_t lapic_id(void) { return mmio_read32(lapic_base + LAPIC_ID) >> 24; }

uint64_t lapic_phys_base(void) { return lapic_base; }

void lapic_timer_set(uint32_t lvt, uint32_t divide, uint32_t initial)
{
	mmio_write32(lapic_base + LAPIC_TDCR, divide);
	mmio_write32(lapic_base + LAPIC_LVT_TIMER, lvt);
	mmio_write32(lapic_base + LAPIC_TICR, initial);	/* starts (or, with 0, stops) the count */
}

uint32_t lapic_timer_current(void) { return mmio_read32(lapic_base + LAPIC_TCCR); }

static void ioapic_write(unsigned reg, uint32_t v)
{
	mmio_write32(IOAPIC_BASE + IOREGSEL, reg);
	mmio_write32(IOAPIC_BASE + IOWIN, v);
}

void ioapic_route(unsigned pin, uint8_t vector, uint32_t dest_apic_id, uint32_t flags)
{
	ioapic_write(IOAPIC_REDTBL(pin), REDIR_MASKED);
	ioapic_write(IOAPIC_REDTBL(pin) + 1, dest_apic_id << 24);
	ioapic_write(IOAPIC_REDTBL(pin), vector | flags);	/* fixed delivery, physical destination */
}

void ioapic_mask(unsigned pin) { ioapic_write(IOAPIC_REDTBL(pin), REDIR_MASKED); }
