/* Polled output on the COM1 16550A, and a printf small enough to read. */
#include "rt.h"

#define UART_IER	1
#define UART_LCR	3
#define UART_LSR	5
#define LCR_8N1		0x03
#define LSR_THRE	0x20

void uart_init(void)
{
	outb(COM1 + UART_IER, 0);	/* polled: no interrupts */
	outb(COM1 + UART_LCR, LCR_8N1);
}

void uart_putc(char c)
{
	/* Bounded, so a VMM that never sets THRE still gets its bytes. */
	for (int i = 0; i < 100000 && !(inb(COM1 + UART_LSR) & LSR_THRE); i++)
		;
	outb(COM1, c);
}

void uart_puts(const char *s)
{
	while (*s)
		uart_putc(*s++);
}

static void put_uint(u64 v, unsigned base, int width, char pad)
{
	char buf[20];
	int n = 0;

	do {
		buf[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (width-- > n)
		uart_putc(pad);
	while (n)
		uart_putc(buf[--n]);
}

/* %s %c %d %u %x with an optional 0 flag, width and l modifier. */
void printf(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			uart_putc(*fmt);
			continue;
		}
		char pad = ' ';
		int width = 0, is_long = 0;
		if (*++fmt == '0')
			pad = *fmt++;
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + *fmt++ - '0';
		if (*fmt == 'l') {
			is_long = 1;
			fmt++;
		}
		switch (*fmt) {
		case 's':
			uart_puts(va_arg(ap, const char *));
			break;
		case 'c':
			uart_putc(va_arg(ap, int));
			break;
		case 'd': {
			long v = is_long ? va_arg(ap, long) : va_arg(ap, int);
			if (v < 0) {
				uart_putc('-');
				v = -v;
			}
			put_uint(v, 10, width, pad);
			break;
		}
		case 'u':
		case 'x': {
			u64 v = is_long ? va_arg(ap, u64) : va_arg(ap, u32);
			put_uint(v, *fmt == 'u' ? 10 : 16, width, pad);
			break;
		}
		default:
			uart_putc(*fmt);
		}
	}
	va_end(ap);
}
