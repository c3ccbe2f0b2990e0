/*
 * Instructions KVM's emulator lacks at CPL0 on PVM hosts, which HyperCore's emulation-completion
 * layer finishes (Docs/linux-boot.md): int3 (#BP, RIP past it), fwait (plain, and #NM with
 * CR0.TS|MP), lock cmpxchg16b (success, failure, unmapped → #PF with CR2, misaligned and
 * non-canonical → #GP(0)). On QEMU (TCG) the hardware semantics give the same lines.
 * With cpus=2 the BSP and one AP then each add 1 to a 16-byte counter n=N times (default 500)
 * with a lock cmpxchg16b loop: the completions must be atomic against each other.
 */
#include "smp_boot.h"

#define EXIT_EMUL 0x42
#define LAPIC_SVR	0xfee000f0ul

static volatile u64 bp_count, bp_rip, nm_count, pf_count, pf_cr2, pf_error, gp_count, gp_error;
/* Where the #PF/#GP handlers resume: just past the faulting cmpxchg16b. */
static volatile u64 resume_rip;
static volatile u64 pair[4] __attribute__((aligned(16)));
extern const char after_int3[];

static void on_bp(struct trap_frame *f)
{
	bp_count++;
	bp_rip = f->rip;	/* a trap: the instruction after int3 */
}

static void on_nm(struct trap_frame *f)
{
	(void)f;
	nm_count++;
	__asm__ volatile("clts");	/* fwait runs again and passes */
}

static void on_pf(struct trap_frame *f)
{
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	pf_count++;
	pf_cr2 = cr2;
	pf_error = f->error;
	f->rip = resume_rip;
}

static void on_gp(struct trap_frame *f)
{
	gp_count++;
	gp_error = f->error;
	f->rip = resume_rip;
}

/* lock cmpxchg16b at p: returns ZF; lo and hi get RDX:RAX afterwards. */
static int cas16(u64 p, u64 *lo, u64 *hi, u64 new_lo, u64 new_hi)
{
	u64 a = *lo, d = *hi;
	u8 ok;
	__asm__ volatile("leaq 1f(%%rip), %%r11\n\t"
			 "movq %%r11, %[resume]\n\t"
			 "lock cmpxchg16b (%[p])\n"
			 "1:\tsetz %[ok]"
			 : [ok] "=q"(ok), "+a"(a), "+d"(d), [resume] "=m"(resume_rip)
			 : [p] "r"(p), "b"(new_lo), "c"(new_hi)
			 : "r11", "memory", "cc");
	*lo = a;
	*hi = d;
	return ok;
}

/* ---- cpus=2: two vCPUs contending on one 16-byte counter ---- */

static volatile u64 counter[2] __attribute__((aligned(16)));
static volatile u64 go, ap_online, ap_finished, retries[2];
static u64 rounds = 500;
u8 emul_ap_stack[4096] __attribute__((aligned(16)));

/* counter = {count, 3 * count}: a torn or lost update breaks one of the two. */
static void cas_loop(int cpu)
{
	for (u64 i = 0; i < rounds; i++) {
		for (;;) {
			u64 lo = counter[0], hi = counter[1], a = lo, d = hi;
			u8 ok;
			__asm__ volatile("lock cmpxchg16b (%[p])\n\tsetz %[ok]"
					 : [ok] "=q"(ok), "+a"(a), "+d"(d)
					 : [p] "r"(counter), "b"(lo + 1), "c"(hi + 3)
					 : "memory", "cc");
			if (ok)
				break;
			retries[cpu]++;
		}
	}
}

__asm__(".pushsection .text.emul_ap, \"ax\"\n"
	".globl emul_ap\n"
	"emul_ap:\n"
	"	lea emul_ap_stack+4096(%rip), %rsp\n"
	"	call emul_ap_main\n"
	"	jmp halt_forever\n"
	".popsection\n");
extern const char emul_ap[];

void __attribute__((used)) emul_ap_main(void)
{
	ap_online = 1;
	while (!go)
		__asm__ volatile("pause");
	cas_loop(1);
	ap_finished = 1;
}

static int smp_contention(void)
{
	mmio_write32(LAPIC_SVR, 0x1ff);
	smp_start_aps(emul_ap);
	u64 start = rdtsc();
	while (!ap_online && rdtsc() - start < 5000000ul * TSC_PER_US)
		__asm__ volatile("pause");
	if (!ap_online) {
		printf("error=the AP did not start\n");
		return 0;
	}
	go = 1;
	cas_loop(0);
	start = rdtsc();
	while (!ap_finished && rdtsc() - start < 30000000ul * TSC_PER_US)
		__asm__ volatile("pause");
	printf("smp_count=%lu\n", counter[0]);
	printf("smp_consistent=%d\n", counter[1] == 3 * counter[0]);
	printf("info smp_retries=%lu,%lu\n", retries[0], retries[1]);
	return ap_finished && counter[0] == 2 * rounds && counter[1] == 3 * counter[0];
}

void guest_main(struct hvm_start_info *si)
{
	u64 bad = 0, cpus = 1;
	uart_init();
	cmdline_uint(pvh_cmdline(si), "cpus", &cpus);
	cmdline_uint(pvh_cmdline(si), "n", &rounds);
	/* bad=1: an instruction the layer does not complete (crc32): the VMM must stop the run. */
	if (cmdline_uint(pvh_cmdline(si), "bad", &bad) && bad) {
		printf("bad=crc32\n");
		u32 v = 0;
		__asm__ volatile("crc32l %0, %0" : "+r"(v));
		printf("bad_survived=%u\n", v);
		debug_exit(EXIT_FAILURE);
	}
	idt_init();
	idt_set_handler(3, on_bp);
	idt_set_handler(7, on_nm);
	idt_set_handler(13, on_gp);
	idt_set_handler(14, on_pf);

	__asm__ volatile("int3\n\t.globl after_int3\nafter_int3:");
	__asm__ volatile("int3");
	printf("bp=%lu\n", bp_count);
	printf("bp_rip=after_int3+%lu\n", bp_rip - (u64)after_int3);	/* the second int3 is at after_int3 */

	__asm__ volatile("fwait");
	printf("fwait=ok\n");
	u64 cr0;
	__asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
	__asm__ volatile("mov %0, %%cr0" :: "r"(cr0 | 0xa));	/* MP | TS */
	__asm__ volatile("fwait");
	printf("nm=%lu\n", nm_count);

	/* Success: memory equals RDX:RAX, so it takes RCX:RBX. */
	pair[0] = 0x1111222233334444;
	pair[1] = 0x5555666677778888;
	u64 lo = pair[0], hi = pair[1];
	int ok = cas16((u64)&pair[0], &lo, &hi, 0xaaaabbbbccccdddd, 0xeeeeffff00001111);
	printf("cas_ok=%d\n", ok);
	printf("cas_ok_mem=0x%lx,0x%lx\n", pair[0], pair[1]);

	/* Failure: memory stays, RDX:RAX get its contents. */
	lo = 1;
	hi = 2;
	ok = cas16((u64)&pair[0], &lo, &hi, 3, 4);
	printf("cas_fail=%d\n", !ok);
	printf("cas_fail_loaded=0x%lx,0x%lx\n", lo, hi);
	printf("cas_fail_mem=0x%lx,0x%lx\n", pair[0], pair[1]);

	/* Not mapped (the runtime maps 0-4 GiB): #PF, write, not present. */
	lo = hi = 0;
	cas16(0x100000000UL, &lo, &hi, 5, 6);
	printf("pf=%lu\n", pf_count);
	printf("pf_cr2=0x%lx\n", pf_cr2);
	printf("pf_error=0x%lx\n", pf_error);

	/* Misaligned and non-canonical: #GP(0). */
	cas16((u64)&pair[0] + 8, &lo, &hi, 7, 8);
	cas16(0x8000000000000000UL, &lo, &hi, 7, 8);
	printf("gp=%lu\n", gp_count);
	printf("gp_error=0x%lx\n", gp_error);
	printf("pair_after=0x%lx,0x%lx,0x%lx\n", pair[0], pair[1], pair[2]);

	int good = bp_count == 2 && nm_count == 1 && pf_count == 1 && gp_count == 2 &&
		   pf_cr2 == 0x100000000UL && pair[0] == 0xaaaabbbbccccdddd;
	if (cpus >= 2 && !smp_contention())
		good = 0;
	debug_exit(good ? EXIT_EMUL : EXIT_FAILURE);
}
