/*
 * CPL3 <-> CPL0 transitions of the user-mode runtime (see user.c).
 *
 * Kernel-mode instructions are emulated one by one on the development machines
 * (~0.7 us each), so these paths are counted in instructions:
 *   system call (int3)     7 + the handler (SYS_null: 9 in all)
 *   LAPIC timer tick        3 (incq ticks; EOI; iretq)
 *   device interrupt        4 (incq count; btsq pending; EOI; iretq), 14 with irqlog=1
 * The interrupt stubs use no register and no stack beyond the CPU's frame, and
 * send EOI through a supervisor alias of the LAPIC at a constant address
 * (LAPIC_ALIAS, set up by user_run()) so that it is one instruction.
 */
#include "uapi.h"

#define LAPIC_ALIAS	0xffffffffbfe00000	/* pd_kernel[511] -> the LAPIC's 2 MiB page */
#define LAPIC_EOI	0xb0
#define UINFO_TICKS	16			/* offsetof(struct user_info, ticks) */
#define UINFO_IRQ_COUNT	2128			/* offsetof(struct user_info, irq_count) */
#define UINFO_IRQ_LOG_HEAD	2640		/* offsetof(struct user_info, irq_log_head) */
#define UINFO_IRQ_LOG	2648			/* offsetof(struct user_info, irq_log) */
#define SEL_UDATA_RPL3	0x1b
#define SEL_UCODE_RPL3	0x23

/*
 * System calls: `int3` at CPL3 with rax = number, rdi rsi rdx r10 = arguments,
 * result in rax.  #BP is a trap (the saved rip is already past the int3), its
 * gate (SYSCALL_TRAP_VECTOR, 3) is a DPL3 interrupt gate (IF=0 inside), and the
 * CPU has switched to TSS.rsp0 (kernel_stack_top) and pushed the iret frame;
 * interrupts that arrive in wait_interrupt nest on top of it at CPL0.
 * 7 instructions + the handler (SYS_null: 9 in all).
 *
 * Why int3: on kvm_pvm (the nested development machines) a guest `syscall` at
 * CPL3 lands at LSTAR still at CPL3, and `int $n` raises #UD (KVM's emulator
 * cannot emulate a software interrupt in long mode), while exceptions from
 * CPL3 are delivered through the IDT like on hardware.  #BP is the one
 * exception raised by a 1-byte instruction with no state to fix up.  Where the
 * CPU does it right (hardware KVM, QEMU TCG), `int $0x80` (same entry) and
 * `syscall` (syscall_entry) reach the same table.
 */
	.text
	.globl trap_syscall_entry
trap_syscall_entry:
	cmpq $NR_SYSCALLS, %rax
	jae 1f
	pushq %r10			/* keeps the C ABI's 16-byte stack alignment */
	movq %r10, %rcx
	call *syscall_table(, %rax, 8)
	popq %rcx
	iretq
1:	movq $-E_NOSYS, %rax
	iretq

/* syscall/sysret: rcx = user rip, r11 = user rflags, SFMASK cleared IF DF TF AC. */
	.globl syscall_entry
syscall_entry:
	movq %rsp, user_rsp(%rip)
	leaq kernel_stack_top(%rip), %rsp
	cmpq $NR_SYSCALLS, %rax
	jae 1f
	pushq %rcx
	pushq %r11
	movq %r10, %rcx
	call *syscall_table(, %rax, 8)
	popq %r11
	popq %rcx
	movq user_rsp(%rip), %rsp
	sysretq
1:	movq $-E_NOSYS, %rax
	movq user_rsp(%rip), %rsp
	sysretq

/* LAPIC timer (TIMER_VECTOR): count, EOI, return.  The flags are restored by iretq. */
	.globl timer_stub
timer_stub:
	incq user_info + UINFO_TICKS(%rip)
	movl $0, LAPIC_ALIAS + LAPIC_EOI
	iretq

/* Device interrupts: vector IRQ_VECTOR_BASE + b counts the run in
 * user_info.irq_count[b] and sets bit b of irq_pending.  32 bytes apart. */
	.balign 32
	.globl irq_stubs
irq_stubs:
	b = 0
	.rept IRQ_VECTORS
	.balign 32
	incq user_info + UINFO_IRQ_COUNT + 8 * b(%rip)
	btsq $b, irq_pending(%rip)
	movl $0, LAPIC_ALIAS + LAPIC_EOI
	iretq
	b = b + 1
	.endr

/* The same with a log entry first (irqlog=1): irq_log[head % IRQ_LOG_LEN] =
 * (TSC & ~0xff) | b, then head++ (the entry is written before the head moves, so
 * a reader that sees the head sees the entry).  64 bytes apart. */
	.balign 64
	.globl irq_log_stubs
irq_log_stubs:
	b = 0
	.rept IRQ_VECTORS
	.balign 64
	pushq %rax
	pushq %rdx
	rdtsc
	shlq $32, %rdx
	orq %rdx, %rax
	movb $b, %al
	movq user_info + UINFO_IRQ_LOG_HEAD(%rip), %rdx
	movzbl %dl, %edx			/* IRQ_LOG_LEN == 256 */
	movq %rax, user_info + UINFO_IRQ_LOG(, %rdx, 8)
	incq user_info + UINFO_IRQ_LOG_HEAD(%rip)
	popq %rdx
	popq %rax
	jmp irq_stubs + 32 * b
	b = b + 1
	.endr

/* user_enter(rip, rsp, arg): iretq to CPL3 with IF=1; does not return. */
	.globl user_enter
user_enter:
	pushq $(SEL_UDATA_RPL3)
	pushq %rsi
	pushq $0x202				/* IF */
	pushq $(SEL_UCODE_RPL3)
	pushq %rdi
	movq %rdx, %rdi
	iretq

	.bss
	.balign 8
	.globl irq_pending
irq_pending:	.quad 0
user_rsp:	.quad 0

	.section .bss.noinit, "aw", @nobits
	.balign 4096
	.skip 8192
	.globl kernel_stack_top
kernel_stack_top:

/* The user program's stack, in the user region (zeroed by the loader, not in the file). */
	.section .user.bss.stack, "aw", @nobits
	.balign 4096
	.skip 65536
	.globl user_stack_top
user_stack_top:
