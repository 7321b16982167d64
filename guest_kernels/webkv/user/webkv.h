/*
 * webkv: an HTTP/1.1 key-value service on vsock port 80 with a write-ahead log
 * on virtio-blk and a maintenance agent on vsock port 7000 (see the README).
 * Built twice: WEBKV_VERSION=1 and 2 (v2 adds key listing).
 */
#ifndef WEBKV_H
#define WEBKV_H

#include <stddef.h>
#include <stdint.h>
#include "ulib.h"
#include "dev/umalloc.h"
#include "dev/vsock.h"
#include "dev/vblk.h"

#ifndef WEBKV_VERSION
#error "build with -DWEBKV_VERSION=1 or 2"
#endif
#define WEBKV_STR2(x)	#x
#define WEBKV_STR(x)	WEBKV_STR2(x)
#define VERSION_NAME	"v" WEBKV_STR(WEBKV_VERSION)

#define HTTP_PORT		80
#define AGENT_PORT		7000
#define MAX_KEY			200
#define MAX_BODY		(64u << 10)	/* PUT body limit (413 above) */
#define MAX_HEADER		(8u << 10)	/* request line + headers (431 above) */
#define MAX_OUTPUT		(256u << 10)	/* unsent output at which a connection stops parsing */
#define MAX_AGENT_LINE		512
#define REQUEST_TIMEOUT_NS	(30ULL * 1000000000)	/* a started request must complete */
#define IDLE_TIMEOUT_NS		(300ULL * 1000000000)	/* idle keep-alive connection */
#define TIMER_HZ		4

#define NS_PER_MS		1000000ULL

enum role { ROLE_STANDBY, ROLE_PRIMARY, ROLE_RELEASED };

/* ---- main.c ---- */
extern struct vsock vs;
extern const char *instance_name;
extern enum role role;
extern int serving;			/* port 80 accepting, disk in use */
extern uint64_t start_ns, now_ns;
uint64_t uptime_ms(void);
int status_json(char *buf, size_t size);

/* ---- kv.c: the in-memory index ---- */
struct kv_entry {
	struct kv_entry *next;
	uint64_t hash;
	uint8_t *val;			/* umalloc'd, NULL if vlen == 0 */
	uint32_t vlen;
	uint32_t claim;			/* id of the pending PUT counting this value as freed, 0 */
	uint16_t klen;
	char key[];
};

void kv_init(void);
void kv_clear(void);
struct kv_entry *kv_get(const char *key, size_t klen);
/* Takes ownership of val; 1 created, 0 replaced, -1 out of memory (val not taken). */
int kv_put(const char *key, size_t klen, uint8_t *val, uint32_t vlen);
int kv_del(const char *key, size_t klen);	/* 1 deleted, 0 absent */
size_t kv_count(void);
uint64_t kv_live_bytes(void);			/* log bytes a snapshot of the live keys needs */
struct kv_iter { size_t bucket; struct kv_entry *e; };
void kv_iter_start(struct kv_iter *it);
struct kv_entry *kv_iter_next(struct kv_iter *it);

/* ---- wal.c: the write-ahead log ---- */
#define OP_PUT	1
#define OP_DEL	2

struct hconn;
struct op {
	struct op *next;
	struct hconn *hc;		/* NULL once the connection is gone */
	uint8_t type;
	uint16_t klen;
	uint32_t vlen;
	uint8_t *val;			/* umalloc'd body (PUT), handed to the index on commit */
	uint32_t reserved;		/* budget reserved (PUT) */
	uint32_t claim;			/* the replaced value's kv_entry.claim we set, 0 */
	char key[MAX_KEY];
};

/* Commit results handed to http_commit_done */
#define COMMIT_OK	0
#define COMMIT_IOERR	1	/* the disk failed: 503 */
#define COMMIT_FULL	2	/* does not fit the log: 507 */

static inline uint32_t wal_record_size(uint32_t klen, uint32_t vlen)
{
	return (32 + klen + vlen + 7) & ~7u;
}

struct wal_stats {
	uint64_t batches, records, flushes, compactions, bytes_written;
	uint64_t recovered_records, recovered_bytes;
	int torn_tail;
};
extern struct wal_stats wal_stats;
extern struct vblk disk;

/* Set up the disk (reset, negotiate), read or create the superblock, replay the
 * log into the index, start a new epoch.  0, or -1 with *why set. */
int wal_open(const char **why);
int wal_follow(const char **why);	/* standby: replay what is there, read-only */
/* Stop using the disk (no request in flight): reset the device. */
void wal_close(void);
int wal_is_open(void);
int wal_failed(void);
/* Reserve live-data budget for a pending PUT; 0, or -1 if it would not fit (507). */
int wal_reserve(uint32_t bytes);
void wal_unreserve(uint32_t bytes);
void wal_submit(struct op *op);		/* queued; http_commit_done() later */
int wal_poll(void);			/* completions; nonzero if anything happened */
void wal_pump(void);			/* start the next batch if the disk is idle */
int wal_idle(void);			/* nothing queued or in flight */
int wal_arm(void);
int wal_in_flight(void);		/* a disk request is outstanding */
void wal_disarm(void);
void wal_interrupt(void);

/* ---- http.c: the service and the agent ---- */
void http_init(void);
extern const struct vs_callbacks webkv_callbacks;
void http_commit_done(struct op *op, int result);
void http_tick(uint64_t now);			/* time-outs */
void http_resume(void);				/* connections paused for output that drained */
void http_reap(void);				/* free closed connections (end of a loop round) */
int http_busy(void);				/* connections that need the timer */
void http_drain(void);				/* release: hand port-80 connections back */
unsigned http_port_conns(void);		/* port-80 connections not yet closed */
void agent_reply_all(int which, const char *line);
#define AGENT_WAIT_RELEASE	1
#define AGENT_WAIT_ACQUIRE	2
#define AGENT_WAIT_FOREVER	3	/* the never-serving fault: no reply, ever */
enum fault {	/* injected faults: see main.c */
	FAULT_NONE, FAULT_NEVER_SERVING, FAULT_RELEASE_REFUSED, FAULT_RELEASE_HANG,
	FAULT_RELEASE_CLOSE, FAULT_CRASH_ON_ACQUIRE, FAULT_AGENT_CLOSE, FAULT_VSOCK_RING_ERROR, N_FAULTS
};
int fault_fires(enum fault f);

/* main.c: the agent's commands */
int begin_release(void);
/* Console lines that can wait: queued, and written when the loop has nothing else
 * to do (or 2 KiB are waiting), because every console write is a system call and
 * two exits per 16 bytes, ~1-2 ms for a long line: not in the hand-off path. */
__attribute__((format(printf, 1, 2))) void wlog(const char *fmt, ...);
void wlog_flush(void);		/* 1 already released, 0 reply later, -1 refused (fault) */
int do_acquire(char *reply, size_t size);	/* 0 serving, -1 error, 1 no reply (fault) */
int arm_fault(const char *name);	/* a fault's name (main.c) or "none"; -1 unknown */

#endif
