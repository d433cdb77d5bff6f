/* Declarations shared by the C core and its cffi build (native/build.py parses this file). */
#define AFS_MAX_IOV 1024

struct afs_probe_result {
    uint64_t size;
    uint32_t logical_block_size;
    uint32_t is_blockdev;
    uint32_t dio_mem_align;
    uint32_t dio_offset_align;
    uint32_t atomic_unit_min;
    uint32_t atomic_unit_max;
    uint32_t atomic_segments_max;
};

int afs_rwf_atomic(void);
void *afs_alloc(size_t size, size_t align);
void afs_free(void *p);
void afs_copy(void *dst, const void *src, size_t n);
void afs_zero(void *dst, size_t n);
int afs_is_zero(const void *p, size_t n);
uint32_t afs_crc32c(uint32_t crc, const void *p, size_t n);
int64_t afs_pwritev(int fd, void *const *bufs, const size_t *lens, int n, int64_t off, int flags);
int64_t afs_preadv(int fd, void *const *bufs, const size_t *lens, int n, int64_t off);
int afs_fdatasync(int fd);
int afs_probe(int fd, struct afs_probe_result *out);
void afs_bitmap_set(uint8_t *bm, int64_t start, int64_t count, int value);
int64_t afs_bitmap_count_set(const uint8_t *bm, int64_t start, int64_t count);
int64_t afs_bitmap_find(const uint8_t *bm, int64_t lo, int64_t hi, int64_t goal, int64_t want,
                        int64_t min_len, int64_t align, int64_t *found);
