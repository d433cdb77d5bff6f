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
 * So this library, loaded RTLD_GLOBAL before pyfuse3 (atomicfs/fuseconn.py), provides
 * fuse_session_new: it wraps the operations' init callback and passes the call on to
 * libfuse's own (looked up in libfuse3.so.3 itself: pyfuse3 loads it RTLD_LOCAL, out of
 * RTLD_NEXT's reach). The wrapper calls pyfuse3's init, then clears the flags asked
 * for. It changes nothing else and fails safe: without it, the flag simply stays on.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 32
#include <dlfcn.h>
#include <fuse3/fuse_lowlevel.h>
#include <stddef.h>
#include <string.h>

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
