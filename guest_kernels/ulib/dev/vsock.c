/* virtio-vsock stream sockets at CPL3 (see vsock.h). */
#include "ulib.h"
#include "dev/umalloc.h"
#include "dev/vsock.h"
#include "dev/vsock_stream.h"

#define RXQ		0
#define TXQ		1
#define EVQ		2
#define EV_BUFS		4
#define HDR		((uint32_t)sizeof(struct vsock_hdr))
#define HASH_SIZE	2048		/* power of two */
#define RBUF_MIN	4096
#define RBUF_MAX	(VS_BUF_ALLOC + 4096)

#define W_RESPONSE	1
#define W_CREDIT	2

#define VIRTIO_VSOCK_EVENT_TRANSPORT_RESET 0

static unsigned hash_key(uint32_t peer, uint32_t local)
{
	uint32_t h = peer * 0x9e3779b1u ^ local * 0x85ebca6bu;
	return (h ^ (h >> 15)) & (HASH_SIZE - 1);
}

static struct vs_conn *find(struct vsock *vs, uint32_t peer, uint32_t local)
{
	for (struct vs_conn *c = vs->hash[hash_key(peer, local)]; c; c = c->hnext)
		if (c->peer_port == peer && c->local_port == local)
			return c;
	return NULL;
}

static struct vs_listener *listener(struct vsock *vs, uint32_t port)
{
	for (unsigned i = 0; i < vs->nlisteners; i++)
		if (vs->listeners[i].port == port)
			return &vs->listeners[i];
	return NULL;
}

/* ---- dirty list: connections with something to send ---- */

/* ---- connection table ---- */

static struct vs_conn *alloc_conn(struct vsock *vs, uint32_t local, uint32_t peer)
{
	struct vs_conn *c = vs->free_conns;
	unsigned h;

	if (!c)
		return NULL;
	vs->free_conns = c->hnext;
	memset(c, 0, sizeof(*c));
	c->local_port = local;
	c->peer_port = peer;
	c->state = VS_ESTABLISHED;
	h = hash_key(peer, local);
	c->hnext = vs->hash[h];
	vs->hash[h] = c;
	vs->nconns++;
	return c;
}

static void free_conn(struct vsock *vs, struct vs_conn *c)
{
	struct vs_conn **pp = &vs->hash[hash_key(c->peer_port, c->local_port)];

	while (*pp && *pp != c)
		pp = &(*pp)->hnext;
	if (*pp)
		*pp = c->hnext;
	vs_conn_release(vs, c);
}

/* ---- transmit ---- */

static uint8_t *slot_ptr(struct vsock *vs, unsigned slot)
{
	return vs->txmem + (size_t)slot * VS_TX_SLOT_SIZE;
}

static int get_slot(struct vsock *vs)
{
	return vs->tx_nfree ? vs->tx_free[--vs->tx_nfree] : -1;
}

static void fill_hdr(struct vsock *vs, uint8_t *buf, uint32_t local, uint32_t peer, uint16_t op,
		     uint32_t flags, uint32_t len, struct vs_conn *c)
{
	struct vsock_hdr h = {
		.src_cid = vs->cid, .dst_cid = VS_HOST_CID,
		.src_port = local, .dst_port = peer,
		.len = len, .type = VSOCK_TYPE_STREAM, .op = op, .flags = flags,
		.buf_alloc = c ? VS_BUF_ALLOC : 0, .fwd_cnt = c ? c->fwd_cnt : 0,
	};

	memcpy(buf, &h, HDR);
	if (c) {
		c->adv_fwd_cnt = c->fwd_cnt;
		c->want &= ~W_CREDIT;
	}
}

static void submit(struct vsock *vs, unsigned slot, uint32_t len)
{
	struct virtq_buf b = { slot_ptr(vs, slot), len };

	/* Cannot fail: there are no more slots than descriptors. */
	virtq_add(&vs->txq, &b, 1, 0, (void *)(uintptr_t)(slot + 1));
	vs->stats.tx_packets++;
}

/* A header-only packet; 0 if no slot was free. */
static int send_ctl(struct vsock *vs, uint32_t local, uint32_t peer, uint16_t op, uint32_t flags,
		    struct vs_conn *c)
{
	int slot = get_slot(vs);

	if (slot < 0)
		return 0;
	fill_hdr(vs, slot_ptr(vs, slot), local, peer, op, flags, 0, c);
	submit(vs, slot, HDR);
	return 1;
}

static void queue_rst(struct vsock *vs, uint32_t local, uint32_t peer)
{
	vs->stats.resets_out++;
	if (vs->rst_n < VS_RST_QUEUE) {
		vs->rst_q[vs->rst_n][0] = local;
		vs->rst_q[vs->rst_n][1] = peer;
		vs->rst_n++;
	}
}

static int64_t peer_credit(const struct vs_conn *c)
{
	return (int64_t)c->peer_buf_alloc - (uint32_t)(c->tx_cnt - c->peer_fwd_cnt);
}

static void drop_output(struct vs_conn *c)
{
	c->tstart = c->tend = 0;
}

static void enter_closing(struct vsock *vs, struct vs_conn *c, uint64_t now)
{
	c->state = VS_CLOSING;
	c->deadline = now + VS_CLOSE_TIMEOUT_NS;
	vs->timed++;
}

/* Send what this connection may send; 1 if it stopped for lack of tx slots. */
static int pump(struct vsock *vs, struct vs_conn *c, uint64_t now)
{
	if (c->want & W_RESPONSE) {
		if (!send_ctl(vs, c->local_port, c->peer_port, VSOCK_OP_RESPONSE, 0, c))
			return 1;
		c->want &= ~W_RESPONSE;
	}
	if (c->peer_shut & VSOCK_SHUTDOWN_RCV)
		drop_output(c);
	while (c->tend > c->tstart && c->state == VS_ESTABLISHED) {
		int64_t credit = peer_credit(c);
		uint32_t n = c->tend - c->tstart;
		int slot;

		if (credit <= 0) {
			if (!c->credit_requested) {
				if (!send_ctl(vs, c->local_port, c->peer_port, VSOCK_OP_CREDIT_REQUEST, 0, c))
					return 1;
				c->credit_requested = 1;
			}
			break;
		}
		if (n > credit)
			n = credit;
		if (n > VS_TX_SLOT_SIZE - HDR)
			n = VS_TX_SLOT_SIZE - HDR;
		if ((slot = get_slot(vs)) < 0)
			return 1;
		fill_hdr(vs, slot_ptr(vs, slot), c->local_port, c->peer_port, VSOCK_OP_RW, 0, n, c);
		memcpy(slot_ptr(vs, slot) + HDR, c->tbuf + c->tstart, n);
		submit(vs, slot, HDR + n);
		c->tstart += n;
		c->tx_cnt += n;
		vs->stats.tx_bytes += n;
	}
	vs_tbuf_trim(c);
	if (c->closing && c->state == VS_ESTABLISHED && c->tstart == c->tend) {
		if ((c->peer_shut & 3) == 3) {	/* both sides done: end it */
			if (!send_ctl(vs, c->local_port, c->peer_port, VSOCK_OP_RST, 0, NULL))
				return 1;
			vs->stats.resets_out++;
			free_conn(vs, c);
			return 0;
		}
		/* A hand-back shuts only our receive side: the host gives the client
		 * to the next listener, with the input we leave unconsumed. */
		uint32_t how = c->closing == VS_HAND_BACK ? VSOCK_SHUTDOWN_RCV
							  : VSOCK_SHUTDOWN_RCV | VSOCK_SHUTDOWN_SEND;
		if (!send_ctl(vs, c->local_port, c->peer_port, VSOCK_OP_SHUTDOWN, how, c))
			return 1;
		enter_closing(vs, c, now);
	}
	if (c->want & W_CREDIT) {
		if (!send_ctl(vs, c->local_port, c->peer_port, VSOCK_OP_CREDIT_UPDATE, 0, c))
			return 1;
		vs->stats.credit_updates++;
	}
	return 0;
}

void vs_flush(struct vsock *vs, uint64_t now)
{
	int blocked = 0;
	unsigned i = 0;

	if (vs->recovering || vs->failed)
		return;

	for (; i < vs->rst_n; i++)
		if (!send_ctl(vs, vs->rst_q[i][0], vs->rst_q[i][1], VSOCK_OP_RST, 0, NULL))
			break;
	if (i) {
		memmove(vs->rst_q, vs->rst_q[i], (vs->rst_n - i) * sizeof(vs->rst_q[0]));
		vs->rst_n -= i;
	}
	for (struct vs_conn *c = vs->dirty_head, *next; c; c = next) {
		next = c->dnext;
		if (pump(vs, c, now)) {
			blocked = 1;
			break;
		}
		vs_unmark_dirty(vs, c);	/* no-op if pump freed it */
	}
	vs->blocked_on_slots = blocked || vs->rst_n;
	virtq_kick(&vs->txq);
	if (vs->rx_reposted) {
		/* The device waits for a kick only when it ran out of rx buffers; kick
		 * if it had less than half of the ring before we gave buffers back. */
		unsigned reposted = vs->rx_reposted;
		vs->rx_reposted = 0;
		virtio_mb();
		uint16_t left = vs->rxq.avail_idx - virtq_used_idx(&vs->rxq);
		if ((unsigned)left < reposted + vs->rxq.size / 2)
			virtq_kick(&vs->rxq);
		else
			vs->rxq.added = 0;
	}
	virtq_kick(&vs->evq);
}

/* ---- receive ---- */

static int rbuf_append(struct vs_conn *c, const uint8_t *p, uint32_t n)
{
	if (c->rend + n > c->rcap && c->rstart) {
		memmove(c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
		c->rend -= c->rstart;
		c->rstart = 0;
	}
	if (c->rend + n > c->rcap) {
		uint32_t cap = c->rcap ? c->rcap : RBUF_MIN;
		uint8_t *nb;
		while (cap < c->rend + n)
			cap *= 2;
		if (cap > RBUF_MAX)
			cap = RBUF_MAX;
		if (cap < c->rend + n || !(nb = urealloc(c->rbuf, cap)))
			return -1;
		c->rbuf = nb;
		c->rcap = cap;
	}
	memcpy(c->rbuf + c->rend, p, n);
	c->rend += n;
	return 0;
}

static void accept_conn(struct vsock *vs, uint32_t local, uint32_t peer, uint32_t peer_buf_alloc)
{
	struct vs_conn *c = alloc_conn(vs, local, peer);

	c->peer_buf_alloc = peer_buf_alloc;
	c->want = W_RESPONSE;
	vs_mark_dirty(vs, c);
	vs->stats.accepted++;
	if (vs->cb->accept)
		vs->cb->accept(vs, c);
}

static void accept_backlog(struct vsock *vs, struct vs_listener *l)
{
	while (l->accepting && l->count && vs->free_conns) {
		uint32_t *e = l->backlog[l->head];
		l->head = (l->head + 1) % VS_BACKLOG;
		l->count--;
		accept_conn(vs, l->port, e[0], e[1]);
	}
}

/* Drop a waiting connection from the backlog (the peer reset it); 1 if found. */
static int backlog_remove(struct vs_listener *l, uint32_t peer)
{
	for (unsigned i = 0; i < l->count; i++) {
		unsigned k = (l->head + i) % VS_BACKLOG;
		if (l->backlog[k][0] != peer)
			continue;
		for (unsigned j = i; j + 1 < l->count; j++) {
			unsigned a = (l->head + j) % VS_BACKLOG, b = (a + 1) % VS_BACKLOG;
			l->backlog[a][0] = l->backlog[b][0];
			l->backlog[a][1] = l->backlog[b][1];
		}
		l->count--;
		return 1;
	}
	return 0;
}

static void conn_reset(struct vsock *vs, struct vs_conn *c)
{
	if (!c->closing && vs->cb->reset)
		vs->cb->reset(vs, c);
	free_conn(vs, c);
}

static void handle_request(struct vsock *vs, const struct vsock_hdr *h, struct vs_conn *c)
{
	struct vs_listener *l = listener(vs, h->dst_port);

	if (c) {			/* a new stream on a pair we think is open: the old one is stale */
		conn_reset(vs, c);
		queue_rst(vs, h->dst_port, h->src_port);
		return;
	}
	if (!l) {
		vs->stats.refused++;
		queue_rst(vs, h->dst_port, h->src_port);
		return;
	}
	backlog_remove(l, h->src_port);	/* a repeated request */
	if (l->accepting && !l->count && vs->free_conns) {
		accept_conn(vs, h->dst_port, h->src_port, h->buf_alloc);
	} else if (l->count < VS_BACKLOG) {
		unsigned k = (l->head + l->count) % VS_BACKLOG;
		l->backlog[k][0] = h->src_port;
		l->backlog[k][1] = h->buf_alloc;
		l->count++;
		accept_backlog(vs, l);
	} else {
		vs->stats.refused++;
		queue_rst(vs, h->dst_port, h->src_port);
	}
}

static void handle_packet(struct vsock *vs, const uint8_t *buf, uint32_t used_len, uint64_t now)
{
	struct vsock_hdr h;
	struct vs_conn *c;
	struct vs_listener *l;

	if (used_len < HDR || used_len > VS_RX_BUF_SIZE) {
		vs->stats.dropped++;
		return;
	}
	memcpy(&h, buf, HDR);
	if (h.len > used_len - HDR || h.dst_cid != vs->cid || h.src_cid != VS_HOST_CID) {
		vs->stats.dropped++;
		return;
	}
	vs->stats.rx_packets++;
	c = find(vs, h.src_port, h.dst_port);
	if (h.type != VSOCK_TYPE_STREAM) {
		if (h.op != VSOCK_OP_RST)
			queue_rst(vs, h.dst_port, h.src_port);
		return;
	}
	if (h.op == VSOCK_OP_REQUEST) {
		handle_request(vs, &h, c);
		return;
	}
	if (!c) {
		/* Unknown stream, or one still waiting in a backlog (the peer gave up
		 * with RST, or talked before we answered): forget it; answer RST unless
		 * it was one. */
		if ((l = listener(vs, h.dst_port)))
			backlog_remove(l, h.src_port);
		if (h.op == VSOCK_OP_RST)
			vs->stats.resets_in++;
		else
			queue_rst(vs, h.dst_port, h.src_port);
		return;
	}
	c->peer_buf_alloc = h.buf_alloc;
	c->peer_fwd_cnt = h.fwd_cnt;
	c->credit_requested = 0;
	if (c->tend > c->tstart)
		vs_mark_dirty(vs, c);		/* the credit may have grown */
	switch (h.op) {
	case VSOCK_OP_RW: {
		uint32_t room = VS_BUF_ALLOC - (c->rx_cnt - c->fwd_cnt);
		if (h.len > room) {		/* beyond the credit we gave */
			vs->stats.dropped++;
			conn_reset(vs, c);
			queue_rst(vs, h.dst_port, h.src_port);
			return;
		}
		c->rx_cnt += h.len;
		vs->stats.rx_bytes += h.len;
		if (c->closing || c->state != VS_ESTABLISHED || (c->peer_shut & VSOCK_SHUTDOWN_SEND)) {
			if (c->closing != VS_HAND_BACK)
				c->fwd_cnt += h.len;	/* nobody reads it: consumed */
			return;			/* handed back: the host replays it elsewhere */
		}
		if (rbuf_append(c, buf + HDR, h.len)) {
			conn_reset(vs, c);	/* out of memory */
			queue_rst(vs, h.dst_port, h.src_port);
			return;
		}
		if (vs->cb->input)
			vs->cb->input(vs, c);
		return;
	}
	case VSOCK_OP_CREDIT_UPDATE:
		return;
	case VSOCK_OP_CREDIT_REQUEST:
		c->want |= W_CREDIT;
		vs_mark_dirty(vs, c);
		return;
	case VSOCK_OP_SHUTDOWN:
		c->peer_shut |= h.flags & (VSOCK_SHUTDOWN_RCV | VSOCK_SHUTDOWN_SEND);
		if (c->state == VS_CLOSING && (c->peer_shut & 3) == 3) {
			queue_rst(vs, c->local_port, c->peer_port);
			free_conn(vs, c);
			return;
		}
		if (c->peer_shut & VSOCK_SHUTDOWN_RCV)
			drop_output(c);
		vs_mark_dirty(vs, c);
		if (!c->closing && vs->cb->shutdown)
			vs->cb->shutdown(vs, c);
		return;
	case VSOCK_OP_RST:
		vs->stats.resets_in++;
		conn_reset(vs, c);
		return;
	default:			/* RESPONSE (we never connect) or unknown */
		conn_reset(vs, c);
		queue_rst(vs, h.dst_port, h.src_port);
		return;
	}
	(void)now;
}

static void post_rx(struct vsock *vs, unsigned i)
{
	struct virtq_buf b = { vs->rxmem + (size_t)i * VS_RX_BUF_SIZE, VS_RX_BUF_SIZE };

	virtq_add(&vs->rxq, &b, 0, 1, (void *)(uintptr_t)(i + 1));
}

static void post_ev(struct vsock *vs, unsigned i)
{
	struct virtq_buf b = { &vs->evbuf[i * 2], 8 };

	virtq_add(&vs->evq, &b, 0, 1, (void *)(uintptr_t)(i + 1));
}

/* Every connection is gone on the host's side (transport reset, device reset). */
static void reset_all(struct vsock *vs)
{
	vs->stats.conns_lost += vs->nconns;
	for (unsigned i = 0; i < VS_MAX_CONNS; i++)
		if (vs->conns[i].state != VS_FREE)
			conn_reset(vs, &vs->conns[i]);
	for (unsigned i = 0; i < vs->nlisteners; i++)
		vs->listeners[i].count = 0;
	vs->rst_n = 0;
}

static int setup(struct vsock *vs);

/* One set-up attempt if one is due (after NEEDS_RESET); the next is scheduled if it fails. */
static void recover_step(struct vsock *vs, uint64_t now)
{
	if (!vs->recovering || now < vs->retry_ns)
		return;
	vs->tries++;
	if (setup(vs) == 0) {
		vs->recovering = 0;
		vs->stats.reinits++;
		uprintf("vsock: reinitialised tries=%u ms=%lu\n", vs->tries,
			(unsigned long)((uclock_ns() - vs->recover_start_ns) / 1000000));
		return;
	}
	if (vs->tries >= VIRTIO_RESET_TRIES) {
		uprintf("vsock: error=reset-failed tries=%u\n", vs->tries);
		virtio_failed(&vs->dev);
		vs->recovering = 0;
		vs->failed = 1;
		return;
	}
	vs->retry_ns = now + virtio_retry_ns(vs->tries);
}

int vs_poll(struct vsock *vs, uint64_t now)
{
	void *cookie;
	uint32_t len;
	int work = 0;

	if (vs->recovering)
		recover_step(vs, now);
	if (vs->recovering || vs->failed)
		return 0;		/* the rings are not the device's (yet) */
	for (unsigned n = 0; n < vs->rxq.size && (cookie = virtq_get(&vs->rxq, &len)); n++) {
		unsigned i = (uintptr_t)cookie - 1;
		handle_packet(vs, vs->rxmem + (size_t)i * VS_RX_BUF_SIZE, len, now);
		post_rx(vs, i);
		vs->rx_reposted++;
		work = 1;
	}
	while ((cookie = virtq_get(&vs->txq, NULL))) {
		vs->tx_free[vs->tx_nfree++] = (uintptr_t)cookie - 1;
		work = 1;
	}
	while ((cookie = virtq_get(&vs->evq, &len))) {
		unsigned i = (uintptr_t)cookie - 1;
		if (len >= 4 && vs->evbuf[i * 2] == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) {
			vs->stats.transport_resets++;
			uprintf("vsock: transport-reset connections=%u\n", vs->nconns);
			reset_all(vs);
			vs->cid = virtio_config64(&vs->dev, 0);
		}
		post_ev(vs, i);
		work = 1;
	}
	if (vs->dirty_head)
		work = 1;
	for (unsigned i = 0; i < vs->nlisteners; i++)
		accept_backlog(vs, &vs->listeners[i]);
	return work;
}

/* ---- set-up ---- */

static int setup(struct vsock *vs)
{
	int r;

	if ((r = virtio_begin(&vs->dev, VIRTIO_F_VERSION_1)))
		return r;
	if ((r = virtq_setup(&vs->dev, &vs->rxq, RXQ, VS_RX_BUFS)) ||
	    (r = virtq_setup(&vs->dev, &vs->txq, TXQ, VS_TX_SLOTS)) ||
	    (r = virtq_setup(&vs->dev, &vs->evq, EVQ, EV_BUFS))) {
		virtio_failed(&vs->dev);
		return r;
	}
	vs->cid = virtio_config64(&vs->dev, 0);
	if ((r = virtio_driver_ok(&vs->dev)))
		return r;
	for (unsigned i = 0; i < vs->rxq.size; i++)
		post_rx(vs, i);
	for (unsigned i = 0; i < vs->evq.size && i < EV_BUFS; i++)
		post_ev(vs, i);
	vs->tx_nfree = 0;
	for (unsigned i = 0; i < VS_TX_SLOTS && i < vs->txq.size; i++)
		vs->tx_free[vs->tx_nfree++] = i;
	vs->rx_reposted = 0;		/* new rings: nothing of the old ones counts */
	vs->blocked_on_slots = 0;
	virtq_kick(&vs->rxq);
	virtq_kick(&vs->evq);
	return 0;
}

int vs_init(struct vsock *vs, const struct vs_callbacks *cb)
{
	memset(vs, 0, sizeof(*vs));
	vs->cb = cb;
	if (virtio_find(VIRTIO_ID_VSOCK, 0, &vs->dev))
		return VIRTIO_E_NODEV;
	vs->rxmem = ualloc((size_t)VS_RX_BUFS * VS_RX_BUF_SIZE, 4096);
	vs->txmem = ualloc((size_t)VS_TX_SLOTS * VS_TX_SLOT_SIZE, 4096);
	vs->tx_free = ualloc(VS_TX_SLOTS * sizeof(uint16_t), 16);
	vs->evbuf = ualloc(EV_BUFS * 8, 16);
	vs->conns = ualloc(VS_MAX_CONNS * sizeof(struct vs_conn), 64);
	vs->hash = ualloc(HASH_SIZE * sizeof(struct vs_conn *), 64);
	if (!vs->rxmem || !vs->txmem || !vs->tx_free || !vs->evbuf || !vs->conns || !vs->hash)
		return VIRTIO_E_NOMEM;
	memset(vs->conns, 0, VS_MAX_CONNS * sizeof(struct vs_conn));
	memset(vs->hash, 0, HASH_SIZE * sizeof(struct vs_conn *));
	for (unsigned i = VS_MAX_CONNS; i-- > 0;) {
		vs->conns[i].hnext = vs->free_conns;
		vs->free_conns = &vs->conns[i];
	}
	return setup(vs);
}

int vs_restart(struct vsock *vs)
{
	reset_all(vs);
	return setup(vs);
}

int vs_listen(struct vsock *vs, uint32_t port, int accepting)
{
	struct vs_listener *l = listener(vs, port);

	if (!l) {
		if (vs->nlisteners >= VS_MAX_LISTENERS)
			return -1;
		l = &vs->listeners[vs->nlisteners];
		l->backlog = ualloc(VS_BACKLOG * sizeof(l->backlog[0]), 16);
		if (!l->backlog)
			return -1;
		l->port = port;
		l->head = l->count = 0;
		vs->nlisteners++;
	}
	vs_listen_accept(vs, port, accepting);
	return 0;
}

void vs_listen_accept(struct vsock *vs, uint32_t port, int accepting)
{
	struct vs_listener *l = listener(vs, port);

	if (!l)
		return;
	l->accepting = accepting;
	accept_backlog(vs, l);
}

/* ---- application side ---- */

void vs_consume(struct vsock *vs, struct vs_conn *c, uint32_t n)
{
	vs_rbuf_consume(c, n);
	if (c->fwd_cnt - c->adv_fwd_cnt >= VS_BUF_ALLOC / 4) {
		c->want |= W_CREDIT;
		vs_mark_dirty(vs, c);
	}
}

void vs_close(struct vsock *vs, struct vs_conn *c)
{
	if (c->closing)
		return;
	c->closing = VS_CLOSE;
	c->user = NULL;
	c->fwd_cnt += c->rend - c->rstart;	/* unread input is dropped */
	c->rstart = c->rend = 0;
	vs_mark_dirty(vs, c);
}

void vs_hand_back(struct vsock *vs, struct vs_conn *c)
{
	if (c->closing)
		return;
	c->closing = VS_HAND_BACK;
	c->user = NULL;
	c->rstart = c->rend = 0;	/* unconsumed input: not counted, so the host keeps it */
	vs_mark_dirty(vs, c);
}

void vs_abort(struct vsock *vs, struct vs_conn *c)
{
	queue_rst(vs, c->local_port, c->peer_port);
	free_conn(vs, c);
}

/* ---- interrupts ---- */

int vs_arm(struct vsock *vs)
{
	if (vs->recovering || vs->failed)
		return 0;
	virtq_intr(&vs->rxq, 1);
	virtq_intr(&vs->evq, 1);
	virtq_intr(&vs->txq, vs->blocked_on_slots);
	return virtq_has_used(&vs->rxq) || virtq_has_used(&vs->evq) ||
	       (vs->blocked_on_slots && virtq_has_used(&vs->txq));
}

void vs_disarm(struct vsock *vs)
{
	if (vs->recovering || vs->failed)
		return;
	virtq_intr(&vs->rxq, 0);
	virtq_intr(&vs->evq, 0);
	virtq_intr(&vs->txq, 0);
}

void vs_interrupt(struct vsock *vs)
{
	uint32_t isr = virtio_isr(&vs->dev);
	uint64_t now;

	/* While recovering, a try that failed raises NEEDS_RESET again: the schedule
	 * decides when to try next, not the interrupt. */
	if (vs->recovering || vs->failed || !(isr & VIRTIO_INT_CONFIG) ||
	    !(virtio_status(&vs->dev) & VIRTIO_S_NEEDS_RESET))
		return;
	now = uclock_ns();
	uprintf("vsock: device-reset connections=%u\n", vs->nconns);
	vs->stats.transport_resets++;
	reset_all(vs);
	vs->recovering = 1;
	vs->tries = 0;
	vs->retry_ns = vs->recover_start_ns = now;
	recover_step(vs, now);	/* at once: a device reset may be all it takes */
}
