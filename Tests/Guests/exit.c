/* Leaves through the debug-exit port with the code= from the command line. */
#include "rt.h"

void guest_main(struct hvm_start_info *si)
{
	u64 code;

	uart_init();
	if (!cmdline_uint(pvh_cmdline(si), "code", &code) || code > 0xff) {
		uart_puts("error=need code=0..255\n");
		debug_exit(EXIT_FAILURE);
	}
	printf("code=%lu\n", code);
	debug_exit(code);
}
