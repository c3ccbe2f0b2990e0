/* GCC may emit calls to these even in freestanding code. */
#include "rt.h"

void *memcpy(void *dst, const void *src, u64 n)
{
	__asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) :: "memory");
	return dst;
}

void *memset(void *dst, int c, u64 n)
{
	void *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}
