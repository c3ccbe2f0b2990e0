/* Reading the PVH start info and the kernel command line. */
#include "rt.h"

const char *pvh_cmdline(const struct hvm_start_info *si)
{
	return si->cmdline_paddr ? (const char *)si->cmdline_paddr : "";
}

/* The memory map arrived with start info version 1. */
u32 pvh_memmap(const struct hvm_start_info *si, const struct hvm_memmap_entry **map)
{
	if (si->version < 1 || !si->memmap_paddr)
		return 0;
	*map = (const struct hvm_memmap_entry *)si->memmap_paddr;
	return si->memmap_entries;
}

u64 pvh_ram_bytes(const struct hvm_start_info *si)
{
	const struct hvm_memmap_entry *map;
	u32 n = pvh_memmap(si, &map);
	u64 total = 0;

	for (u32 i = 0; i < n; i++)
		if (map[i].type == E820_RAM)
			total += map[i].size;
	return total;
}

/* Returns s past prefix, or NULL when s does not start with it. */
static const char *skip_prefix(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return NULL;
	return s;
}

/*
 * Finds "key=" at the start of a word in the command line and parses the
 * number after it, decimal or 0x-prefixed hex. Returns 0 when the key is
 * absent or not followed by a number.
 */
int cmdline_uint(const char *cmdline, const char *key, u64 *value)
{
	for (const char *word = cmdline; *word; word++) {
		if (word != cmdline && word[-1] != ' ')
			continue;
		const char *p = skip_prefix(word, key);
		if (!p || *p++ != '=')
			continue;
		unsigned base = 10;
		if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
			base = 16;
			p += 2;
		}
		u64 v = 0;
		int digits = 0;
		for (;; p++, digits++) {
			unsigned d;
			if (*p >= '0' && *p <= '9')
				d = *p - '0';
			else if (base == 16 && (*p | 0x20) >= 'a' && (*p | 0x20) <= 'f')
				d = (*p | 0x20) - 'a' + 10;
			else
				break;
			v = v * base + d;
		}
		if (!digits)
			return 0;
		*value = v;
		return 1;
	}
	return 0;
}
