/*
 * libatomicfs-preload.so: the kernel's untorn-write interface for unmodified programs on
 * atomicfs. Started by `atomicfs run -- CMD` through LD_PRELOAD.
 *
 * For a regular file on an atomicfs mount (FUSE_SUPER_MAGIC plus the virtual attribute
 * user.atomicfs.limits, cached per st_dev) it
 *   - accepts pwritev2/pwritev64v2 with RWF_ATOMIC, validated as the kernel's
 *     generic_atomic_write_valid and XFS do it (EINVAL: length not a power of two or
 *     outside [unit_min, unit_max], offset not aligned to the length, more than one
 *     segment), and makes the daemon treat the write as one untorn write: it announces
 *     it (setxattr user.atomicfs.control "write_begin=TOKEN:OFF:LEN:FLAGS"), issues it
 *     without the flag (the FUSE kernel would refuse it), then withdraws the
 *     announcement ("write_end=TOKEN");
 *   - maps RWF_WRITETHROUGH (the 2026 RFC's flag, 0x200, unknown to this kernel) to the
 *     daemon's RFC write-through and RWF_DSYNC on an atomic write to its durable one;
 *   - answers statx(STATX_WRITE_ATOMIC) with the file's limits.
 * The same through syscall(2) for SYS_statx and SYS_pwritev2. Everything else, and every
 * other filesystem, goes straight to libc. Not covered: io_uring, inline system calls,
 * mmap, statically linked programs.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <unistd.h>

#define AFS_FUSE_SUPER_MAGIC 0x65735546
#define AFS_RWF_DSYNC 0x00000002
#define AFS_RWF_SYNC 0x00000004
#define AFS_RWF_ATOMIC 0x00000040
#define AFS_RWF_WRITETHROUGH 0x00000200 /* "iomap: buffered RWF_WRITETHROUGH" (RFC, 2026) */
#define LIMITS_XATTR "user.atomicfs.limits"
#define CONTROL_XATTR "user.atomicfs.control"

#include "afs_statx.h"

struct limits {
    uint32_t unit_min, unit_max, segments_max, unit_max_opt;
};

typedef ssize_t (*pwritev2_fn)(int, const struct iovec *, int, off_t, int);
typedef int (*statx_fn)(int, const char *, int, unsigned int, void *);

static pwritev2_fn next_pwritev2(void)
{
    static _Atomic(pwritev2_fn) fn;
    pwritev2_fn f = atomic_load(&fn);
    if (!f) {
        f = (pwritev2_fn)dlsym(RTLD_NEXT, "pwritev2");
        atomic_store(&fn, f);
    }
    return f;
}

static statx_fn next_statx(void)
{
    static _Atomic(statx_fn) fn;
    statx_fn f = atomic_load(&fn);
    if (!f) {
        f = (statx_fn)dlsym(RTLD_NEXT, "statx");
        atomic_store(&fn, f);
    }
    return f;
}

/* ---- which devices are atomicfs mounts: a small cache, by st_dev ---- */

#define DEV_SLOTS 64
static struct {
    dev_t dev;
    int state; /* 0 empty, 1 atomicfs, 2 something else */
} dev_cache[DEV_SLOTS];
static pthread_mutex_t dev_lock = PTHREAD_MUTEX_INITIALIZER;

static int dev_lookup(dev_t dev)
{
    int state = 0;
    pthread_mutex_lock(&dev_lock);
    for (int i = 0; i < DEV_SLOTS; i++)
        if (dev_cache[i].state && dev_cache[i].dev == dev) {
            state = dev_cache[i].state;
            break;
        }
    pthread_mutex_unlock(&dev_lock);
    return state;
}

static void dev_remember(dev_t dev, int state)
{
    static unsigned next;
    pthread_mutex_lock(&dev_lock);
    dev_cache[next++ % DEV_SLOTS].dev = dev;
    dev_cache[(next - 1) % DEV_SLOTS].state = state;
    pthread_mutex_unlock(&dev_lock);
}

static int parse_limits(const char *text, ssize_t n, struct limits *out)
{
    char buf[128];
    if (n <= 0 || n >= (ssize_t)sizeof(buf))
        return -1;
    memcpy(buf, text, (size_t)n);
    buf[n] = 0;
    if (sscanf(buf, "%u %u %u %u", &out->unit_min, &out->unit_max, &out->segments_max,
               &out->unit_max_opt) != 4 || !out->unit_min || !out->unit_max)
        return -1;
    return 0;
}

/* The limits of the regular file open as fd if it is on atomicfs (0), else -1. errno is
 * left as it was. */
static int fd_limits(int fd, struct limits *out)
{
    int saved = errno;
    struct stat st;
    int ret = -1;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
        goto done;
    int state = dev_lookup(st.st_dev);
    if (state == 2)
        goto done;
    if (state == 0) {
        struct statfs sfs;
        if (fstatfs(fd, &sfs) != 0 || (uint32_t)sfs.f_type != AFS_FUSE_SUPER_MAGIC) {
            dev_remember(st.st_dev, 2);
            goto done;
        }
    }
    char text[128];
    ssize_t n = fgetxattr(fd, LIMITS_XATTR, text, sizeof(text));
    if (parse_limits(text, n, out) != 0) {
        if (state == 0)
            dev_remember(st.st_dev, 2); /* another FUSE filesystem */
        goto done;
    }
    if (state == 0)
        dev_remember(st.st_dev, 1);
    ret = 0;
done:
    errno = saved;
    return ret;
}

static int is_pow2(uint64_t x) { return x && !(x & (x - 1)); }

/* The kernel's checks for an atomic write (xfs_file_write_iter's limits, then
 * generic_atomic_write_valid): 0 or the errno. */
static int atomic_write_valid(const struct limits *lim, int iovcnt, uint64_t len,
                              uint64_t pos)
{
    if (len < lim->unit_min || len > lim->unit_max)
        return EINVAL;
    if (iovcnt < 1 || (uint32_t)iovcnt > lim->segments_max)
        return EINVAL;
    if (!is_pow2(len))
        return EINVAL;
    if (pos % len)
        return EINVAL;
    return 0;
}

static int announce(int fd, const char *cmd)
{
    return fsetxattr(fd, CONTROL_XATTR, cmd, strlen(cmd), 0);
}

/* One write with RWF_ATOMIC and/or RWF_WRITETHROUGH on an atomicfs file. */
static ssize_t announced_write(pwritev2_fn next, int fd, const struct iovec *iov, int iovcnt,
                               off_t offset, int flags, const struct limits *lim)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_ACCMODE) == O_RDONLY) /* EBADF comes first in the kernel too */
        return next(fd, iov, iovcnt, offset, flags & ~AFS_RWF_WRITETHROUGH);
    uint64_t len = 0;
    for (int i = 0; i < iovcnt; i++) {
        if (iov[i].iov_len > SSIZE_MAX - len) {
            errno = EINVAL;
            return -1;
        }
        len += iov[i].iov_len;
    }
    int append = (fl & O_APPEND) || (flags & 0x10 /* RWF_APPEND */);
    off_t pos = offset;
    struct stat st;
    if (append) {
        if (fstat(fd, &st) != 0)
            return -1;
        pos = st.st_size;
    } else if (offset == -1) {
        pos = lseek(fd, 0, SEEK_CUR);
        if (pos < 0)
            return -1;
    }
    int atomic = flags & AFS_RWF_ATOMIC;
    if (atomic) {
        int err = atomic_write_valid(lim, iovcnt, len, (uint64_t)pos);
        if (err) {
            errno = err;
            return -1;
        }
    }
    /* an O_DIRECT write from an unaligned buffer could be split into two requests */
    void *bounce = NULL;
    struct iovec one;
    if (atomic && (fl & O_DIRECT) && ((uintptr_t)iov[0].iov_base & 4095)) {
        if (posix_memalign(&bounce, 4096, len) != 0) {
            errno = ENOMEM;
            return -1;
        }
        memcpy(bounce, iov[0].iov_base, len);
        one.iov_base = bounce;
        one.iov_len = len;
        iov = &one;
    }
    static _Atomic unsigned long counter;
    char token[64], cmd[160];
    snprintf(token, sizeof(token), "%d.%ld.%lu", (int)getpid(), (long)syscall(SYS_gettid),
             atomic_fetch_add(&counter, 1));
    char what[4];
    int k = 0;
    if (atomic)
        what[k++] = 'a';
    if (flags & AFS_RWF_WRITETHROUGH)
        what[k++] = 'w';
    if (atomic && (flags & (AFS_RWF_DSYNC | AFS_RWF_SYNC)))
        what[k++] = 'd';
    what[k] = 0;
    if (append) /* the offset is EOF when the request is made: any offset matches */
        snprintf(cmd, sizeof(cmd), "write_begin=%s:*:%llu:%s", token,
                 (unsigned long long)len, what);
    else
        snprintf(cmd, sizeof(cmd), "write_begin=%s:%lld:%llu:%s", token, (long long)pos,
                 (unsigned long long)len, what);
    ssize_t ret;
    if (announce(fd, cmd) != 0) {
        ret = -1; /* the daemon refused it (EINVAL) or could not be asked */
    } else {
        ret = next(fd, iov, iovcnt, offset, flags & ~(AFS_RWF_ATOMIC | AFS_RWF_WRITETHROUGH));
        int saved = errno;
        snprintf(cmd, sizeof(cmd), "write_end=%s", token);
        announce(fd, cmd);
        errno = saved;
    }
    free(bounce);
    return ret;
}

static ssize_t afs_pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset,
                            int flags)
{
    pwritev2_fn next = next_pwritev2();
    struct limits lim;
    if (!(flags & (AFS_RWF_ATOMIC | AFS_RWF_WRITETHROUGH)) || fd_limits(fd, &lim) != 0)
        return next(fd, iov, iovcnt, offset, flags);
    return announced_write(next, fd, iov, iovcnt, offset, flags, &lim);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags)
{
    return afs_pwritev2(fd, iov, iovcnt, offset, flags);
}

ssize_t pwritev64v2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags)
{
    return afs_pwritev2(fd, iov, iovcnt, offset, flags);
}

/* ---- statx ---- */

/* The limits of the file statx looked at, if it is on atomicfs (0), else -1. */
static int path_limits(int dirfd, const char *path, int flags, dev_t dev,
                       struct limits *out)
{
    int state = dev_lookup(dev);
    if (state == 2)
        return -1;
    char proc[64];
    const char *name = path;
    int fd = -1;
    if (!path || !*path) { /* AT_EMPTY_PATH: dirfd is the file */
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", dirfd);
        name = proc;
    } else if (path[0] != '/' && dirfd != AT_FDCWD) {
        fd = openat(dirfd, path, O_PATH | O_CLOEXEC |
                    ((flags & AT_SYMLINK_NOFOLLOW) ? O_NOFOLLOW : 0));
        if (fd < 0)
            return -1;
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
        name = proc;
    }
    int ret = -1;
    if (state == 0) {
        struct statfs sfs;
        if (statfs(name, &sfs) != 0 || (uint32_t)sfs.f_type != AFS_FUSE_SUPER_MAGIC) {
            dev_remember(dev, 2);
            goto done;
        }
    }
    char text[128];
    ssize_t n = getxattr(name, LIMITS_XATTR, text, sizeof(text));
    if (parse_limits(text, n, out) != 0) {
        if (state == 0)
            dev_remember(dev, 2);
        goto done;
    }
    if (state == 0)
        dev_remember(dev, 1);
    ret = 0;
done:
    if (fd >= 0)
        close(fd);
    return ret;
}

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf);

typedef long (*syscall_fn)(long, ...);

/* Programs that call statx and pwritev2 through syscall(2) (xfstests' fsx does, for
 * statx) get the same: the two numbers are routed to the wrappers above and below, every
 * other goes to libc unchanged (six arguments passed on, as the x86-64 and arm64 calling
 * conventions allow). */
long syscall(long number, ...)
{
    static _Atomic(syscall_fn) fn;
    va_list ap;
    long a[6];
    va_start(ap, number);
    for (int i = 0; i < 6; i++)
        a[i] = va_arg(ap, long);
    va_end(ap);
    if (number == SYS_statx)
        return statx((int)a[0], (const char *)a[1], (int)a[2], (unsigned int)a[3],
                     (struct statx *)a[4]);
    if (number == SYS_pwritev2) /* fd, iov, iovcnt, pos_l, pos_h, flags */
        return afs_pwritev2((int)a[0], (const struct iovec *)a[1], (int)a[2], (off_t)a[3],
                            (int)a[5]);
    syscall_fn f = atomic_load(&fn);
    if (!f) {
        f = (syscall_fn)dlsym(RTLD_NEXT, "syscall");
        atomic_store(&fn, f);
    }
    return f(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf)
{
    int ret = next_statx()(dirfd, path, flags, mask, buf);
    if (ret != 0 || !(mask & AFS_STATX_WRITE_ATOMIC))
        return ret;
    int saved = errno;
    struct afs_statx *sx = (struct afs_statx *)buf;
    struct limits lim;
    if (S_ISREG(sx->stx_mode) && !(sx->stx_mask & AFS_STATX_WRITE_ATOMIC) &&
        path_limits(dirfd, path, flags, makedev(sx->stx_dev_major, sx->stx_dev_minor),
                    &lim) == 0) {
        sx->stx_mask |= AFS_STATX_WRITE_ATOMIC;
        sx->stx_attributes |= AFS_STATX_ATTR_WRITE_ATOMIC;
        sx->stx_attributes_mask |= AFS_STATX_ATTR_WRITE_ATOMIC;
        sx->stx_atomic_write_unit_min = lim.unit_min;
        sx->stx_atomic_write_unit_max = lim.unit_max;
        sx->stx_atomic_write_segments_max = lim.segments_max;
        sx->stx_atomic_write_unit_max_opt = lim.unit_max_opt;
    }
    errno = saved;
    return 0;
}
