/* C entry from boot.S: parse the PVH start info, bring up the console, call kmain(). */
#include "runtime.h"

#define CMDLINE_MAX	2048
#define IDENTITY_LIMIT	(4UL << 30)	/* physical memory reachable through the identity map */

uint64_t boot_start_info_paddr;
const struct hvm_start_info *boot_start_info;
const struct hvm_memmap_entry *boot_memmap;
uint32_t boot_memmap_entries;
const char *boot_cmdline = "";
uint64_t boot_load_base;
uint64_t boot_link_base;

static char cmdline_copy[CMDLINE_MAX] __noinit;	/* as given */
static char cmdline_words[CMDLINE_MAX] __noinit;	/* same, blanks replaced by NULs */
static size_t cmdline_len;

void trap_init(void);
void rt_start(uint64_t start_info, uint64_t load_base);

static int reachable(uint64_t paddr, uint64_t size)
{
	return paddr && paddr < IDENTITY_LIMIT && size <= IDENTITY_LIMIT - paddr;
}

static void parse_start_info(void)
{
	const struct hvm_start_info *si = (const void *)boot_start_info_paddr;

	if (!reachable(boot_start_info_paddr, sizeof(*si)) || si->magic != HVM_START_MAGIC)
		return;
	boot_start_info = si;
	cmdline_copy[0] = 0;
	if (reachable(si->cmdline_paddr, 1)) {
		const char *s = (const char *)si->cmdline_paddr;
		while (cmdline_len < CMDLINE_MAX - 1 && s[cmdline_len]) {
			char c = s[cmdline_len];
			cmdline_copy[cmdline_len] = c;
			cmdline_words[cmdline_len++] = (c == ' ' || c == '\t' || c == '\n') ? 0 : c;
		}
		cmdline_copy[cmdline_len] = cmdline_words[cmdline_len] = 0;
		boot_cmdline = cmdline_copy;
	}
	if (si->version >= 1 && reachable(si->memmap_paddr, (uint64_t)si->memmap_entries * sizeof(*boot_memmap))) {
		boot_memmap = (const void *)si->memmap_paddr;
		boot_memmap_entries = si->memmap_entries;
	}
}

const char *cmdline_get(const char *key)
{
	size_t klen = strlen(key);

	for (size_t i = 0; i < cmdline_len; i++) {
		const char *w = &cmdline_words[i];
		if (!*w || (i && w[-1]))
			continue;	/* not the start of a word */
		if (!strncmp(w, key, klen) && (w[klen] == '=' || !w[klen]))
			return w[klen] ? w + klen + 1 : w + klen;
	}
	return NULL;
}

void debug_exit(int code)
{
	outb(0xf4, code);
	for (;;)
		__asm__ volatile("cli; hlt");
}

void rt_start(uint64_t start_info, uint64_t load_base)
{
	extern char __image_start[];
	const char *console;

	boot_start_info_paddr = start_info;
	boot_load_base = load_base;
	boot_link_base = (uint64_t)__image_start - KERNEL_VIRT_BASE;
	trap_init();
	parse_start_info();
	console = cmdline_get("console");
	/* console=ttyS1 (or ttyS1,115200...) selects COM2; anything else COM1 */
	serial_init(console && !strncmp(console, "ttyS1", 5) && (!console[5] || console[5] == ',') ? COM2 : COM1);
	if (!boot_start_info) {
		kprintf("runtime: error=bad-start-info paddr=0x%016lx\n", start_info);
		debug_exit(4);
	}
	debug_exit(kmain());
}
