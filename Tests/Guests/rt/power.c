/* The two ways a guest ends its run. */
#include "rt.h"

void debug_exit(u8 code)
{
	outb(DEBUG_EXIT, code);
	halt_forever();		/* a VMM without the device keeps us parked */
}

void i8042_reset(void)
{
	outb(I8042_CMD, I8042_RESET);
	halt_forever();
}
