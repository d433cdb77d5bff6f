/*
 * The calls fio (atomic=1) and xfstests' fsx (RWF_ATOMIC mode) make to find and use untorn
 * writes: statx(STATX_WRITE_ATOMIC) on the path, then pwritev2(..., RWF_ATOMIC) with one
 * iovec. Built by tests/mount/test_rwf_atomic.py and run as is, or under `atomicfs run`.
 *
 *   rwf_probe statx PATH        (statx(3), as fio calls it)
 *   rwf_probe statx-raw PATH    (syscall(SYS_statx), as fsx calls it)
 *       prints: atomic=<0|1> attr=<0|1> min=N max=N segments=N opt=N
 *   rwf_probe write PATH OFF LEN BYTE [atomic] [dsync] [wt] [direct] [iov2] [append]
 *       pwritev2 of LEN bytes of value BYTE at OFF; prints: ok N  or  errno NAME
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef RWF_ATOMIC
#define RWF_ATOMIC 0x00000040
#endif
#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif
#define RWF_WRITETHROUGH 0x00000200
#ifndef STATX_WRITE_ATOMIC
#define STATX_WRITE_ATOMIC 0x00010000U
#endif
#define ATTR_WRITE_ATOMIC 0x00400000ULL

/* glibc 2.36's struct statx ends before the atomic-write fields: read them at their
 * offsets in the kernel's struct (include/uapi/linux/stat.h). */
struct probe_statx {
    uint8_t head[0x08];
    uint64_t stx_attributes;
    uint8_t mid[0x90 - 0x10];
    uint8_t mnt[0xa8 - 0x90];
    uint32_t unit_min, unit_max;           /* 0xa8 */
    uint32_t segments_max, dio_read_align; /* 0xb0 */
    uint32_t unit_max_opt, spare;          /* 0xb8 */
    uint8_t tail[0x100 - 0xc0];
};
_Static_assert(sizeof(struct probe_statx) == 0x100, "statx is 256 bytes");

static const char *errname(int e)
{
    switch (e) {
    case EINVAL: return "EINVAL";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case EBADF: return "EBADF";
    case EFBIG: return "EFBIG";
    case EIO: return "EIO";
    case ENOSPC: return "ENOSPC";
    default: return strerror(e);
    }
}

static int do_statx(const char *path, int raw)
{
    struct probe_statx sx;
    memset(&sx, 0, sizeof(sx));
    int r = raw ? (int)syscall(SYS_statx, AT_FDCWD, path, 0, STATX_WRITE_ATOMIC, &sx)
                : statx(AT_FDCWD, path, 0, STATX_WRITE_ATOMIC, (struct statx *)&sx);
    if (r != 0) {
        printf("errno %s\n", errname(errno));
        return 1;
    }
    uint32_t mask;
    memcpy(&mask, sx.head, sizeof(mask));
    printf("atomic=%d attr=%d min=%u max=%u segments=%u opt=%u\n",
           (mask & STATX_WRITE_ATOMIC) ? 1 : 0,
           (sx.stx_attributes & ATTR_WRITE_ATOMIC) ? 1 : 0, sx.unit_min, sx.unit_max,
           sx.segments_max, sx.unit_max_opt);
    return 0;
}

static int do_write(int argc, char **argv)
{
    const char *path = argv[2];
    long long off = atoll(argv[3]);
    size_t len = (size_t)atoll(argv[4]);
    int byte = atoi(argv[5]);
    int flags = 0, oflags = O_RDWR | O_CREAT, iovcnt = 1;
    for (int i = 6; i < argc; i++) {
        if (!strcmp(argv[i], "atomic")) flags |= RWF_ATOMIC;
        else if (!strcmp(argv[i], "dsync")) flags |= RWF_DSYNC;
        else if (!strcmp(argv[i], "wt")) flags |= RWF_WRITETHROUGH;
        else if (!strcmp(argv[i], "direct")) oflags |= O_DIRECT;
        else if (!strcmp(argv[i], "append")) oflags |= O_APPEND;
        else if (!strcmp(argv[i], "iov2")) iovcnt = 2;
        else {
            fprintf(stderr, "unknown word %s\n", argv[i]);
            return 2;
        }
    }
    int fd = open(path, oflags, 0644);
    if (fd < 0) {
        printf("open errno %s\n", errname(errno));
        return 1;
    }
    void *buf = NULL;
    if (posix_memalign(&buf, 4096, len ? len : 4096) != 0)
        return 2;
    memset(buf, byte, len);
    struct iovec iov[2] = {{buf, len / iovcnt}, {(char *)buf + len / iovcnt, len - len / iovcnt}};
    ssize_t n = pwritev2(fd, iov, iovcnt, off, flags);
    if (n < 0)
        printf("errno %s\n", errname(errno));
    else
        printf("ok %zd\n", n);
    free(buf);
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "statx"))
        return do_statx(argv[2], 0);
    if (argc >= 3 && !strcmp(argv[1], "statx-raw"))
        return do_statx(argv[2], 1);
    if (argc >= 6 && !strcmp(argv[1], "write"))
        return do_write(argc, argv);
    fprintf(stderr, "usage: rwf_probe statx|statx-raw PATH | write PATH OFF LEN BYTE "
            "[flags...]\n");
    return 2;
}
