/*
 * Entry of the CPL3 program: user_run() irets here with rdi = struct user_info *
 * and rsp = the top of the user stack (16-byte aligned).
 */
	.text
	.globl _ustart
_ustart:
	xorl %ebp, %ebp
	call ulib_start			/* does not return: exit(umain()) */
	ud2

	.section .note.GNU-stack, "", @progbits
