/*
 * Probes the COM1 16550A the way Linux's 8250 driver does and prints every
 * value it read, so a run on HyperCore can be compared with QEMU line by
 * line. Nothing is printed until the probe is over: in loopback the UART
 * sends nothing out, and with DLAB set THR is the divisor latch.
 */
#include "rt.h"

#define EXIT_UART 0x32

enum { RBR = 0, THR = 0, DLL = 0, IER = 1, DLM = 1, IIR = 2, FCR = 2,
       LCR = 3, MCR = 4, LSR = 5, MSR = 6, SCR = 7 };

static u8 wr_rd(int reg, u8 v)
{
	outb(COM1 + reg, v);
	return inb(COM1 + reg);
}

void guest_main(struct hvm_start_info *si)
{
	(void)si;
	uart_init();

	u8 scr_5a = wr_rd(SCR, 0x5a);
	u8 scr_a5 = wr_rd(SCR, 0xa5);

	u8 lcr_dlab = wr_rd(LCR, 0x83);
	u8 dll = wr_rd(DLL, 0x0c);		/* 9600 baud */
	u8 dlm = wr_rd(DLM, 0x00);
	u8 lcr = wr_rd(LCR, 0x03);

	u8 ier_0f = wr_rd(IER, 0x0f);
	u8 ier_00 = wr_rd(IER, 0x00);

	outb(COM1 + FCR, 0x00);
	u8 iir_nofifo = inb(COM1 + IIR);
	outb(COM1 + FCR, 0xc7);			/* enable and clear, 14-byte trigger */
	u8 iir_fifo = inb(COM1 + IIR);

	/* A THRE interrupt is pending once enabled; reading IIR clears it. */
	outb(COM1 + IER, 0x02);
	u8 iir_thri = inb(COM1 + IIR);
	u8 iir_thri_after = inb(COM1 + IIR);
	outb(COM1 + IER, 0x00);

	u8 lsr_idle = inb(COM1 + LSR);

	/* Loopback: DTR, RTS, OUT1, OUT2 come back as DSR, CTS, RI, DCD. */
	outb(COM1 + MCR, 0x10);
	u8 msr_loop_10 = inb(COM1 + MSR) & 0xf0;
	outb(COM1 + MCR, 0x1a);
	u8 msr_loop_1a = inb(COM1 + MSR) & 0xf0;
	u8 mcr_loop = wr_rd(MCR, 0x1f);
	u8 msr_loop_1f = inb(COM1 + MSR) & 0xf0;
	outb(COM1 + THR, 0x41);
	outb(COM1 + THR, 0x42);
	u8 lsr_loop = inb(COM1 + LSR);
	u8 rx0 = inb(COM1 + RBR);
	u8 rx1 = inb(COM1 + RBR);
	u8 lsr_drained = inb(COM1 + LSR);
	outb(COM1 + MCR, 0x03);

	printf("scr=0x%02x,0x%02x\n", scr_5a, scr_a5);
	printf("lcr_dlab=0x%02x\n", lcr_dlab);
	printf("divisor=0x%02x,0x%02x\n", dll, dlm);
	printf("lcr=0x%02x\n", lcr);
	printf("ier=0x%02x,0x%02x\n", ier_0f, ier_00);
	printf("iir_nofifo=0x%02x\n", iir_nofifo);
	printf("iir_fifo=0x%02x\n", iir_fifo);
	printf("iir_thri=0x%02x,0x%02x\n", iir_thri, iir_thri_after);
	printf("lsr_idle=0x%02x\n", lsr_idle);
	printf("mcr_loop=0x%02x\n", mcr_loop);
	printf("msr_loop=0x%02x,0x%02x,0x%02x\n", msr_loop_10, msr_loop_1a, msr_loop_1f);
	printf("lsr_loop=0x%02x\n", lsr_loop);
	printf("loop_rx=0x%02x,0x%02x\n", rx0, rx1);
	printf("lsr_drained=0x%02x\n", lsr_drained);
	debug_exit(EXIT_UART);
}
