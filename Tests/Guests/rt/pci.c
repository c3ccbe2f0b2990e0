/* PCI configuration mechanism #1 (ports 0xCF8/0xCFC), bus 0, function 0. */
#include "rt.h"

#define PCI_ADDR 0xcf8
#define PCI_DATA 0xcfc

static void pci_select(u32 slot, u32 off)
{
	outl(PCI_ADDR, 0x80000000u | slot << 11 | (off & 0xfc));
}

u32 pci_read32(u32 slot, u32 off)
{
	pci_select(slot, off);
	return inl(PCI_DATA);
}

u16 pci_read16(u32 slot, u32 off)
{
	pci_select(slot, off);
	return inw(PCI_DATA + (off & 2));
}

u8 pci_read8(u32 slot, u32 off)
{
	pci_select(slot, off);
	return inb(PCI_DATA + (off & 3));
}

void pci_write32(u32 slot, u32 off, u32 v)
{
	pci_select(slot, off);
	outl(PCI_DATA, v);
}

void pci_write16(u32 slot, u32 off, u16 v)
{
	pci_select(slot, off);
	outw(PCI_DATA + (off & 2), v);
}

/* The first slot with this vendor/device, or -1. */
int pci_find(u16 vendor, u16 device)
{
	for (u32 slot = 0; slot < 32; slot++) {
		u32 id = pci_read32(slot, 0);
		if ((id & 0xffff) == vendor && (id >> 16) == device)
			return (int)slot;
	}
	return -1;
}

/* The address a memory BAR decodes (64-bit BARs span two registers). */
u64 pci_bar(u32 slot, u32 bar)
{
	u32 lo = pci_read32(slot, 0x10 + 4 * bar);
	u64 addr = lo & ~0xfu;
	if ((lo & 6) == 4)
		addr |= (u64)pci_read32(slot, 0x14 + 4 * bar) << 32;
	return addr;
}

/* Size of a memory BAR by the all-ones probe, restoring the register. */
u64 pci_bar_size(u32 slot, u32 bar)
{
	u32 off = 0x10 + 4 * bar;
	u32 old = pci_read32(slot, off);
	pci_write32(slot, off, 0xffffffff);
	u32 mask = pci_read32(slot, off) & ~0xfu;
	pci_write32(slot, off, old);
	return mask ? (u64)(~mask + 1) : 0;
}
