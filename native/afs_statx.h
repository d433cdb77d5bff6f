/* struct statx from the kernel's include/uapi/linux/stat.h as of Linux 6.16, for the native
 * core and the preload library: Debian 12's UAPI and glibc headers stop before the
 * untorn-write fields (Linux 6.11), so the layout is written out here and checked. */
#ifndef AFS_STATX_H
#define AFS_STATX_H

#include <stddef.h>
#include <stdint.h>

#define AFS_STATX_WRITE_ATOMIC 0x00010000U
#define AFS_STATX_DIOALIGN 0x00002000U
#define AFS_STATX_ATTR_WRITE_ATOMIC 0x00400000ULL

struct afs_statx {
    uint32_t stx_mask, stx_blksize;
    uint64_t stx_attributes;
    uint32_t stx_nlink, stx_uid, stx_gid;
    uint16_t stx_mode, spare0;
    uint64_t stx_ino, stx_size, stx_blocks, stx_attributes_mask;
    uint8_t timestamps[64];
    uint32_t stx_rdev_major, stx_rdev_minor, stx_dev_major, stx_dev_minor;
    uint64_t stx_mnt_id;
    uint32_t stx_dio_mem_align, stx_dio_offset_align;
    uint64_t stx_subvol;
    uint32_t stx_atomic_write_unit_min, stx_atomic_write_unit_max;
    uint32_t stx_atomic_write_segments_max, stx_dio_read_offset_align;
    uint32_t stx_atomic_write_unit_max_opt, spare2;
    uint64_t spare3[8];
};
_Static_assert(offsetof(struct afs_statx, stx_rdev_major) == 0x80, "statx layout");
_Static_assert(offsetof(struct afs_statx, stx_mnt_id) == 0x90, "statx layout");
_Static_assert(offsetof(struct afs_statx, stx_atomic_write_unit_min) == 0xa8, "statx layout");
_Static_assert(offsetof(struct afs_statx, stx_atomic_write_segments_max) == 0xb0,
               "statx layout");
_Static_assert(offsetof(struct afs_statx, stx_atomic_write_unit_max_opt) == 0xb8,
               "statx layout");
_Static_assert(sizeof(struct afs_statx) == 0x100, "statx layout");

#endif
