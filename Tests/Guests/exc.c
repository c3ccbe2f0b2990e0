/* Takes #UD and #DE at CPL0 through the runtime's IDT and returns with iretq. */
#include "rt.h"

#define EXIT_EXC 0x36

static volatile u64 seen_ud, seen_de;

static void on_ud(struct trap_frame *f)
{
	seen_ud++;
	f->rip += 2;		/* ud2 */
}

static void on_de(struct trap_frame *f)
{
	seen_de++;
	f->rip += 2;		/* div %ecx */
}

void guest_main(struct hvm_start_info *si)
{
	(void)si;
	uart_init();
	idt_init();
	idt_set_handler(6, on_ud);
	idt_set_handler(0, on_de);

	__asm__ volatile("ud2");
	__asm__ volatile("div %%ecx" :: "a"(1), "d"(0), "c"(0));
	printf("ud=%lu\n", seen_ud);
	printf("de=%lu\n", seen_de);
	debug_exit(seen_ud == 1 && seen_de == 1 ? EXIT_EXC : EXIT_FAILURE);
}
