/*
 * Starts the cpus=N-1 application processors with INIT-SIPI-SIPI through
 * the xAPIC and reports their APIC IDs.
 */
#include "smp_boot.h"

#define EXIT_SMP	0x35
#define MAX_APS		63		/* as in smp_ap.S */

#define LAPIC		0xfee00000ul
#define LAPIC_ID	0x020
#define LAPIC_SVR	0x0f0
#define SVR_ENABLE	0x100

extern const char ap_main[];
volatile u32 ap_slot, ap_done, ap_ids[MAX_APS];

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
	mmio_write32(LAPIC + LAPIC_SVR, SVR_ENABLE | 0xff);
	if (want)
		smp_start_aps(ap_main);
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
