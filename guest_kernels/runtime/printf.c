/*
 * Minimal printf: %s %c %d %i %u %x %X %p %%, flags '0' '-', width, length l ll z h.
 * Kernel-mode instructions are emulated (slow), so text is moved in runs
 * (memcpy = one rep movsb) rather than byte by byte, and kprintf hands whole
 * lines to the console.
 */
#include "runtime.h"

struct sink {
	char *buf;
	size_t size, len;	/* buffer capacity and fill */
	size_t total;		/* every byte produced, including those flushed or dropped */
	int console;		/* flush a full buffer to the console (else truncate) */
};

static void emit(struct sink *o, const char *s, size_t n)
{
	o->total += n;
	while (n) {
		size_t k = o->size - o->len;

		if (!k) {
			if (!o->console)
				return;
			serial_write(o->buf, o->len);
			o->len = 0;
			k = o->size;
		}
		if (k > n)
			k = n;
		memcpy(o->buf + o->len, s, k);
		o->len += k;
		s += k;
		n -= k;
	}
}

static void pad(struct sink *o, char c, int n)
{
	static const char zeros[] = "0000000000000000", blanks[] = "                ";

	for (; n > 0; n -= 16)
		emit(o, c == '0' ? zeros : blanks, n < 16 ? n : 16);
}

static void format(struct sink *o, const char *fmt, va_list ap)
{
	static const char digits[] = "0123456789abcdef0123456789ABCDEF";

	while (*fmt) {
		char tmp[24], *p = tmp + sizeof(tmp), zero = ' ', conv, c;
		const char *q = fmt, *s;
		int left = 0, lng = 0, width = 0, neg = 0, len;
		uint64_t v;

		while (*q && *q != '%')
			q++;
		emit(o, fmt, q - fmt);
		if (!*q)
			return;
		for (fmt = q + 1; *fmt == '0' || *fmt == '-'; fmt++)
			if (*fmt == '0')
				zero = '0';
			else
				left = 1;
		for (; *fmt >= '0' && *fmt <= '9'; fmt++)
			width = width * 10 + *fmt - '0';
		for (; *fmt == 'l' || *fmt == 'z' || *fmt == 'h'; fmt++)
			lng |= *fmt != 'h';
		conv = *fmt;
		if (conv)
			fmt++;
		switch (conv) {
		case 's':
			s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			len = strlen(s);
			goto field;
		case 'c':
			c = (char)va_arg(ap, int);
			s = &c, len = 1;
			goto field;
		case 'p':
			emit(o, "0x", 2);
			v = (uint64_t)va_arg(ap, void *), zero = '0', width = 16;
			goto hex;
		case 'd': case 'i':
			v = lng ? (uint64_t)va_arg(ap, long) : (uint64_t)(long)va_arg(ap, int);
			if ((int64_t)v < 0)
				neg = 1, v = -v;
			goto decimal;
		case 'u':
			v = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
decimal:
			do
				*--p = '0' + v % 10;
			while (v /= 10);
			break;
		case 'x': case 'X':
			v = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
hex:
			do
				*--p = digits[(conv == 'X' ? 16 : 0) + (v & 15)];
			while (v >>= 4);
			break;
		default:		/* %% and unknown conversions: print verbatim */
			emit(o, "%", 1);
			if (conv && conv != '%')
				emit(o, &conv, 1);
			continue;
		}
		if (neg) {
			if (zero == '0')
				emit(o, "-", 1), width--;
			else
				*--p = '-';
		}
		s = p, len = tmp + sizeof(tmp) - p;
field:
		if (!left)
			pad(o, zero, width - len);
		emit(o, s, len);
		if (left)
			pad(o, ' ', width - len);
	}
}

int kvsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct sink o = { buf, size ? size - 1 : 0, 0, 0, 0 };

	format(&o, fmt, ap);
	if (size)
		buf[o.len] = 0;
	return o.total;
}

int ksnprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = kvsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

int kprintf(const char *fmt, ...)
{
	char buf[256];
	struct sink o = { buf, sizeof(buf), 0, 0, 1 };
	va_list ap;

	va_start(ap, fmt);
	format(&o, fmt, ap);
	va_end(ap);
	serial_write(buf, o.len);
	return o.total;
}
