/* hvrun's embedded guest: says hello, reports what it sees, resets. */
#include "rt.h"

void guest_main(struct hvm_start_info *si)
{
	u32 max_leaf, vendor[3];

	uart_init();
	uart_puts("Hello from HyperCore guest\n");
	cpuid(0, &max_leaf, &vendor[0], &vendor[2], &vendor[1]);
	printf("cpu_vendor=%c%c%c%c%c%c%c%c%c%c%c%c\n",
	       vendor[0], vendor[0] >> 8, vendor[0] >> 16, vendor[0] >> 24,
	       vendor[1], vendor[1] >> 8, vendor[1] >> 16, vendor[1] >> 24,
	       vendor[2], vendor[2] >> 8, vendor[2] >> 16, vendor[2] >> 24);
	printf("cpuid_max_leaf=0x%x\n", max_leaf);

	const struct hvm_memmap_entry *map;
	u64 ram = pvh_ram_bytes(si);
	printf("mem_total=%lu\n", ram);
	printf("mem_mib=%lu\n", ram >> 20);
	printf("memmap_entries=%u\n", pvh_memmap(si, &map));
	printf("cmdline=%s\n", pvh_cmdline(si));
	uart_puts("bye\n");
	i8042_reset();
}
