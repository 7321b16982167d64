/*
 * virtio-vsock stream sockets at CPL3 (virtio 1.x §5.10): the guest listens,
 * the host (CID 2) connects.
 *
 * One event loop drives it: vs_poll() takes packets from the device and calls
 * the callbacks (accept, input, shutdown, reset), vs_flush() turns queued output
 * and control packets into tx packets within the peer's credit and kicks the
 * device.  Before sleeping in SYS_wait_interrupt the loop calls vs_arm(); when
 * the vsock IRQ bit comes back it calls vs_interrupt().
 *
 * Flow control: each connection advertises VS_BUF_ALLOC bytes; received data
 * stays in the connection's input buffer until the application consumes it
 * (vs_consume), which is what advances fwd_cnt.  Every packet we send carries
 * buf_alloc/fwd_cnt; a CREDIT_UPDATE goes out on its own when a quarter of the
 * buffer was freed and nothing else carried it, and on CREDIT_REQUEST.  Output
 * (vs_send) is queued without limit (the application bounds it, see
 * vs_unsent()) and sent only within the peer's credit.
 *
 * Connections that arrive while their port's listener is not accepting (or the
 * table is full) are neither answered nor refused: they wait in the listener's
 * backlog and are accepted when it accepts again (vs_listen_accept).  A REQUEST
 * for a port nobody listens on is refused (RST).
 *
 * Closing: vs_close() sends what is queued, then SHUTDOWN (both directions) and
 * waits for the peer's RST (VS_CLOSE_TIMEOUT_NS, then RST); the application no
 * longer hears of the connection.  vs_abort() sends RST at once.
 *
 * A device that needs a reset (NEEDS_RESET: pyvmm's vsock back-end died or met a
 * ring it refuses) or sends a transport reset event loses every connection: the
 * host's side of each is gone, so each is reset (the application hears of it
 * through the reset callback) and counted in stats.conns_lost.  The listeners stay;
 * connections waiting in their backlogs are forgotten (the host re-sends or drops
 * them).  After NEEDS_RESET the device is set up again; a try that fails is
 * repeated (virtio.h: every 50 ms, then every second, ~22 s in all), while
 * vs_poll() is called, which it must be VIRTIO_RETRY_HZ times a second while
 * vs->recovering; then the device is left FAILED (vs->failed).  Console lines:
 *   vsock: device-reset connections=<n>
 *   vsock: reinitialised tries=<n> ms=<n>
 *   vsock: error=reset-failed tries=<n>
 *
 * Handing back: vs_hand_back() is vs_close() that shuts down only our receive
 * side and leaves unread input unconsumed (fwd_cnt stays).  pyvmm's host
 * forwarder takes that as "this service reads no more from this client": the
 * client's TCP connection is not closed but offered to the next guest that
 * listens, which first receives the bytes we never consumed.  Call it at a
 * request boundary, after the last reply is queued.
 */
#ifndef ULIB_DEV_VSOCK_H
#define ULIB_DEV_VSOCK_H

#include <stddef.h>
#include <stdint.h>
#include "dev/virtio.h"

#define VS_HOST_CID		2
#define VS_MAX_CONNS		1024
#define VS_MAX_LISTENERS	8
#define VS_BACKLOG		1024
#define VS_BUF_ALLOC		(128u << 10)	/* receive buffer advertised per connection */
#define VS_RX_BUFS		256
#define VS_RX_BUF_SIZE		(16u << 10)	/* header + payload */
#define VS_TX_SLOTS		256
#define VS_TX_SLOT_SIZE		(16u << 10)	/* header + payload */
#define VS_CLOSE_TIMEOUT_NS	5000000000ULL
#define VS_RST_QUEUE		256

#define VSOCK_OP_REQUEST	1
#define VSOCK_OP_RESPONSE	2
#define VSOCK_OP_RST		3
#define VSOCK_OP_SHUTDOWN	4
#define VSOCK_OP_RW		5
#define VSOCK_OP_CREDIT_UPDATE	6
#define VSOCK_OP_CREDIT_REQUEST	7
#define VSOCK_SHUTDOWN_RCV	1
#define VSOCK_SHUTDOWN_SEND	2
#define VSOCK_TYPE_STREAM	1

struct vsock_hdr {
	uint64_t src_cid, dst_cid;
	uint32_t src_port, dst_port;
	uint32_t len;
	uint16_t type, op;
	uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));
_Static_assert(sizeof(struct vsock_hdr) == 44, "virtio_vsock_hdr is 44 bytes");

enum { VS_FREE, VS_ESTABLISHED, VS_CLOSING };
enum { VS_CLOSE = 1, VS_HAND_BACK = 2 };	/* vs_conn.closing */

struct vsock;

struct vs_conn {
	/* for the application */
	uint32_t local_port, peer_port;
	void *user;
	uint8_t peer_shut;		/* VSOCK_SHUTDOWN_* bits received */
	/* private */
	uint8_t state, closing, want;
	uint8_t credit_requested, dirty, in_eventlist;
	uint8_t *rbuf;
	uint32_t rcap, rstart, rend;
	uint8_t *tbuf;
	uint32_t tcap, tstart, tend;
	uint32_t rx_cnt, fwd_cnt, adv_fwd_cnt;
	uint32_t tx_cnt, peer_buf_alloc, peer_fwd_cnt;
	uint64_t deadline;
	struct vs_conn *hnext, *dprev, *dnext;
};

struct vs_callbacks {
	void (*accept)(struct vsock *vs, struct vs_conn *c);	/* set c->user */
	void (*input)(struct vsock *vs, struct vs_conn *c);	/* new data (vs_peek) */
	void (*shutdown)(struct vsock *vs, struct vs_conn *c);	/* c->peer_shut changed */
	void (*reset)(struct vsock *vs, struct vs_conn *c);	/* gone; c is freed after this */
};

struct vs_listener {
	uint32_t port;
	int accepting;
	unsigned head, count;
	uint32_t (*backlog)[2];		/* (peer port, peer buf_alloc) waiting, a VS_BACKLOG ring */
};

struct vs_stats {
	uint64_t rx_packets, tx_packets, rx_bytes, tx_bytes;
	uint64_t accepted, refused, resets_in, resets_out, dropped, credit_updates;
	uint64_t transport_resets;	/* transport reset events and NEEDS_RESETs */
	uint64_t conns_lost;		/* connections reset by those */
	uint64_t reinits;		/* successful set-ups after NEEDS_RESET */
};

struct vsock {
	struct virtio_dev dev;
	struct virtq rxq, txq, evq;
	uint64_t cid;
	const struct vs_callbacks *cb;
	uint8_t *rxmem;
	uint8_t *txmem;
	uint16_t *tx_free;
	unsigned tx_nfree;
	uint32_t *evbuf;
	struct vs_conn *conns;
	struct vs_conn *free_conns;
	struct vs_conn **hash;
	unsigned nconns;
	struct vs_listener listeners[VS_MAX_LISTENERS];
	unsigned nlisteners;
	struct vs_conn *dirty_head, *dirty_tail;
	uint32_t rst_q[VS_RST_QUEUE][2];	/* (our port, peer port) to reset */
	unsigned rst_n;
	int rx_reposted;
	int blocked_on_slots;		/* output waits for tx slots: want tx interrupts */
	int timed;			/* connections in VS_CLOSING */
	uint8_t recovering, failed;	/* set up again after NEEDS_RESET / given up */
	unsigned tries;
	uint64_t retry_ns, recover_start_ns;
	struct vs_stats stats;
};

/* Find the device (first vsock on the command line), set it up, post rx buffers. */
int vs_init(struct vsock *vs, const struct vs_callbacks *cb);
/* Re-initialise after a device error: every connection is reset; 0 or VIRTIO_E_*. */
int vs_restart(struct vsock *vs);

int vs_listen(struct vsock *vs, uint32_t port, int accepting);
/* Start or stop accepting on a port; starting accepts the backlog. */
void vs_listen_accept(struct vsock *vs, uint32_t port, int accepting);

/* Process everything the device returned; returns nonzero if anything happened. */
int vs_poll(struct vsock *vs, uint64_t now_ns);
/* Send what can be sent, kick. */
void vs_flush(struct vsock *vs, uint64_t now_ns);
/* Enable the interrupts we need before sleeping; returns nonzero if work is
 * already waiting (then do not sleep). */
int vs_arm(struct vsock *vs);
void vs_disarm(struct vsock *vs);
/* The device's IRQ fired: InterruptStatus once, acknowledged; handles a device error. */
void vs_interrupt(struct vsock *vs);
/* Close timeouts; returns the earliest deadline (0: none). */
uint64_t vs_timers(struct vsock *vs, uint64_t now_ns);

static inline uint32_t vs_peek(struct vs_conn *c, uint8_t **p)
{
	*p = c->rbuf + c->rstart;
	return c->rend - c->rstart;
}
void vs_consume(struct vsock *vs, struct vs_conn *c, uint32_t n);
/* Queue output; returns 0, or -1 if out of memory (nothing queued). */
int vs_send(struct vsock *vs, struct vs_conn *c, const void *p, size_t n);
/* Room for n bytes of output to fill in place, then vs_send_commit. */
uint8_t *vs_send_reserve(struct vs_conn *c, size_t n);
void vs_send_commit(struct vsock *vs, struct vs_conn *c, size_t n);
static inline uint32_t vs_unsent(const struct vs_conn *c) { return c->tend - c->tstart; }
void vs_close(struct vsock *vs, struct vs_conn *c);
void vs_hand_back(struct vsock *vs, struct vs_conn *c);
void vs_abort(struct vsock *vs, struct vs_conn *c);

#endif
