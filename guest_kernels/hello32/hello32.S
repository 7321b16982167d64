/*
 * hello32.elf: a minimal 32-bit PVH kernel (ELF32, EM_386), linked and loaded
 * at physical 0x100000, not relocatable.  Protected mode, no paging.  Prints
 * two lines on COM1 and exits 0 through port 0xf4 (4 on a bad start info).
 */
#define COM1		0x3f8
#define DEBUG_EXIT	0xf4
#define START_MAGIC	0x336ec578

	.section .note.Xen, "a", @note
	.balign 4
	.long 4, 4, 18			/* XEN_ELFNOTE_PHYS32_ENTRY, 4-byte desc */
	.asciz "Xen"
	.balign 4
	.long _start
	.balign 4

	.text
	.code32
	.globl _start
_start:
	cli
	cld
	lgdt gdt_ptr			/* own flat GDT and stack: assume neither exists */
	ljmp $0x08, $1f
1:	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movl $stack_top, %esp
	movl %ebx, %ebp			/* ebp = start_info */

	call serial_init
	cmpl $START_MAGIC, (%ebp)
	jne bad_magic
	movl $msg_hello, %esi
	call puts
	movl $msg_cmdline, %esi
	call puts
	movl 24(%ebp), %esi		/* cmdline_paddr (low half) */
	cmpl $0, 28(%ebp)		/* above 4 GiB: unreachable, print nothing */
	jne 2f
	testl %esi, %esi
	jz 2f
	call puts
2:	movl $msg_quote_nl, %esi
	call puts
	xorl %eax, %eax
	jmp exit

bad_magic:
	movl $msg_bad, %esi
	call puts
	movl $4, %eax
exit:
	outb %al, $DEBUG_EXIT
3:	cli
	hlt
	jmp 3b

/* 8N1, divisor 1, FIFO on, DTR|RTS */
serial_init:
	movl $uart_init, %esi
4:	movzbl (%esi), %edx
	testl %edx, %edx
	jz 5f
	movb 1(%esi), %al
	addl $COM1 - 1, %edx
	outb %al, %dx
	addl $2, %esi
	jmp 4b
5:	ret

/* puts(esi): NUL-terminated string; 16 bytes per LSR.THRE (TX FIFO) */
puts:
	movl tx_room, %ecx
6:	movb (%esi), %al
	testb %al, %al
	jz 9f
	testl %ecx, %ecx
	jnz 8f
	movw $COM1 + 5, %dx
7:	inb %dx, %al
	testb $0x20, %al
	jz 7b
	movl $16, %ecx
	movb (%esi), %al
8:	movw $COM1, %dx
	outb %al, %dx
	decl %ecx
	incl %esi
	jmp 6b
9:	movl %ecx, tx_room
	ret

	.section .rodata
	/* (register offset + 1, value) pairs; offset 0 ends the list */
uart_init:
	.byte 1 + 1, 0x00		/* IER off */
	.byte 3 + 1, 0x80		/* DLAB */
	.byte 0 + 1, 0x01		/* DLL */
	.byte 1 + 1, 0x00		/* DLM */
	.byte 3 + 1, 0x03		/* 8N1 */
	.byte 2 + 1, 0x07		/* FCR: FIFO on, both cleared, RX trigger 1 */
	.byte 4 + 1, 0x03		/* MCR */
	.byte 0
msg_hello:	.asciz "hello32: Hello from hello32.elf, a 32-bit PVH guest kernel\n"
msg_cmdline:	.asciz "hello32: cmdline=\""
msg_quote_nl:	.asciz "\"\n"
msg_bad:	.asciz "hello32: error=bad-start-info\n"

	.balign 8
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff		/* 0x08 flat code32 */
	.quad 0x00cf92000000ffff		/* 0x10 flat data */
gdt_end:
	.balign 4
	.word 0
gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt

	.data
tx_room:	.long 0

	.bss
	.balign 16
	.skip 4096
stack_top:
