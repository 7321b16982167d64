/*
 * User mode: the kernel's main program runs at CPL3, natively, and asks the
 * kernel (emulated, ~0.7 us per instruction) for as little as possible.
 *
 * Address space (one, shared with the kernel, built from the boot page tables):
 *   user region   the image's .user.* sections (ulib + <name>/user/), 2 MiB
 *                 aligned after the kernel, at 0xffffffff80000000 + x like the
 *                 kernel; the User bit is set on its kernel-window PD entries only
 *   heap          the largest free 2 MiB-aligned RAM range of the e820 map below
 *                 4 GiB (not the image, not the first 2 MiB, not the start info),
 *                 identity mapped (virtual == physical), User bit on its PD entries
 *   SYS_map       more identity-mapped 2 MiB pages (device MMIO, DMA memory)
 *   LAPIC alias   0xffffffffbfe00000 (pd_kernel[511], supervisor, uncached): the
 *                 interrupt stubs write EOI there with one instruction
 */
#include "runtime.h"
#include "uapi.h"

#define PTE_P		0x001
#define PTE_RW		0x002
#define PTE_US		0x004
#define PTE_PWT		0x008
#define PTE_PCD		0x010
#define PTE_PS		0x080
#define PAGE_2M		0x200000UL
#define IDENTITY_LIMIT	(4UL << 30)
#define LAPIC_ALIAS_SLOT	511		/* pd_kernel index: 0xffffffffbfe00000 */
#define HZ_MAX		1000
#define MSR_STAR	0xc0000081
#define MSR_LSTAR	0xc0000082
#define MSR_SFMASK	0xc0000084
#define EFER_SCE	0x1
#define RFLAGS_MASK	0x47700		/* AC NT IOPL DF IF TF cleared on syscall */

extern uint64_t pd_kernel[], pd_ident[];	/* boot.S */
extern char __image_start[], __image_end[], __user_start[], __user_end[];
extern char _ustart[];					/* ulib/crt0.S */
extern char trap_syscall_entry[], syscall_entry[], timer_stub[], irq_stubs[], irq_log_stubs[];
extern char kernel_stack_top[], user_stack_top[];
extern volatile uint64_t irq_pending;			/* entry.S */
__attribute__((noreturn)) void user_enter(uint64_t rip, uint64_t rsp, uint64_t arg);

/* In the user region: the user program reads it (ticks, clock, heap, cmdline). */
struct user_info user_info __attribute__((section(".user.data.info"), aligned(64)));

static uint64_t image_lo, image_hi;	/* physical, 2 MiB rounded */
static uint64_t lapic_page;		/* physical 2 MiB page of the LAPIC */
static uint64_t lapic_timer_hz;		/* LAPIC timer input / 16; 0 = not calibrated */

static inline void cpuid(uint32_t leaf, uint32_t r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(0));
}

static inline void flush_tlb(void)
{
	uint64_t cr3;

	__asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

static uint64_t parse_u64(const char *s)
{
	uint64_t v = 0;

	while (s && *s >= '0' && *s <= '9')
		v = v * 10 + (*s++ - '0');
	return v;
}

/* ---- TSC frequency: tsc_khz= from the VMM, else CPUID, kvmclock, the PIT ---- */

/* KVM's pvclock: the hypervisor's TSC -> ns scale gives the TSC frequency exactly. */
#define MSR_KVM_SYSTEM_TIME_NEW	0x4b564d01
#define KVM_FEATURE_CLOCKSOURCE2	(1u << 3)

static struct pvclock {
	uint32_t version, pad0;
	uint64_t tsc_timestamp, system_time;
	uint32_t tsc_to_system_mul;
	int8_t tsc_shift;
	uint8_t flags, pad[2];
} pvclock __attribute__((aligned(64)));

static uint64_t kvmclock_tsc_khz(void)
{
	uint32_t r[4];
	uint64_t khz;

	cpuid(0x40000000, r);
	if (r[1] != 0x4b4d564b || r[0] < 0x40000001)	/* "KVMK" */
		return 0;
	cpuid(0x40000001, r);
	if (!(r[0] & KVM_FEATURE_CLOCKSOURCE2))
		return 0;
	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, virt_to_phys(&pvclock) | 1);	/* KVM fills it in before the next instruction */
	khz = *(volatile uint32_t *)&pvclock.version && pvclock.tsc_to_system_mul ?
		(1000000UL << 32) / pvclock.tsc_to_system_mul : 0;
	wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);				/* and stops updating it */
	return pvclock.tsc_shift < 0 ? khz << -pvclock.tsc_shift : khz >> pvclock.tsc_shift;
}

/* PIT channel 2, mode 0, gate through port 0x61: TSC cycles until OUT2 rises. */
static uint64_t pit_tsc_khz(void)
{
	const uint32_t count = 11932;	/* 10 ms of the 1.193182 MHz PIT */
	uint8_t gate = inb(0x61);
	uint64_t t0, t1, polls = 0;

	if (gate == 0xff)
		return 0;		/* no port 0x61 */
	outb(0x61, (gate & ~0x02) | 0x01);	/* speaker off, gate on */
	outb(0x43, 0xb0);		/* channel 2, lobyte/hibyte, mode 0 */
	outb(0x42, count & 0xff);
	outb(0x42, count >> 8);
	t0 = rdtsc();
	while (!(inb(0x61) & 0x20) && ++polls < 1000000)
		;
	t1 = rdtsc();
	outb(0x61, gate);
	if (polls < 2 || polls >= 1000000)
		return 0;
	return (t1 - t0) * 1193182 / ((uint64_t)count * 1000);
}

static void setup_clock(void)
{
	const char *arg = cmdline_get("tsc_khz");
	const char *src = "cmdline";
	uint64_t khz = parse_u64(arg);
	uint32_t r[4];

	if (!khz) {
		cpuid(0, r);
		uint32_t max = r[0];
		cpuid(1, r);
		if (r[2] & (1u << 31)) {	/* hypervisor: VMware/KVM timing leaf */
			cpuid(0x40000000, r);
			if (r[0] >= 0x40000010) {
				cpuid(0x40000010, r);
				khz = r[0], src = "cpuid-40000010";
			}
		}
		if (!khz && max >= 0x15) {
			cpuid(0x15, r);	/* TSC = crystal * ebx / eax */
			if (r[0] && r[1] && r[2])
				khz = (uint64_t)r[2] * r[1] / r[0] / 1000, src = "cpuid-15";
		}
		if (!khz)
			khz = kvmclock_tsc_khz(), src = "kvmclock";
		if (!khz && max >= 0x16) {
			cpuid(0x16, r);	/* base MHz */
			if (r[0])
				khz = (uint64_t)r[0] * 1000, src = "cpuid-16";
		}
		if (!khz)
			khz = pit_tsc_khz(), src = "pit";
		if (!khz) {
			kprintf("runtime: warning=no-tsc-frequency assuming tsc_khz=1000000\n");
			khz = 1000000, src = "guess";
		}
	}
	user_info.tsc_khz = khz;
	user_info.ns_mult = (1000000UL << 32) / khz;
	memcpy(user_info.tsc_source, src, strlen(src) + 1);
}

/* ---- memory ---- */

struct range { uint64_t lo, hi; };

/* Largest part of [lo, hi) that overlaps none of the n reserved ranges. */
static struct range largest_free(uint64_t lo, uint64_t hi, const struct range *res, int n)
{
	struct range best = { 0, 0 };

	for (int i = -1; i < n; i++) {
		uint64_t s = i < 0 ? lo : res[i].hi, e = hi;
		int ok = s >= lo && s < hi;

		for (int j = 0; ok && j < n; j++) {
			if (res[j].lo <= s && s < res[j].hi)
				ok = 0;
			else if (res[j].lo > s && res[j].lo < e)
				e = res[j].lo;
		}
		if (ok && e - s > best.hi - best.lo)
			best = (struct range){ s, e };
	}
	return best;
}

static uint64_t down2m(uint64_t a) { return a & ~(PAGE_2M - 1); }
static uint64_t up2m(uint64_t a) { return (a + PAGE_2M - 1) & ~(PAGE_2M - 1); }

static void setup_heap(void)
{
	struct range res[4], best = { 0, 0 };
	int n = 0;

	res[n++] = (struct range){ image_lo, image_hi };
	res[n++] = (struct range){ down2m(boot_start_info_paddr), up2m(boot_start_info_paddr + sizeof(*boot_start_info)) };
	if (boot_memmap)
		res[n++] = (struct range){ down2m((uint64_t)boot_memmap),
					   up2m((uint64_t)(boot_memmap + boot_memmap_entries)) };
	res[n++] = (struct range){ lapic_page, lapic_page + PAGE_2M };
	for (uint32_t i = 0; i < boot_memmap_entries; i++) {
		const struct hvm_memmap_entry *e = &boot_memmap[i];
		uint64_t lo = up2m(e->addr < PAGE_2M ? PAGE_2M : e->addr);
		uint64_t hi = e->addr + e->size > IDENTITY_LIMIT ? IDENTITY_LIMIT : down2m(e->addr + e->size);
		struct range r;

		if (e->type != E820_RAM || lo >= hi)
			continue;
		r = largest_free(lo, hi, res, n);
		if (r.hi - r.lo > best.hi - best.lo)
			best = r;
	}
	for (uint64_t a = best.lo; a < best.hi; a += PAGE_2M)
		pd_ident[a >> 21] |= PTE_US;
	user_info.heap_base = best.lo;
	user_info.heap_size = best.hi - best.lo;
}

/* [p, p + n) is user-accessible: in the user region or on identity pages with the User bit. */
static int user_range_ok(uint64_t p, uint64_t n)
{
	if (p + n < p)
		return 0;
	if (p >= (uint64_t)__user_start && p + n <= (uint64_t)__user_end)
		return 1;
	if (p + n > IDENTITY_LIMIT)
		return 0;
	for (uint64_t a = down2m(p); a < p + n; a += PAGE_2M)
		if (!(pd_ident[a >> 21] & PTE_US))
			return 0;
	return 1;
}

/* ---- system calls (see uapi.h); reached from syscall_entry with IF=0 ---- */

static int64_t sys_null(void) { return 0; }

static int64_t sys_write(uint64_t fd, const char *buf, uint64_t len)
{
	if (fd != 1 && fd != 2)
		return -E_INVAL;
	if (!user_range_ok((uint64_t)buf, len))
		return -E_FAULT;
	serial_write(buf, len);
	return len;
}

static int64_t sys_exit(uint64_t code) { debug_exit(code & 0xff); }

/* An OS that crashes for real (injected faults): no IDT, then an exception. */
static int64_t sys_crash(void)
{
	struct { uint16_t limit; uint64_t base; } __attribute__((packed)) none = { 0, 0 };

	__asm__ volatile("lidt %0; ud2" : : "m"(none));
	return 0;
}

static int64_t sys_clock_ns(void)
{
	return ((unsigned __int128)rdtsc() * user_info.ns_mult) >> 32;
}

static int64_t sys_wait_interrupt(void)
{
	uint64_t m;

	if (!irq_pending) {
		sti_hlt();	/* the interrupt runs here, on this stack, at CPL0 */
		cli();
	}
	m = irq_pending;
	irq_pending = 0;
	return m;
}

static int64_t sys_map(uint64_t phys, uint64_t len, uint64_t flags)
{
	uint64_t lo = down2m(phys), hi;

	if (!len || phys >= IDENTITY_LIMIT || len > IDENTITY_LIMIT - phys || (flags & ~(uint64_t)MAP_NOCACHE))
		return -E_INVAL;
	hi = up2m(phys + len);
	if ((lo < image_hi && hi > image_lo) || (lo <= lapic_page && hi > lapic_page))
		return -E_PERM;		/* the kernel image, the LAPIC */
	for (uint64_t a = lo; a < hi; a += PAGE_2M)
		pd_ident[a >> 21] |= PTE_US | (flags & MAP_NOCACHE ? PTE_PCD | PTE_PWT : 0);
	flush_tlb();
	return phys;
}

static void calibrate_lapic_timer(void)
{
	uint64_t window = user_info.tsc_khz * 2, t0, t1;	/* 2 ms */
	uint32_t c0, c1;

	lapic_timer_set(LAPIC_LVT_MASKED | TIMER_VECTOR, LAPIC_DIV16, 0xffffffff);
	c0 = lapic_timer_current();
	t0 = rdtsc();
	while (rdtsc() - t0 < window)
		;
	c1 = lapic_timer_current();
	t1 = rdtsc();
	lapic_timer_set(LAPIC_LVT_MASKED | TIMER_VECTOR, LAPIC_DIV16, 0);
	lapic_timer_hz = (uint64_t)(c0 - c1) * user_info.tsc_khz * 1000 / (t1 - t0);
}

static int64_t sys_timer(uint64_t hz)
{
	uint64_t prev = user_info.hz;

	if (hz > HZ_MAX)
		hz = HZ_MAX;
	if (!hz) {
		lapic_timer_set(LAPIC_LVT_MASKED | TIMER_VECTOR, LAPIC_DIV16, 0);
	} else {
		if (!lapic_timer_hz)
			calibrate_lapic_timer();
		lapic_timer_set(LAPIC_TIMER_PERIODIC | TIMER_VECTOR, LAPIC_DIV16, lapic_timer_hz / hz);
	}
	user_info.hz = hz;
	return prev;
}

static int64_t sys_irq(uint64_t pin, uint64_t flags)
{
	if (pin >= 24 || (flags & ~(uint64_t)(IRQ_ACTIVE_LOW | IRQ_LEVEL | IRQ_MASK)))
		return -E_INVAL;
	if (flags & IRQ_MASK) {
		ioapic_mask(pin);
	} else {
		ioapic_route(pin, IRQ_VECTOR(pin), lapic_id(),
			     (flags & IRQ_ACTIVE_LOW ? IOAPIC_ACTIVE_LOW : 0) | (flags & IRQ_LEVEL ? IOAPIC_LEVEL : 0));
	}
	return IRQ_VECTOR(pin);
}

const void *const syscall_table[NR_SYSCALLS] = {
	[SYS_null] = sys_null,
	[SYS_write] = sys_write,
	[SYS_exit] = sys_exit,
	[SYS_clock_ns] = sys_clock_ns,
	[SYS_wait_interrupt] = sys_wait_interrupt,
	[SYS_map] = sys_map,
	[SYS_timer] = sys_timer,
	[SYS_irq] = sys_irq,
	[SYS_crash] = sys_crash,
};

/* ---- entering user mode ---- */

void user_run(void)
{
	uint64_t user_lo = (uint64_t)__user_start, user_hi = up2m((uint64_t)__user_end);
	uint64_t apic;
	size_t n;

	lapic_enable();
	apic = lapic_phys_base();
	if (apic & (PAGE_2M - 1)) {	/* the one-instruction EOI needs it at a 2 MiB boundary */
		kprintf("runtime: error=lapic-base base=0x%016lx\n", apic);
		debug_exit(4);
	}
	lapic_page = apic;
	pd_kernel[LAPIC_ALIAS_SLOT] = apic | PTE_P | PTE_RW | PTE_PS | PTE_PCD | PTE_PWT;

	image_lo = down2m(boot_load_base);
	image_hi = up2m(virt_to_phys(__image_end));
	user_info.load_base = boot_load_base;
	user_info.image_end = virt_to_phys(__image_end);
	setup_clock();
	n = strlen(boot_cmdline);
	if (n >= UINFO_CMDLINE_MAX)
		n = UINFO_CMDLINE_MAX - 1;
	memcpy(user_info.cmdline, boot_cmdline, n);
	user_info.cmdline[n] = 0;

	for (uint64_t a = user_lo; a < user_hi; a += PAGE_2M)
		pd_kernel[(a - KERNEL_VIRT_BASE) >> 21] |= PTE_US;
	setup_heap();
	flush_tlb();

	idt_set(SYSCALL_TRAP_VECTOR, trap_syscall_entry, 3);
	idt_set(SYSCALL_VECTOR, trap_syscall_entry, 3);
	idt_set(TIMER_VECTOR, timer_stub, 0);
	const char *log = cmdline_get("irqlog");
	int logged = log && *log == '1';

	for (unsigned b = 0; b < IRQ_VECTORS; b++)
		idt_set(IRQ_VECTOR_BASE + b, logged ? irq_log_stubs + 64 * b : irq_stubs + 32 * b, 0);
	wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
	wrmsr(MSR_STAR, (uint64_t)SEL_KDATA << 48 | (uint64_t)SEL_KCODE << 32);	/* sysret: +16 code, +8 data */
	wrmsr(MSR_LSTAR, (uint64_t)syscall_entry);
	wrmsr(MSR_SFMASK, RFLAGS_MASK);
	tss_set_rsp0((uint64_t)kernel_stack_top);

	if (cmdline_get("hz"))
		sys_timer(parse_u64(cmdline_get("hz")));
	user_enter((uint64_t)_ustart, (uint64_t)user_stack_top, (uint64_t)&user_info);
}
