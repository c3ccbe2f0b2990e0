/* The guest runtime: port and MMIO access, the UART, PVH start info. */
#ifndef RT_H
#define RT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef __builtin_va_list va_list;
#define va_start __builtin_va_start
#define va_arg __builtin_va_arg
#define va_end __builtin_va_end
#define NULL ((void *)0)

/* Ports of the guest <-> VMM protocol (see README.md). */
#define COM1		0x3f8
#define I8042_CMD	0x64
#define I8042_RESET	0xfe
#define DEBUG_EXIT	0x501
#define TEST_PORT(n)	(0x520 + (n))

/* Exit code a guest reports when something it checked went wrong. */
#define EXIT_FAILURE	0x7f

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_write64(u64 a, u64 v) { *(volatile u64 *)a = v; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline u64 mmio_read64(u64 a) { return *(volatile u64 *)a; }

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* string.c */
void *memcpy(void *dst, const void *src, u64 n);
void *memset(void *dst, int c, u64 n);

/* uart.c */
void uart_init(void);
void uart_putc(char c);
void uart_puts(const char *s);
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The PVH start info (Xen public/arch-x86/hvm/start_info.h). */
#define HVM_START_MAGIC 0x336ec578
#define E820_RAM 1

struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;	/* version >= 1 */
	u32 memmap_entries;
	u32 reserved;
};

struct hvm_modlist_entry {
	u64 paddr;
	u64 size;
	u64 cmdline_paddr;
	u64 reserved;
};

struct hvm_memmap_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

/* pvh.c */
const char *pvh_cmdline(const struct hvm_start_info *si);
u32 pvh_memmap(const struct hvm_start_info *si, const struct hvm_memmap_entry **map);
u64 pvh_ram_bytes(const struct hvm_start_info *si);
int cmdline_uint(const char *cmdline, const char *key, u64 *value);

/* power.c */
void __attribute__((noreturn)) debug_exit(u8 code);
void __attribute__((noreturn)) i8042_reset(void);
void __attribute__((noreturn)) halt_forever(void);

/* idt.c, traps.S: long-mode exception and interrupt handling, returning with iretq. */
struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;	/* pushed by the CPU */
};
typedef void (*trap_handler)(struct trap_frame *f);
void idt_init(void);
void idt_load(void);
void idt_set_handler(u8 vector, trap_handler h);

/* pci.c: configuration mechanism #1, bus 0. */
u32 pci_read32(u32 slot, u32 off);
u16 pci_read16(u32 slot, u32 off);
u8 pci_read8(u32 slot, u32 off);
void pci_write32(u32 slot, u32 off, u32 v);
void pci_write16(u32 slot, u32 off, u16 v);
int pci_find(u16 vendor, u16 device);
u64 pci_bar(u32 slot, u32 bar);
u64 pci_bar_size(u32 slot, u32 bar);

static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }

#endif
