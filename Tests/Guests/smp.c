/*
 * Starts the cpus=N-1 application processors with INIT-SIPI-SIPI through
 * the xAPIC and reports their APIC IDs.
 */
#include "rt.h"

#define EXIT_SMP	0x35
#define MAX_APS		63		/* as in smp_ap.S */
#define TRAMP_BASE	0x8000
#define SIPI_VECTOR	(TRAMP_BASE >> 12)

#define LAPIC		0xfee00000ul
#define LAPIC_ID	0x020
#define LAPIC_SVR	0x0f0
#define LAPIC_ICR_LO	0x300
#define LAPIC_ICR_HI	0x310
#define SVR_ENABLE	0x100
#define ICR_INIT	0x00500
#define ICR_STARTUP	0x00600
#define ICR_BUSY	0x01000
#define ICR_ASSERT	0x04000
#define ICR_ALL_BUT_SELF 0xc0000

/*
 * Waits assume a TSC of about 2 GHz. Only their order of magnitude matters:
 * KVM's and QEMU's APICs need none of them.
 */
#define TSC_PER_US	2000

extern const char ap_trampoline[], ap_trampoline_end[], ap_main[];
extern u32 ap_entry;		/* smp_ap.S: where the APs continue in long mode */
volatile u32 ap_slot, ap_done, ap_ids[MAX_APS];

static void delay_us(u64 us)
{
	u64 start = rdtsc();
	while (rdtsc() - start < us * TSC_PER_US)
		__asm__ volatile("pause");
}

static void send_ipi(u32 icr)
{
	mmio_write32(LAPIC + LAPIC_ICR_HI, 0);
	mmio_write32(LAPIC + LAPIC_ICR_LO, icr);
	for (int i = 0; i < 1000 && (mmio_read32(LAPIC + LAPIC_ICR_LO) & ICR_BUSY); i++)
		;
}

void guest_main(struct hvm_start_info *si)
{
	u64 cpus = 1;

	uart_init();
	cmdline_uint(pvh_cmdline(si), "cpus", &cpus);
	if (cpus < 1 || cpus > MAX_APS + 1) {
		uart_puts("error=need cpus=1..64\n");
		debug_exit(EXIT_FAILURE);
	}
	u32 want = cpus - 1;

	/* The start info has been read: the trampoline may overwrite low memory. */
	ap_entry = (u32)(u64)ap_main;
	memcpy((void *)TRAMP_BASE, ap_trampoline, ap_trampoline_end - ap_trampoline);
	mmio_write32(LAPIC + LAPIC_SVR, SVR_ENABLE | 0xff);
	if (want) {
		send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT);
		delay_us(10000);
		for (int i = 0; i < 2; i++) {
			send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | SIPI_VECTOR);
			delay_us(200);
		}
	}
	/* CPL0 code is emulated here, so allow the APs a generous two seconds. */
	u64 start = rdtsc();
	while (ap_done < want && rdtsc() - start < 2000000ul * TSC_PER_US)
		__asm__ volatile("pause");

	u32 n = ap_done < MAX_APS ? ap_done : MAX_APS;
	for (u32 i = 1; i < n; i++)		/* arrival order varies: sort */
		for (u32 j = i; j && ap_ids[j - 1] > ap_ids[j]; j--) {
			u32 t = ap_ids[j];
			ap_ids[j] = ap_ids[j - 1];
			ap_ids[j - 1] = t;
		}
	printf("cpus=%lu\n", cpus);
	printf("bsp_apic_id=%u\n", mmio_read32(LAPIC + LAPIC_ID) >> 24);
	printf("aps=%u\n", ap_done);
	for (u32 i = 0; i < n; i++)
		printf("ap_apic_id=%u\n", ap_ids[i]);
	debug_exit(ap_done == want ? EXIT_SMP : EXIT_FAILURE);
}
