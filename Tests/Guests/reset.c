/* The smallest PVH guest: one line, then an i8042 reset. */
#include "rt.h"

void guest_main(struct hvm_start_info *si)
{
	(void)si;
	uart_puts("resetting\n");
	i8042_reset();
}
