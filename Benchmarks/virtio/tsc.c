/* Prints the TSC frequency in Hz, measured against CLOCK_MONOTONIC over 0.5 s. */
#include <stdio.h>
#include <stdint.h>
#include <time.h>
static uint64_t rdtsc(void) { uint32_t lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return (uint64_t)hi << 32 | lo; }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(void)
{
	double t0 = now();
	uint64_t c0 = rdtsc();
	while (now() - t0 < 0.5)
		;
	uint64_t c1 = rdtsc();
	printf("%.0f\n", (c1 - c0) / (now() - t0));
	return 0;
}
