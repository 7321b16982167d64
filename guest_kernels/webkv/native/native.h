/*
 * build/webkv-native: webkv's CPL3 program (webkv/user/, ulib, umalloc, crc32,
 * printf) built unchanged as a Linux process, the host-native anchor of the
 * webkv benchmarks.  Only the platform differs, in this directory:
 *   platform.c  main(), the system calls (ulib.h's syscall3 under ULIB_NATIVE),
 *               the "interrupts": SYS_wait_interrupt is epoll_wait
 *   vsock.c     ulib/dev/vsock.h's API over POSIX TCP sockets
 *   vblk.c      ulib/dev/vblk.h's API over a file: pread/pwrite/fdatasync in an
 *               I/O thread, completions signalled through an eventfd
 *
 *   build/webkv-native disk=FILE forward=[HOST:]PORT=80 [forward=...=7000]
 *                      [name=N] [role=primary|standby] [heap=BYTES]
 */
#ifndef WEBKV_NATIVE_H
#define WEBKV_NATIVE_H

#include <stdint.h>

/* "IRQ" bits of SYS_wait_interrupt's mask */
#define NATIVE_IRQ_VSOCK	5
#define NATIVE_IRQ_BLK		6

/* Wake SYS_wait_interrupt with bit irq while fd is readable.  ack: read the fd
 * (an eventfd) when it fires, like an edge interrupt; otherwise it is level
 * triggered (an epoll fd whose events the device's poll consumes). */
void native_irq_fd(int fd, unsigned irq, int ack);
/* The host:port a vsock port is forwarded from, or NULL. */
const char *native_forward(uint32_t vsock_port);
void native_die(const char *what);	/* perror + exit(1): a host-side failure */

#endif
