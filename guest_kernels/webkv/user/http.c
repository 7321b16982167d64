/*
 * The HTTP/1.1 service (vsock port 80) and the maintenance agent (port 7000).
 *
 * Each vsock connection has an hconn.  Requests are parsed straight from the
 * connection's input buffer, strictly in order: a PUT or DELETE goes to the
 * write-ahead log and blocks its connection (no further parsing) until the batch
 * is flushed, so pipelined responses keep their order and a later GET on the
 * same connection sees the write.  Other requests are answered at once.
 *
 * Release (maintenance): every port-80 connection is handed back to the host at
 * its next request boundary (vs_hand_back), so a keep-alive client is not closed:
 * the next instance gets the connection with any request we had not started.
 * A PUT or DELETE already in the log completes and is answered here first.
 */
#include "webkv.h"

struct hconn {
	struct hconn *prev, *next;
	struct vs_conn *vc;		/* NULL once closed or reset */
	uint8_t agent;			/* port 7000 */
	uint8_t blocked;		/* a PUT/DELETE is in the log */
	uint8_t draining;		/* release: hand back at the next request boundary */
	uint8_t paused;			/* too much unsent output */
	uint8_t sent_continue;
	uint8_t agent_wait;		/* AGENT_WAIT_*: a reply is due later */
	uint8_t op_keep;		/* keep-alive after the blocked request's response */
	uint8_t op_http10;
	uint8_t dead;			/* closed or reset: freed by http_reap() */
	uint32_t scan;			/* where to resume looking for the end of the headers */
	uint32_t pending_ops;
	uint64_t req_start, last_active;
};

struct req {
	const char *method, *target;
	uint32_t mlen, tlen;
	int http10;
	uint64_t cl;
	int has_cl, te, conn_close, conn_keepalive, expect_continue;
};

static struct hconn *hconns;
static unsigned n_http, n_paused, n_dead;

static void process(struct hconn *hc);
static void agent_process(struct hconn *hc);

/* ---- connections ---- */

static void unlink_free(struct hconn *hc)
{
	if (hc->prev)
		hc->prev->next = hc->next;
	else
		hconns = hc->next;
	if (hc->next)
		hc->next->prev = hc->prev;
	if (!hc->agent)
		n_http--;
	if (hc->paused)
		n_paused--;
	ufree(hc);
}

/* The connection is gone for us.  The hconn is freed by http_reap() at the end of
 * the loop round (callers up the stack may still look at it), and not before the
 * log op that refers to it has completed. */
static void detach(struct hconn *hc)
{
	hc->vc = NULL;
	if (hc->paused) {
		hc->paused = 0;
		n_paused--;
	}
	if (!hc->dead) {
		hc->dead = 1;
		n_dead++;
	}
}

void http_reap(void)
{
	if (!n_dead)
		return;
	for (struct hconn *hc = hconns, *next; hc; hc = next) {
		next = hc->next;
		if (hc->dead && !hc->pending_ops) {
			n_dead--;
			unlink_free(hc);
		}
	}
}

static void close_conn(struct hconn *hc)
{
	if (hc->vc)
		vs_close(&vs, hc->vc);
	detach(hc);
}

static void hand_back_conn(struct hconn *hc)
{
	if (hc->vc)
		vs_hand_back(&vs, hc->vc);
	detach(hc);
}

static void on_accept(struct vsock *v, struct vs_conn *c)
{
	struct hconn *hc = ucalloc(sizeof(*hc));

	if (!hc) {
		vs_abort(v, c);
		return;
	}
	hc->vc = c;
	hc->agent = c->local_port == AGENT_PORT;
	hc->last_active = now_ns;
	hc->next = hconns;
	if (hconns)
		hconns->prev = hc;
	hconns = hc;
	if (!hc->agent)
		n_http++;
	c->user = hc;
}

static void on_input(struct vsock *v, struct vs_conn *c)
{
	struct hconn *hc = c->user;

	(void)v;
	if (!hc)
		return;
	hc->last_active = now_ns;
	if (hc->agent)
		agent_process(hc);
	else
		process(hc);
}

static void on_shutdown(struct vsock *v, struct vs_conn *c)
{
	struct hconn *hc = c->user;

	(void)v;
	if (!hc)
		return;
	if (c->peer_shut & VSOCK_SHUTDOWN_RCV) {	/* nobody reads our answers */
		close_conn(hc);
		return;
	}
	if (hc->agent)
		agent_process(hc);
	else
		process(hc);
}

static void on_reset(struct vsock *v, struct vs_conn *c)
{
	struct hconn *hc = c->user;

	(void)v;
	if (hc)
		detach(hc);
}

const struct vs_callbacks webkv_callbacks = { on_accept, on_input, on_shutdown, on_reset };

void http_init(void)
{
	hconns = NULL;
	n_http = n_paused = 0;
}

/* ---- responses ---- */

static const char *reason(int status)
{
	switch (status) {
	case 100: return "Continue";
	case 200: return "OK";
	case 201: return "Created";
	case 204: return "No Content";
	case 400: return "Bad Request";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 408: return "Request Timeout";
	case 413: return "Content Too Large";
	case 431: return "Request Header Fields Too Large";
	case 500: return "Internal Server Error";
	case 501: return "Not Implemented";
	case 503: return "Service Unavailable";
	case 505: return "HTTP Version Not Supported";
	case 507: return "Insufficient Storage";
	default: return "Unknown";
	}
}

/* Queue one response.  close: say "Connection: close" (the caller closes). */
static void respond(struct hconn *hc, int status, const char *ctype, const void *body, size_t blen,
		    const char *extra, int close, int http10, int head)
{
	char h[384];
	int n;
	uint8_t *d;

	if (!hc->vc)
		return;
	n = ksnprintf(h, sizeof(h), "HTTP/1.1 %d %s\r\nServer: webkv/" VERSION_NAME "\r\n", status, reason(status));
	if (status != 204)
		n += ksnprintf(h + n, sizeof(h) - n, "Content-Length: %lu\r\n", (unsigned long)blen);
	if (ctype && status != 204)
		n += ksnprintf(h + n, sizeof(h) - n, "Content-Type: %s\r\n", ctype);
	if (extra)
		n += ksnprintf(h + n, sizeof(h) - n, "%s", extra);
	if (close)
		n += ksnprintf(h + n, sizeof(h) - n, "Connection: close\r\n");
	else if (http10)
		n += ksnprintf(h + n, sizeof(h) - n, "Connection: keep-alive\r\n");
	n += ksnprintf(h + n, sizeof(h) - n, "\r\n");
	if (head || status == 204)
		blen = 0;
	if (!(d = vs_send_reserve(hc->vc, n + blen))) {
		close_conn(hc);		/* out of memory: drop the connection */
		return;
	}
	memcpy(d, h, n);
	if (blen)
		memcpy(d + n, body, blen);
	vs_send_commit(&vs, hc->vc, n + blen);
}

static void respond_text(struct hconn *hc, int status, const char *text, const char *extra, int close,
			 int http10, int head)
{
	respond(hc, status, "text/plain", text, strlen(text), extra, close, http10, head);
}

/* An error after which the request framing is lost: answer and close. */
static void error_close(struct hconn *hc, int status)
{
	char body[64];

	ksnprintf(body, sizeof(body), "%s\n", reason(status));
	respond_text(hc, status, body, NULL, 1, 0, 0);
	close_conn(hc);
}

/* ---- parsing ---- */

static int is_tchar(uint8_t c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       (c && strchr("!#$%&'*+-.^_`|~", c));
}

static int is_unreserved(uint8_t c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       c == '-' || c == '.' || c == '_' || c == '~';
}

static int lower(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

static int ieq(const char *a, size_t n, const char *lit)
{
	size_t i = 0;

	for (; i < n && lit[i]; i++)
		if (lower((uint8_t)a[i]) != lit[i])
			return 0;
	return i == n && !lit[i];
}

/* Offset just past the blank line that ends the headers, or 0. */
static uint32_t header_end(const uint8_t *p, uint32_t n, uint32_t *scan)
{
	for (uint32_t i = *scan; i < n; i++) {
		if (p[i] != '\n')
			continue;
		if (i + 1 < n && p[i + 1] == '\n')
			return i + 2;
		if (i + 2 < n && p[i + 1] == '\r' && p[i + 2] == '\n')
			return i + 3;
	}
	*scan = n > 2 ? n - 2 : 0;
	return 0;
}

/* Next line of [*pos, end): its start and length without CR LF; -1 at the end. */
static int next_line(const uint8_t *p, uint32_t end, uint32_t *pos, const uint8_t **line, uint32_t *len)
{
	uint32_t s = *pos, e = s;

	if (s >= end)
		return -1;
	while (e < end && p[e] != '\n')
		e++;
	*pos = e + 1;
	*line = p + s;
	*len = e - s;
	if (*len && p[e - 1] == '\r')
		(*len)--;
	return 0;
}

static void connection_tokens(struct req *r, const char *v, uint32_t n)
{
	uint32_t i = 0;

	while (i < n) {
		uint32_t s, e;
		while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
			i++;
		s = i;
		while (i < n && v[i] != ',')
			i++;
		e = i;
		while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t'))
			e--;
		if (ieq(v + s, e - s, "close"))
			r->conn_close = 1;
		else if (ieq(v + s, e - s, "keep-alive"))
			r->conn_keepalive = 1;
	}
}

/* Request line and headers of [0, hend); 0 or an HTTP status. */
static int parse(const uint8_t *p, uint32_t hend, struct req *r)
{
	const uint8_t *line;
	uint32_t pos = 0, len, i = 0;

	memset(r, 0, sizeof(*r));
	if (next_line(p, hend, &pos, &line, &len))
		return 400;
	/* method SP request-target SP HTTP/1.x */
	while (i < len && is_tchar(line[i]))
		i++;
	if (!i || i > 16 || i >= len || line[i] != ' ')
		return 400;
	r->method = (const char *)line;
	r->mlen = i++;
	r->target = (const char *)line + i;
	while (i < len && line[i] > 0x20 && line[i] < 0x7f)
		i++;
	r->tlen = (const char *)line + i - r->target;
	if (!r->tlen || i >= len || line[i] != ' ')
		return 400;
	i++;
	if (len - i != 8 || memcmp(line + i, "HTTP/", 5) || line[i + 6] != '.' ||
	    line[i + 5] < '0' || line[i + 5] > '9' || line[i + 7] < '0' || line[i + 7] > '9')
		return 400;
	if (line[i + 5] != '1')
		return 505;
	r->http10 = line[i + 7] == '0';
	/* header fields */
	while (!next_line(p, hend, &pos, &line, &len) && len) {
		uint32_t n = 0, vs_, ve;
		if (line[0] == ' ' || line[0] == '\t')
			return 400;		/* obsolete line folding */
		while (n < len && is_tchar(line[n]))
			n++;
		if (!n || n >= len || line[n] != ':')
			return 400;
		vs_ = n + 1;
		while (vs_ < len && (line[vs_] == ' ' || line[vs_] == '\t'))
			vs_++;
		ve = len;
		while (ve > vs_ && (line[ve - 1] == ' ' || line[ve - 1] == '\t'))
			ve--;
		for (uint32_t k = vs_; k < ve; k++)
			if ((line[k] < 0x20 && line[k] != '\t') || line[k] == 0x7f)
				return 400;
		const char *name = (const char *)line, *val = (const char *)line + vs_;
		uint32_t vlen = ve - vs_;
		if (ieq(name, n, "content-length")) {
			uint64_t v = 0;
			if (!vlen || vlen > 12)
				return 400;
			for (uint32_t k = 0; k < vlen; k++) {
				if (val[k] < '0' || val[k] > '9')
					return 400;
				v = v * 10 + (val[k] - '0');
			}
			if (r->has_cl && r->cl != v)
				return 400;
			r->has_cl = 1;
			r->cl = v;
		} else if (ieq(name, n, "transfer-encoding")) {
			r->te = 1;
		} else if (ieq(name, n, "connection")) {
			connection_tokens(r, val, vlen);
		} else if (ieq(name, n, "expect")) {
			if (ieq(val, vlen, "100-continue"))
				r->expect_continue = 1;
		}
	}
	return 0;
}

static int method_is(const struct req *r, const char *m)
{
	return r->mlen == strlen(m) && !memcmp(r->method, m, r->mlen);
}

/* ---- handlers ---- */

static int key_ok(const char *k, uint32_t n)
{
	if (!n || n > MAX_KEY)
		return 0;
	for (uint32_t i = 0; i < n; i++)
		if (!is_unreserved(k[i]))
			return 0;
	return 1;
}

static void begin_op(struct hconn *hc, const struct req *r, int keep, uint8_t type, const char *key,
		     uint32_t klen, const uint8_t *body, uint32_t blen)
{
	static uint32_t next_claim;
	struct op *op;
	uint32_t rec = wal_record_size(klen, blen), credit = 0, amount;
	uint8_t *val = NULL;
	struct kv_entry *old = type == OP_PUT ? kv_get(key, klen) : NULL;

	if (!wal_is_open() || wal_failed()) {
		respond_text(hc, 503, "disk unavailable\n", NULL, !keep, r->http10, 0);
		return;
	}
	if (old && !old->claim)
		credit = wal_record_size(old->klen, old->vlen);
	amount = type == OP_PUT && rec > credit ? rec - credit : 0;
	if (wal_reserve(amount)) {
		respond_text(hc, 507, "store full\n", NULL, !keep, r->http10, 0);
		return;
	}
	op = umalloc(sizeof(*op));
	if (op && blen && !(val = umalloc(blen))) {
		ufree(op);
		op = NULL;
	}
	if (!op) {
		wal_unreserve(amount);
		respond_text(hc, 507, "out of memory\n", NULL, !keep, r->http10, 0);
		return;
	}
	op->hc = hc;
	op->reserved = amount;
	op->claim = 0;
	if (credit) {
		if (!++next_claim)
			next_claim = 1;
		old->claim = op->claim = next_claim;
	}
	op->type = type;
	op->klen = klen;
	op->vlen = blen;
	op->val = val;
	memcpy(op->key, key, klen);
	if (blen)
		memcpy(val, body, blen);
	hc->blocked = 1;
	hc->pending_ops++;
	hc->op_keep = keep;
	hc->op_http10 = r->http10;
	wal_submit(op);
}

void http_commit_done(struct op *op, int result)
{
	struct hconn *hc = op->hc;
	int status;

	wal_unreserve(op->reserved);
	if (result == COMMIT_OK) {
		/* Durable: apply it whether or not anybody waits for the answer. */
		if (op->type == OP_PUT) {
			int created = kv_put(op->key, op->klen, op->val, op->vlen);
			if (created < 0) {
				ufree(op->val);
				status = 500;
			} else {
				status = created ? 201 : 204;
			}
		} else {
			/* Idempotent, as S3's DeleteObject: "absent" is durable either way,
			 * and a DELETE re-driven after a failover (its first execution never
			 * answered) gets the answer the first would have given. */
			kv_del(op->key, op->klen);
			status = 204;
		}
	} else {
		ufree(op->val);
		status = result == COMMIT_IOERR ? 503 : 507;
	}
	if (op->claim) {		/* our claim on the value we replaced ends */
		struct kv_entry *e = kv_get(op->key, op->klen);
		if (e && e->claim == op->claim)
			e->claim = 0;
	}
	ufree(op);
	if (!hc)
		return;
	hc->pending_ops--;
	hc->blocked = 0;
	if (!hc->vc)
		return;			/* http_reap() frees it */
	int close = !hc->op_keep;
	const char *text = status == 201 ? "" : status == 404 ? "not found\n" : status == 500 ? "out of memory\n" :
			   status == 503 ? "disk unavailable\n" : status == 507 ? "store full\n" : "";
	respond_text(hc, status, text, NULL, close, hc->op_http10, 0);
	if (close)
		close_conn(hc);
	else
		process(hc);
}

static void get_key(struct hconn *hc, const struct req *r, int keep, int head, const char *key, uint32_t klen)
{
	struct kv_entry *e = kv_get(key, klen);

	if (!e)
		respond_text(hc, 404, "not found\n", NULL, !keep, r->http10, head);
	else
		respond(hc, 200, "application/octet-stream", e->val, e->vlen, NULL, !keep, r->http10, head);
}

int status_json(char *buf, size_t size)
{
	char name[128];
	size_t n = 0;

	for (const char *s = instance_name; *s && n + 7 < sizeof(name); s++) {
		uint8_t c = *s;
		if (c == '"' || c == '\\')
			name[n++] = '\\', name[n++] = c;
		else if (c < 0x20 || c >= 0x7f)
			n += ksnprintf(name + n, sizeof(name) - n, "\\u%04x", c);
		else
			name[n++] = c;
	}
	name[n] = 0;
	return ksnprintf(buf, size,
			 "{\"version\": \"" VERSION_NAME "\", \"instance\": \"%s\", \"uptime_ms\": %lu, "
			 "\"keys\": %lu, \"role\": \"%s\", \"connections\": %u, \"streams\": %u, \"disk\": \"%s\", "
			 "\"log_records\": %lu, \"log_batches\": %lu, \"compactions\": %lu, \"disk_resets\": %lu, "
			 "\"vsock_resets\": %lu, \"streams_lost\": %lu}",
			 name, uptime_ms(), (unsigned long)kv_count(),
			 role == ROLE_PRIMARY ? "primary" : role == ROLE_RELEASED ? "released" : "standby",
			 n_http, vs.nconns,
			 !wal_is_open() ? "none" : wal_failed() ? "error" : vblk_recovering(&disk) ? "resetting" : "ok",
			 wal_stats.records, wal_stats.batches, wal_stats.compactions, (unsigned long)disk.resets,
			 (unsigned long)vs.stats.reinits, (unsigned long)vs.stats.conns_lost);
}

#if WEBKV_VERSION >= 2
static int key_cmp(const struct kv_entry *a, const struct kv_entry *b)
{
	int c = memcmp(a->key, b->key, a->klen < b->klen ? a->klen : b->klen);

	return c ? c : (int)a->klen - (int)b->klen;
}

/* Percent-decode the prefix= parameter of a query; -1 if malformed or too long. */
static int query_prefix(const char *q, uint32_t qlen, char *out)
{
	uint32_t i = 0, n = 0;

	while (i < qlen) {
		uint32_t s = i, e;
		while (i < qlen && q[i] != '&')
			i++;
		e = i++;
		if (e - s < 7 || memcmp(q + s, "prefix=", 7))
			continue;
		n = 0;
		for (uint32_t k = s + 7; k < e; k++) {
			int c = q[k];
			if (c == '%') {
				int hv = 0;
				if (k + 2 >= e)
					return -1;
				for (int d = 1; d <= 2; d++) {
					int x = lower(q[k + d]);
					if (x >= '0' && x <= '9')
						hv = hv * 16 + x - '0';
					else if (x >= 'a' && x <= 'f')
						hv = hv * 16 + x - 'a' + 10;
					else
						return -1;
				}
				c = hv;
				k += 2;
			} else if (c == '+') {
				c = ' ';
			}
			if (n >= MAX_KEY)
				return -1;
			out[n++] = c;
		}
	}
	return n;
}

static void list_keys(struct hconn *hc, const struct req *r, int keep, int head, const char *q, uint32_t qlen)
{
	char prefix[MAX_KEY];
	int plen = query_prefix(q, qlen, prefix);
	struct kv_entry **v, *e;
	struct kv_iter it;
	size_t n = 0, bytes = 0;
	uint8_t *d;
	char h[256];
	int hn;

	if (plen < 0) {
		respond_text(hc, 400, "bad prefix\n", NULL, !keep, r->http10, head);
		return;
	}
	v = umalloc((kv_count() + 1) * sizeof(*v));
	if (!v) {
		respond_text(hc, 503, "out of memory\n", NULL, !keep, r->http10, head);
		return;
	}
	kv_iter_start(&it);
	while ((e = kv_iter_next(&it)))
		if (e->klen >= plen && !memcmp(e->key, prefix, plen)) {
			v[n++] = e;
			bytes += e->klen + 1;
		}
	for (size_t gap = n / 2; gap; gap /= 2)		/* shell sort */
		for (size_t i = gap; i < n; i++)
			for (size_t j = i; j >= gap && key_cmp(v[j - gap], v[j]) > 0; j -= gap) {
				e = v[j];
				v[j] = v[j - gap];
				v[j - gap] = e;
			}
	hn = ksnprintf(h, sizeof(h),
		       "HTTP/1.1 200 OK\r\nServer: webkv/" VERSION_NAME "\r\nContent-Length: %lu\r\n"
		       "Content-Type: text/plain\r\n%s\r\n",
		       (unsigned long)bytes, !keep ? "Connection: close\r\n" : r->http10 ? "Connection: keep-alive\r\n" : "");
	if (head)
		bytes = 0;
	if (!(d = vs_send_reserve(hc->vc, hn + bytes))) {
		ufree(v);
		close_conn(hc);
		return;
	}
	memcpy(d, h, hn);
	d += hn;
	for (size_t i = 0; i < n && !head; i++) {
		memcpy(d, v[i]->key, v[i]->klen);
		d += v[i]->klen;
		*d++ = '\n';
	}
	vs_send_commit(&vs, hc->vc, hn + bytes);
	ufree(v);
}
#endif

static void handle(struct hconn *hc, const struct req *r, const uint8_t *body, uint32_t blen, int keep)
{
	static const char allow_get[] = "Allow: GET, HEAD\r\n";
	static const char allow_kv[] = "Allow: GET, HEAD, PUT, DELETE\r\n";
	const char *path = r->target, *query = NULL;
	uint32_t plen = r->tlen, qlen = 0;
	int get = method_is(r, "GET"), head = method_is(r, "HEAD");
	int is_kv, is_list = 0;

	for (uint32_t i = 0; i < r->tlen; i++)
		if (path[i] == '?') {
			plen = i;
			query = path + i + 1;
			qlen = r->tlen - i - 1;
			break;
		}
	if (plen == 0 || path[0] != '/') {
		respond_text(hc, 400, "bad request target\n", NULL, !keep, r->http10, head);
		return;
	}
	if (plen == 1) {
		char page[192];
		if (!get && !head) {
			respond_text(hc, 405, "method not allowed\n", allow_get, !keep, r->http10, 0);
			return;
		}
		ksnprintf(page, sizeof(page), "webkv %s on %s: GET/PUT/DELETE /kv/<key>, GET /status%s\n",
			  VERSION_NAME, instance_name, WEBKV_VERSION >= 2 ? ", GET /keys?prefix=<p>" : "");
		respond_text(hc, 200, page, NULL, !keep, r->http10, head);
		return;
	}
	if (plen == 7 && !memcmp(path, "/status", 7)) {
		char json[512];
		int n;
		if (!get && !head) {
			respond_text(hc, 405, "method not allowed\n", allow_get, !keep, r->http10, 0);
			return;
		}
		n = status_json(json, sizeof(json) - 1);
		json[n++] = '\n';
		respond(hc, 200, "application/json", json, n, NULL, !keep, r->http10, head);
		return;
	}
	is_kv = plen > 4 && !memcmp(path, "/kv/", 4);
#if WEBKV_VERSION >= 2
	is_list = (plen == 4 && !memcmp(path, "/kv/", 4)) || (plen == 5 && !memcmp(path, "/keys", 5));
	if (is_list) {
		if (!get && !head) {
			respond_text(hc, 405, "method not allowed\n", allow_get, !keep, r->http10, 0);
			return;
		}
		list_keys(hc, r, keep, head, query ? query : "", qlen);
		return;
	}
#endif
	(void)is_list;
	(void)query;
	(void)qlen;
	if (!is_kv) {
		respond_text(hc, 404, "not found\n", NULL, !keep, r->http10, head);
		return;
	}
	const char *key = path + 4;
	uint32_t klen = plen - 4;
	if (!key_ok(key, klen)) {
		respond_text(hc, 400, "bad key (1-200 of A-Z a-z 0-9 - . _ ~)\n", NULL, !keep, r->http10, head);
		return;
	}
	if (get || head)
		get_key(hc, r, keep, head, key, klen);
	else if (method_is(r, "PUT"))
		begin_op(hc, r, keep, OP_PUT, key, klen, body, blen);
	else if (method_is(r, "DELETE"))
		begin_op(hc, r, keep, OP_DEL, key, klen, NULL, 0);
	else
		respond_text(hc, 405, "method not allowed\n", allow_kv, !keep, r->http10, 0);
}

/* Parse and answer what is complete in the input, in order. */
static void process(struct hconn *hc)
{
	while (hc->vc && !hc->blocked) {
		struct vs_conn *c = hc->vc;
		int eof = c->peer_shut & VSOCK_SHUTDOWN_SEND;
		uint8_t *p;
		uint32_t n, skip = 0, hend;
		struct req r;
		int st, keep;

		if (hc->draining) {
			hand_back_conn(hc);
			return;
		}
		if (vs_unsent(c) > MAX_OUTPUT) {
			if (!hc->paused) {
				hc->paused = 1;
				n_paused++;
			}
			return;
		}
		n = vs_peek(c, &p);
		while (skip < n && (p[skip] == '\r' || p[skip] == '\n'))
			skip++;			/* blank lines before a request line */
		if (skip) {
			vs_consume(&vs, c, skip);
			hc->scan = 0;
			n = vs_peek(c, &p);
		}
		if (!n) {
			hc->req_start = 0;
			if (eof)
				close_conn(hc);
			return;
		}
		if (!hc->req_start)
			hc->req_start = now_ns;
		hend = header_end(p, n > MAX_HEADER + 3 ? MAX_HEADER + 3 : n, &hc->scan);
		if (!hend) {
			if (n > MAX_HEADER)
				error_close(hc, 431);
			else if (eof)
				close_conn(hc);
			return;
		}
		if (hend > MAX_HEADER) {
			error_close(hc, 431);
			return;
		}
		if ((st = parse(p, hend, &r))) {
			error_close(hc, st);
			return;
		}
		if (r.te) {
			error_close(hc, 501);	/* chunked bodies are not supported */
			return;
		}
		if (r.cl > MAX_BODY) {
			error_close(hc, 413);
			return;
		}
		if (n < hend + r.cl) {		/* the body is still coming */
			if (eof) {
				close_conn(hc);
				return;
			}
			if (r.expect_continue && !hc->sent_continue) {
				static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
				vs_send(&vs, c, cont, sizeof(cont) - 1);
				hc->sent_continue = 1;
			}
			return;
		}
		keep = !r.conn_close && (!r.http10 || r.conn_keepalive);
		handle(hc, &r, p + hend, (uint32_t)r.cl, keep);
		if (hc->vc)
			vs_consume(&vs, hc->vc, hend + (uint32_t)r.cl);
		hc->scan = 0;
		hc->sent_continue = 0;
		hc->req_start = 0;
		if (!keep && hc->vc && !hc->blocked)
			close_conn(hc);
	}
}

/* ---- the maintenance agent: one command per line, one reply line ---- */

static void agent_send(struct hconn *hc, const char *line)
{
	if (!hc->vc)
		return;
	vs_send(&vs, hc->vc, line, strlen(line));
	vs_send(&vs, hc->vc, "\n", 1);
}

static void agent_command(struct hconn *hc, const char *cmd)
{
	char buf[640];

	if (!strcmp(cmd, "ready?")) {
		agent_send(hc, "ready " VERSION_NAME);
	} else if (!strcmp(cmd, "status")) {
		status_json(buf, sizeof(buf));
		agent_send(hc, buf);
	} else if (!strcmp(cmd, "release")) {
		int r = begin_release();
		if (r == 2)
			hc->agent_wait = AGENT_WAIT_FOREVER;
		else if (r > 0)
			agent_send(hc, "released");
		else if (r < 0)
			agent_send(hc, "refused fault-injected");
		else if (fault_fires(FAULT_RELEASE_CLOSE))
			close_conn(hc);	/* the release goes on without its agent */
		else
			hc->agent_wait = AGENT_WAIT_RELEASE;
	} else if (!strcmp(cmd, "acquire")) {
		if (do_acquire(buf, sizeof(buf)) > 0) {
			hc->agent_wait = AGENT_WAIT_FOREVER;
		} else {
			agent_send(hc, buf);
			if (fault_fires(FAULT_AGENT_CLOSE))
				close_conn(hc);
		}
	} else if (!strncmp(cmd, "fault ", 6)) {
		if (arm_fault(cmd + 6)) {
			agent_send(hc, "error unknown-fault");
		} else {
			ksnprintf(buf, sizeof(buf), "ok fault=%s", cmd + 6);
			agent_send(hc, buf);
		}
	} else if (*cmd) {
		agent_send(hc, "error unknown-command");
	}
}

static void agent_process(struct hconn *hc)
{
	while (hc->vc && !hc->agent_wait) {
		struct vs_conn *c = hc->vc;
		uint8_t *p, *nl;
		uint32_t n = vs_peek(c, &p), len;
		char cmd[MAX_AGENT_LINE + 1];

		nl = NULL;
		for (uint32_t i = 0; i < n; i++)
			if (p[i] == '\n') {
				nl = p + i;
				break;
			}
		if (!nl) {
			if (n > MAX_AGENT_LINE) {
				agent_send(hc, "error line-too-long");
				close_conn(hc);
			} else if (c->peer_shut & VSOCK_SHUTDOWN_SEND) {
				close_conn(hc);
			}
			return;
		}
		len = nl - p;
		if (len > MAX_AGENT_LINE) {
			vs_consume(&vs, c, len + 1);
			agent_send(hc, "error line-too-long");
			continue;
		}
		memcpy(cmd, p, len);
		if (len && cmd[len - 1] == '\r')
			len--;
		cmd[len] = 0;
		vs_consume(&vs, c, nl - p + 1);
		agent_command(hc, cmd);
	}
}

void agent_reply_all(int which, const char *line)
{
	for (struct hconn *hc = hconns, *next; hc; hc = next) {
		next = hc->next;
		if (!hc->agent || hc->agent_wait != which)
			continue;
		hc->agent_wait = 0;
		agent_send(hc, line);
		agent_process(hc);	/* commands that came after */
	}
}

/* ---- release, time-outs ---- */

void http_drain(void)
{
	for (struct hconn *hc = hconns, *next; hc; hc = next) {
		next = hc->next;
		if (hc->agent || !hc->vc)
			continue;
		hc->draining = 1;
		if (!hc->blocked)
			process(hc);
	}
}

unsigned http_port_conns(void)
{
	unsigned n = 0;

	for (struct hconn *hc = hconns; hc; hc = hc->next)
		if (!hc->agent && hc->vc)
			n++;
	return n;
}

int http_busy(void)
{
	return n_http > 0;
}

void http_resume(void)
{
	if (!n_paused)
		return;
	for (struct hconn *hc = hconns, *next; hc; hc = next) {
		next = hc->next;
		if (hc->paused && hc->vc && vs_unsent(hc->vc) < MAX_OUTPUT / 2) {
			hc->paused = 0;
			n_paused--;
			process(hc);
		}
	}
}

void http_tick(uint64_t now)
{
	for (struct hconn *hc = hconns, *next; hc; hc = next) {
		next = hc->next;
		if (hc->agent || !hc->vc || hc->blocked)
			continue;
		if (hc->req_start && now - hc->req_start > REQUEST_TIMEOUT_NS)
			error_close(hc, 408);
		else if (!hc->req_start && now - hc->last_active > IDLE_TIMEOUT_NS && !vs_unsent(hc->vc))
			close_conn(hc);
	}
}
