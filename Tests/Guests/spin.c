/* Never ends on its own: for deadlines, kicks and forced stops. */
#include "rt.h"

void guest_main(struct hvm_start_info *si)
{
	(void)si;
	uart_init();
	uart_puts("spinning\n");
	__asm__ volatile("cli\n1: jmp 1b");
	__builtin_unreachable();
}
