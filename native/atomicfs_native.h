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
int afs_probe(int fd, struct afs_probe_result *out);
void afs_bitmap_set(uint8_t *bm, int64_t start, int64_t count, int value);
int64_t afs_bitmap_count_set(const uint8_t *bm, int64_t start, int64_t count);
int64_t afs_bitmap_find(const uint8_t *bm, int64_t lo, int64_t hi, int64_t goal, int64_t want,
                        int64_t min_len, int64_t align, int64_t *found);

/* ---- asynchronous I/O queue: C worker threads, completions signalled on an eventfd ---- */
#define AFS_OP_WRITE 1
#define AFS_OP_READ 2
#define AFS_OP_FLUSH 3
#define AFS_OP_WRITE_FLUSH 4  /* a write, then a flush of the device: one hand-over */
/* kinds of requests, for fault injection, delay and recording (bit = 1 << kind) */
#define AFS_KIND_SUPER 0
#define AFS_KIND_LOG 1
#define AFS_KIND_SNAPSHOT 2
#define AFS_KIND_DATA 3
#define AFS_KIND_FLUSH 4
#define AFS_KIND_READ 5

struct afs_io {
    int64_t id;         /* the caller's cookie */
    int op;
    int kind;
    int fd;
    int niov;
    int flags;          /* RWF_* for writes */
    int pad;
    int64_t offset;
    void **bufs;
    size_t *lens;
    int64_t result;     /* bytes, 0 for a flush, or -errno */
    struct afs_io *next;
};

struct afs_ioq;

struct afs_ioq *afs_ioq_new(int nthreads);
int afs_ioq_eventfd(struct afs_ioq *q);
void afs_ioq_submit(struct afs_ioq *q, struct afs_io *io);
int afs_ioq_reap(struct afs_ioq *q, struct afs_io **out, int max);
void afs_ioq_execute(struct afs_ioq *q, struct afs_io *io);
void afs_ioq_free(struct afs_ioq *q);
void afs_ioq_set_delay(struct afs_ioq *q, int64_t usec);
void afs_ioq_set_inject(struct afs_ioq *q, int kind_mask, int64_t count);
int64_t afs_ioq_inject_left(struct afs_ioq *q);
int afs_ioq_set_record(struct afs_ioq *q, int fd);

/* ---- the recording format (`-o record=PATH`; the crash explorer reads it) ----
 * A recording is the 8-byte magic, then records in the order they happened. A record is a
 * header of AFS_REC_HEADER_SIZE bytes, its fields little-endian at the offsets below, and,
 * for a completed write only, the write's data (length bytes). A write is recorded when
 * submitted (WRITE_SUBMIT, no data) and when completed (WRITE, ref = its submit's seq); a
 * flush when it starts (FLUSH_START) and when it ends (FLUSH_END, ref = its start's seq),
 * so that the explorer knows what was in flight and which flush covered what. seq counts
 * 1, 2, 3... from each opening of the file (a recorder appends to an existing recording).
 * The writers are record_event (C) and atomicfs.device.Recorder, which takes these
 * constants from here; the one reader is atomicfs.crashtest.recording. */
#define AFS_REC_MAGIC 0x3230434552534641  /* "AFSREC02" as a little-endian u64 */
#define AFS_REC_MAGIC_SIZE 8
#define AFS_REC_OFF_TYPE 0                 /* u8: AFS_REC_WRITE_SUBMIT... */
#define AFS_REC_OFF_SEQ 1                  /* u64 */
#define AFS_REC_OFF_OFFSET 9               /* i64: where the write goes on the device */
#define AFS_REC_OFF_LENGTH 17              /* u32: bytes of the write */
#define AFS_REC_OFF_FLAGS 21               /* u32: AFS_REC_FLAG_* */
#define AFS_REC_OFF_TIME 25                /* i64: CLOCK_MONOTONIC, ns */
#define AFS_REC_OFF_REF 33                 /* u64: seq of the submit / flush start */
#define AFS_REC_HEADER_SIZE 41
#define AFS_REC_WRITE_SUBMIT 0x42          /* 'B' */
#define AFS_REC_WRITE 0x57                 /* 'W' */
#define AFS_REC_FLUSH_START 0x53           /* 'S' */
#define AFS_REC_FLUSH_END 0x46             /* 'F' */
#define AFS_REC_FLAG_ATOMIC 0x1            /* written with RWF_ATOMIC */
#define AFS_REC_FLAG_DSYNC 0x2             /* written with RWF_DSYNC */
#define AFS_REC_FLAG_SUPER 0x10            /* the kind of the write: AFS_KIND_SUPER... */
#define AFS_REC_FLAG_LOG 0x20
#define AFS_REC_FLAG_SNAPSHOT 0x40
#define AFS_REC_FLAG_DATA 0x80

/* the request loop's spin before it sleeps (atomicfs/fuseloop.py) */
int afs_poll_spin(int fd, int other_fd, int64_t max_ns);
