/* probe.elf: one VMM test action per boot, chosen by probe=<action> on the command line. */
#include "runtime.h"

#define UART_VECTOR	0x24
#define LINE_MAX	128

static char line[LINE_MAX + 1];
static volatile unsigned line_len, irqs, bad_iir;
static volatile int line_done;

static void take(char c)
{
	if (c == '\n')
		line_done = 1;
	else if (c != '\r' && line_len < LINE_MAX)
		line[line_len++] = c;
}

static int echo_poll(void)
{
	while (!line_done)
		take(serial_getc());
	kprintf("probe: echo=\"%s\"\n", line);
	return 0;
}

static void uart_isr(struct trap_frame *tf)
{
	uint8_t iir = serial_read_iir();

	(void)tf;
	irqs++;
	/* bit 0 = 0: pending, bits 3:1 = 010: received data available.  Bit 0 = 1
	 * (nothing pending) is fine: an edge raised while the previous ISR drained. */
	if (!(iir & 0x01) && (iir & 0x0e) != 0x04 && !bad_iir)
		bad_iir = 0x100 | iir;
	while (serial_rx_ready())
		take(serial_getc());
	lapic_eoi();
}

static int echo_irq(void)
{
	lapic_enable();
	irq_register(UART_VECTOR, uart_isr, 0);
	ioapic_route(console_port == COM2 ? 3 : 4, UART_VECTOR, lapic_id(), IOAPIC_EDGE_HIGH);
	serial_set_mcr(0x0b);		/* DTR | RTS | OUT2 (the PC's IRQ gate) */
	serial_set_ier(0x01);		/* received data available */
	cli();
	while (!line_done) {
		sti_hlt();
		cli();
	}
	serial_set_ier(0x00);
	if (bad_iir) {
		kprintf("probe: error=bad-iir iir=0x%02x\n", bad_iir & 0xff);
		return 4;
	}
	kprintf("probe: echo=\"%s\" irqs=%u\n", line, irqs);
	return 0;
}

static int parse_u8(const char *s)
{
	int v = 0;

	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || (v = v * 10 + *s - '0') > 255)
			return -1;
	}
	return v;
}

/*
 * An SSE instruction at CPL0.  KVM's instruction emulator on the nested machines
 * cannot run it and stops the VM (KVM_EXIT_INTERNAL_ERROR), which is what the
 * VMM's error report is tested with.  Hardware-assisted KVM just runs it.
 * `make check` skips this one function (UNEMULATABLE_OK in the Makefile).
 */
static __attribute__((noinline)) void probe_unemulatable(void)
{
	__asm__ volatile("pxor %%xmm0, %%xmm0" : : : "memory");
}

int kmain(void)
{
	const char *action = cmdline_get("probe");
	int code;

	if (!action)
		action = "";
	kprintf("probe: action=%s\n", action);

	if (!strncmp(action, "exit:", 5) && (code = parse_u8(action + 5)) >= 0)
		return code;
	if (!strcmp(action, "triple-fault")) {
		struct { uint16_t limit; uint64_t base; } __attribute__((packed)) none = { 0, 0 };
		__asm__ volatile("lidt %0; ud2" : : "m"(none));
	}
	if (!strcmp(action, "page-fault"))
		return *(volatile uint8_t *)0x0000100000000000UL;
	if (!strcmp(action, "spin"))
		__asm__ volatile("cli; 1: jmp 1b");
	if (!strcmp(action, "halt"))
		__asm__ volatile("cli; 1: hlt; jmp 1b");
	if (!strcmp(action, "echo"))
		return echo_poll();
	if (!strcmp(action, "echo-irq"))
		return echo_irq();
	if (!strncmp(action, "user-exit:", 10) || !strncmp(action, "user-exit-rep:", 14) || !strcmp(action, "user-fault") || !strcmp(action, "clock") ||
	    !strcmp(action, "timer") || !strcmp(action, "syscall") || !strcmp(action, "user-echo-irq") ||
	    !strcmp(action, "user-map") || !strcmp(action, "idle") || !strcmp(action, "compute") ||
	    !strcmp(action, "scribble") || !strcmp(action, "irq-count") ||
	    !strcmp(action, "sweep"))
		user_run();	/* probe/user/probe_user.c, at CPL3 */
	if (!strcmp(action, "unemulatable")) {
		probe_unemulatable();
		kprintf("probe: unemulatable=ran\n");
		return 0;
	}
	kprintf("probe: error=unknown-action\n");
	return 2;
}
