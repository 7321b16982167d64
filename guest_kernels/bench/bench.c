/* bench.elf: CPL3 benchmark workloads (bench/user/), run by the user-mode runtime. */
#include "runtime.h"

int kmain(void)
{
	user_run();	/* bench/user/main.c: umain() */
}
