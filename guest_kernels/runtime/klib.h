/*
 * Freestanding helpers compiled both into the kernel (CPL0) and into user programs
 * (CPL3): formatted output and the string functions gcc may emit calls to.
 */
#ifndef KLIB_H
#define KLIB_H

#include <stdarg.h>
#include <stddef.h>

/* formatted output: %s %c %d %i %u %x %X %p %%, flags 0 -, width, l ll z */
__attribute__((format(printf, 1, 2))) int kprintf(const char *fmt, ...);
__attribute__((format(printf, 3, 4))) int ksnprintf(char *buf, size_t size, const char *fmt, ...);
int kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strchr(const char *s, int c);

#endif
