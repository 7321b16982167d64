/* hello.elf: prints what the loader handed over (start info, command line, memory map, load base). */
#include "runtime.h"

int kmain(void)
{
	uint64_t ram = 0;

	kprintf("hello: Hello from hello.elf, a PVH guest kernel\n");
	kprintf("hello: start_info=0x%016lx magic=0x%x version=%u\n",
		boot_start_info_paddr, boot_start_info->magic, boot_start_info->version);
	kprintf("hello: cmdline=\"%s\"\n", boot_cmdline);
	for (uint32_t i = 0; i < boot_memmap_entries; i++) {
		const struct hvm_memmap_entry *e = &boot_memmap[i];
		kprintf("hello: e820 addr=0x%016lx size=0x%016lx type=%u\n", e->addr, e->size, e->type);
		if (e->type == E820_RAM)
			ram += e->size;
	}
	kprintf("hello: ram_bytes=%lu\n", ram);
	kprintf("hello: load_base=0x%016lx\n", boot_load_base);
	kprintf("hello: exit=0\n");
	return 0;
}
