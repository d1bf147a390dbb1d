/* shm_internal.h -- the C side's single include: the parser-clean layout and API headers behind
 * a guard, the process-local handle, and the file-private prototypes grouped by the file that
 * defines them. */
#ifndef SHM_INTERNAL_H
#define SHM_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "shm_layout.h"
#include "shm_api.h"

/* Debug levels: SHMALLOC_DEBUG=0..3 at build time (build_ffi.py; shm_debug_level() reports it).
 *   0  release: no asserts
 *   1  shm_assert(x): cheap checks of our own logic (sizes we computed, slots we were given after
 *      validating them, states we set a moment ago)
 *   2  also shm_assert_internal(x): internal invariants that cost more (a header we just wrote
 *      re-validated with its checksum, a list we just changed re-read)
 *   3  also the full heap walk (check.c) after every heap-locked operation (heap_unlock)
 * A failed assert prints what failed and where, and aborts. Asserts are for our own logic only:
 * bytes read from the segment may be damaged by anyone, and are validated and answered with
 * SHM_ECORRUPT, never asserted (but the level-3 walk, which aborts on any corruption). */
#ifndef SHMALLOC_DEBUG
#define SHMALLOC_DEBUG 0
#endif
#if SHMALLOC_DEBUG >= 1
#define shm_assert(x) ((x) ? (void)0 : shm_assert_fail(#x, __FILE__, __LINE__))
#else
#define shm_assert(x) ((void)0)
#endif
#if SHMALLOC_DEBUG >= 2
#define shm_assert_internal(x) ((x) ? (void)0 : shm_assert_fail(#x, __FILE__, __LINE__))
#else
#define shm_assert_internal(x) ((void)0)
#endif

#define SHM_HDR ((uint64_t)sizeof(shm_block_t))
/* The arena header rounded up to a page: where the heap starts (shm_header_size()). */
#define SHM_HEADER_BYTES \
    (((uint64_t)sizeof(shm_arena_t) + SHM_PAGE - 1) & ~(uint64_t)(SHM_PAGE - 1))
#define SHM_MAX_CAPACITY ((uint64_t)1 << 40)
#define SHM_WALK_LIMIT ((uint64_t)1 << 40) /* no list holds more blocks than this */

/* Counters with one writer at a time (the heap lock's holder, or a slot lock's holder for its
 * cache's counters) and readers without the lock: a relaxed atomic load and store (no locked
 * read-modify-write) keeps every read untorn. Counters with several writers use __atomic_fetch_add
 * or a compare-and-swap (a_raise_max). */
#define A_LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define A_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define A_ADD(p, v) a_add_u64((p), (v))
#define A_SUB(p, v) a_add_u64((p), -(uint64_t)(v))
static inline uint64_t a_add_u64(uint64_t *p, uint64_t v) {
    uint64_t n = __atomic_load_n(p, __ATOMIC_RELAXED) + v;
    __atomic_store_n(p, n, __ATOMIC_RELAXED);
    return n;
}

/* *p = max(*p, v) by compare-and-swap (for peaks raised from more than one path); returns it. */
static inline uint64_t a_raise_max(uint64_t *p, uint64_t v) {
    uint64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (cur < v &&
           !__atomic_compare_exchange_n(p, &cur, v, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    return cur < v ? v : cur;
}

#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* Process-local view of an arena. Nothing in here is shared. */
struct shm_handle {
    uint8_t *base;
    shm_arena_t *arena;
    uint64_t capacity; /* the mapping's length, trusted over the copy in the segment */
    uint64_t heap_off;
    uint64_t heap_end;
    uint64_t salt;
    int fd;
    uint64_t seg_dev, seg_ino; /* the segment's identity (fstat): life.c keys its locks by it */
    int32_t slot;              /* this process's slot once attached (shm_proc_attach), else -1 */
    uint64_t claimed;  /* block claimed BUSY under the heap lock (block_claim); let go at release */
    uint32_t gate;     /* threads inside a public call, and GATE_CLOSING (arena.c, the gate) */
    uint32_t orphaned; /* a fork child's copy of a handle its parent was closing (arena.c) */
    int32_t closer;    /* thread id of the thread closing it, which the gate lets through */
    int32_t pad;
    struct shm_handle *next; /* this process's handles not yet freed (arena.c) */
};

/* The gate (arena.c): every public call that touches the segment passes it, so that close never
 * unmaps the segment under a thread that is still inside. SHM_GATE(h) enters (or returns
 * SHM_ECLOSED once the handle is closing, to every thread but the closing one) and leaves again
 * when the function returns, by whichever return. Two uncontended atomic additions per call. */
#define GATE_CLOSING 0x80000000u
int gate_refuse(shm_handle_t *h);
void gate_wake(shm_handle_t *h);
static inline shm_handle_t *gate_enter(shm_handle_t *h) {
    if (UNLIKELY(__atomic_fetch_add(&h->gate, 1, __ATOMIC_ACQUIRE) & GATE_CLOSING) &&
        gate_refuse(h) != SHM_OK)
        return NULL;
    return h;
}
static inline void gate_leave(shm_handle_t **held) {
    if (*held && UNLIKELY(__atomic_sub_fetch(&(*held)->gate, 1, __ATOMIC_RELEASE) & GATE_CLOSING))
        gate_wake(*held);
}
/* Return what expr returns, evaluated under the heap lock (the lock's error if it cannot be
 * taken). For the one-call public entry points of own.c and objects.c. */
#define LOCKED(h, expr)                \
    do {                               \
        int rc_ = heap_lock(h);        \
        if (rc_ != SHM_OK) return rc_; \
        rc_ = (expr);                  \
        heap_unlock(h);                \
        return rc_;                    \
    } while (0)

#define SHM_GATE(h)                                                                \
    shm_handle_t *gate_held_ __attribute__((cleanup(gate_leave))) = gate_enter(h); \
    if (UNLIKELY(!gate_held_)) return SHM_ECLOSED

/* error.c */
int err_set(int status, uint64_t offset, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int err_sys(int sys_errno, const char *what);
int err_oom(int status, uint64_t requested, uint64_t available, uint64_t used, uint64_t total);
int err_limit(uint32_t pid, uint64_t limit, uint64_t used, uint64_t requested);
int err_table_full(uint64_t offset, const char *table, int entries, const char *size_macro,
                   const char *advice);
void err_restore(const shm_error_info_t *saved);
__attribute__((noreturn)) void shm_assert_fail(const char *what, const char *file, int line);

/* journal.c */
#define JOURNAL_REC_HDR 16 /* offset (8) + len (8) */
static inline uint64_t journal_rec_size(uint64_t len) {
    return JOURNAL_REC_HDR + ((len + 7) & ~(uint64_t)7);
}
void journal_overflow(shm_handle_t *h);
/* Append (offset, len, the old bytes) to the undo journal; see journal.c for the protocol. */
static inline void journal_save(shm_handle_t *h, const void *p, uint64_t len) {
    shm_journal_t *j = &h->arena->journal;
    shm_assert((const uint8_t *)p >= h->base && (const uint8_t *)p + len <= h->base + h->capacity);
    uint64_t used = j->used;
    if (UNLIKELY(used + journal_rec_size(len) > sizeof j->log)) {
        journal_overflow(h);
        return;
    }
    /* the log and every record are 8-aligned */
    uint64_t *rec = (uint64_t *)(void *)(j->log + used);
    rec[0] = (uint64_t)((const uint8_t *)p - h->base);
    rec[1] = len;
    if (__builtin_constant_p(len)) {
        __builtin_memcpy(rec + 2, p, len); /* a known size: inlined as a few wide moves */
    } else if (LIKELY(len % 8 == 0 && ((uintptr_t)p & 7) == 0)) {
        const uint64_t *src = p; /* every range we save is whole aligned words: no memcpy call */
        for (uint64_t i = 0; i < len / 8; i++) rec[2 + i] = src[i];
    } else {
        __builtin_memcpy(rec + 2, p, len);
    }
    j->used = used + journal_rec_size(len);
    __atomic_store_n(&j->count, j->count + 1, __ATOMIC_RELEASE); /* counted only once whole */
}
void journal_begin(shm_handle_t *h);
void journal_checkpoint(shm_handle_t *h);
void journal_end(shm_handle_t *h);
int journal_rollback(shm_handle_t *h);
int journal_validate(const shm_handle_t *h, uint64_t *starts, uint64_t *end);
#define J(h, p) journal_save((h), (p), sizeof *(p))

/* fault.c */
enum {
    FAULT_ALLOC_LOCKED,
    FAULT_ALLOC_REMOVED,
    FAULT_ALLOC_CARVED,
    FAULT_ALLOC_DONE,
    FAULT_FREE_LOCKED,
    FAULT_FREE_UNLINKED,
    FAULT_FREE_INSERTED,
    FAULT_RETAIN_HALF,
    FAULT_GC_STEP,
    FAULT_CACHE_POPPED,
    FAULT_CACHE_PUSHED,
    FAULT_REMOTE_CLAIMED,
    FAULT_QUEUE_PUT_HALF,
    FAULT_QUEUE_PUT_DONE,
    FAULT_QUEUE_GET_HALF,
    FAULT_QUEUE_GET_DONE,
    FAULT_QUEUE_GROW,
    FAULT_QUEUE_DRAIN,
    FAULT_OBJECT_FILLED,
};
extern int fault_step;
void fault_init(void);
void fault_fire(void);
#define FAULT_POINT(id)                                 \
    do {                                                \
        if (UNLIKELY(fault_step == (id))) fault_fire(); \
    } while (0)

/* lock.c */
int lock_init(shm_lock_t *l);
int heap_lock(shm_handle_t *h);
void heap_unlock(shm_handle_t *h);
#define SHM_LOCK_RECOVERED 1
int lock_take(shm_handle_t *h, shm_lock_t *l, int wait);
void lock_give(shm_lock_t *l);
#define LOCK_PEEK_FREE 0
#define LOCK_PEEK_HELD 1
#define LOCK_PEEK_OWNER_DIED 2
int lock_peek(const shm_lock_t *l);
uint64_t lock_self_ns(void);

/* life.c */
int life_hold(shm_handle_t *h, int slot);
int life_is_mine(const shm_handle_t *h, int slot);
void life_let_go(shm_handle_t *h, int slot);
void life_forget(uint64_t dev, uint64_t ino);
int life_peek(const shm_handle_t *h, int slot);
int life_probe(shm_handle_t *h, int slot);

/* block.c */
static inline shm_block_t *block_at(const shm_handle_t *h, uint64_t off) {
    return (shm_block_t *)(h->base + off);
}
static inline shm_free_links_t *block_links(const shm_handle_t *h, uint64_t off) {
    return (shm_free_links_t *)(h->base + off + SHM_HDR);
}
/* The (owner, flags) pair as one 64-bit word: owner in the low half, flags in the high half. */
static inline uint64_t *block_word(const shm_handle_t *h, uint64_t off) {
    return (uint64_t *)(void *)(h->base + off + 16);
}
#define BLOCK_WORD(owner, flags) ((uint64_t)(uint32_t)(owner) | ((uint64_t)(uint32_t)(flags) << 32))
/* Could a block header start at off? (Inside the heap, room for a minimal block, aligned.) */
static inline int heap_offset_ok(const shm_handle_t *h, uint64_t off) {
    return off >= h->heap_off && off <= h->heap_end - SHM_MIN_BLOCK && off % SHM_ALIGN == 0;
}
/* A cached or remotely freed block's payload starts with the offset of the next on its list. */
static inline uint64_t *block_cache_link(const shm_handle_t *h, uint64_t off) {
    return (uint64_t *)(void *)(h->base + off + SHM_HDR);
}
/* Tombstone of a free block or of a header wiped by a merge : why it was freed, in its
 * top 3 bits, and by which process (pid, as that process saw it) below; 0 = not known. Only error
 * messages read it ("was reclaimed by a collection in process ..."). */
#define SHM_TOMB(why, pid) ((uint32_t)(why) << 29 | ((uint32_t)(pid)&0x1fffffffu))
#define SHM_TOMB_WHY(t) ((t) >> 29)
#define SHM_TOMB_PID(t) ((t)&0x1fffffffu)
#define SHM_TOMB_DEALLOCATED 1 /* deallocate() in that process */
#define SHM_TOMB_CACHE 2       /* deallocate(), then given back by that process's cache */
#define SHM_TOMB_RECLAIMED 3   /* a collection in that process took it from its owner */
#define SHM_TOMB_RELEASED 4    /* its last reference released, in that process */
#define SHM_TOMB_OBJECT 5      /* part of an object that process deleted or let go last */

uint32_t block_checksum(const shm_handle_t *h, uint64_t off, const shm_block_t *b);
shm_block_t *block_edit(shm_handle_t *h, uint64_t off);
void block_write(shm_handle_t *h, uint64_t off, uint64_t size, uint64_t prev_size, uint32_t owner,
                 uint32_t flags, uint32_t refcount);
void block_reseal(const shm_handle_t *h, uint64_t off);
void block_scrub(shm_handle_t *h, uint64_t off, uint32_t tomb);
int block_err_freed(const shm_handle_t *h, uint64_t address, uint64_t off);
uint32_t self_pid(const shm_handle_t *h);
int block_claim(shm_handle_t *h, uint64_t off);
void block_unclaim(shm_handle_t *h, uint64_t off);
int block_validate(const shm_handle_t *h, uint64_t off);
int block_from_address(const shm_handle_t *h, uint64_t address, uint64_t *off_out);

/* sizeclass.c */
unsigned bin_of_size(uint64_t size);
uint64_t bin_min_size(unsigned bin);
uint64_t cache_class_size(unsigned k);
unsigned cache_class_of(uint64_t need);

/* freelist.c */
int freelist_insert(shm_handle_t *h, uint64_t off);
int freelist_remove(shm_handle_t *h, uint64_t off);
int freelist_find(shm_handle_t *h, uint64_t need, uint64_t *off_out);
int freelist_largest(shm_handle_t *h, uint64_t *size_out);

/* heap.c */
int heap_carve(shm_handle_t *h, uint64_t need, uint64_t align, uint32_t owner, uint32_t flags,
               uint64_t room, uint64_t *off_out);
int heap_release_block(shm_handle_t *h, uint64_t off, uint32_t tomb, uint64_t *merged_end);
uint64_t heap_cache_sum(const shm_handle_t *h, size_t field);
void heap_note_peak(shm_handle_t *h, int slot);
int64_t heap_result_flags(shm_handle_t *h, uint32_t owner, int rose);
void pressure_update(shm_handle_t *h, int *rose);

/* process.c */
/* SHM_OK if slot indexes the process table, else SHM_EINVAL reported (an entry point's check). */
static inline int proc_slot_check(int32_t slot) {
    if (UNLIKELY(slot < 0 || slot >= SHM_MAX_PROCS))
        return err_set(SHM_EINVAL, (uint64_t)slot, "no process slot %d", slot);
    return SHM_OK;
}
/* SHM_OK if slot is a live (attached) process's, else SHM_EINVAL reported. */
static inline int proc_live_check(const shm_handle_t *h, int32_t slot) {
    if (slot < 0 || slot >= SHM_MAX_PROCS || A_LOAD(&h->arena->procs[slot].state) != SHM_PROC_LIVE)
        return err_set(SHM_EINVAL, (uint64_t)slot, "process slot %d is not attached", slot);
    return SHM_OK;
}
static inline int proc_slot_is_valid(const shm_handle_t *h, uint32_t owner) {
    return owner >= 1 && owner <= SHM_MAX_PROCS &&
           A_LOAD(&h->arena->procs[owner - 1].state) != SHM_PROC_FREE;
}
/* The pid of the process in a block owner's slot (slot + 1), 0 for none. */
static inline uint32_t proc_owner_pid(const shm_handle_t *h, uint32_t owner) {
    return proc_slot_is_valid(h, owner) ? A_LOAD(&h->arena->procs[owner - 1].pid) : 0;
}
uint64_t proc_usage(const shm_handle_t *h, int slot);
int proc_charge(shm_handle_t *h, uint32_t owner, uint64_t bytes);
void proc_credit(shm_handle_t *h, uint32_t owner, uint64_t bytes);
void proc_move(shm_handle_t *h, uint32_t from, uint32_t to, uint64_t bytes);
void proc_free_slot(shm_handle_t *h, int slot);

/* check.c */
int check_locked(shm_handle_t *h, shm_check_report_t *out, int full);

/* copy.c: memcpy (no overlap); when n is large, streamed and split over the usable cores */
void copy_in(void *dst, const void *src, size_t n);
int usable_cores(void); /* the CPUs this thread may run on (its affinity), at least 1 */

/* cache.c */
#define CACHE_MAX_BLOCK ((uint64_t)65536)
#define CACHE_MAX_USABLE (CACHE_MAX_BLOCK - SHM_HDR)
#define CACHE_DECLINED (-1000) /* cache_alloc/cache_free: not for the cache; take the heap path */
int slot_lock(shm_handle_t *h, int slot, int wait);
void slot_unlock(shm_handle_t *h, int slot);
int64_t cache_alloc(shm_handle_t *h, int slot, uint64_t size);
int64_t cache_free(shm_handle_t *h, int slot, uint64_t address);
int cache_flush(shm_handle_t *h, int slot);
void cache_flush_all(shm_handle_t *h);
void cache_remote_done(shm_handle_t *h, int slot, uint64_t got);
int cache_pending_live(const shm_handle_t *h, uint64_t off);
void cache_finish_pushes(shm_handle_t *h);
void cache_help_drain_all(shm_handle_t *h);

/* own.c */
int refs_release(shm_handle_t *h, uint64_t off, int32_t slot);
int refs_drop_block(shm_handle_t *h, uint64_t off);
uint64_t refs_drop_slot(shm_handle_t *h, uint32_t holder);
int refs_held_by(shm_handle_t *h, uint32_t holder);

/* names.c */
void names_drop_address(shm_handle_t *h, uint64_t address);
int64_t names_find_address(shm_handle_t *h, const char *name);
int names_unbind_locked(shm_handle_t *h, const char *name, uint64_t *off_out);
int names_check(const char *name);

/* alloc.c */
int64_t alloc_checked(shm_handle_t *h, uint64_t size, uint64_t align, int32_t slot);
int alloc_free_block(shm_handle_t *h, uint64_t off, uint32_t tomb, uint64_t *merged_end);
int alloc_oom_report(shm_handle_t *h, uint64_t requested);

/* objects.c */
int objects_create(shm_handle_t *h, int32_t slot, uint64_t pickle_len, uint32_t nbuffers,
                   const uint64_t *sizes, uint64_t *out);
void objects_discard(shm_handle_t *h, uint64_t object, uint32_t nbuffers, const uint64_t *bufs);
int objects_held(const shm_handle_t *h, int32_t slot);
int objects_collect(shm_handle_t *h, int32_t slot);
/* objects.c, for queue.c: the file-private steps of objects, under the heap lock */
int objects_find(shm_handle_t *h, uint64_t object, uint64_t id, uint64_t *off, shm_object_t **out);
int objects_publish_locked(shm_handle_t *h, int32_t slot, uint64_t object, int writable,
                           uint64_t *id_out);
int objects_open_found(shm_handle_t *h, int32_t slot, uint64_t off, shm_object_t *o,
                       shm_object_view_t *out, uint64_t *bufs, uint32_t cap);
void objects_holder_set(shm_handle_t *h, shm_object_t *o, int32_t slot, int on);
int objects_settle(shm_handle_t *h, uint64_t off, shm_object_t *o);
/* objects.c, for handoff.c */
int objects_take_stream(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id, void *dst,
                        uint64_t dst_cap);

/* wait.c */
int wait_spin(const uint32_t *w, uint32_t expected);

/* queue.c */
int queue_release_items(shm_handle_t *h, uint64_t off, shm_object_t *qo);
/* shm_queue_get, and with dst the copy of a small item's stream and its drop in the same hold of
 * the heap lock (SHM_QGET_COPIED); with copy_only, SHM_QGET_HELD for any other item. */
int queue_take(shm_handle_t *h, int32_t slot, uint64_t queue, uint64_t queue_id,
               shm_object_view_t *out, uint64_t *bufs, uint32_t cap, void *dst, uint64_t dst_cap,
               int copy_only, uint32_t *seq_out);

#endif
