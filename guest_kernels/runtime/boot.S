/*
 * PVH entry of the 64-bit kernels.
 *
 * Entered in 32-bit protected mode, paging off, EBX = physical address of
 * struct hvm_start_info.  The image may have been loaded at its linked
 * physical address plus any multiple of 2 MiB (Xen note 19), so this code is
 * position independent until paging is on.  Page tables (2 MiB pages, built
 * once, by the assembler where they do not depend on the load address):
 *   virtual 0 .. 4 GiB                    -> physical 0 .. 4 GiB (identity)
 *   virtual 0xffffffff80000000 + x        -> physical x + delta, x < 64 MiB
 * and since the kernel is linked at 0xffffffff80000000 + its physical link
 * address, the 64-bit code runs at its link address wherever it was loaded:
 * relocation through paging, no relocation records.
 */
#define KERNEL_VIRT_BASE	0xffffffff80000000
#define PHYS(x)			((x) - KERNEL_VIRT_BASE)	/* linked physical address */
#define WINDOW_PAGES		32				/* 64 MiB of 2 MiB pages */

#define PTE_TABLE	0x007		/* present, writable, user (leaves decide) */
#define PTE_LARGE	0x083		/* present, writable, 2 MiB, supervisor */
#define CR0_BITS	0x80010023	/* PG | WP | NE | MP | PE */
#define CR0_CLEAR	0x0000000c	/* TS | EM */
#define CR4_BITS	0x00000620	/* OSXMMEXCPT | OSFXSR | PAE (SSE only ever used at CPL3) */
#define MSR_EFER	0xc0000080
#define EFER_LME	0x100

/* ---- ELF notes (PT_NOTE, 4-byte aligned) ---- */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4, 8, 18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad PHYS(pvh_start32)
	.balign 4
	.long 4, 12, 19			/* XEN_ELFNOTE_PHYS32_RELOC: align, min, max */
	.asciz "Xen"
	.balign 4
	.long 0x200000, 0x200000, 0xffffffff
	.balign 4

/* ---- 32-bit entry ---- */
	.section .text.boot, "ax"
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	cld
	/* No stack yet: borrow start_info->magic as the slot for call/pop (as Linux does). */
	movl (%ebx), %ecx
	leal 4(%ebx), %esp
	call 1f
1:	popl %ebp
	movl %ecx, (%ebx)
	subl $PHYS(1b), %ebp			/* ebp = delta = actual - linked */
	leal PHYS(boot_stack_top)(%ebp), %esp
	movl %ebx, %esi				/* esi = start_info */

	/* PML4: [0] -> low PDPT, [511] -> high PDPT */
	leal PHYS(pml4)(%ebp), %edi
	leal (PHYS(pdpt_low) + PTE_TABLE)(%ebp), %eax
	movl %eax, (%edi)
	leal (PHYS(pdpt_high) + PTE_TABLE)(%ebp), %eax
	movl %eax, 511*8(%edi)
	/* low PDPT: [0..3] -> the four identity page directories */
	leal PHYS(pdpt_low)(%ebp), %edi
	leal (PHYS(pd_ident) + PTE_TABLE)(%ebp), %eax
	movl %eax, (%edi)
	addl $0x1000, %eax
	movl %eax, 8(%edi)
	addl $0x1000, %eax
	movl %eax, 16(%edi)
	addl $0x1000, %eax
	movl %eax, 24(%edi)
	/* high PDPT: [510] (0xffffffff80000000) -> kernel window directory */
	leal (PHYS(pd_kernel) + PTE_TABLE)(%ebp), %eax
	movl %eax, (PHYS(pdpt_high) + 510*8)(%ebp)
	/* kernel window: entry i -> physical i * 2 MiB + delta */
	leal PHYS(pd_kernel)(%ebp), %edi
	leal PTE_LARGE(%ebp), %eax
	movl $WINDOW_PAGES, %ecx
3:	movl %eax, (%edi)
	addl $0x200000, %eax
	addl $8, %edi
	decl %ecx
	jnz 3b

	/* long mode */
	movl $CR4_BITS, %eax
	movl %eax, %cr4
	leal PHYS(pml4)(%ebp), %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	leal PHYS(gdt)(%ebp), %eax		/* GDT at its physical address for now */
	pushl %eax
	pushw $(gdt_end - gdt - 1)
	lgdt (%esp)
	addl $6, %esp
	movl %cr0, %eax
	andl $~CR0_CLEAR, %eax
	orl $CR0_BITS, %eax
	movl %eax, %cr0
	leal PHYS(__image_start)(%ebp), %ebx	/* ebx = load base */
	leal PHYS(start64_low)(%ebp), %eax
	pushl $0x08
	pushl %eax
	lret

	.code64
start64_low:					/* identity mapped; jump to the high window */
	movabs $start64, %rax
	jmp *%rax

	.text
start64:
	lgdt gdt_ptr(%rip)
	movl $0x10, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	leaq boot_stack_top(%rip), %rsp
	movl %esi, %r12d			/* start_info (zero-extended) */
	movl %ebx, %r13d			/* load base */
	/* zero .bss (page tables, stacks and other .bss.noinit data live outside it) */
	leaq __bss_start(%rip), %rdi
	leaq __bss_end(%rip), %rcx
	subq %rdi, %rcx
	shrq $3, %rcx
	xorl %eax, %eax
	rep stosq
	movq %r12, %rdi
	movq %r13, %rsi
	call rt_start
4:	cli
	hlt
	jmp 4b

/* ---- GDT (fixed layout; syscall/sysret need 0x08/0x10 and 0x18/0x20 in this order) ---- */
	.data
	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00af9a000000ffff		/* 0x08 kernel code64 */
	.quad 0x00cf92000000ffff		/* 0x10 kernel data */
	.quad 0x00cff2000000ffff		/* 0x18 user data, DPL3 */
	.quad 0x00affa000000ffff		/* 0x20 user code64, DPL3 */
	.quad 0, 0				/* 0x28 64-bit TSS, filled by trap.c */
gdt_end:
	.balign 8
	.word 0, 0, 0
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt

/*
 * ---- page tables (in the file: never zeroed, never rebuilt) ----
 * The identity leaves do not depend on the load address, so the assembler
 * writes them (2048 entries at boot would cost ~4 ms of emulated code); the
 * code above fills in the table pointers and the kernel window.
 */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl pd_kernel, pd_ident		/* user.c sets User/PCD bits and the LAPIC alias */
pml4:		.fill 512, 8, 0
pdpt_low:	.fill 512, 8, 0
pdpt_high:	.fill 512, 8, 0
pd_kernel:	.fill 512, 8, 0
pd_ident:
	i = 0
	.rept 4 * 512
	.quad (i << 21) | PTE_LARGE
	i = i + 1
	.endr

/* ---- stacks: not zeroed, not in the file ---- */
	.section .bss.noinit, "aw", @nobits
	.balign 4096
	.skip 16384
	.globl boot_stack_top
boot_stack_top:
