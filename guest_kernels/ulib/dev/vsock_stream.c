/* The transport-independent half of the vsock stream sockets (see vsock_stream.h). */
#include "ulib.h"
#include "dev/umalloc.h"
#include "dev/vsock_stream.h"

void vs_mark_dirty(struct vsock *vs, struct vs_conn *c)
{
	if (c->dirty || c->state == VS_FREE)
		return;
	c->dirty = 1;
	c->dnext = NULL;
	c->dprev = vs->dirty_tail;
	if (vs->dirty_tail)
		vs->dirty_tail->dnext = c;
	else
		vs->dirty_head = c;
	vs->dirty_tail = c;
}

void vs_unmark_dirty(struct vsock *vs, struct vs_conn *c)
{
	if (!c->dirty)
		return;
	if (c->dprev)
		c->dprev->dnext = c->dnext;
	else
		vs->dirty_head = c->dnext;
	if (c->dnext)
		c->dnext->dprev = c->dprev;
	else
		vs->dirty_tail = c->dprev;
	c->dirty = 0;
	c->dprev = c->dnext = NULL;
}

void vs_conn_release(struct vsock *vs, struct vs_conn *c)
{
	vs_unmark_dirty(vs, c);
	if (c->state == VS_CLOSING)
		vs->timed--;
	ufree(c->rbuf);
	ufree(c->tbuf);
	c->rbuf = c->tbuf = NULL;
	c->state = VS_FREE;
	c->user = NULL;
	c->hnext = vs->free_conns;
	vs->free_conns = c;
	vs->nconns--;
}

uint32_t vs_rbuf_consume(struct vs_conn *c, uint32_t n)
{
	if (n > c->rend - c->rstart)
		n = c->rend - c->rstart;
	c->rstart += n;
	c->fwd_cnt += n;
	if (c->rstart == c->rend) {
		c->rstart = c->rend = 0;
		if (c->rcap > VS_KEEP_BUF) {
			ufree(c->rbuf);
			c->rbuf = NULL;
			c->rcap = 0;
		}
	}
	return n;
}

void vs_tbuf_trim(struct vs_conn *c)
{
	if (c->tstart != c->tend)
		return;
	c->tstart = c->tend = 0;
	if (c->tcap > VS_KEEP_BUF) {
		ufree(c->tbuf);
		c->tbuf = NULL;
		c->tcap = 0;
	}
}

uint8_t *vs_send_reserve(struct vs_conn *c, size_t n)
{
	if (c->tend + n > c->tcap && c->tstart) {
		memmove(c->tbuf, c->tbuf + c->tstart, c->tend - c->tstart);
		c->tend -= c->tstart;
		c->tstart = 0;
	}
	if (c->tend + n > c->tcap) {
		size_t cap = c->tcap ? c->tcap : 4096;
		uint8_t *nb;
		while (cap < c->tend + n)
			cap *= 2;
		if (cap > (1u << 30) || !(nb = urealloc(c->tbuf, cap)))
			return NULL;
		c->tbuf = nb;
		c->tcap = cap;
	}
	return c->tbuf + c->tend;
}

void vs_send_commit(struct vsock *vs, struct vs_conn *c, size_t n)
{
	c->tend += n;
	vs_mark_dirty(vs, c);
}

int vs_send(struct vsock *vs, struct vs_conn *c, const void *p, size_t n)
{
	uint8_t *d;

	if (c->closing || c->state != VS_ESTABLISHED)
		return -1;
	if (!(d = vs_send_reserve(c, n)))
		return -1;
	memcpy(d, p, n);
	vs_send_commit(vs, c, n);
	return 0;
}

/* A connection still closing at its deadline is reset (vs_abort: RST). */
uint64_t vs_timers(struct vsock *vs, uint64_t now)
{
	uint64_t next = 0;

	if (!vs->timed)
		return 0;
	for (unsigned i = 0; i < VS_MAX_CONNS; i++) {
		struct vs_conn *c = &vs->conns[i];
		if (c->state != VS_CLOSING)
			continue;
		if (now >= c->deadline)
			vs_abort(vs, c);
		else if (!next || c->deadline < next)
			next = c->deadline;
	}
	return next;
}
