#include "smp_boot.h"

#define TRAMP_BASE	0x8000
#define SIPI_VECTOR	(TRAMP_BASE >> 12)
#define LAPIC		0xfee00000ul
#define LAPIC_ICR_LO	0x300
#define LAPIC_ICR_HI	0x310
#define ICR_INIT	0x00500
#define ICR_STARTUP	0x00600
#define ICR_BUSY	0x01000
#define ICR_ASSERT	0x04000
#define ICR_ALL_BUT_SELF 0xc0000

extern const char ap_trampoline[], ap_trampoline_end[];
extern u32 ap_entry;		/* smp_ap.S: where the APs continue in long mode */

void delay_us(u64 us)
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

void smp_start_aps(const void *entry)
{
	ap_entry = (u32)(u64)entry;
	memcpy((void *)TRAMP_BASE, ap_trampoline, ap_trampoline_end - ap_trampoline);
	send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT);
	delay_us(10000);
	for (int i = 0; i < 2; i++) {
		send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | SIPI_VECTOR);
		delay_us(200);
	}
}
