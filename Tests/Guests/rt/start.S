/*
 * PVH entry and the switch to long mode.
 *
 * A PVH loader starts us in 32-bit protected mode with paging off, flat
 * segments and EBX = physical address of struct hvm_start_info. We identity
 * map the first 4 GiB with 2 MiB pages (1 GiB pages fault on this host),
 * enter long mode and call guest_main(start_info) in C.
 */

#define CR0_PE		0x00000001
#define CR0_PG		0x80000000
#define CR4_PAE		0x00000020
#define MSR_EFER	0xc0000080
#define EFER_LME	0x00000100

#define PDE_2M		0x83		/* present, writable, 2 MiB page */
#define PDE_2M_UC	0x9b		/* same, uncached: the MMIO hole */
#define PTE_TABLE	0x03		/* present, writable, points to a table */

/*
 * The Xen PVH note. QEMU reads the entry as a pointer-sized value in an
 * ELF64 image, so the descriptor is 8 bytes here (Linux does the same).
 */
	.section .note.Xen, "a"
	.balign 4
	.long 4				/* namesz: "Xen\0" */
	.long 8				/* descsz */
	.long 18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.quad pvh_start

	.section .text.boot, "ax"
	.code32
	.globl pvh_start
pvh_start:
	cli
	cld
	mov	%ebx, %esi		/* start_info survives in ESI, then RDI */
	xor	%ebp, %ebp		/* no AP continuation: this is the BSP */

	/* PML4[0] -> PDPT, PDPT[0..3] -> the four page directories. */
	movl	$pdpt + PTE_TABLE, pml4
	mov	$pd + PTE_TABLE, %eax
	xor	%ecx, %ecx
1:	mov	%eax, pdpt(, %ecx, 8)
	add	$0x1000, %eax
	inc	%ecx
	cmp	$4, %ecx
	jne	1b

	/*
	 * 2048 PDEs; the upper halves stay zero (.bss). Filling them is most of
	 * the guest's boot time where CPL0 code is emulated (about 0.5 µs an
	 * instruction), hence four entries per iteration.
	 */
	.macro fill_pdes count
	mov	$\count / 4, %ecx
1:	mov	%eax, (%edi)
	add	$0x200000, %eax
	mov	%eax, 8(%edi)
	add	$0x200000, %eax
	mov	%eax, 16(%edi)
	add	$0x200000, %eax
	mov	%eax, 24(%edi)
	add	$0x200000, %eax
	add	$32, %edi
	loop	1b
	.endm

	mov	$pd, %edi
	mov	$PDE_2M, %eax
	fill_pdes 1536			/* RAM below 3 GiB */
	add	$PDE_2M_UC - PDE_2M, %eax
	fill_pdes 512			/* the MMIO hole */

	/* Shared with the SMP trampoline, which arrives here in 32-bit mode. */
	.globl enter_long_mode
enter_long_mode:
	lgdt	gdt_ptr
	mov	$0x10, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%cr4, %eax
	or	$CR4_PAE, %eax
	mov	%eax, %cr4
	mov	$pml4, %eax
	mov	%eax, %cr3
	mov	$MSR_EFER, %ecx
	rdmsr
	or	$EFER_LME, %eax
	wrmsr
	mov	%cr0, %eax
	or	$CR0_PG | CR0_PE, %eax
	mov	%eax, %cr0
	ljmp	$0x08, $long_mode_entry

	.code64
long_mode_entry:
	mov	$0x10, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	xor	%eax, %eax
	mov	%eax, %fs
	mov	%eax, %gs
	/* APs carry their continuation in EBP; the BSP has none. */
	test	%ebp, %ebp
	jz	1f
	jmp	*%rbp
1:	lea	stack_top(%rip), %rsp
	mov	%esi, %edi
	call	guest_main
	.globl halt_forever
halt_forever:
	cli
	hlt
	jmp	halt_forever

	.section .rodata
	.balign 8
	.globl gdt
gdt:
	.quad 0				/* null */
	.quad 0x00af9a000000ffff	/* 0x08: 64-bit code */
	.quad 0x00cf92000000ffff	/* 0x10: flat data */
	.quad 0x00cf9a000000ffff	/* 0x18: flat 32-bit code */
gdt_end:
	.globl gdt_ptr
gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt

	.section .bss
	.balign 4096
	.globl pml4
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4 * 4096
	.balign 16
	.skip 16384
stack_top:

	.section .note.GNU-stack, "", @progbits
