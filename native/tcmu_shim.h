/*
 * tcmu-py native shim: declarations shared by the cffi cdef and the C source.
 *
 * Only what Python cannot do safely or fast lives here: mapping the uio region,
 * acquire/release access to the mailbox indices, draining every new ring entry
 * into compact descriptors in one call, writing a batch of completions at the
 * shared tail, and the 4-byte wakeup.  Every value read from the ring is
 * bounds-checked before use.  Layout: reference/tcmu.md §1.2-1.7.
 */
#ifndef TCMU_PY_SHIM_H
#define TCMU_PY_SHIM_H

#include <stdint.h>
#include <stddef.h>

#define TCMU_PY_CDB_MAX 32

/* descriptor kinds */
#define TCMU_PY_KIND_CMD 1        /* a well-formed command */
#define TCMU_PY_KIND_TMR 2        /* a TMR notification (no completion needed) */
#define TCMU_PY_KIND_MALFORMED 3  /* a CMD entry with a bad CDB or iovec: complete it with UNKNOWN_OP */
#define TCMU_PY_KIND_UNKNOWN 4    /* unknown entry opcode: flagged UNKNOWN_OP and skipped */

/* reasons for KIND_MALFORMED and for a corrupt ring */
#define TCMU_PY_BAD_NONE 0
#define TCMU_PY_BAD_LEN 1         /* entry length 0, not a multiple of 8, or past the ring end */
#define TCMU_PY_BAD_IOV_CNT 2     /* iovec array does not fit in the entry */
#define TCMU_PY_BAD_CDB_OFF 3     /* cdb_off outside the entry */
#define TCMU_PY_BAD_CDB_LEN 4     /* CDB longer than TCMU_PY_CDB_MAX or past the entry */
#define TCMU_PY_BAD_IOV 5         /* an iovec outside the data area */
#define TCMU_PY_BAD_TMR 6         /* TMR id list does not fit in the entry */

struct tcmu_py_desc {
    uint64_t data_len;      /* bytes in the iov_cnt data iovecs (bidi excluded) */
    uint64_t iov0_off;      /* first iovec, absolute offset in the mapping */
    uint64_t iov0_len;
    uint32_t iov_index;     /* first iovec (or TMR id) in the caller's array */
    uint32_t iov_cnt;       /* data iovecs */
    uint32_t iov_bidi_cnt;  /* bidi iovecs, following the data iovecs */
    uint32_t tmr_cnt;       /* TMR: number of ids copied */
    uint16_t cmd_id;
    uint8_t kind;
    uint8_t cdb_len;
    uint8_t tmr_type;
    uint8_t bad;            /* TCMU_PY_BAD_* for KIND_MALFORMED */
    uint8_t pad[2];
    uint8_t cdb[TCMU_PY_CDB_MAX];
};

struct tcmu_py_iov {
    uint64_t off;           /* absolute offset in the mapping */
    uint64_t len;
};

struct tcmu_py_comp {
    uint32_t read_len;
    uint16_t cmd_id;
    uint8_t status;         /* SAM status byte */
    uint8_t uflags;         /* TCMU_UFLAG_* */
    uint8_t sense_len;      /* 0: leave the sense buffer alone */
    uint8_t pad[7];
    uint8_t sense[96];
};

struct tcmu_py_ring {
    uint8_t *map;           /* start of the mapping (the mailbox) */
    uint64_t map_size;
    uint64_t data_off;      /* start of the data area */
    uint32_t cmdr_off;
    uint32_t cmdr_size;
    uint32_t fetch;         /* private consumer index: next entry to drain */
    uint32_t n_iov;         /* out: iovecs used by the last drain */
    uint32_t n_tmr;         /* out: TMR ids used by the last drain */
    uint32_t corrupt;       /* TCMU_PY_BAD_LEN once the walk cannot go on; cleared by reset */
    int fd;
};

/* map/unmap the whole region; 0 or -errno */
int tcmu_py_map(int fd, uint64_t size, void **out);
int tcmu_py_unmap(void *addr, uint64_t size);

/* bind a ring to a mapping after checking the mailbox; 0 or -errno */
int tcmu_py_ring_init(struct tcmu_py_ring *r, void *map, uint64_t map_size, int fd);
/* after reset_ring: private index back to cmd_head-independent 0 */
void tcmu_py_ring_reset(struct tcmu_py_ring *r);

uint32_t tcmu_py_load_head(const struct tcmu_py_ring *r);
uint32_t tcmu_py_load_tail(const struct tcmu_py_ring *r);
void tcmu_py_store_tail(struct tcmu_py_ring *r, uint32_t tail);

/* drain every new entry (up to the array limits); returns descriptors filled */
int tcmu_py_drain(struct tcmu_py_ring *r,
                  struct tcmu_py_desc *d, uint32_t max_d,
                  struct tcmu_py_iov *iov, uint32_t max_iov,
                  uint16_t *tmr_ids, uint32_t max_tmr);

/* write n completions at the shared tail, then one release-store; n or -errno */
int tcmu_py_complete(struct tcmu_py_ring *r, const struct tcmu_py_comp *c, uint32_t n);

/*
 * The native data path for memory-backed devices.  A handler whose data lives in one
 * flat mapping (ram) lends it to the engine; plain READ/WRITE (10)/(16) that need no
 * SCSI decision beyond "in range, length matches, no protection bits" are then served
 * here, in the drain's batch, without a Python object per command.  Everything else --
 * errors, sense, edge cases -- stays with the Python SCSI layer, which is the authority:
 * a command this path is unsure of is left for it untouched.  The engine sets `enabled`
 * before every batch (off while a unit attention is pending, a format runs, the device
 * is blocked or closing).
 *
 * Two kinds of medium: memory (`mem`: the data is copied in the batch and completed at
 * once) or a file descriptor (`aio`, see tcmu_py_aio_start: the batch queues jobs that
 * worker threads run with preadv/pwritev, and tcmu_py_aio_reap completes them).
 */
struct tcmu_py_aio;         /* opaque: the worker threads of one fd-backed device */

#define TCMU_PY_HIST 32

struct tcmu_py_fast {
    uint8_t *mem;           /* the device's data: num_lbas * block_size bytes */
    struct tcmu_py_aio *aio;  /* or: a file descriptor served by worker threads */
    uint64_t num_lbas;
    uint64_t reads;         /* served natively since the start (counters) */
    uint64_t writes;
    uint64_t read_bytes;
    uint64_t write_bytes;
    uint64_t errors;        /* fd jobs that failed (handed to Python for the sense) */
    uint64_t inflight;      /* fd jobs queued and not yet reaped */
    uint64_t hist[TCMU_PY_HIST];  /* latency from the drain to completion, log2 us buckets */
    uint32_t block_size;
    uint32_t max_xfer;      /* blocks per command (Block Limits VPD) */
    uint32_t n_comp;        /* in/out: completions already queued in the caller's array */
    uint32_t served;        /* out: commands served by the last call */
    uint8_t enabled;
    uint8_t readonly;       /* writes go to Python (it answers DATA PROTECT) */
    uint8_t fua_ok;         /* FUA writes may be served here (nothing volatile to flush) */
    uint8_t pad[5];
};

/* serve what it can of d[0..n); GOOD completions are appended at c[f->n_comp], the
   remaining descriptors are moved to the front in ring order; returns how many remain */
uint32_t tcmu_py_serve_fast(struct tcmu_py_ring *r, struct tcmu_py_fast *f,
                            struct tcmu_py_desc *d, uint32_t n,
                            const struct tcmu_py_iov *iov,
                            struct tcmu_py_comp *c, uint32_t max_c);

/* a job of the fd path that failed: Python completes it with the errno's sense */
struct tcmu_py_fail {
    int32_t err;            /* errno */
    uint16_t cmd_id;
    uint8_t write;
    uint8_t pad;
};

/* start `nthreads` workers serving f's READ/WRITE on `fd`; each finished batch is
   signalled by an 8-byte write to the eventfd `efd`.  `write_through`: fdatasync after
   every write (no volatile cache), as FUA writes always get.  0 or -errno */
int tcmu_py_aio_start(struct tcmu_py_fast *f, int fd, int efd, uint32_t nthreads,
                      uint8_t write_through);
/* stop the workers once every queued job has run (joins them); jobs still to reap stay */
void tcmu_py_aio_stop(struct tcmu_py_fast *f);
/* free what aio_start allocated (after aio_stop and a last reap) */
void tcmu_py_aio_free(struct tcmu_py_fast *f);
/* move finished jobs: successes become GOOD completions at c[f->n_comp], failures go to
   `fails`; f->served = jobs taken; returns the number of failures */
uint32_t tcmu_py_aio_reap(struct tcmu_py_fast *f, struct tcmu_py_comp *c, uint32_t max_c,
                          struct tcmu_py_fail *fails, uint32_t max_f);

/* bytes between the shared tail and the private index still owned by userspace */
uint32_t tcmu_py_inflight_bytes(const struct tcmu_py_ring *r);

/* the 4-byte wakeup write (kernel: tcmu_irqcontrol); 0 or -errno */
int tcmu_py_wakeup(int fd);
/* consume pending 4-byte events without blocking; number read or -errno */
int tcmu_py_ack(int fd);
/* poll for an event, releasing the GIL; 1 ready, 0 timeout, -errno */
int tcmu_py_wait(int fd, int timeout_ms);

#endif
