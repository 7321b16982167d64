/*
 * The transport-independent half of ulib/dev/vsock.h: a connection's input and
 * output buffers and the list of connections with output to flush.  Shared by
 * the virtio driver (ulib/dev/vsock.c) and webkv-native's TCP one
 * (webkv/native/vsock.c), which differ only in how bytes reach the peer.
 * vs_send, vs_send_reserve, vs_send_commit and vs_timers (declared in vsock.h)
 * live here too; vs_timers resets with the transport's vs_abort.
 */
#ifndef ULIB_DEV_VSOCK_STREAM_H
#define ULIB_DEV_VSOCK_STREAM_H

#include "dev/vsock.h"

#define VS_KEEP_BUF	(16u << 10)	/* buffers up to this size are kept when empty */

/* Queue c for the next vs_flush (no-op if queued already or free). */
void vs_mark_dirty(struct vsock *vs, struct vs_conn *c);
void vs_unmark_dirty(struct vsock *vs, struct vs_conn *c);
/* Back to the free list: off the dirty list, out of the close timers, buffers
 * freed (the transport has already forgotten c). */
void vs_conn_release(struct vsock *vs, struct vs_conn *c);
/* Drop up to n bytes of unread input, counting them in fwd_cnt; returns how many. */
uint32_t vs_rbuf_consume(struct vs_conn *c, uint32_t n);
/* If every queued byte is sent: rewind the output buffer, free it if large. */
void vs_tbuf_trim(struct vs_conn *c);

#endif
