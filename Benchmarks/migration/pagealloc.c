/*
 * The floor under a migration destination's first pass: how long this host takes to allocate
 * MIB MiB of fresh anonymous memory and fill it, each way a receiver could, alternating ROUNDS
 * times (the host's state drifts):
 *   first_touch         a first write to each 4 KiB page (a page fault each)
 *   populate_write      one madvise(MADV_POPULATE_WRITE) over all of it
 *   populate_then_copy  that, then a copy into all of it
 *   populate_copy_1mib  populate and copy interleaved per 1 MiB (hvrun's receiver: per section)
 *   thp_populate        MADV_POPULATE_WRITE over 2 MiB-aligned transparent huge pages
 *   cc -O2 -o pagealloc pagealloc.c && ./pagealloc 1024 3
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#define HUGE (2ul << 20)
#define CHUNK (1ul << 20)

enum method { FIRST_TOUCH, POPULATE, POPULATE_THEN_COPY, POPULATE_COPY_CHUNKS, THP_POPULATE, METHODS };
static const char *names[METHODS] = { "first_touch", "populate_write", "populate_then_copy", "populate_copy_1mib",
				      "thp_populate" };
static char source[CHUNK];

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void populate(char *p, size_t bytes)
{
	if (madvise(p, bytes, MADV_POPULATE_WRITE) != 0) {
		perror("MADV_POPULATE_WRITE");
		exit(1);
	}
}

static double allocate(size_t bytes, enum method method)
{
	char *mapping = mmap(NULL, bytes + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mapping == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	char *p = (char *)(((unsigned long)mapping + HUGE - 1) & ~(HUGE - 1));
	/* 4 KiB pages, as hvrun's guest RAM, except for the huge-page method. */
	madvise(p, bytes, method == THP_POPULATE ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
	double start = now_ms();
	switch (method) {
	case FIRST_TOUCH:
		for (size_t i = 0; i < bytes; i += 4096)
			((volatile char *)p)[i] = 1;
		break;
	case POPULATE:
	case THP_POPULATE:
		populate(p, bytes);
		break;
	case POPULATE_THEN_COPY:
		populate(p, bytes);
		for (size_t o = 0; o < bytes; o += CHUNK)
			memcpy(p + o, source, CHUNK);
		break;
	case POPULATE_COPY_CHUNKS:
		for (size_t o = 0; o < bytes; o += CHUNK) {
			populate(p + o, CHUNK);
			memcpy(p + o, source, CHUNK);
		}
		break;
	default:
		break;
	}
	double elapsed = now_ms() - start;
	munmap(mapping, bytes + HUGE);
	return elapsed;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 1024;
	int rounds = argc > 2 ? atoi(argv[2]) : 3;
	memset(source, 0x5a, sizeof source);
	for (int r = 0; r < rounds; r++)
		for (enum method m = 0; m < METHODS; m++) {
			double ms = allocate(mib << 20, m);
			printf("{\"method\": \"%s\", \"mib\": %zu, \"ms\": %.1f, \"us_per_page\": %.2f}\n", names[m], mib, ms,
			       ms * 1e3 / (double)((mib << 20) / 4096));
		}
	return 0;
}
