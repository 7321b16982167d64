/*
 * 256 interrupt stubs, 16 bytes apart (isr_stubs + 16 * vector).  Each pushes
 * a dummy error code when the CPU does not, then the vector, and jumps to
 * isr_common, which saves the GPRs and calls trap_dispatch(struct trap_frame *).
 */
	.text
	.balign 16
	.globl isr_stubs
isr_stubs:
	vec = 0
	.rept 256
	.balign 16
	.if !(vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30)
	pushq $0
	.endif
	pushq $vec			/* >= 128 is sign-extended; trap_dispatch masks it */
	jmp isr_common
	vec = vec + 1
	.endr

isr_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	cld
	movq %rsp, %rdi			/* 22 quadwords pushed: still 16-byte aligned */
	call trap_dispatch
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp			/* vector, error */
	iretq
