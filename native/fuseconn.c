/*
 * libatomicfs-fuseconn.so: the FUSE connection's capabilities that libfuse sets by default
 * and pyfuse3 gives a filesystem no way to change.
 *
 * libfuse 3 turns FUSE_CAP_AUTO_INVAL_DATA on for every filesystem: the kernel then drops a
 * file's whole page cache whenever a getattr reply shows a new mtime. Without writeback
 * caching every write changes the mtime, so every stat or lseek(SEEK_END) after a write
 * threw the file's cache away and the next reads all came to the daemon (pgbench: one FUSE
 * read per transaction). atomicfs does not need it: every change to a file's data passes
 * through the kernel (no other writer, no direct_io handles, one mount per disk), so the
 * cache cannot go stale. The filesystem's init callback could clear the flag in conn->want,
 * but pyfuse3 (3.5) keeps that callback to itself.
 *
 * FUSE_HANDLE_KILLPRIV_V2 is the other: without it the kernel asks for the
 * security.capability attribute before every write (one more round trip per write, 40% of
 * a cached 16 KiB write); with it the superblock is SB_NOSEC and the kernel asks once per
 * inode, leaving the clearing of setuid/setgid bits on write, truncate, chown and
 * open(O_TRUNC) to the filesystem, which it flags in the request. Debian 12's libfuse
 * (3.14) does not know the flag, so it can neither offer it nor pass the request flags on.
 *
 * So this library, loaded RTLD_GLOBAL before pyfuse3 (atomicfs/fuseconn.py), provides
 * fuse_session_new and fuse_session_mount. The first wraps the operations' init callback
 * and passes the call on to libfuse's own (looked up in libfuse3.so.3 itself: pyfuse3 loads
 * it RTLD_LOCAL, out of RTLD_NEXT's reach); the wrapper calls pyfuse3's init, then clears
 * the flags asked for. The second mounts, then gives the session custom I/O (libfuse's
 * fuse_session_custom_io) that reads and writes /dev/fuse as libfuse would, and on the way
 * adds FUSE_HANDLE_KILLPRIV_V2 to the INIT reply when the kernel offers it and notes
 * whether the request just read asks to clear setuid/setgid bits. pyfuse3 starts the
 * handler of a request before it reads the next (the handler runs to its first await in
 * the same task, see _session_loop), so a handler that asks first thing gets the answer
 * for its own request. It fails safe: without the library nothing is added, and the
 * kernel clears the bits and asks for security.capability itself as before.
 *
 * The custom I/O also serves the daemon's request loop (atomicfs/fuseloop.py), whose idle
 * workers wait for work in the loop and not on /dev/fuse: it gives the loop the fd, and an
 * eventfd that becomes readable when a read finds the connection gone (ENODEV: unmounted),
 * so the loop can wake them to return.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 32
#include <dlfcn.h>
#include <fuse3/fuse_lowlevel.h>
#include <linux/fuse.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);
typedef void (*init_fn)(void *, struct fuse_conn_info *);

static unsigned clear_want;      /* capabilities to take out of conn->want */
static int state;                /* 0: no init yet; 1: init ran; -1: no libfuse below */
static unsigned want_seen;       /* conn->want as the session was set up */
static unsigned capable_seen;    /* conn->capable, what the kernel offered */
static init_fn next_init;
static struct fuse_lowlevel_ops ops;

void afs_fuseconn_clear(unsigned flags) { clear_want = flags; }
int afs_fuseconn_state(void) { return state; }
unsigned afs_fuseconn_want(void) { return want_seen; }
unsigned afs_fuseconn_capable(void) { return capable_seen; }

static void wrapped_init(void *userdata, struct fuse_conn_info *conn)
{
    if (next_init)
        next_init(userdata, conn);
    conn->want &= ~clear_want;
    want_seen = conn->want;
    capable_seen = conn->capable;
    state = 1;
}

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    static session_new_fn next;
    if (!next) {
        void *libfuse = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_LOCAL);
        if (libfuse)
            next = (session_new_fn)dlvsym(libfuse, "fuse_session_new", "FUSE_3.0");
    }
    if (!next) {
        state = -1;
        return NULL;
    }
    if (op_size > sizeof(ops)) /* a newer caller than these headers: leave it alone */
        return next(args, op, op_size, userdata);
    memset(&ops, 0, sizeof(ops));
    memcpy(&ops, op, op_size);
    next_init = ops.init;
    ops.init = wrapped_init;
    return next(args, &ops, op_size, userdata);
}

/* ---- custom I/O: the INIT reply's FUSE_HANDLE_KILLPRIV_V2 and the requests' kill flags ---- */

typedef int (*session_mount_fn)(struct fuse_session *, const char *);
typedef int (*custom_io_fn)(struct fuse_session *, const struct fuse_custom_io *, int);
typedef int (*session_fd_fn)(struct fuse_session *);

static unsigned add_init;        /* FUSE_* INIT flags to add to the reply, if offered */
static uint64_t init_unique;     /* the INIT request, until its reply is written */
static uint32_t init_offered;    /* the kernel's INIT flags */
static uint32_t init_replied;    /* the INIT reply's flags, once custom I/O sent it */
static int kill_suidgid;         /* the last request read asks to clear setuid/setgid */
static uint32_t kill_uid, kill_gid, kill_pid;  /* and who sent it */

static int conn_fd = -1;         /* /dev/fuse, once custom I/O reads it */
static int end_fd = -1;          /* eventfd: readable once a read found the connection gone */

void afs_fuseconn_add_init(unsigned flags) { add_init = flags; }
int afs_fuseconn_fd(void) { return conn_fd; }
int afs_fuseconn_end_fd(void) { return end_fd; }
unsigned afs_fuseconn_init_replied(void) { return init_replied; }
int afs_fuseconn_kill_suidgid(void) { return kill_suidgid; }
unsigned afs_fuseconn_kill_uid(void) { return kill_uid; }
unsigned afs_fuseconn_kill_gid(void) { return kill_gid; }
unsigned afs_fuseconn_kill_pid(void) { return kill_pid; }

static int request_kills_suidgid(const struct fuse_in_header *h, size_t n)
{
    const void *arg = h + 1;
    switch (h->opcode) {
    case FUSE_WRITE:
        return n >= sizeof(*h) + offsetof(struct fuse_write_in, lock_owner) &&
               (((const struct fuse_write_in *)arg)->write_flags & FUSE_WRITE_KILL_SUIDGID);
    case FUSE_SETATTR:
        return n >= sizeof(*h) + sizeof(struct fuse_setattr_in) &&
               (((const struct fuse_setattr_in *)arg)->valid & FATTR_KILL_SUIDGID);
    case FUSE_OPEN:
        return n >= sizeof(*h) + sizeof(struct fuse_open_in) &&
               (((const struct fuse_open_in *)arg)->open_flags & FUSE_OPEN_KILL_SUIDGID);
    default:
        return 0;
    }
}

static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
    (void)userdata;
    ssize_t n = read(fd, buf, len);
    if (n < 0 && errno == ENODEV && end_fd >= 0) {
        /* unmounted or aborted: libfuse ends the session; tell the request loop's idle
         * workers (atomicfs/fuseloop.py), which wait for work, not on /dev/fuse */
        int saved = errno;
        uint64_t one = 1;
        if (write(end_fd, &one, sizeof(one)) < 0) { /* cannot fail short of a bug */ }
        errno = saved;
    }
    kill_suidgid = 0;
    if (n >= (ssize_t)sizeof(struct fuse_in_header)) {
        const struct fuse_in_header *h = buf;
        if (h->opcode == FUSE_INIT &&
            (size_t)n >= sizeof(*h) + offsetof(struct fuse_init_in, max_readahead) + 8) {
            init_unique = h->unique;
            init_offered = ((const struct fuse_init_in *)(h + 1))->flags;
        } else {
            kill_suidgid = request_kills_suidgid(h, (size_t)n);
            if (kill_suidgid) {
                kill_uid = h->uid;
                kill_gid = h->gid;
                kill_pid = h->pid;
            }
        }
    }
    return n;
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    (void)userdata;
    if (init_unique && count >= 2 && iov[0].iov_len >= sizeof(struct fuse_out_header)) {
        const struct fuse_out_header *oh = iov[0].iov_base;
        if (oh->unique == init_unique) {
            init_unique = 0;
            if (oh->error == 0 && iov[1].iov_len >= offsetof(struct fuse_init_out, max_background)) {
                struct fuse_init_out *out = iov[1].iov_base;
                out->flags |= add_init & init_offered;
                if (out->flags & FUSE_HANDLE_KILLPRIV_V2)
                    out->flags &= ~FUSE_HANDLE_KILLPRIV; /* v2 replaces it */
                init_replied = out->flags;
            }
        }
    }
    return writev(fd, iov, count);
}

int fuse_session_mount(struct fuse_session *se, const char *mountpoint)
{
    static session_mount_fn next;
    static custom_io_fn custom_io;
    static session_fd_fn session_fd;
    static const struct fuse_custom_io io = {.writev = io_writev, .read = io_read};
    if (!next) {
        void *libfuse = dlopen("libfuse3.so.3", RTLD_NOW | RTLD_LOCAL);
        if (libfuse) {
            next = (session_mount_fn)dlvsym(libfuse, "fuse_session_mount", "FUSE_3.0");
            custom_io = (custom_io_fn)dlvsym(libfuse, "fuse_session_custom_io", "FUSE_3.0");
            session_fd = (session_fd_fn)dlvsym(libfuse, "fuse_session_fd", "FUSE_3.0");
        }
    }
    if (!next)
        return -1;
    int res = next(se, mountpoint);
    /* custom I/O only when something needs it: the same reads and writes, minus splice */
    if (res == 0 && add_init && custom_io && session_fd &&
        custom_io(se, &io, session_fd(se)) == 0) { /* on failure libfuse's own I/O stays */
        conn_fd = session_fd(se);
        end_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    }
    return res;
}
