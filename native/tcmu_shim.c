/*
 * tcmu-py native shim: ring access that must be atomic, bounds-checked and fast.
 *
 * The consumer protocol follows reference/tcmu.md §1.7: acquire-load cmd_head, walk
 * from the private index to head (PAD skipped, TMR reported, unknown opcodes flagged
 * UNKNOWN_OP), copy everything needed out of each request before any completion can
 * overwrite it, and complete out of order by writing cmd_id + response into whatever
 * CMD entry sits at the shared cmd_tail, followed by one release-store of the tail.
 */
#define _GNU_SOURCE /* IOV_MAX, preadv */
#include "tcmu_shim.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* mailbox offsets (§1.2) */
#define MB_VERSION 0
#define MB_CMDR_OFF 4
#define MB_CMDR_SIZE 8
#define MB_CMD_HEAD 12
#define MB_CMD_TAIL 64
#define MB_SIZE 128

/* entry offsets (§1.3-1.5) */
#define OP_MASK 0x7u
#define OP_PAD 0
#define OP_CMD 1
#define OP_TMR 2
#define UFLAG_UNKNOWN_OP 0x1
#define ENT_HDR_SIZE 8
#define REQ_IOV_CNT 8
#define REQ_IOV_BIDI_CNT 12
#define REQ_CDB_OFF 24
#define REQ_IOV 48
#define RSP_STATUS 8
#define RSP_READ_LEN 12
#define RSP_SENSE 16
#define TMR_TYPE 8
#define TMR_CMD_CNT 12
#define TMR_IDS 32

static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void wr16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

int tcmu_py_map(int fd, uint64_t size, void **out)
{
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    *out = p;
    return 0;
}

int tcmu_py_unmap(void *addr, uint64_t size)
{
    return munmap(addr, (size_t)size) ? -errno : 0;
}

int tcmu_py_ring_init(struct tcmu_py_ring *r, void *map, uint64_t map_size, int fd)
{
    uint8_t *mb = map;
    uint32_t off, size;

    if (map_size < MB_SIZE)
        return -EINVAL;
    if (rd16(mb + MB_VERSION) != 2)
        return -EPROTO;
    off = rd32(mb + MB_CMDR_OFF);
    size = rd32(mb + MB_CMDR_SIZE);
    if (off < MB_SIZE || size < 1024 || (uint64_t)off + size > map_size)
        return -EINVAL;
    memset(r, 0, sizeof(*r));
    r->map = mb;
    r->map_size = map_size;
    r->cmdr_off = off;
    r->cmdr_size = size;
    r->data_off = (uint64_t)off + size;
    r->fd = fd;
    r->fetch = __atomic_load_n((uint32_t *)(mb + MB_CMD_TAIL), __ATOMIC_ACQUIRE) % size;
    return 0;
}

void tcmu_py_ring_reset(struct tcmu_py_ring *r)
{
    r->fetch = __atomic_load_n((uint32_t *)(r->map + MB_CMD_TAIL), __ATOMIC_ACQUIRE) % r->cmdr_size;
    r->corrupt = 0;
}

uint32_t tcmu_py_load_head(const struct tcmu_py_ring *r)
{
    return __atomic_load_n((uint32_t *)(r->map + MB_CMD_HEAD), __ATOMIC_ACQUIRE);
}

uint32_t tcmu_py_load_tail(const struct tcmu_py_ring *r)
{
    return __atomic_load_n((uint32_t *)(r->map + MB_CMD_TAIL), __ATOMIC_ACQUIRE);
}

void tcmu_py_store_tail(struct tcmu_py_ring *r, uint32_t tail)
{
    __atomic_store_n((uint32_t *)(r->map + MB_CMD_TAIL), tail, __ATOMIC_RELEASE);
}

static uint32_t cdb_size(uint8_t op, uint8_t b7)
{
    static const uint8_t group[8] = {6, 10, 10, 12, 16, 12, 10, 10};
    if (op == 0x7f)
        return (uint32_t)b7 + 8;
    return group[(op >> 5) & 7];
}

/* Decode one CMD entry at ring offset pos of length len into d (and iov). */
static uint8_t decode_cmd(struct tcmu_py_ring *r, uint32_t pos, uint32_t len,
                          struct tcmu_py_desc *d, struct tcmu_py_iov *iov,
                          uint32_t iov_room)
{
    const uint8_t *ent = r->map + r->cmdr_off + pos;
    uint64_t ent_abs = (uint64_t)r->cmdr_off + pos;
    uint64_t ent_end = ent_abs + len;
    uint32_t cnt = rd32(ent + REQ_IOV_CNT);
    uint32_t bidi = rd32(ent + REQ_IOV_BIDI_CNT);
    uint64_t cdb_off = rd64(ent + REQ_CDB_OFF);
    uint64_t total = 0, n;
    uint32_t i, clen;

    if (len < REQ_IOV)
        return TCMU_PY_BAD_IOV_CNT;
    n = (uint64_t)cnt + bidi;
    if (n > (len - REQ_IOV) / 16)
        return TCMU_PY_BAD_IOV_CNT;
    if (cdb_off < ent_abs + REQ_IOV || cdb_off >= ent_end)
        return TCMU_PY_BAD_CDB_OFF;
    clen = cdb_size(r->map[cdb_off], cdb_off + 8 <= ent_end ? r->map[cdb_off + 7] : 0);
    if (clen > TCMU_PY_CDB_MAX)
        return TCMU_PY_BAD_CDB_LEN;
    if (cdb_off + clen > ent_end)
        return TCMU_PY_BAD_CDB_LEN;
    if (n > iov_room)
        return 0xff; /* caller: no room, stop this drain here */
    for (i = 0; i < n; i++) {
        uint64_t off = rd64(ent + REQ_IOV + 16 * i);
        uint64_t l = rd64(ent + REQ_IOV + 16 * i + 8);
        if (off < r->data_off || off > r->map_size || l > r->map_size - off)
            return TCMU_PY_BAD_IOV;
        iov[i].off = off;
        iov[i].len = l;
        if (i < cnt)
            total += l;
    }
    memcpy(d->cdb, r->map + cdb_off, clen);
    d->cdb_len = (uint8_t)clen;
    d->iov_cnt = cnt;
    d->iov_bidi_cnt = bidi;
    d->data_len = total;
    d->iov0_off = n ? iov[0].off : 0;
    d->iov0_len = cnt ? iov[0].len : 0;
    return TCMU_PY_BAD_NONE;
}

int tcmu_py_drain(struct tcmu_py_ring *r,
                  struct tcmu_py_desc *d, uint32_t max_d,
                  struct tcmu_py_iov *iov, uint32_t max_iov,
                  uint16_t *tmr_ids, uint32_t max_tmr)
{
    uint32_t head, pos = r->fetch, size = r->cmdr_size;
    uint32_t nd = 0, ni = 0, nt = 0;

    r->n_iov = 0;
    r->n_tmr = 0;
    if (r->corrupt)
        return 0;
    head = tcmu_py_load_head(r);
    if (head >= size) {
        r->corrupt = TCMU_PY_BAD_LEN;
        return 0;
    }
    while (pos != head && nd < max_d) {
        uint8_t *ent = r->map + r->cmdr_off + pos;
        uint32_t len_op, len, op;
        struct tcmu_py_desc *o = &d[nd];

        /* the header itself must lie inside the ring */
        if (size - pos < ENT_HDR_SIZE) {
            r->corrupt = TCMU_PY_BAD_LEN;
            break;
        }
        len_op = rd32(ent);
        len = len_op & ~OP_MASK;
        op = len_op & OP_MASK;
        if (len == 0 || len > size - pos) {
            r->corrupt = TCMU_PY_BAD_LEN;
            break;
        }
        if (op == OP_PAD) {
            pos = (pos + len) % size;
            continue;
        }
        memset(o, 0, offsetof(struct tcmu_py_desc, cdb));
        o->cmd_id = rd16(ent + 4);
        if (op == OP_CMD) {
            uint8_t bad = decode_cmd(r, pos, len, o, iov + ni, max_iov - ni);
            if (bad == 0xff)
                break; /* out of iovec room: resume here next time */
            o->iov_index = ni;
            if (bad == TCMU_PY_BAD_NONE) {
                o->kind = TCMU_PY_KIND_CMD;
                ni += o->iov_cnt + o->iov_bidi_cnt;
            } else {
                o->kind = TCMU_PY_KIND_MALFORMED;
                o->bad = bad;
                ent[7] |= UFLAG_UNKNOWN_OP;
            }
        } else if (op == OP_TMR) {
            uint32_t cnt = len >= TMR_IDS ? rd32(ent + TMR_CMD_CNT) : 0;
            uint32_t i;
            o->kind = TCMU_PY_KIND_TMR;
            o->tmr_type = len >= TMR_IDS ? ent[TMR_TYPE] : 0;
            if (len < TMR_IDS || cnt > (len - TMR_IDS) / 2) {
                o->bad = TCMU_PY_BAD_TMR;
                cnt = 0;
            }
            if (cnt > max_tmr - nt)
                break; /* resume here next time */
            o->iov_index = nt;
            for (i = 0; i < cnt; i++)
                tmr_ids[nt + i] = rd16(ent + TMR_IDS + 2 * i);
            o->tmr_cnt = cnt;
            nt += cnt;
        } else {
            o->kind = TCMU_PY_KIND_UNKNOWN;
            ent[7] |= UFLAG_UNKNOWN_OP;
        }
        nd++;
        pos = (pos + len) % size;
    }
    r->fetch = pos;
    r->n_iov = ni;
    r->n_tmr = nt;
    return (int)nd;
}

int tcmu_py_complete(struct tcmu_py_ring *r, const struct tcmu_py_comp *c, uint32_t n)
{
    uint32_t size = r->cmdr_size;
    uint32_t tail = tcmu_py_load_tail(r) % size;
    uint32_t done = 0;
    int err = 0;

    for (;;) {
        /* skip entries that need no completion (PAD, TMR, unknown) */
        while (tail != r->fetch) {
            uint8_t *ent = r->map + r->cmdr_off + tail;
            uint32_t len_op = rd32(ent);
            uint32_t len = len_op & ~OP_MASK;
            if ((len_op & OP_MASK) == OP_CMD)
                break;
            if (len == 0 || len > size - tail) { /* cannot happen below fetch */
                err = -EBADMSG;
                goto out;
            }
            tail = (tail + len) % size;
        }
        if (done == n)
            break;
        if (tail == r->fetch) {
            err = -ERANGE; /* more completions than fetched commands */
            break;
        }
        {
            uint8_t *ent = r->map + r->cmdr_off + tail;
            uint32_t len = rd32(ent) & ~OP_MASK;
            const struct tcmu_py_comp *cc = &c[done];
            wr16(ent + 4, cc->cmd_id);
            ent[7] = cc->uflags;
            ent[RSP_STATUS] = cc->status;
            wr32(ent + RSP_READ_LEN, cc->read_len);
            if (cc->sense_len) {
                uint32_t sl = cc->sense_len > 96 ? 96 : cc->sense_len;
                memcpy(ent + RSP_SENSE, cc->sense, sl);
                memset(ent + RSP_SENSE + sl, 0, 96 - sl);
            }
            tail = (tail + len) % size;
            done++;
        }
    }
out:
    tcmu_py_store_tail(r, tail);
    return err ? err : (int)done;
}

static inline uint64_t be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* 1 if served (data moved), 0 if Python must decide */
static int fast_one(const struct tcmu_py_ring *r, struct tcmu_py_fast *f,
                    const struct tcmu_py_desc *o, const struct tcmu_py_iov *iov)
{
    const uint8_t *cdb = o->cdb;
    uint64_t lba, nblk, off, len;
    int write;

    if (o->kind != TCMU_PY_KIND_CMD || o->iov_bidi_cnt)
        return 0;
    switch (cdb[0]) {
    case 0x28: /* READ (10) */
    case 0x2a: /* WRITE (10) */
        if (o->cdb_len < 10)
            return 0;
        lba = be32(cdb + 2);
        nblk = (uint32_t)cdb[7] << 8 | cdb[8];
        break;
    case 0x88: /* READ (16) */
    case 0x8a: /* WRITE (16) */
        if (o->cdb_len < 16)
            return 0;
        lba = be64(cdb + 2);
        nblk = be32(cdb + 10);
        break;
    default:
        return 0;
    }
    write = cdb[0] & 0x02;
    /* only DPO (0x10) and FUA (0x08) may be set: protection bits and the rest are the
       SCSI layer's to judge */
    if (cdb[1] & ~0x18u)
        return 0;
    if (write && (f->readonly || ((cdb[1] & 0x08) && !f->fua_ok)))
        return 0;
    if (nblk == 0 || nblk > f->max_xfer || nblk > f->num_lbas || lba > f->num_lbas - nblk)
        return 0;
    len = nblk * f->block_size;
    if (len != o->data_len)
        return 0;
    off = lba * f->block_size;
    if (!f->mem)
        return 2; /* the fd path: the caller queues it */
    if (o->iov_cnt == 1) {
        uint8_t *buf = r->map + o->iov0_off;
        if (write)
            memcpy(f->mem + off, buf, len);
        else
            memcpy(buf, f->mem + off, len);
    } else {
        for (uint32_t i = 0; i < o->iov_cnt; i++) {
            const struct tcmu_py_iov *v = &iov[o->iov_index + i];
            uint8_t *buf = r->map + v->off;
            if (write)
                memcpy(f->mem + off, buf, v->len);
            else
                memcpy(buf, f->mem + off, v->len);
            off += v->len;
        }
    }
    if (write) {
        f->writes++;
        f->write_bytes += len;
    } else {
        f->reads++;
        f->read_bytes += len;
    }
    return 1;
}

/* ---- the fd path: worker threads ------------------------------------------------------ */

#define JOB_INLINE_IOV 4
#define AIO_MAX_THREADS 64

struct tcmu_py_job {
    struct tcmu_py_job *next;
    uint64_t off;
    uint64_t len;
    uint64_t t0_ns;
    struct iovec *iov;
    int32_t err;
    uint32_t iov_cnt;
    uint16_t cmd_id;
    uint8_t write;
    uint8_t fua;
    struct iovec iov_inline[JOB_INLINE_IOV];
};

struct tcmu_py_aio {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct tcmu_py_job *q_head, *q_tail; /* queued, workers take from the head */
    struct tcmu_py_job *d_head, *d_tail; /* done, the loop thread reaps */
    struct tcmu_py_job *free_list;       /* loop thread only */
    int stop;
    int fd;
    int efd;
    int write_through;
    uint32_t nthreads;
    pthread_t threads[AIO_MAX_THREADS];
};

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void hist_add(struct tcmu_py_fast *f, uint64_t ns)
{
    uint64_t us = ns / 1000;
    uint32_t b = us ? 64 - (uint32_t)__builtin_clzll(us) : 0;
    f->hist[b < TCMU_PY_HIST ? b : TCMU_PY_HIST - 1]++;
}

static int32_t job_run(const struct tcmu_py_aio *a, struct tcmu_py_job *j)
{
    struct iovec *v = j->iov;
    uint32_t cnt = j->iov_cnt;
    uint64_t off = j->off, left = j->len;

    while (left) {
        int nv = cnt > IOV_MAX ? IOV_MAX : (int)cnt;
        ssize_t n = j->write ? pwritev(a->fd, v, nv, (off_t)off) : preadv(a->fd, v, nv, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0)
            return EIO; /* end of file: the image shrank behind our back */
        off += (uint64_t)n;
        left -= (uint64_t)n;
        while (n > 0 && cnt) { /* a short transfer: go on where it stopped */
            if ((size_t)n >= v->iov_len) {
                n -= (ssize_t)v->iov_len;
                v++;
                cnt--;
            } else {
                v->iov_base = (uint8_t *)v->iov_base + n;
                v->iov_len -= (size_t)n;
                n = 0;
            }
        }
    }
    if (j->write && (j->fua || a->write_through) && fdatasync(a->fd) < 0)
        return errno;
    return 0;
}

static void *aio_worker(void *arg)
{
    struct tcmu_py_aio *a = arg;

    pthread_mutex_lock(&a->mu);
    for (;;) {
        struct tcmu_py_job *j;
        while (!a->q_head && !a->stop)
            pthread_cond_wait(&a->cv, &a->mu);
        j = a->q_head;
        if (!j)
            break; /* stopping, and nothing is left to run */
        a->q_head = j->next;
        if (!a->q_head)
            a->q_tail = NULL;
        pthread_mutex_unlock(&a->mu);
        j->err = job_run(a, j);
        pthread_mutex_lock(&a->mu);
        j->next = NULL;
        if (a->d_tail) {
            a->d_tail->next = j;
        } else {
            /* the list was empty: the loop needs one wakeup for everything that follows */
            uint64_t one = 1;
            a->d_head = j;
            if (write(a->efd, &one, 8) < 0) { /* EAGAIN: a wakeup is pending anyway */ }
        }
        a->d_tail = j;
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

int tcmu_py_aio_start(struct tcmu_py_fast *f, int fd, int efd, uint32_t nthreads,
                      uint8_t write_through)
{
    struct tcmu_py_aio *a;
    uint32_t i;

    if (f->aio)
        return -EBUSY;
    if (nthreads == 0 || nthreads > AIO_MAX_THREADS)
        return -EINVAL;
    a = calloc(1, sizeof(*a));
    if (!a)
        return -ENOMEM;
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->cv, NULL);
    a->fd = fd;
    a->efd = efd;
    a->write_through = write_through;
    for (i = 0; i < nthreads; i++) {
        int rc = pthread_create(&a->threads[i], NULL, aio_worker, a);
        if (rc) {
            a->nthreads = i;
            f->aio = a;
            tcmu_py_aio_stop(f);
            tcmu_py_aio_free(f);
            return -rc;
        }
    }
    a->nthreads = nthreads;
    f->aio = a;
    return 0;
}

void tcmu_py_aio_stop(struct tcmu_py_fast *f)
{
    struct tcmu_py_aio *a = f->aio;
    uint32_t i;

    if (!a)
        return;
    pthread_mutex_lock(&a->mu);
    a->stop = 1;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    for (i = 0; i < a->nthreads; i++)
        pthread_join(a->threads[i], NULL);
    a->nthreads = 0;
}

static void job_free(struct tcmu_py_job *j)
{
    if (j->iov != j->iov_inline)
        free(j->iov);
    free(j);
}

void tcmu_py_aio_free(struct tcmu_py_fast *f)
{
    struct tcmu_py_aio *a = f->aio;
    struct tcmu_py_job *lists[3], *j;

    if (!a)
        return;
    lists[0] = a->q_head;
    lists[1] = a->d_head;
    lists[2] = a->free_list;
    for (int k = 0; k < 3; k++) {
        while ((j = lists[k])) {
            lists[k] = j->next;
            job_free(j);
        }
    }
    pthread_cond_destroy(&a->cv);
    pthread_mutex_destroy(&a->mu);
    free(a);
    f->aio = NULL;
}

/* a job for descriptor o, or NULL (no memory: Python serves the command instead) */
static struct tcmu_py_job *job_new(struct tcmu_py_aio *a, const struct tcmu_py_ring *r,
                                   const struct tcmu_py_desc *o, const struct tcmu_py_iov *iov,
                                   uint64_t off, uint64_t t0)
{
    struct tcmu_py_job *j = a->free_list;

    if (j) {
        a->free_list = j->next;
    } else {
        j = malloc(sizeof(*j));
        if (!j)
            return NULL;
    }
    j->iov = j->iov_inline;
    if (o->iov_cnt > JOB_INLINE_IOV) {
        j->iov = malloc(sizeof(struct iovec) * o->iov_cnt);
        if (!j->iov) {
            j->iov = j->iov_inline;
            j->next = a->free_list;
            a->free_list = j;
            return NULL;
        }
    }
    if (o->iov_cnt == 1) {
        j->iov[0].iov_base = r->map + o->iov0_off;
        j->iov[0].iov_len = o->iov0_len;
    } else {
        for (uint32_t i = 0; i < o->iov_cnt; i++) {
            j->iov[i].iov_base = r->map + iov[o->iov_index + i].off;
            j->iov[i].iov_len = iov[o->iov_index + i].len;
        }
    }
    j->next = NULL;
    j->off = off;
    j->len = o->data_len;
    j->t0_ns = t0;
    j->err = 0;
    j->iov_cnt = o->iov_cnt;
    j->cmd_id = o->cmd_id;
    j->write = (o->cdb[0] & 0x02) != 0;
    j->fua = j->write && (o->cdb[1] & 0x08);
    return j;
}

uint32_t tcmu_py_serve_fast(struct tcmu_py_ring *r, struct tcmu_py_fast *f,
                            struct tcmu_py_desc *d, uint32_t n,
                            const struct tcmu_py_iov *iov,
                            struct tcmu_py_comp *c, uint32_t max_c)
{
    uint32_t keep = 0, served = 0, nc = f->n_comp, queued = 0;
    struct tcmu_py_job *qh = NULL, *qt = NULL;
    uint64_t t0 = now_ns();

    for (uint32_t i = 0; i < n; i++) {
        const struct tcmu_py_desc *o = &d[i];
        if (f->enabled && (f->mem || f->aio)) {
            if (f->mem) {
                if (nc < max_c && fast_one(r, f, o, iov)) {
                    struct tcmu_py_comp *cc = &c[nc++];
                    cc->read_len = 0;
                    cc->cmd_id = o->cmd_id;
                    cc->status = 0;
                    cc->uflags = 0;
                    cc->sense_len = 0;
                    hist_add(f, now_ns() - t0);
                    served++;
                    continue;
                }
            } else if (fast_one(r, f, o, iov) == 2) {
                const uint8_t *cdb = o->cdb;
                uint64_t lba = (cdb[0] == 0x28 || cdb[0] == 0x2a) ? be32(cdb + 2) : be64(cdb + 2);
                struct tcmu_py_job *j = job_new(f->aio, r, o, iov, lba * f->block_size, t0);
                if (j) {
                    if (qt)
                        qt->next = j;
                    else
                        qh = j;
                    qt = j;
                    queued++;
                    served++;
                    continue;
                }
            }
        }
        if (keep != i)
            d[keep] = d[i];
        keep++;
    }
    if (qh) {
        struct tcmu_py_aio *a = f->aio;
        f->inflight += queued;
        pthread_mutex_lock(&a->mu);
        if (a->q_tail)
            a->q_tail->next = qh;
        else
            a->q_head = qh;
        a->q_tail = qt;
        if (queued == 1)
            pthread_cond_signal(&a->cv);
        else
            pthread_cond_broadcast(&a->cv);
        pthread_mutex_unlock(&a->mu);
    }
    f->n_comp = nc;
    f->served = served;
    return keep;
}

uint32_t tcmu_py_aio_reap(struct tcmu_py_fast *f, struct tcmu_py_comp *c, uint32_t max_c,
                          struct tcmu_py_fail *fails, uint32_t max_f)
{
    struct tcmu_py_aio *a = f->aio;
    struct tcmu_py_job *list, *j;
    uint32_t nc = f->n_comp, nf = 0, taken = 0;
    uint64_t now;

    f->served = 0;
    if (!a)
        return 0;
    pthread_mutex_lock(&a->mu);
    list = a->d_head;
    a->d_head = a->d_tail = NULL;
    pthread_mutex_unlock(&a->mu);
    now = now_ns();
    while ((j = list)) {
        if (j->err == 0 ? nc >= max_c : nf >= max_f) {
            /* no room: the rest goes back in front, and the loop is told to come back */
            struct tcmu_py_job *t = list;
            uint64_t one = 1;
            while (t->next)
                t = t->next;
            pthread_mutex_lock(&a->mu);
            t->next = a->d_head;
            if (!a->d_head)
                a->d_tail = t;
            a->d_head = list;
            if (write(a->efd, &one, 8) < 0) { /* a wakeup is pending anyway */ }
            pthread_mutex_unlock(&a->mu);
            break;
        }
        list = j->next;
        if (j->err == 0) {
            struct tcmu_py_comp *cc = &c[nc++];
            cc->read_len = 0;
            cc->cmd_id = j->cmd_id;
            cc->status = 0;
            cc->uflags = 0;
            cc->sense_len = 0;
            if (j->write) {
                f->writes++;
                f->write_bytes += j->len;
            } else {
                f->reads++;
                f->read_bytes += j->len;
            }
        } else {
            fails[nf].err = j->err;
            fails[nf].cmd_id = j->cmd_id;
            fails[nf].write = j->write;
            nf++;
            f->errors++;
        }
        hist_add(f, now - j->t0_ns);
        f->inflight--;
        taken++;
        if (j->iov != j->iov_inline) {
            free(j->iov);
            j->iov = j->iov_inline;
        }
        j->next = a->free_list;
        a->free_list = j;
    }
    f->n_comp = nc;
    f->served = taken;
    return nf;
}

uint32_t tcmu_py_inflight_bytes(const struct tcmu_py_ring *r)
{
    uint32_t tail = tcmu_py_load_tail(r) % r->cmdr_size;
    return (r->fetch + r->cmdr_size - tail) % r->cmdr_size;
}

int tcmu_py_wakeup(int fd)
{
    uint32_t v = 0;
    ssize_t n;
    do {
        n = write(fd, &v, 4);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    return n == 4 ? 0 : -EIO;
}

int tcmu_py_ack(int fd)
{
    uint32_t v;
    int count = 0;
    while (count < 4096) {
        ssize_t n = read(fd, &v, 4);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            return -errno;
        }
        if (n == 0)
            break;
        count++;
    }
    return count;
}

int tcmu_py_wait(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int rc;
    do {
        rc = poll(&p, 1, timeout_ms);
    } while (rc < 0 && errno == EINTR);
    if (rc < 0)
        return -errno;
    return rc > 0 ? 1 : 0;
}
