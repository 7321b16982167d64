/* ulib: start-up, console, command line and heap of the CPL3 programs. */
#include "ulib.h"

const struct user_info *uinfo;

static char words[UINFO_CMDLINE_MAX];	/* the command line, blanks replaced by NULs */
static size_t words_len;
static uint64_t heap_next, heap_end;

void ulib_start(const struct user_info *info);
void serial_write(const char *s, size_t n);

__attribute__((noreturn)) void ulib_start(const struct user_info *info)
{
	uinfo = info;
	for (const char *s = info->cmdline; *s && words_len < UINFO_CMDLINE_MAX - 1; s++)
		words[words_len++] = (*s == ' ' || *s == '\t' || *s == '\n') ? 0 : *s;
	words[words_len] = 0;
	heap_next = info->heap_base;
	heap_end = info->heap_base + info->heap_size;
	sys_exit(umain());
}

/* runtime/printf.c's console: one SYS_write per buffer. */
void serial_write(const char *s, size_t n)
{
	sys_write(1, s, n);
}

const char *uarg(const char *key)
{
	size_t klen = strlen(key);

	for (size_t i = 0; i < words_len; i++) {
		const char *w = &words[i];
		if (!*w || (i && w[-1]))
			continue;
		if (!strncmp(w, key, klen) && (w[klen] == '=' || !w[klen]))
			return w[klen] ? w + klen + 1 : w + klen;
	}
	return NULL;
}

uint64_t uarg_u64(const char *key, uint64_t dflt)
{
	const char *s = uarg(key);
	uint64_t v = 0;
	unsigned base = 10;

	if (!s || !*s)
		return dflt;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
		s += 2, base = 16;
	for (; *s; s++) {
		unsigned d;
		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && (*s | 0x20) >= 'a' && (*s | 0x20) <= 'f')
			d = (*s | 0x20) - 'a' + 10;
		else
			return dflt;
		v = v * base + d;
	}
	return v;
}

void *ualloc(size_t size, size_t align)
{
	uint64_t p;

	if (!align)
		align = 16;
	p = (heap_next + align - 1) & ~(uint64_t)(align - 1);
	if (p < heap_next || p > heap_end || size > heap_end - p)
		return NULL;
	heap_next = p + size;
	return (void *)p;
}

size_t uheap_mark(void) { return heap_next; }
void uheap_release(size_t mark) { heap_next = mark; }
