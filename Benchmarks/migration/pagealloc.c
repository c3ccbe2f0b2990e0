/*
 * The floor under a migration destination's first pass: how long this host takes to allocate
 * MIB MiB of fresh anonymous memory, by a first write to each 4 KiB page (a page fault each) and
 * by one madvise(MADV_POPULATE_WRITE), alternating ROUNDS times (the host's state drifts).
 *   cc -O2 -o pagealloc pagealloc.c && ./pagealloc 1024 3
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static double allocate(size_t bytes, int populate)
{
	char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	madvise(p, bytes, MADV_NOHUGEPAGE);	/* 4 KiB pages, as hvrun's guest RAM */
	double start = now_ms();
	if (populate) {
		if (madvise(p, bytes, MADV_POPULATE_WRITE) != 0) {
			perror("MADV_POPULATE_WRITE");
			exit(1);
		}
	} else {
		for (size_t i = 0; i < bytes; i += 4096)
			((volatile char *)p)[i] = 1;
	}
	double elapsed = now_ms() - start;
	munmap(p, bytes);
	return elapsed;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 1024;
	int rounds = argc > 2 ? atoi(argv[2]) : 3;
	for (int r = 0; r < rounds; r++)
		for (int populate = 0; populate <= 1; populate++) {
			double ms = allocate(mib << 20, populate);
			printf("{\"method\": \"%s\", \"mib\": %zu, \"ms\": %.1f, \"us_per_page\": %.2f}\n",
			       populate ? "populate_write" : "first_touch", mib, ms, ms * 1e3 / (double)((mib << 20) / 4096));
		}
	return 0;
}
