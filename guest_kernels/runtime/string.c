/*
 * String and memory helpers.  The rep string instructions keep gcc from
 * turning the loops back into calls, and each rep iteration costs about one
 * emulated instruction, so bulk work moves quadwords.
 */
#include "runtime.h"

void *memset(void *d, int c, size_t n)
{
	void *r = d;
	size_t q = n / 8;

	n %= 8;
	__asm__ volatile("rep stosq; mov %3, %%rcx; rep stosb"
			 : "+D"(d), "+c"(q) : "a"(0x0101010101010101UL * (uint8_t)c), "r"(n) : "memory");
	return r;
}

void *memcpy(void *d, const void *s, size_t n)
{
	void *r = d;
	size_t q = n / 8;

	n %= 8;
	__asm__ volatile("rep movsq; mov %3, %%rcx; rep movsb" : "+D"(d), "+S"(s), "+c"(q) : "r"(n) : "memory");
	return r;
}

void *memmove(void *d, const void *s, size_t n)
{
	void *r = d;

	if ((uintptr_t)d - (uintptr_t)s >= n)	/* no harmful overlap: forward copy */
		return memcpy(d, s, n);
	d = (char *)d + n - 1;
	s = (const char *)s + n - 1;
	__asm__ volatile("std; rep movsb; cld" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
	return r;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	const char *p = s;

	while (*p)
		p++;
	return p - s;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++)
		if (*a != *b || !*a)
			return (unsigned char)*a - (unsigned char)*b;
	return 0;
}

char *strchr(const char *s, int c)
{
	for (;; s++) {
		if (*s == (char)c)
			return (char *)s;
		if (!*s)
			return NULL;
	}
}
