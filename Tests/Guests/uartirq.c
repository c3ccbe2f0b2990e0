/*
 * The UART's interrupt reaching the CPU through the in-kernel IOAPIC (pin 4), the path Linux's
 * 8250 driver uses once it runs interrupt-driven: enabling the THR-empty interrupt raises it at
 * once, and a byte the host sends later raises the received-data interrupt.
 */
#include "rt.h"

#define EXIT_UARTIRQ	0x37
#define LAPIC		0xfee00000ul
#define IOAPIC		0xfec00000ul
#define VECTOR		0x34

static volatile u64 thre_irqs, rx_irqs, other_irqs;
static volatile u8 rx_byte;

static void ioapic_write(u32 reg, u32 value)
{
	mmio_write32(IOAPIC, reg);
	mmio_write32(IOAPIC + 0x10, value);
}

static void on_uart(struct trap_frame *f)
{
	(void)f;
	switch (inb(COM1 + 2) & 0x0f) {	/* reading IIR acknowledges THR empty */
	case 0x02:
		thre_irqs++;
		outb(COM1 + 1, 0x00);	/* our own output would raise it again */
		break;
	case 0x04:
	case 0x0c:
		rx_irqs++;
		rx_byte = inb(COM1);
		break;
	default:
		other_irqs++;
	}
	mmio_write32(LAPIC + 0xb0, 0);	/* EOI */
}

/* Sleeps until `counter` moves; the test's deadline ends a guest whose interrupt never comes. */
static void wait_for(volatile u64 *counter)
{
	while (!*counter)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
}

void guest_main(struct hvm_start_info *si)
{
	(void)si;
	uart_init();
	idt_init();
	idt_set_handler(VECTOR, on_uart);
	outb(0x21, 0xff);			/* both 8259s masked: only the IOAPIC delivers */
	outb(0xa1, 0xff);
	mmio_write32(LAPIC + 0xf0, 0x1ff);	/* LAPIC on, spurious vector 0xff */
	ioapic_write(0x10 + 2 * 4 + 1, 0);	/* pin 4 → APIC ID 0 */
	ioapic_write(0x10 + 2 * 4, VECTOR);	/* fixed, edge, active high, unmasked */
	outb(COM1 + 4, 0x0b);			/* DTR, RTS, OUT2 */

	outb(COM1 + 1, 0x02);			/* THR empty: pending as soon as enabled */
	wait_for(&thre_irqs);
	printf("thre_irqs=%lu\n", thre_irqs);

	outb(COM1 + 1, 0x01);			/* received data */
	printf("ready\n");
	wait_for(&rx_irqs);
	printf("rx_irqs=%lu\n", rx_irqs);
	printf("rx=%c\n", rx_byte);
	printf("other_irqs=%lu\n", other_irqs);
	debug_exit(thre_irqs == 1 && rx_irqs == 1 && other_irqs == 0 ? EXIT_UARTIRQ : EXIT_FAILURE);
}
