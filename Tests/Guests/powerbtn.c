/*
 * The ACPI power button and soft off, driven the way an OS does from the firmware tables, with
 * no hard-coded port or interrupt: the RSDP from the PVH start info → XSDT → FADT (the sleep
 * control register) and DSDT (the Generic Event Device's interrupt from its _CRS, its event
 * register from its OperationRegion, SLP_TYP from \_S5). It programs the IOAPIC for that
 * interrupt, prints `ready`, and sleeps; when the VMM presses the power button the interrupt
 * comes, it reads (and so clears) the event register — `event=1` — and powers off by writing
 * SLP_TYP|SLP_EN to the sleep control register, which must end the machine as a power-off.
 * Output: `acpi sleep_control=0x… gsi=N event_port=0x… s5=N`, `ready`, `event=N`,
 * `powering off`. Anything missing: `error=…` and debug exit 0x7F.
 */
#include "rt.h"

#define LAPIC		0xfee00000ul
#define IOAPIC		0xfec00000ul
#define VECTOR		0x40

static volatile u64 irqs;

static void fail_with(const char *what)
{
	printf("error=%s\n", what);
	debug_exit(EXIT_FAILURE);
}

static int same(const u8 *a, const char *b, u32 n)
{
	for (u32 i = 0; i < n; i++)
		if (a[i] != (u8)b[i])
			return 0;
	return 1;
}

static const u8 *table(u64 xsdt, const char *signature)
{
	u32 length = *(const u32 *)(xsdt + 4);
	for (u32 offset = 36; offset + 8 <= length; offset += 8) {
		const u8 *t = (const u8 *)*(const u64 *)(xsdt + offset);
		if (same(t, signature, 4))
			return t;
	}
	return 0;
}

static void ioapic_write(u32 reg, u32 value)
{
	mmio_write32(IOAPIC, reg);
	mmio_write32(IOAPIC + 0x10, value);
}

static void on_ged(struct trap_frame *f)
{
	(void)f;
	irqs++;
	mmio_write32(LAPIC + 0xb0, 0);	/* EOI */
}

void guest_main(struct hvm_start_info *si)
{
	uart_init();
	if (!si->rsdp_paddr)
		fail_with("no RSDP");
	const u8 *rsdp = (const u8 *)si->rsdp_paddr;
	if (!same(rsdp, "RSD PTR ", 8))
		fail_with("bad RSDP");
	u64 xsdt = *(const u64 *)(rsdp + 24);
	const u8 *fadt = table(xsdt, "FACP");
	if (!fadt)
		fail_with("no FADT");
	/* SLEEP_CONTROL_REG: a Generic Address Structure at 244, system I/O (space 1). */
	if (fadt[244] != 1)
		fail_with("sleep control register not in I/O space");
	u16 sleep_control = (u16)*(const u64 *)(fadt + 248);
	const u8 *dsdt = (const u8 *)*(const u64 *)(fadt + 140);
	u32 dsdt_length = *(const u32 *)(dsdt + 4);

	/* The pieces of AML we need, found by their encodings. */
	u32 gsi = 0xffffffff, s5 = 0xff;
	u16 event_port = 0;
	for (u32 i = 36; i + 12 < dsdt_length; i++) {
		const u8 *p = dsdt + i;
		if (p[0] == 0x89 && p[1] == 0x06 && p[2] == 0x00 && p[4] == 1)	/* Extended Interrupt, one GSI */
			gsi = *(const u32 *)(p + 5);
		if (p[0] == 0x5b && p[1] == 0x80 && same(p + 2, "EREG", 4) && p[6] == 0x01 && p[7] == 0x0b)
			event_port = (u16)(p[8] | p[9] << 8);
		if (same(p, "_S5_", 4) && p[4] == 0x12)				/* Name(_S5_, Package(){…}) */
			s5 = p[7] == 0x0a ? p[8] : p[7];			/* ByteConst, or Zero/One */
	}
	if (gsi > 23 || !event_port || s5 > 7)
		fail_with("DSDT without the power button's GED, event register or \\_S5");
	printf("acpi sleep_control=0x%x gsi=%u event_port=0x%x s5=%u\n", sleep_control, gsi, event_port, s5);

	idt_init();
	idt_set_handler(VECTOR, on_ged);
	outb(0x21, 0xff);			/* both 8259s masked: only the IOAPIC delivers */
	outb(0xa1, 0xff);
	mmio_write32(LAPIC + 0xf0, 0x1ff);	/* LAPIC on, spurious vector 0xff */
	ioapic_write(0x10 + 2 * gsi + 1, 0);	/* → APIC ID 0 */
	ioapic_write(0x10 + 2 * gsi, VECTOR);	/* fixed, edge, active high, unmasked */
	printf("ready\n");
	while (!irqs)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	u8 events = inb(event_port);
	printf("event=%u\n", events);
	if (inb(event_port) != 0)
		fail_with("the event register did not clear on read");
	if (!(events & 1))
		fail_with("interrupt without the power button event");
	printf("powering off\n");
	outb(sleep_control, (u8)(s5 << 2 | 1 << 5));
	fail_with("still running after SLP_EN");
}
