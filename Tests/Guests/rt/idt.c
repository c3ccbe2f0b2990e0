/* A 64-bit IDT whose gates all lead to C handlers through traps.S. */
#include "rt.h"

#define GATE_INTERRUPT	0x8e	/* present, DPL 0, 64-bit interrupt gate */
#define STUB_SIZE	16

struct idt_gate {
	u16 offset_low;
	u16 selector;
	u8 ist;
	u8 type;
	u16 offset_mid;
	u32 offset_high;
	u32 reserved;
};

extern const char trap_stubs[];
static struct idt_gate idt[256] __attribute__((aligned(16)));
static trap_handler handlers[256];

void idt_init(void)
{
	for (int v = 0; v < 256; v++) {
		u64 stub = (u64)trap_stubs + v * STUB_SIZE;
		idt[v] = (struct idt_gate){
			.offset_low = stub,
			.selector = 0x08,
			.type = GATE_INTERRUPT,
			.offset_mid = stub >> 16,
			.offset_high = stub >> 32,
		};
	}
	idt_load();
}

/* Loads the (already built) IDT on this CPU: APs share the BSP's. */
void idt_load(void)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) ptr = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" :: "m"(ptr));
}

void idt_set_handler(u8 vector, trap_handler h)
{
	handlers[vector] = h;
}

void trap_dispatch(struct trap_frame *f)
{
	if (handlers[f->vector]) {
		handlers[f->vector](f);
		return;
	}
	printf("trap=unhandled vector=%lu error=0x%lx rip=0x%lx\n", f->vector, f->error, f->rip);
	debug_exit(EXIT_FAILURE);
}
