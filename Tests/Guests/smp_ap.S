/*
 * The application processors' path. ap_trampoline is copied to 0x8000 and
 * reached through SIPI vector 0x08 (CS=0x0800, IP=0), so everything in it
 * is addressed as its offset from 0x8000. It goes to 32-bit protected
 * mode and joins the BSP's own route to long mode (start.S), which
 * continues at the address in EBP: ap_entry, which the guest sets first
 * (smp.c to ap_main below, stateful.c to its own continuation).
 */
#define TRAMP_BASE	0x8000
#define AT(x)		((x) - ap_trampoline + TRAMP_BASE)
#define AP_REPORT_PORT	0x522
#define MAX_APS		63

	.section .text.ap, "ax"
	.code16
	.globl ap_trampoline, ap_trampoline_end
ap_trampoline:
	cli
	cld
	xor	%ax, %ax
	mov	%ax, %ds
	lgdtl	AT(tramp_gdt_ptr)
	mov	%cr0, %eax
	or	$1, %eax
	mov	%eax, %cr0
	ljmpl	$0x18, $AT(tramp_prot32)

	.code32
tramp_prot32:
	mov	$0x10, %eax		/* DS still has its 64 KiB real-mode limit */
	mov	%eax, %ds
	mov	ap_entry, %ebp		/* absolute load: DS is flat now */
	mov	$enter_long_mode, %eax
	jmp	*%eax			/* absolute: this copy is not where it was linked */

	.balign 8
tramp_gdt_ptr:
	.word	4 * 8 - 1
	.long	gdt
ap_trampoline_end:

	.section .data.ap_entry, "aw"
	.balign 4
	.globl ap_entry
ap_entry:
	.long	0			/* set by the guest before the SIPIs */

	/* Its own section: guests with their own continuation leave it out. */
	.section .text.ap_main, "ax"
	.code64
	.globl ap_main
/* No stack: report the APIC ID, take a slot, count ourselves, park. */
ap_main:
	mov	$1, %eax
	cpuid
	shr	$24, %ebx		/* CPUID.1:EBX[31:24] = initial APIC ID */
	mov	%ebx, %eax
	mov	$AP_REPORT_PORT, %dx
	outb	%al, %dx
	mov	$1, %ecx
	lock xadd %ecx, ap_slot(%rip)
	cmp	$MAX_APS, %ecx
	jae	1f
	mov	%ebx, ap_ids(, %rcx, 4)
1:	lock incl ap_done(%rip)
	jmp	halt_forever

	.section .note.GNU-stack, "", @progbits
