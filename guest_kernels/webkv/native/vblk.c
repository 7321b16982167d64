/*
 * ulib/dev/vblk.h's API over a file (webkv-native): the disk is `disk=FILE`.
 * Requests go, in order, to one I/O thread (pread, pwrite, fdatasync for FLUSH),
 * as they go to pyvmm's virtio-blk worker; completions come back through a ring
 * and an eventfd, which wakes SYS_wait_interrupt with bit NATIVE_IRQ_BLK.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include "ulib.h"
#include "dev/vblk.h"
#include "native.h"

struct request {
	uint32_t type, len;
	uint64_t sector;
	void *buf, *cookie;
	int status;
};

/* submitted requests (ring), then completed ones (ring); both under lock */
static struct request sub[VBLK_QUEUE], done[VBLK_QUEUE];
static unsigned sub_head, sub_n, done_head, done_n, busy;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work = PTHREAD_COND_INITIALIZER, idle = PTHREAD_COND_INITIALIZER;
static int fd = -1, evfd = -1;
static uint32_t dummy_regs;		/* dev.regs != NULL: "there is a disk" */

static int do_io(const struct request *r)
{
	size_t at = 0;
	off_t off = (off_t)r->sector * VBLK_SECTOR;

	if (r->type == VBLK_T_FLUSH)
		return fdatasync(fd) ? VBLK_S_IOERR : VBLK_S_OK;
	if (r->type != VBLK_T_IN && r->type != VBLK_T_OUT)
		return VBLK_S_UNSUPP;
	while (at < r->len) {
		ssize_t n = r->type == VBLK_T_IN ? pread(fd, (char *)r->buf + at, r->len - at, off + at)
						 : pwrite(fd, (char *)r->buf + at, r->len - at, off + at);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return VBLK_S_IOERR;
		at += n;
	}
	return VBLK_S_OK;
}

static void *io_thread(void *arg)
{
	uint64_t one = 1;

	(void)arg;
	pthread_mutex_lock(&lock);
	for (;;) {
		struct request r;
		while (!sub_n)
			pthread_cond_wait(&work, &lock);
		r = sub[sub_head];
		sub_head = (sub_head + 1) % VBLK_QUEUE;
		sub_n--;
		busy = 1;
		pthread_mutex_unlock(&lock);
		r.status = do_io(&r);
		pthread_mutex_lock(&lock);
		done[(done_head + done_n++) % VBLK_QUEUE] = r;
		busy = 0;
		pthread_cond_broadcast(&idle);
		if (write(evfd, &one, 8) != 8)
			native_die("webkv-native: eventfd");
	}
	return NULL;
}

int vblk_init(struct vblk *b, int nth)
{
	const char *path = uarg("disk");
	static pthread_t thread;
	struct stat st;

	b->ready = 0;
	if (nth || !path || !*path)
		return VIRTIO_E_NODEV;
	b->dev.regs = &dummy_regs;
	b->dev.irq = NATIVE_IRQ_BLK;
	if (fd < 0) {
		b->read_only = 0;
		fd = open(path, O_RDWR | O_CLOEXEC);
		if (fd < 0 && (errno == EACCES || errno == EROFS)) {
			fd = open(path, O_RDONLY | O_CLOEXEC);
			b->read_only = 1;
		}
		if (fd < 0 || fstat(fd, &st)) {
			uprintf("webkv-native: cannot open disk %s\n", path);
			return VIRTIO_E_NODEV;
		}
		b->capacity = st.st_size / VBLK_SECTOR;
	}
	if (evfd < 0) {
		evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
		if (evfd < 0 || pthread_create(&thread, NULL, io_thread, NULL))
			native_die("webkv-native: disk thread");
		native_irq_fd(evfd, NATIVE_IRQ_BLK, 1);
	}
	b->has_flush = 1;
	b->nslots = b->nfree = VBLK_QUEUE;
	b->ready = 1;
	return 0;
}

void vblk_stop(struct vblk *b)
{
	pthread_mutex_lock(&lock);
	while (sub_n || busy)		/* nothing is served or completes after this */
		pthread_cond_wait(&idle, &lock);
	done_n = 0;
	pthread_mutex_unlock(&lock);
	if (fd >= 0)
		close(fd);		/* the disk is free for the next mount */
	fd = -1;
	b->ready = 0;
	b->nfree = 0;
}

int vblk_submit(struct vblk *b, uint32_t type, uint64_t sector, void *buf, uint32_t len, void *cookie)
{
	if (!b->ready || !b->nfree)
		return -1;
	if (type != VBLK_T_FLUSH &&
	    (len % VBLK_SECTOR || sector > b->capacity || len / VBLK_SECTOR > b->capacity - sector))
		return -1;
	b->nfree--;
	b->requests++;
	pthread_mutex_lock(&lock);
	sub[(sub_head + sub_n++) % VBLK_QUEUE] = (struct request){ type, len, sector, buf, cookie, 0 };
	pthread_mutex_unlock(&lock);
	return 0;
}

/* vblk_kick(): wake the I/O thread (the disk's queue is the only one kicked). */
void virtq_kick(struct virtq *q)
{
	(void)q;
	pthread_mutex_lock(&lock);
	pthread_cond_signal(&work);
	pthread_mutex_unlock(&lock);
}

int vblk_complete(struct vblk *b, void **cookie)
{
	struct request r;

	pthread_mutex_lock(&lock);
	if (!done_n) {
		pthread_mutex_unlock(&lock);
		return -1;
	}
	r = done[done_head];
	done_head = (done_head + 1) % VBLK_QUEUE;
	done_n--;
	pthread_mutex_unlock(&lock);
	b->nfree++;
	if (r.status != VBLK_S_OK)
		b->errors++;
	*cookie = r.cookie;
	return r.status;
}

static int has_done(void)
{
	int n;

	pthread_mutex_lock(&lock);
	n = done_n;
	pthread_mutex_unlock(&lock);
	return n > 0;
}

int vblk_arm(struct vblk *b)
{
	return b->ready && vblk_inflight(b) && has_done();
}

void vblk_disarm(struct vblk *b) { (void)b; }

int vblk_interrupt(struct vblk *b) { (void)b; return 0; }	/* the eventfd is read by the wait */

int vblk_sync(struct vblk *b, uint32_t type, uint64_t sector, void *buf, uint32_t len, uint64_t *irqs)
{
	void *cookie = NULL, *want = &cookie;
	int st;

	(void)irqs;
	if (vblk_submit(b, type, sector, buf, len, want))
		return VBLK_S_IOERR;
	vblk_kick(b);	/* virtq_kick above */
	for (;;) {
		pthread_mutex_lock(&lock);
		while (!done_n)
			pthread_cond_wait(&idle, &lock);
		pthread_mutex_unlock(&lock);
		while ((st = vblk_complete(b, &cookie)) >= 0)
			if (cookie == want)
				return st;
	}
}
