/*
 * A flat real-mode image, loaded at 0x10000 and entered at CS=0x1000 IP=0.
 * Reads test port 0x520 at 8, 16 and 32 bits and writes each value plus
 * one back to port 0x521 at the same width, prints "rm ok", then leaves
 * through the debug-exit port with 0x34.
 */
	.code16
	.globl _start
_start:
	cli
	cld
	mov	%cs, %ax
	mov	%ax, %ds

	mov	$0x520, %dx
	in	%dx, %al
	inc	%al
	inc	%dx
	out	%al, %dx

	dec	%dx
	in	%dx, %ax
	inc	%ax
	inc	%dx
	out	%ax, %dx

	dec	%dx
	in	%dx, %eax
	inc	%eax
	inc	%dx
	out	%eax, %dx

	mov	$message, %si
next:
	lodsb
	test	%al, %al
	jz	done
	mov	%al, %bl
	mov	$0x3fd, %dx		/* LSR */
wait_thre:
	in	%dx, %al
	test	$0x20, %al
	jz	wait_thre
	mov	$0x3f8, %dx
	mov	%bl, %al
	out	%al, %dx
	jmp	next

done:
	mov	$0x501, %dx
	mov	$0x34, %al
	out	%al, %dx
1:	hlt
	jmp	1b

message:
	.asciz	"rm ok\n"
