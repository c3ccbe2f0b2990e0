/*
 * MMIO of every width to the address given as mmio=ADDR (below 4 GiB).
 * Writes, in order: 1 byte 0x12 at +0, 2 bytes 0x3456 at +2, 4 bytes
 * 0x789abcde at +4, 8 bytes 0x0123456789abcdef at +8. Then reads 4 bytes
 * at +0x10 and 8 bytes at +0x18 and prints them.
 */
#include "rt.h"

#define EXIT_MMIO 0x33

void guest_main(struct hvm_start_info *si)
{
	u64 base;

	uart_init();
	if (!cmdline_uint(pvh_cmdline(si), "mmio", &base) || base >= (1ul << 32) - 0x20) {
		uart_puts("error=need mmio=ADDR below 4 GiB\n");
		debug_exit(EXIT_FAILURE);
	}
	printf("mmio=0x%lx\n", base);
	mmio_write8(base + 0x0, 0x12);
	mmio_write16(base + 0x2, 0x3456);
	mmio_write32(base + 0x4, 0x789abcde);
	mmio_write64(base + 0x8, 0x0123456789abcdef);
	printf("read32=0x%x\n", mmio_read32(base + 0x10));
	printf("read64=0x%lx\n", mmio_read64(base + 0x18));
	debug_exit(EXIT_MMIO);
}
