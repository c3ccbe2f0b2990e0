/*
 * Round trips of a userspace port-I/O exit: n= (default 1000000) byte
 * writes to test port 0x523, timed with the TSC from inside the guest.
 */
#include "rt.h"

void guest_main(struct hvm_start_info *si)
{
	u64 n = 1000000;

	uart_init();
	cmdline_uint(pvh_cmdline(si), "n", &n);
	if (!n)
		n = 1;
	u64 start = rdtsc();
	u64 left = n;
	__asm__ volatile("1: outb %%al, %%dx\n\tdec %0\n\tjnz 1b"
			 : "+r"(left) : "a"(0), "d"(TEST_PORT(3)));
	u64 cycles = rdtsc() - start;
	printf("n=%lu\n", n);
	printf("cycles=%lu\n", cycles);
	printf("cycles_per_exit=%lu\n", cycles / n);
	i8042_reset();
}
