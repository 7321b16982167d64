/* webkv-v1.elf / webkv-v2.elf: the key-value service runs at CPL3 (webkv/user/). */
#include "runtime.h"

int kmain(void)
{
	user_run();	/* webkv/user/main.c: umain() */
}
