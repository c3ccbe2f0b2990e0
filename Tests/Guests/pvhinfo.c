/* Prints the PVH start info as the VMM built it. */
#include "rt.h"

#define EXIT_PVHINFO 0x31

void guest_main(struct hvm_start_info *si)
{
	uart_init();
	printf("magic=0x%x\n", si->magic);
	printf("version=%u\n", si->version);
	printf("cmdline=%s\n", pvh_cmdline(si));

	const struct hvm_memmap_entry *map;
	u32 n = pvh_memmap(si, &map);
	for (u32 i = 0; i < n; i++)
		printf("memmap=0x%lx,0x%lx,%u\n", map[i].addr, map[i].size, map[i].type);
	printf("memmap_entries=%u\n", n);

	printf("modules=%u\n", si->nr_modules);
	if (si->nr_modules) {
		const struct hvm_modlist_entry *mod = (const void *)si->modlist_paddr;
		const u8 *data = (const u8 *)mod->paddr;
		printf("module0=0x%lx,0x%lx\n", mod->paddr, mod->size);
		uart_puts("module0_head=");
		for (u64 i = 0; i < 16 && i < mod->size; i++)
			printf("%02x", data[i]);
		uart_putc('\n');
	}
	debug_exit(si->magic == HVM_START_MAGIC ? EXIT_PVHINFO : EXIT_FAILURE);
}
