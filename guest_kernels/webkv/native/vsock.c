/*
 * ulib/dev/vsock.h's API over POSIX TCP sockets (webkv-native).  A vsock port
 * listens on the host address given by forward=[HOST:]PORT=VSOCK_PORT (the
 * same mapping `pyvmm boot --forward` makes); a port with no forward listens on
 * nothing.  One epoll set holds the listeners and the connections; it wakes
 * SYS_wait_interrupt with bit NATIVE_IRQ_VSOCK and vs_poll() takes its events.
 *
 * The semantics are the guest driver's: input is read into the connection's
 * buffer (at most VS_BUF_ALLOC unconsumed, then the socket is not read until the
 * application consumes, which is TCP's flow control doing what credit does),
 * output is queued by vs_send and written by vs_flush, a listener that is not
 * accepting leaves connections waiting in the kernel's backlog.  Closing sends
 * what is queued, then FIN, and waits (VS_CLOSE_TIMEOUT_NS) for the peer's EOF.
 * A hand-back has no next instance to go to here: it is a close.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include "ulib.h"
#include "dev/umalloc.h"
#include "dev/vsock.h"
#include "dev/vsock_stream.h"
#include "native.h"

#define EV_BATCH	64
#define RBUF_MIN	4096
#define TAG_LISTENER	(1ULL << 63)

/* host side of each connection slot: its socket, the epoll interest, a
 * generation (events for an earlier user of the slot are stale) */
static struct { int fd; uint32_t events, gen; } host[VS_MAX_CONNS];
static int lfd[VS_MAX_LISTENERS];
static int vsep = -1;
static int lpaused;		/* listeners out of the epoll set: no free slot */

static unsigned idx(struct vsock *vs, struct vs_conn *c) { return c - vs->conns; }

static void set_events(struct vsock *vs, struct vs_conn *c, uint32_t events)
{
	unsigned i = idx(vs, c);
	struct epoll_event ev = { .events = events, .data.u64 = ((uint64_t)host[i].gen << 32) | i };

	if (events == host[i].events)
		return;
	if (epoll_ctl(vsep, EPOLL_CTL_MOD, host[i].fd, &ev))
		native_die("webkv-native: epoll_ctl(conn)");
	host[i].events = events;
}

static void listeners_on(struct vsock *vs, int on)
{
	for (unsigned i = 0; i < vs->nlisteners; i++) {
		struct epoll_event ev = { .events = EPOLLIN, .data.u64 = TAG_LISTENER | i };
		if (lfd[i] >= 0 && vs->listeners[i].accepting)
			epoll_ctl(vsep, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, lfd[i], &ev);
	}
	lpaused = !on;
}

static void free_conn(struct vsock *vs, struct vs_conn *c, int rst)
{
	unsigned i = idx(vs, c);

	if (rst) {		/* RST rather than FIN */
		struct linger l = { 1, 0 };
		setsockopt(host[i].fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
		vs->stats.resets_out++;
	}
	close(host[i].fd);
	host[i].fd = -1;
	host[i].gen++;
	vs_conn_release(vs, c);
	if (lpaused)
		listeners_on(vs, 1);
}

/* The peer is gone (reset, or an error on the socket). */
static void conn_reset(struct vsock *vs, struct vs_conn *c)
{
	vs->stats.resets_in++;
	if (!c->closing && vs->cb->reset)
		vs->cb->reset(vs, c);
	free_conn(vs, c, 0);
}

static void accept_one(struct vsock *vs, unsigned li)
{
	struct vs_conn *c = vs->free_conns;
	struct sockaddr_storage sa;
	socklen_t salen = sizeof(sa);
	int fd, one = 1;
	unsigned i;

	if (!c) {
		listeners_on(vs, 0);	/* back when a slot frees */
		return;
	}
	fd = accept4(lfd[li], (struct sockaddr *)&sa, &salen, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0)
		return;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	vs->free_conns = c->hnext;
	memset(c, 0, sizeof(*c));
	c->local_port = vs->listeners[li].port;
	c->peer_port = sa.ss_family == AF_INET ? ntohs(((struct sockaddr_in *)&sa)->sin_port)
					       : ntohs(((struct sockaddr_in6 *)&sa)->sin6_port);
	c->state = VS_ESTABLISHED;
	vs->nconns++;
	i = idx(vs, c);
	host[i].fd = fd;
	host[i].events = EPOLLIN;
	struct epoll_event ev = { .events = EPOLLIN, .data.u64 = ((uint64_t)host[i].gen << 32) | i };
	if (epoll_ctl(vsep, EPOLL_CTL_ADD, fd, &ev))
		native_die("webkv-native: epoll_ctl(accept)");
	vs->stats.accepted++;
	if (vs->cb->accept)
		vs->cb->accept(vs, c);
}

/* Read what the socket has (up to the buffer's limit); callbacks. */
static void readable(struct vsock *vs, struct vs_conn *c)
{
	unsigned i = idx(vs, c);
	uint8_t scratch[4096];
	ssize_t n;

	if (c->closing) {	/* waiting for the peer's EOF: input is dropped */
		n = recv(host[i].fd, scratch, sizeof(scratch), 0);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			free_conn(vs, c, 0);
		return;
	}
	if (c->rend == c->rcap && c->rstart) {
		memmove(c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
		c->rend -= c->rstart;
		c->rstart = 0;
	}
	if (c->rend == c->rcap) {
		uint32_t cap = c->rcap ? c->rcap * 2 : RBUF_MIN;
		uint8_t *nb;
		if (cap > VS_BUF_ALLOC)
			cap = VS_BUF_ALLOC;
		if (cap <= c->rend) {	/* full: read again when the application consumed */
			set_events(vs, c, host[i].events & ~EPOLLIN);
			return;
		}
		if (!(nb = urealloc(c->rbuf, cap))) {
			vs->stats.dropped++;
			conn_reset(vs, c);
			return;
		}
		c->rbuf = nb;
		c->rcap = cap;
	}
	n = recv(host[i].fd, c->rbuf + c->rend, c->rcap - c->rend, 0);
	if (n > 0) {
		c->rend += n;
		c->rx_cnt += n;
		vs->stats.rx_bytes += n;
		vs->stats.rx_packets++;
		if (vs->cb->input)
			vs->cb->input(vs, c);
	} else if (n == 0) {
		c->peer_shut |= VSOCK_SHUTDOWN_SEND;	/* EOF: the peer sends no more */
		set_events(vs, c, host[i].events & ~EPOLLIN);
		if (vs->cb->shutdown)
			vs->cb->shutdown(vs, c);
	} else if (errno != EAGAIN && errno != EINTR) {
		conn_reset(vs, c);
	}
}

static void enter_closing(struct vsock *vs, struct vs_conn *c, uint64_t now)
{
	unsigned i = idx(vs, c);

	if (c->peer_shut & VSOCK_SHUTDOWN_SEND) {	/* the peer is done too */
		free_conn(vs, c, 0);
		return;
	}
	shutdown(host[i].fd, SHUT_WR);
	c->state = VS_CLOSING;
	c->deadline = now + VS_CLOSE_TIMEOUT_NS;
	vs->timed++;
	set_events(vs, c, EPOLLIN);
}

/* Write queued output; 0, or -1 if the connection is gone. */
static int pump(struct vsock *vs, struct vs_conn *c, uint64_t now)
{
	unsigned i = idx(vs, c);

	while (c->tend > c->tstart) {
		ssize_t n = send(host[i].fd, c->tbuf + c->tstart, c->tend - c->tstart, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN) {
			set_events(vs, c, host[i].events | EPOLLOUT);
			return 0;
		}
		if (n <= 0) {
			conn_reset(vs, c);
			return -1;
		}
		c->tstart += n;
		c->tx_cnt += n;
		vs->stats.tx_bytes += n;
		vs->stats.tx_packets++;
	}
	vs_tbuf_trim(c);	/* all sent */
	if (host[i].events & EPOLLOUT)
		set_events(vs, c, host[i].events & ~EPOLLOUT);
	if (c->closing && c->state == VS_ESTABLISHED)
		enter_closing(vs, c, now);
	return 0;
}

int vs_init(struct vsock *vs, const struct vs_callbacks *cb)
{
	memset(vs, 0, sizeof(*vs));
	vs->cb = cb;
	vs->cid = 3;
	vs->dev.irq = NATIVE_IRQ_VSOCK;
	vs->conns = ucalloc(VS_MAX_CONNS * sizeof(*vs->conns));
	if (!vs->conns)
		return VIRTIO_E_NOMEM;
	for (unsigned i = VS_MAX_CONNS; i-- > 0;) {
		vs->conns[i].hnext = vs->free_conns;
		vs->free_conns = &vs->conns[i];
		host[i].fd = -1;
	}
	vsep = epoll_create1(EPOLL_CLOEXEC);
	if (vsep < 0)
		native_die("webkv-native: epoll_create1");
	native_irq_fd(vsep, NATIVE_IRQ_VSOCK, 0);
	return 0;
}

int vs_restart(struct vsock *vs)
{
	for (unsigned i = 0; i < VS_MAX_CONNS; i++)
		if (vs->conns[i].state != VS_FREE)
			conn_reset(vs, &vs->conns[i]);
	return 0;
}

/* A listening socket on HOST:PORT (HOST defaults to 127.0.0.1). */
static int listen_on(const char *spec)
{
	char hostname[64] = "127.0.0.1";
	const char *colon = strrchr(spec, ':'), *port = colon ? colon + 1 : spec;
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE }, *ai;
	int fd, one = 1;

	if (colon && (size_t)(colon - spec) < sizeof(hostname)) {
		memcpy(hostname, spec, colon - spec);
		hostname[colon - spec] = 0;
	}
	if (getaddrinfo(hostname, port, &hints, &ai)) {
		fprintf(stderr, "webkv-native: cannot resolve %s\n", spec);
		exit(2);
	}
	fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) || listen(fd, VS_BACKLOG)) {
		fprintf(stderr, "webkv-native: cannot listen on %s: %s\n", spec, strerror(errno));
		exit(2);
	}
	freeaddrinfo(ai);
	return fd;
}

int vs_listen(struct vsock *vs, uint32_t port, int accepting)
{
	const char *from = native_forward(port);
	unsigned i = vs->nlisteners;

	if (i == VS_MAX_LISTENERS)
		return -1;
	vs->listeners[i].port = port;
	vs->listeners[i].accepting = 0;
	lfd[i] = from ? listen_on(from) : -1;
	vs->nlisteners++;
	vs_listen_accept(vs, port, accepting);
	return 0;
}

void vs_listen_accept(struct vsock *vs, uint32_t port, int accepting)
{
	for (unsigned i = 0; i < vs->nlisteners; i++) {
		struct vs_listener *l = &vs->listeners[i];
		struct epoll_event ev = { .events = EPOLLIN, .data.u64 = TAG_LISTENER | i };
		if (l->port != port || !l->accepting == !accepting)
			continue;
		l->accepting = accepting;
		if (lfd[i] >= 0 && !lpaused)
			epoll_ctl(vsep, accepting ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, lfd[i], &ev);
	}
}

int vs_poll(struct vsock *vs, uint64_t now)
{
	struct epoll_event evs[EV_BATCH];
	int n = epoll_wait(vsep, evs, EV_BATCH, 0);

	(void)now;
	for (int k = 0; k < n; k++) {
		uint64_t d = evs[k].data.u64;
		unsigned i = (uint32_t)d;
		struct vs_conn *c;

		if (d & TAG_LISTENER) {
			if (vs->listeners[i].accepting && !lpaused)
				accept_one(vs, i);
			continue;
		}
		c = &vs->conns[i];
		if (c->state == VS_FREE || host[i].gen != (uint32_t)(d >> 32))
			continue;	/* freed earlier in this batch */
		if (evs[k].events & EPOLLOUT)
			vs_mark_dirty(vs, c);
		if (evs[k].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
			readable(vs, c);
	}
	return n > 0;
}

void vs_flush(struct vsock *vs, uint64_t now)
{
	for (struct vs_conn *c = vs->dirty_head, *next; c; c = next) {
		next = c->dnext;
		vs_unmark_dirty(vs, c);
		pump(vs, c, now);
	}
}

int vs_arm(struct vsock *vs) { (void)vs; return 0; }	/* epoll is level-triggered: no race */
void vs_disarm(struct vsock *vs) { (void)vs; }
void vs_interrupt(struct vsock *vs) { (void)vs; }	/* vs_poll takes the events */

void vs_consume(struct vsock *vs, struct vs_conn *c, uint32_t n)
{
	unsigned i = idx(vs, c);

	n = vs_rbuf_consume(c, n);
	if (n && !(host[i].events & EPOLLIN) && !(c->peer_shut & VSOCK_SHUTDOWN_SEND) && c->state == VS_ESTABLISHED)
		set_events(vs, c, host[i].events | EPOLLIN);	/* room again */
}

void vs_close(struct vsock *vs, struct vs_conn *c)
{
	if (c->closing)
		return;
	c->closing = VS_CLOSE;
	c->user = NULL;
	c->rstart = c->rend = 0;	/* unread input is dropped */
	vs_mark_dirty(vs, c);
}

void vs_hand_back(struct vsock *vs, struct vs_conn *c)
{
	vs_close(vs, c);
	c->closing = VS_HAND_BACK;
}

void vs_abort(struct vsock *vs, struct vs_conn *c)
{
	free_conn(vs, c, 1);
}
