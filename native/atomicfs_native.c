/*
 * atomicfs native core: the bytes-moving half of the filesystem.
 *
 * Python decides what to do; these functions do the work that must be fast or must not hold
 * the GIL: aligned buffers, copies, CRC32C (ISA-L), vectored O_DIRECT I/O with
 * pwritev2/preadv2 (RWF_ATOMIC where asked), the statx atomic-write probe and the free-space
 * bitmap search. cffi releases the GIL around every call, and the I/O functions are run from
 * trio worker threads, so the event loop keeps serving FUSE requests while a device write is
 * in flight.
 *
 * Every function that touches the kernel returns a negative errno on failure instead of
 * setting errno, so that the caller in another thread needs no thread-local state.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/fs.h>
#include <isa-l/crc.h>

#include "atomicfs_native.h"

/* Debian 12's UAPI headers predate the untorn-write interface (Linux 6.11). */
#ifndef RWF_ATOMIC
#define RWF_ATOMIC 0x00000040
#endif
#include "afs_statx.h"

int afs_rwf_atomic(void) { return RWF_ATOMIC; }

void *afs_alloc(size_t size, size_t align)
{
    void *p = NULL;
    if (posix_memalign(&p, align, size ? size : align) != 0)
        return NULL;
    memset(p, 0, size);
    return p;
}

void afs_free(void *p) { free(p); }

void afs_copy(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }

void afs_zero(void *dst, size_t n) { memset(dst, 0, n); }

int afs_is_zero(const void *p, size_t n)
{
    const unsigned char *c = p;
    /* Compare the buffer with itself shifted by one byte after checking the first byte. */
    return n == 0 || (c[0] == 0 && memcmp(c, c + 1, n - 1) == 0);
}

uint32_t afs_crc32c(uint32_t crc, const void *p, size_t n)
{
    /* ISA-L returns the raw register; keep the usual convention: start at 0, chainable. */
    uint32_t reg = ~crc;
    const unsigned char *c = p;
    while (n > 0) {
        int chunk = n > (1u << 30) ? (1 << 30) : (int)n;
        reg = crc32_iscsi((unsigned char *)c, chunk, reg);
        c += chunk;
        n -= (size_t)chunk;
    }
    return ~reg;
}

/* Copy the caller's vector into iov; returns the total length (0 for a bad count). */
static size_t fill_iov(struct iovec *iov, void *const *bufs, const size_t *lens, int n)
{
    size_t total = 0;
    if (n <= 0 || n > AFS_MAX_IOV)
        return 0;
    for (int i = 0; i < n; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = lens[i];
        total += lens[i];
    }
    return total;
}

/* Step past r bytes of the vector after a short transfer. */
static void advance_iov(struct iovec **cur, int *left, size_t r)
{
    while (*left > 0 && r >= (*cur)->iov_len) {
        r -= (*cur)->iov_len;
        (*cur)++;
        (*left)--;
    }
    if (*left > 0 && r > 0) {
        (*cur)->iov_base = (char *)(*cur)->iov_base + r;
        (*cur)->iov_len -= r;
    }
}

/* Write the whole vector, resuming after short writes. A short write of an RWF_ATOMIC
 * request would break its promise, so it is reported as EIO instead of resumed. */
static int64_t afs_pwritev(int fd, void *const *bufs, const size_t *lens, int n, int64_t off,
                           int flags)
{
    struct iovec iov[AFS_MAX_IOV];
    size_t total = fill_iov(iov, bufs, lens, n);
    if (total == 0)
        return -EINVAL;
    struct iovec *cur = iov;
    int left = n;
    size_t done = 0;
    while (done < total) {
        ssize_t r = pwritev2(fd, cur, left, off + (off_t)done, flags);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0 || ((size_t)r < total - done && (flags & RWF_ATOMIC)))
            return -EIO;
        done += (size_t)r;
        advance_iov(&cur, &left, (size_t)r);
    }
    return (int64_t)done;
}

/* Read the whole vector; bytes past the end of the backing store read as zeros. */
static int64_t afs_preadv(int fd, void *const *bufs, const size_t *lens, int n, int64_t off)
{
    struct iovec iov[AFS_MAX_IOV];
    size_t total = fill_iov(iov, bufs, lens, n);
    if (total == 0)
        return -EINVAL;
    struct iovec *cur = iov;
    int left = n;
    size_t done = 0;
    while (done < total) {
        ssize_t r = preadv2(fd, cur, left, off + (off_t)done, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0) {
            for (int i = 0; i < left; i++)
                memset(cur[i].iov_base, 0, cur[i].iov_len);
            return (int64_t)total;
        }
        done += (size_t)r;
        advance_iov(&cur, &left, (size_t)r);
    }
    return (int64_t)done;
}

static int afs_fdatasync(int fd)
{
    while (fdatasync(fd) != 0) {
        if (errno != EINTR)
            return -errno;
    }
    return 0;
}

int afs_probe(int fd, struct afs_probe_result *out)
{
    struct stat st;
    memset(out, 0, sizeof(*out));
    if (fstat(fd, &st) != 0)
        return -errno;
    out->is_blockdev = S_ISBLK(st.st_mode) ? 1 : 0;
    out->logical_block_size = 512;
    if (out->is_blockdev) {
        uint64_t bytes = 0;
        int ssz = 0;
        if (ioctl(fd, BLKGETSIZE64, &bytes) != 0)
            return -errno;
        if (ioctl(fd, BLKSSZGET, &ssz) == 0 && ssz > 0)
            out->logical_block_size = (uint32_t)ssz;
        out->size = bytes;
    } else {
        out->size = (uint64_t)st.st_size;
    }
    struct afs_statx sx;
    memset(&sx, 0, sizeof(sx));
    if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, AFS_STATX_WRITE_ATOMIC | AFS_STATX_DIOALIGN,
                &sx) == 0) {
        if (sx.stx_mask & AFS_STATX_DIOALIGN) {
            out->dio_mem_align = sx.stx_dio_mem_align;
            out->dio_offset_align = sx.stx_dio_offset_align;
        }
        if (sx.stx_mask & AFS_STATX_WRITE_ATOMIC) {
            out->atomic_unit_min = sx.stx_atomic_write_unit_min;
            out->atomic_unit_max = sx.stx_atomic_write_unit_max;
            out->atomic_segments_max = sx.stx_atomic_write_segments_max;
        }
    }
    return 0;
}

/* ---- free-space bitmap: bit set = block in use ---- */

static inline int bit_get(const uint8_t *bm, int64_t i) { return (bm[i >> 3] >> (i & 7)) & 1; }

void afs_bitmap_set(uint8_t *bm, int64_t start, int64_t count, int value)
{
    int64_t i = start, end = start + count;
    while (i < end && (i & 7)) {
        if (value) bm[i >> 3] |= (uint8_t)(1u << (i & 7));
        else bm[i >> 3] &= (uint8_t)~(1u << (i & 7));
        i++;
    }
    if (end - i >= 8) {
        int64_t bytes = (end - i) >> 3;
        memset(bm + (i >> 3), value ? 0xff : 0x00, (size_t)bytes);
        i += bytes << 3;
    }
    while (i < end) {
        if (value) bm[i >> 3] |= (uint8_t)(1u << (i & 7));
        else bm[i >> 3] &= (uint8_t)~(1u << (i & 7));
        i++;
    }
}

int64_t afs_bitmap_count_set(const uint8_t *bm, int64_t start, int64_t count)
{
    int64_t n = 0, i = start, end = start + count;
    while (i < end && (i & 7)) n += bit_get(bm, i++);
    while (end - i >= 8) { n += __builtin_popcount(bm[i >> 3]); i += 8; }
    while (i < end) n += bit_get(bm, i++);
    return n;
}

/* Length of the run of clear bits starting at i, up to limit. */
static int64_t clear_run(const uint8_t *bm, int64_t i, int64_t limit)
{
    int64_t j = i;
    while (j < limit && (j & 7)) { if (bit_get(bm, j)) return j - i; j++; }
    while (limit - j >= 8 && bm[j >> 3] == 0) j += 8;
    while (j < limit) { if (bit_get(bm, j)) break; j++; }
    return j - i;
}

/*
 * Find free space in [lo, hi): the first position p >= goal (wrapping around to lo) with
 * p % align == 0 where at least `want` clear bits start. When no such run exists and
 * min_len < want, the longest aligned run of at least min_len is returned instead.
 * Returns the start, or -1; *found gets the usable length (at most want).
 */
int64_t afs_bitmap_find(const uint8_t *bm, int64_t lo, int64_t hi, int64_t goal, int64_t want,
                        int64_t min_len, int64_t align, int64_t *found)
{
    int64_t best = -1, best_len = 0;
    if (align < 1) align = 1;
    if (goal < lo || goal >= hi) goal = lo;
    for (int pass = 0; pass < 2; pass++) {
        int64_t from = pass == 0 ? goal : lo;
        int64_t to = pass == 0 ? hi : goal;
        int64_t i = from;
        while (i < to) {
            /* skip whole used bytes quickly */
            if (!(i & 7) && to - i >= 8 && bm[i >> 3] == 0xff) { i += 8; continue; }
            if (bit_get(bm, i)) { i++; continue; }
            int64_t start = i;
            if (start % align) start += align - start % align;
            if (start >= hi) break;
            if (start > i) {
                int64_t gap = clear_run(bm, i, start);
                if (gap < start - i) { i += gap + 1; continue; }
            }
            /* Runs are never used beyond want: measuring one further would scan all the
             * free space after goal on every call (a sequential writeback allocates per
             * folio run, each time right after the last allocation). */
            int64_t len = clear_run(bm, start, hi - start > want ? start + want : hi);
            if (len >= want) { *found = want; return start; }
            if (len >= min_len && len > best_len) { best = start; best_len = len; }
            i = start + len + 1;
        }
    }
    if (best >= 0) {
        /* keep partial allocations aligned in length too */
        best_len -= best_len % align;
        if (best_len < min_len) return -1;
        *found = best_len;
    }
    return best;
}

/* ---- asynchronous I/O queue ----
 *
 * trio.to_thread costs two GIL hand-overs per request, which under load costs more than a
 * flush of a loop device. Here plain pthreads take requests off a queue, run them with no
 * Python involved, put them on a completion list and bump an eventfd that the trio loop
 * waits on. The test layers of the device (fault injection, a slow device, recording of
 * every write and flush) live here too, so that every request takes the same path.
 */
#include <pthread.h>
#include <sys/eventfd.h>
#include <time.h>
#include <stdio.h>

#define AFS_MAX_THREADS 16

struct afs_ioq {
    pthread_mutex_t lock;
    pthread_cond_t work;
    struct afs_io *head, *tail;     /* submitted */
    struct afs_io *done;            /* completed, LIFO; reap reverses */
    int efd;
    int nthreads;
    int stopping;
    pthread_t threads[AFS_MAX_THREADS];
    /* test layers */
    pthread_mutex_t test_lock;
    int64_t delay_usec;
    int inject_mask;
    int64_t inject_left;            /* < 0: unlimited */
    int record_fd;
    uint64_t record_seq;
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t r = write(fd, c, n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        c += r;
        n -= (size_t)r;
    }
    return 0;
}

/* One record of the recording (format: atomicfs_native.h, AFS_REC_*), then the data of a
 * completed write. Returns the record's seq. */
static uint64_t record_event(struct afs_ioq *q, unsigned char type, int64_t off, uint32_t len,
                             uint32_t flags, uint64_t ref, struct afs_io *io)
{
    unsigned char hdr[AFS_REC_HEADER_SIZE];
    pthread_mutex_lock(&q->test_lock);
    uint64_t seq = ++q->record_seq;
    int64_t t = now_ns();
    hdr[AFS_REC_OFF_TYPE] = type;
    memcpy(hdr + AFS_REC_OFF_SEQ, &seq, 8);
    memcpy(hdr + AFS_REC_OFF_OFFSET, &off, 8);
    memcpy(hdr + AFS_REC_OFF_LENGTH, &len, 4);
    memcpy(hdr + AFS_REC_OFF_FLAGS, &flags, 4);
    memcpy(hdr + AFS_REC_OFF_TIME, &t, 8);
    memcpy(hdr + AFS_REC_OFF_REF, &ref, 8);
    write_all(q->record_fd, hdr, sizeof(hdr));
    if (io != NULL) {  /* len bytes of data: a short write records what it wrote */
        size_t left = len;
        for (int i = 0; i < io->niov && left > 0; i++) {
            size_t n = io->lens[i] < left ? io->lens[i] : left;
            write_all(q->record_fd, io->bufs[i], n);
            left -= n;
        }
    }
    pthread_mutex_unlock(&q->test_lock);
    return seq;
}

static uint32_t io_length(struct afs_io *io)
{
    size_t n = 0;
    for (int i = 0; i < io->niov; i++)
        n += io->lens[i];
    return (uint32_t)n;
}

static uint32_t record_flags(struct afs_io *io)
{
    static const uint32_t kind_flag[] = {
        [AFS_KIND_SUPER] = AFS_REC_FLAG_SUPER, [AFS_KIND_LOG] = AFS_REC_FLAG_LOG,
        [AFS_KIND_SNAPSHOT] = AFS_REC_FLAG_SNAPSHOT, [AFS_KIND_DATA] = AFS_REC_FLAG_DATA};
    uint32_t f = io->kind >= 0 && io->kind <= AFS_KIND_DATA ? kind_flag[io->kind] : 0;
    if (io->flags & RWF_ATOMIC) f |= AFS_REC_FLAG_ATOMIC;
    if (io->flags & 0x2 /* RWF_DSYNC */) f |= AFS_REC_FLAG_DSYNC;
    return f;
}

/* Consume one matching injection; nonzero if this request must fail. */
static int injected(struct afs_ioq *q, int kind)
{
    int hit = 0;
    if (!q->inject_mask)
        return 0;
    pthread_mutex_lock(&q->test_lock);
    if ((q->inject_mask & (1 << kind)) && q->inject_left != 0) {
        hit = 1;
        if (q->inject_left > 0 && --q->inject_left == 0)
            q->inject_mask = 0;
    }
    pthread_mutex_unlock(&q->test_lock);
    return hit;
}

static void perform_flush(struct afs_ioq *q, struct afs_io *io);

static void perform(struct afs_ioq *q, struct afs_io *io)
{
    if (io->op == AFS_OP_FLUSH) {
        perform_flush(q, io);
        return;
    }
    if (io->op == AFS_OP_READ) {
        if (injected(q, AFS_KIND_READ)) {
            io->result = -EIO;
            return;
        }
        io->result = afs_preadv(io->fd, io->bufs, io->lens, io->niov, io->offset);
        return;
    }
    if (q->delay_usec > 0) {  /* a slow device: every write takes at least this long */
        struct timespec ts = {q->delay_usec / 1000000, (q->delay_usec % 1000000) * 1000};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
    }
    if (injected(q, io->kind)) {
        io->result = -EIO;
        return;
    }
    uint64_t submitted = 0;
    if (q->record_fd >= 0)
        submitted = record_event(q, AFS_REC_WRITE_SUBMIT, io->offset, io_length(io),
                                 record_flags(io), 0, NULL);
    io->result = afs_pwritev(io->fd, io->bufs, io->lens, io->niov, io->offset, io->flags);
    if (io->result > 0 && q->record_fd >= 0)
        record_event(q, AFS_REC_WRITE, io->offset, (uint32_t)io->result, record_flags(io),
                     submitted, io);
    if (io->result > 0 && io->op == AFS_OP_WRITE_FLUSH) {
        int64_t written = io->result;
        perform_flush(q, io);
        if (io->result == 0)
            io->result = written;
    }
}

static void perform_flush(struct afs_ioq *q, struct afs_io *io)
{
    uint64_t started = 0;
    if (q->record_fd >= 0)
        started = record_event(q, AFS_REC_FLUSH_START, 0, 0, 0, 0, NULL);
    if (injected(q, AFS_KIND_FLUSH)) {
        io->result = -EIO;
        return;
    }
    io->result = afs_fdatasync(io->fd);
    if (io->result == 0 && q->record_fd >= 0)
        record_event(q, AFS_REC_FLUSH_END, 0, 0, 0, started, NULL);
}

static void *worker(void *arg)
{
    struct afs_ioq *q = arg;
    uint64_t one = 1;
    for (;;) {
        pthread_mutex_lock(&q->lock);
        while (q->head == NULL && !q->stopping)
            pthread_cond_wait(&q->work, &q->lock);
        if (q->head == NULL && q->stopping) {
            pthread_mutex_unlock(&q->lock);
            return NULL;
        }
        struct afs_io *io = q->head;
        q->head = io->next;
        if (q->head == NULL)
            q->tail = NULL;
        pthread_mutex_unlock(&q->lock);

        perform(q, io);

        pthread_mutex_lock(&q->lock);
        io->next = q->done;
        q->done = io;
        pthread_mutex_unlock(&q->lock);
        while (write(q->efd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
    }
}

struct afs_ioq *afs_ioq_new(int nthreads)
{
    struct afs_ioq *q = calloc(1, sizeof(*q));
    if (q == NULL)
        return NULL;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > AFS_MAX_THREADS) nthreads = AFS_MAX_THREADS;
    pthread_mutex_init(&q->lock, NULL);
    pthread_mutex_init(&q->test_lock, NULL);
    pthread_cond_init(&q->work, NULL);
    q->record_fd = -1;
    q->inject_left = -1;
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0) {
        free(q);
        return NULL;
    }
    for (int i = 0; i < nthreads; i++) {
        if (pthread_create(&q->threads[i], NULL, worker, q) != 0)
            break;
        q->nthreads++;
    }
    if (q->nthreads == 0) {
        close(q->efd);
        free(q);
        return NULL;
    }
    return q;
}

int afs_ioq_eventfd(struct afs_ioq *q) { return q->efd; }

void afs_ioq_submit(struct afs_ioq *q, struct afs_io *io)
{
    io->next = NULL;
    pthread_mutex_lock(&q->lock);
    if (q->tail)
        q->tail->next = io;
    else
        q->head = io;
    q->tail = io;
    pthread_cond_signal(&q->work);
    pthread_mutex_unlock(&q->lock);
}

int afs_ioq_reap(struct afs_ioq *q, struct afs_io **out, int max)
{
    uint64_t v;
    while (read(q->efd, &v, sizeof(v)) < 0 && errno == EINTR)
        ;
    pthread_mutex_lock(&q->lock);
    int n = 0;
    while (q->done != NULL && n < max) {
        struct afs_io *io = q->done;
        q->done = io->next;
        out[n++] = io;
    }
    int more = q->done != NULL;
    pthread_mutex_unlock(&q->lock);
    if (more) {  /* keep the eventfd readable for the rest */
        uint64_t one = 1;
        while (write(q->efd, &one, sizeof(one)) < 0 && errno == EINTR)
            ;
    }
    return n;
}

void afs_ioq_execute(struct afs_ioq *q, struct afs_io *io) { perform(q, io); }

void afs_ioq_free(struct afs_ioq *q)
{
    pthread_mutex_lock(&q->lock);
    q->stopping = 1;
    pthread_cond_broadcast(&q->work);
    pthread_mutex_unlock(&q->lock);
    for (int i = 0; i < q->nthreads; i++)
        pthread_join(q->threads[i], NULL);
    close(q->efd);
    pthread_mutex_destroy(&q->lock);
    pthread_mutex_destroy(&q->test_lock);
    pthread_cond_destroy(&q->work);
    free(q);
}

void afs_ioq_set_delay(struct afs_ioq *q, int64_t usec) { q->delay_usec = usec; }

void afs_ioq_set_inject(struct afs_ioq *q, int kind_mask, int64_t count)
{
    pthread_mutex_lock(&q->test_lock);
    q->inject_mask = kind_mask;
    q->inject_left = count;
    pthread_mutex_unlock(&q->test_lock);
}

int64_t afs_ioq_inject_left(struct afs_ioq *q) { return q->inject_mask ? q->inject_left : 0; }

int afs_ioq_set_record(struct afs_ioq *q, int fd)
{
    pthread_mutex_lock(&q->test_lock);
    q->record_fd = fd;
    pthread_mutex_unlock(&q->test_lock);
    return 0;
}

/* ------------------------------------------------------------------ request loop spin */

#include <poll.h>

/* Poll fd (/dev/fuse) and other_fd (the I/O queue's eventfd) without sleeping, for up to
 * max_ns: 1 if fd became readable, 2 if other_fd did, 0 if neither. Called by the request
 * loop (atomicfs/fuseloop.py) with the GIL released, between a reply and the next request:
 * on a VM guest whose idle vCPUs halt at once, a request that comes within a few tens of
 * microseconds finds the daemon awake instead of paying a halt and a wake-up. */
int afs_poll_spin(int fd, int other_fd, int64_t max_ns)
{
    struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = other_fd, .events = POLLIN}};
    int64_t end = now_ns() + max_ns;
    do {
        if (poll(p, 2, 0) > 0) /* (poll skips a negative other_fd) */
            return (p[0].revents & (POLLIN | POLLERR | POLLHUP)) ? 1 : 2;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    } while (now_ns() < end);
    return 0;
}
