/*
 * 16550 UART console.  Every port access is a VM exit, so transmit fills the
 * FIFO after each LSR.THRE (like Linux's 8250 tx_loadsz) instead of polling LSR
 * per byte, and does it with one `rep outsb`: KVM turns that into a single
 * KVM_EXIT_IO with io.count = up to 16 (64 on a 16750; the VMM must honour count).
 */
#include "runtime.h"

#define RBR 0	/* receive buffer (read) / THR transmit (write) / DLL with DLAB */
#define IER 1	/* interrupt enable / DLM with DLAB */
#define IIR 2	/* interrupt identification (read) / FCR (write) */
#define LCR 3
#define MCR 4
#define LSR 5
#define LSR_DR		0x01
#define LSR_THRE	0x20
#define FIFO_SIZE	16
#define FIFO64_SIZE	64

uint16_t console_port = COM1;
static unsigned tx_load = 1;		/* bytes to write per LSR.THRE: 16 with the FIFO on */
static unsigned tx_room;		/* bytes the transmitter can still take */

void serial_init(uint16_t port)
{
	console_port = port;
	outb(port + IER, 0x00);
	outb(port + LCR, 0x80);		/* DLAB */
	outb(port + RBR, 0x01);		/* DLL: divisor 1 = 115200 baud */
	outb(port + IER, 0x00);		/* DLM */
	outb(port + LCR, 0x03);		/* 8N1 */
	/*
	 * Input that arrived before this point (e.g. piped into QEMU's stdin)
	 * would be dropped by enabling the FIFO: QEMU's 16550 flushes both FIFOs
	 * whenever FCR.FE changes.  Then stay in 16450 mode, one byte per THRE.
	 */
	if (inb(port + LSR) & LSR_DR) {
		tx_load = 1;
	} else {
		/* A TI 16750 (pyvmm's UART) takes FCR bit 5, 64-byte FIFOs, only while
		 * DLAB is on, and shows it in IIR bit 5; a 16550A (QEMU's) ignores it. */
		outb(port + LCR, 0x83);
		outb(port + IIR, 0x27);	/* FCR: FIFO on, clear both, 64 bytes */
		outb(port + LCR, 0x03);
		outb(port + IIR, 0x07);	/* FCR: FIFO on, clear both, RX trigger 1 byte */
		tx_load = inb(port + IIR) & 0x20 ? FIFO64_SIZE : FIFO_SIZE;
	}
	outb(port + MCR, 0x03);		/* DTR | RTS */
	tx_room = 0;
}

void serial_write(const char *s, size_t n)
{
	uint16_t port = console_port;

	while (n) {
		size_t k;

		if (!tx_room) {
			while (!(inb(port + LSR) & LSR_THRE))
				;
			tx_room = tx_load;
		}
		k = n < tx_room ? n : tx_room;
		tx_room -= k;
		n -= k;
		__asm__ volatile("rep outsb" : "+S"(s), "+c"(k) : "d"(port) : "memory");
	}
}

int serial_rx_ready(void)
{
	return inb(console_port + LSR) & LSR_DR;
}

char serial_getc(void)
{
	while (!(inb(console_port + LSR) & LSR_DR))
		;
	return inb(console_port + RBR);
}

uint8_t serial_read_iir(void) { return inb(console_port + IIR); }
void serial_set_ier(uint8_t ier) { outb(console_port + IER, ier); }
void serial_set_mcr(uint8_t mcr) { outb(console_port + MCR, mcr); }
