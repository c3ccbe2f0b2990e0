/*
 * SYSCALL from user mode (CPL3) to LSTAR: what an unmodified Linux does on every system call.
 * The guest builds a GDT with user segments and a TSS, makes the identity map's first GiB
 * user-accessible, sets EFER.SCE, STAR, LSTAR and SFMASK, enters CPL3 with iretq and executes
 * `syscall`. The entry first stores the CS it runs with in memory, then prints it (hardware:
 * STAR[47:32] = 0x08, CPL0), whether RCX holds the instruction after `syscall`, and R11 (the
 * saved RFLAGS), and exits with 0x35. If the entry runs at CPL3 its port I/O faults (#GP);
 * the fault handler, at CPL0, prints the stored CS and the fault, and exits with 0x36.
 */
#include "rt.h"

#define KERNEL_CS	0x08
#define USER_BASE	0x18	/* STAR[63:48]: SYSRET's SS = base + 8, CS = base + 16 */
#define USER_DS		(0x20 | 3)
#define USER_CS		(0x28 | 3)
#define TSS_SEL		0x30

static u64 gdt[8] __attribute__((aligned(16)));
static u8 tss[104] __attribute__((aligned(16)));
static u8 kernel_stack[4096] __attribute__((aligned(16)));
static u8 user_stack[4096] __attribute__((aligned(16)));
u64 entry_cs;	/* written by syscall_entry before anything else */

static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

void user_after_syscall(void);
void syscall_report(u64 cs, u64 rcx, u64 r11);

void syscall_report(u64 cs, u64 rcx, u64 r11)
{
	printf("syscall_cs=0x%lx\n", cs);
	printf("syscall_rcx_is_return=%d\n", rcx == (u64)user_after_syscall);
	printf("syscall_r11=0x%lx\n", r11);
	debug_exit(0x35);
}

/* LSTAR: a stack of its own (SYSCALL does not switch stacks), then the report. */
__asm__(".text\n"
	".globl syscall_entry\n"
	"syscall_entry:\n"
	"	mov %cs, entry_cs(%rip)\n"
	"	lea kernel_stack+4096(%rip), %rsp\n"
	"	mov %r11, %rdx\n"
	"	mov %rcx, %rsi\n"
	"	xor %edi, %edi\n"
	"	mov %cs, %di\n"
	"	call syscall_report\n"
	"1:	jmp 1b\n"
	".globl user_code\n"
	"user_code:\n"
	"	syscall\n"
	".globl user_after_syscall\n"
	"user_after_syscall:\n"
	"2:	jmp 2b\n");
void syscall_entry(void);
void user_code(void);

static void fault(struct trap_frame *f)
{
	if (entry_cs)
		printf("syscall_cs=0x%lx\n", entry_cs);
	printf("fault vector=%lu error=0x%lx rip=0x%lx cs=0x%lx\n", f->vector, f->error, f->rip, f->cs);
	debug_exit(0x36);
}

void guest_main(struct hvm_start_info *si)
{
	(void)si;
	uart_init();
	idt_init();
	for (int v = 0; v < 32; v++)
		idt_set_handler(v, fault);

	gdt[1] = 0x00af9a000000ffffULL;		/* 0x08: kernel code, 64-bit */
	gdt[2] = 0x00cf92000000ffffULL;		/* 0x10: kernel data */
	gdt[3] = 0x00cffa000000ffffULL;		/* 0x18: user code, 32-bit (SYSRET's layout) */
	gdt[4] = 0x00cff2000000ffffULL;		/* 0x20: user data */
	gdt[5] = 0x00affa000000ffffULL;		/* 0x28: user code, 64-bit */
	u64 base = (u64)tss;
	gdt[6] = 0x0000890000000067ULL | ((base & 0xffffff) << 16) | ((base >> 24 & 0xff) << 56);
	gdt[7] = base >> 32;
	*(u64 *)(tss + 4) = (u64)(kernel_stack + sizeof(kernel_stack));	/* RSP0 for faults */
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) ptr = { sizeof(gdt) - 1, (u64)gdt };
	__asm__ volatile("lgdt %0\n\tltr %w1" :: "m"(ptr), "r"(TSS_SEL));

	/* The user bit on the identity map's first GiB (where this guest lives). */
	u64 cr3;
	__asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
	u64 *pml4 = (u64 *)(cr3 & 0xffffff000ULL);
	pml4[0] |= 4;
	u64 *pdpt = (u64 *)(pml4[0] & 0xffffff000ULL);
	pdpt[0] |= 4;
	u64 *pd = (u64 *)(pdpt[0] & 0xffffff000ULL);
	for (int i = 0; i < 512; i++)
		pd[i] |= 4;
	__asm__ volatile("mov %0, %%cr3" :: "r"(cr3) : "memory");

	wrmsr(0xC0000080, rdmsr(0xC0000080) | 1);				/* EFER.SCE */
	wrmsr(0xC0000081, ((u64)USER_BASE << 48) | ((u64)KERNEL_CS << 32));	/* STAR */
	wrmsr(0xC0000082, (u64)syscall_entry);					/* LSTAR */
	wrmsr(0xC0000084, 0x200);						/* SFMASK: IF */
	printf("user_mode=1\n");
	__asm__ volatile("push %0\n\tpush %1\n\tpush %2\n\tpush %3\n\tpush %4\n\tiretq"
			 :: "i"(USER_DS), "r"((u64)(user_stack + sizeof(user_stack))), "i"(0x2),
			    "i"(USER_CS), "r"((u64)user_code));
	for (;;)
		;
}
