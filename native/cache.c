/* cache.c -- per-process caches of small and medium blocks, and frees across processes.
 *
 * Every slot of the process table has a cache in the segment (shm_cache_t): one list per size
 * class of free blocks that stay allocated from the heap's point of view, owned by the slot and
 * flagged CACHED. Its process allocates from and frees into it holding only its own slot lock
 * (slot_locks[slot]), never the heap lock: no global lock on the small-block hot path. A list that
 * runs dry is refilled in a batch under the heap lock; one that grows past its bound is drained
 * in a batch. Because the cache lives in the segment, a dead process's cached blocks are found by
 * the collector's heap walk (gc.c) like any block it owned.
 *
 * A process that frees a block owned by another process does not touch the owner's cache: it
 * claims the block with one compare-and-swap of its (owner, flags) word from (owner, 0) to
 * (owner, REMOTE) and pushes it onto the owner's remote list (a Treiber stack, links in the
 * payloads), lock-free. The owner takes the whole list with one exchange when it next allocates
 * and moves the blocks into its cache. While pushing, the freeing process names the block in its
 * own `pending` word, so that a collector never frees a REMOTE block whose push is still under way.
 * One word per process, shared by its threads: a thread takes it by compare-and-swap from 0, and
 * one that finds it taken frees through the heap path instead (remote_free).
 *
 * Who may change what (the rules that make this safe; shm_layout.h's Concurrency section has the
 * whole table and the lock order: a slot lock before the heap lock, never the other way):
 *   - a block in the plain allocated state (owner X, flags 0) leaves it by exactly one CAS: to
 *     CACHED (X's own free, X's slot lock held), to REMOTE (a remote free, no lock) or to BUSY
 *     (the heap lock's holder, block_claim in block.c, before adopt/retain/free/...);
 *   - CACHED blocks and X's lists are touched only by a holder of X's slot lock, or by the
 *     collector once X is dead; REMOTE blocks only by whoever holds X's slot lock and has taken
 *     them off the remote list, or by the collector once X is dead;
 *   - the cache-side counters of X are written only by a holder of X's slot lock (or by the
 *     collector once X is dead), the heap-side counters (procs[X]) only under the heap lock.
 *
 * Crashes. The hot path keeps no journal. A process that dies holding a slot lock leaves the lists
 * and counters of that cache in any state; the next taker of the lock gets SHM_LOCK_RECOVERED and
 * repairs the cache from the heap, which is the truth: every CACHED block of the slot goes back to
 * the heap and the counters are recomputed (cache_repair). Changes to the heap itself are
 * journaled as always, so a death under both locks is first rolled back, then repaired. */
#include <string.h>

#include "shm_internal.h"

#define CLASS_BYTES ((uint64_t)65536) /* a list holds at most this many bytes... */
#define CLASS_MAX 64                  /* ...and at most this many blocks */
#define REFILL_BYTES ((uint64_t)8192) /* a refill carves about this much (at least one block) */
#define ROOM_FLOOR ((uint64_t)262144) /* a process may always cache this much (in its limit) */
#define ROOM_SHARE 16                 /* and otherwise 1/16 of what it uses */
#define REMOTE_WALK_MAX ((uint64_t)1 << 24)
/* a remote list this long is drained by a freer */
#define REMOTE_HELP_BYTES ((uint64_t)256 << 10)

_Static_assert(SHM_CACHE_CLASSES <= sizeof(((shm_cache_t *)0)->head) / 8, "too many classes");

static unsigned class_cap(unsigned k) {
    uint64_t n = CLASS_BYTES / cache_class_size(k); /* a constant divisor per class: cheap */
    return n < 2 ? 2 : n > CLASS_MAX ? CLASS_MAX : (unsigned)n;
}

/* Is size the exact size of a class? Only such blocks are cached. */
static int class_exact(uint64_t size, unsigned *k) {
    if (size < SHM_MIN_BLOCK || size > CACHE_MAX_BLOCK || size % SHM_ALIGN) return 0;
    *k = cache_class_of(size);
    return cache_class_size(*k) == size;
}

/* *p -= v, but not below 0 (a pusher that died between its push and its count leaves it short). */
static void sub_clamped(uint64_t *p, uint64_t v) {
    uint64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &cur, cur > v ? cur - v : 0, 1, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {}
}

/* A REMOTE block of slot leaves the remote list's count (drained, or freed by the collector). */
void cache_remote_done(shm_handle_t *h, int slot, uint64_t got) {
    shm_cache_t *c = &h->arena->caches[slot];
    sub_clamped(&c->remote_bytes, got);
    sub_clamped(&c->remote_blocks, 1);
}

static inline shm_cache_t *cache_of(const shm_handle_t *h, int slot) {
    return &h->arena->caches[slot];
}

/* Is off named by a live process's pending remote push? (The collector must leave it alone.) */
int cache_pending_live(const shm_handle_t *h, uint64_t off) {
    for (int i = 0; i < SHM_MAX_PROCS; i++)
        if (__atomic_load_n(&cache_of(h, i)->pending, __ATOMIC_SEQ_CST) == off &&
            A_LOAD(&h->arena->procs[i].state) == SHM_PROC_LIVE)
            return 1;
    return 0;
}

/* Is off a block of `size` bytes whose (owner, flags) word is `word`? A header caught between
 * two writes of the heap lock's holder (a neighbour's prev_size) fails its checksum for a moment:
 * only a second look under the heap lock decides. */
static int block_is(shm_handle_t *h, uint64_t off, uint64_t size, uint64_t word, int heap_locked) {
    if (LIKELY(block_validate(h, off) == SHM_OK && block_at(h, off)->size == size &&
               __atomic_load_n(block_word(h, off), __ATOMIC_ACQUIRE) == word))
        return 1;
    if (heap_locked || heap_lock(h) != SHM_OK) return 0;
    int ok = block_validate(h, off) == SHM_OK && block_at(h, off)->size == size &&
             __atomic_load_n(block_word(h, off), __ATOMIC_ACQUIRE) == word;
    heap_unlock(h);
    return ok;
}

/* Pop the head of list k of slot (its slot lock held), validated: in the heap, sound header,
 * owned by the slot, CACHED, of the class's size. */
static int list_pop(shm_handle_t *h, int slot, unsigned k, uint64_t *off_out, int heap_locked) {
    shm_cache_t *c = cache_of(h, slot);
    uint64_t off = c->head[k];
    if (UNLIKELY(!block_is(h, off, cache_class_size(k), BLOCK_WORD(slot + 1, SHM_BF_CACHED),
                           heap_locked))) {
        c->head[k] = 0; /* do not follow it again */
        c->count[k] = 0;
        return err_set(SHM_ECORRUPT, off,
                       "[K1] cache of slot %d, class %u: %#llx is not a cached block", slot, k,
                       (unsigned long long)off);
    }
    c->head[k] = *block_cache_link(h, off);
    c->count[k]--;
    *off_out = off;
    return SHM_OK;
}

static void list_push(shm_handle_t *h, int slot, unsigned k, uint64_t off) {
    shm_cache_t *c = cache_of(h, slot);
    shm_assert(k < SHM_CACHE_CLASSES && heap_offset_ok(h, off));
    shm_assert_internal(block_at(h, off)->size == cache_class_size(k));
    *block_cache_link(h, off) = c->head[k];
    c->head[k] = off;
    c->count[k]++;
}

/* A block of slot's process, freed by it or by another one, goes into list k (its slot lock held):
 * it leaves the slot's usage and joins its cached bytes. */
static void keep_freed(shm_handle_t *h, int slot, unsigned k, uint64_t off, uint64_t got) {
    shm_cache_t *c = cache_of(h, slot);
    list_push(h, slot, k, off);
    A_SUB(&c->usage, got);
    A_SUB(&c->nblocks, 1);
    A_ADD(&c->nfrees, 1);
    A_ADD(&c->cached_bytes, got);
    A_ADD(&c->cached_blocks, 1);
}

/* Give n blocks of list k back to the heap (slot lock and heap lock held). */
static int list_release(shm_handle_t *h, int slot, unsigned k, unsigned n) {
    shm_cache_t *c = cache_of(h, slot);
    uint64_t got = cache_class_size(k) - SHM_HDR;
    while (n-- && c->count[k]) {
        uint64_t off;
        int rc = list_pop(h, slot, k, &off, 1);
        if (rc != SHM_OK) return rc;
        A_SUB(&c->cached_bytes, got);
        A_SUB(&c->cached_blocks, 1);
        uint32_t tomb = SHM_TOMB(SHM_TOMB_CACHE, proc_owner_pid(h, (uint32_t)slot + 1));
        if ((rc = heap_release_block(h, off, tomb, NULL)) != SHM_OK) return rc;
        journal_checkpoint(h); /* each block given back is a step of its own */
    }
    return SHM_OK;
}

/* Rebuild slot's cache from the heap after a holder of its lock died (slot lock held): every
 * CACHED block of the slot goes back to the heap, the lists are emptied and the cache-side
 * counters recomputed from what the slot owns. */
static int cache_repair(shm_handle_t *h, int slot) {
    int rc = heap_lock(h); /* rolls back a death under both locks first */
    if (rc != SHM_OK) return rc;
    shm_cache_t *c = cache_of(h, slot);
    memset(c->head, 0, sizeof c->head);
    memset(c->count, 0, sizeof c->count);
    uint64_t usage = 0, nblocks = 0, off = h->heap_off;
    while (off < h->heap_end) {
        if ((rc = block_validate(h, off)) != SHM_OK) break;
        const shm_block_t *b = block_at(h, off);
        uint64_t size = b->size;
        if (b->owner == (uint32_t)slot + 1 && !(b->flags & SHM_BF_FREE)) {
            if (b->flags & SHM_BF_CACHED) {
                uint32_t tomb = SHM_TOMB(SHM_TOMB_CACHE, proc_owner_pid(h, (uint32_t)slot + 1));
                if ((rc = heap_release_block(h, off, tomb, &off)) != SHM_OK) break;
                journal_checkpoint(h);
                continue;
            }
            usage += size - SHM_HDR;
            nblocks++;
        }
        off += size;
    }
    if (rc == SHM_OK) {
        const shm_proc_t *p = &h->arena->procs[slot];
        A_STORE(&c->usage, usage - A_LOAD(&p->usage));
        A_STORE(&c->nblocks, nblocks - A_LOAD(&p->nblocks));
        A_STORE(&c->cached_bytes, 0);
        A_STORE(&c->cached_blocks, 0);
        A_ADD(&h->arena->counters.lock_recoveries, 1);
    }
    heap_unlock(h);
    return rc;
}

/* Take slot's lock (waiting, or not: SHM_EBUSY if busy), repairing its cache if the last holder
 * died. */
int slot_lock(shm_handle_t *h, int slot, int wait) {
    shm_assert(slot >= 0 && slot < SHM_MAX_PROCS);
    int rc = lock_take(h, &h->arena->slot_locks[slot], wait);
    if (LIKELY(rc == SHM_OK)) return SHM_OK;
    if (rc != SHM_LOCK_RECOVERED) return rc;
    if ((rc = cache_repair(h, slot)) != SHM_OK) {
        lock_give(&h->arena->slot_locks[slot]); /* the lists are emptied; the heap is damaged */
        return rc;
    }
    return SHM_OK;
}

void slot_unlock(shm_handle_t *h, int slot) { lock_give(&h->arena->slot_locks[slot]); }

/* Move the blocks other processes freed into slot's cache (slot lock held). */
static int drain_remote(shm_handle_t *h, int slot) {
    shm_cache_t *c = cache_of(h, slot);
    uint64_t off = __atomic_exchange_n(&c->remote_head, 0, __ATOMIC_ACQUIRE);
    for (uint64_t n = 0; off && n < REMOTE_WALK_MAX; n++) {
        unsigned k;
        uint64_t *w = block_word(h, off);
        if (!heap_offset_ok(h, off) || !class_exact(block_at(h, off)->size, &k) ||
            !block_is(h, off, cache_class_size(k), BLOCK_WORD(slot + 1, SHM_BF_REMOTE), 0))
            return err_set(SHM_ECORRUPT, off,
                           "remote list of slot %d: %#llx is not a block freed to it", slot,
                           (unsigned long long)off);
        uint64_t next = *block_cache_link(h, off), got = block_at(h, off)->size - SHM_HDR;
        __atomic_store_n(w, BLOCK_WORD(slot + 1, SHM_BF_CACHED), __ATOMIC_RELAXED);
        keep_freed(h, slot, k, off, got);
        cache_remote_done(h, slot, got);
        off = next;
    }
    return SHM_OK;
}

/* How many bytes slot may keep cached: the arena's cache_limit, but no more than 1/16 of what the
 * process uses (at least ROOM_FLOOR), so that a cache does not dwarf its working set. The floor
 * is a trade: larger caches serve more requests without the heap lock (larson from two processes
 * scales 1.4x with a 32 KiB floor, 1.8x with 256 KiB) but hold more memory that other size classes
 * cannot use (the larson trace's footprint / live: 1.41 and 1.55; 1.25 with caches off). */
static uint64_t cache_room(const shm_handle_t *h, int slot) {
    uint64_t limit = A_LOAD(&h->arena->counters.cache_limit);
    uint64_t share = proc_usage(h, slot) / ROOM_SHARE;
    if (share < ROOM_FLOOR) share = ROOM_FLOOR;
    return share < limit ? share : limit;
}

/* Bring slot's cache back within its bounds: each list within class_cap, the whole within the
 * arena's cache_limit (slot lock held; takes the heap lock if anything has to go). Only list
 * `grew` can be over its cap, or any of them if grew is SHM_CACHE_CLASSES. */
static int trim_to_bounds(shm_handle_t *h, int slot, unsigned grew) {
    shm_cache_t *c = cache_of(h, slot);
    uint64_t limit = cache_room(h, slot);
    int over = A_LOAD(&c->cached_bytes) > limit;
    if (grew < SHM_CACHE_CLASSES)
        over |= c->count[grew] > class_cap(grew);
    else
        for (unsigned k = 0; k < SHM_CACHE_CLASSES && !over; k++) over = c->count[k] > class_cap(k);
    if (LIKELY(!over)) return SHM_OK;
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    for (unsigned k = 0; k < SHM_CACHE_CLASSES && rc == SHM_OK; k++)
        if (c->count[k] > class_cap(k))
            rc = list_release(h, slot, k, c->count[k] - class_cap(k) / 2);
    /* over the total: other lists give back half first, largest blocks first; the list that grew
     * (the block just freed, likely wanted again soon) last */
    for (unsigned k = SHM_CACHE_CLASSES;
         k-- > 0 && rc == SHM_OK && A_LOAD(&c->cached_bytes) > limit;)
        if (k != grew) rc = list_release(h, slot, k, (c->count[k] + 1) / 2);
    if (rc == SHM_OK && grew < SHM_CACHE_CLASSES && A_LOAD(&c->cached_bytes) > limit)
        rc = list_release(h, slot, grew, (c->count[grew] + 1) / 2);
    heap_unlock(h);
    return rc;
}

/* Fill list k with a batch carved from the heap (slot lock held). */
static int refill(shm_handle_t *h, int slot, unsigned k, int *rose) {
    shm_cache_t *c = cache_of(h, slot);
    uint64_t size = cache_class_size(k), got = size - SHM_HDR;
    uint64_t limit = cache_room(h, slot), cached = A_LOAD(&c->cached_bytes);
    uint64_t n = REFILL_BYTES / size, fit = limit > cached ? (limit - cached) / got : 0;
    if (n > class_cap(k) / 2) n = class_cap(k) / 2;
    if (n > fit) n = fit;
    if (n < 1) n = 1; /* the block about to be handed out */
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    uint64_t made = 0;
    while (made < n) {
        uint64_t off;
        rc = heap_carve(h, size, 0, (uint32_t)slot + 1, SHM_BF_CACHED, UINT64_MAX, &off);
        if (rc != SHM_OK) break;
        uint64_t *link = block_cache_link(h, off);
        J(h, link); /* the payload was a free block's links a moment ago */
        list_push(h, slot, k, off);
        A_ADD(&c->cached_bytes, got);
        A_ADD(&c->cached_blocks, 1);
        made++;
    }
    if (made) {
        rc = SHM_OK;
        pressure_update(h, rose);
        heap_note_peak(h, slot);
    }
    heap_unlock(h);
    return rc;
}

int64_t cache_alloc(shm_handle_t *h, int slot, uint64_t size) {
    uint64_t usable = (size + SHM_ALIGN - 1) & ~(uint64_t)(SHM_ALIGN - 1);
    uint64_t need = usable + SHM_HDR < SHM_MIN_BLOCK ? SHM_MIN_BLOCK : usable + SHM_HDR;
    unsigned k = cache_class_of(need);
    uint64_t got = cache_class_size(k) - SHM_HDR;
    shm_assert(got >= usable);
    shm_cache_t *c = cache_of(h, slot);
    shm_proc_t *p = &h->arena->procs[slot];
    int rc = slot_lock(h, slot, 1);
    if (rc != SHM_OK) return rc;
    if (UNLIKELY(A_LOAD(&p->state) != SHM_PROC_LIVE)) { /* detached: the heap path says so */
        slot_unlock(h, slot);
        return CACHE_DECLINED;
    }
    if (UNLIKELY(__atomic_load_n(&c->remote_head, __ATOMIC_RELAXED)) &&
        ((rc = drain_remote(h, slot)) != SHM_OK ||
         (rc = trim_to_bounds(h, slot, SHM_CACHE_CLASSES)) != SHM_OK)) {
        slot_unlock(h, slot);
        return rc;
    }
    uint64_t limit = A_LOAD(&p->limit);
    if (UNLIKELY(limit)) {
        uint64_t u = proc_usage(h, slot);
        if (u + got > limit) { /* the class's rounding may be what does not fit: ask the heap */
            slot_unlock(h, slot);
            return CACHE_DECLINED;
        }
    }
    int rose = 0;
    if (UNLIKELY(!c->count[k]) && (rc = refill(h, slot, k, &rose)) != SHM_OK) {
        slot_unlock(h, slot);
        return rc;
    }
    uint64_t off;
    if ((rc = list_pop(h, slot, k, &off, 0)) != SHM_OK) {
        slot_unlock(h, slot);
        return rc;
    }
    FAULT_POINT(FAULT_CACHE_POPPED);
    __atomic_store_n(block_word(h, off), BLOCK_WORD(slot + 1, 0), __ATOMIC_RELEASE);
    A_SUB(&c->cached_bytes, got);
    A_SUB(&c->cached_blocks, 1);
    A_ADD(&c->nblocks, 1);
    A_ADD(&c->nallocs, 1);
    a_raise_max(&p->peak, A_ADD(&c->usage, got) + A_LOAD(&p->usage));
    slot_unlock(h, slot);
    return (int64_t)(off + SHM_HDR) | heap_result_flags(h, (uint32_t)slot + 1, rose);
}

/* Drain another process's remote list for it if its slot lock is free at once: an owner that has
 * stopped allocating would otherwise keep what others freed to it out of use until it ends. The
 * blocks go into its cache, and what is over the cache's bounds back to the heap. */
static void help_drain(shm_handle_t *h, int owner) {
    if (slot_lock(h, owner, 0) != SHM_OK) return; /* busy: its holder will see the list */
    if (A_LOAD(&h->arena->procs[owner].state) == SHM_PROC_LIVE && drain_remote(h, owner) == SHM_OK)
        trim_to_bounds(h, owner, SHM_CACHE_CLASSES);
    slot_unlock(h, owner);
}

/* Before a collection: every live process's remote list that waits to be drained. */
void cache_help_drain_all(shm_handle_t *h) {
    for (int i = 0; i < SHM_MAX_PROCS; i++)
        if (A_LOAD(&h->arena->procs[i].state) == SHM_PROC_LIVE &&
            __atomic_load_n(&cache_of(h, i)->remote_head, __ATOMIC_RELAXED))
            help_drain(h, i);
}

/* Free a block this process owns into its cache; declines (the heap path frees it) when the block
 * is not plainly allocated (sealed, referenced, claimed) or the slot is no longer live. */
static int64_t own_free(shm_handle_t *h, int slot, uint64_t off, unsigned k) {
    uint64_t got = cache_class_size(k) - SHM_HDR;
    uint64_t *w = block_word(h, off);
    int rc = slot_lock(h, slot, 1);
    if (rc != SHM_OK) return rc;
    uint64_t expect = BLOCK_WORD(slot + 1, 0);
    if (A_LOAD(&h->arena->procs[slot].state) != SHM_PROC_LIVE ||
        !__atomic_compare_exchange_n(w, &expect, BLOCK_WORD(slot + 1, SHM_BF_CACHED), 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        goto declined;
    if (__atomic_load_n(&block_at(h, off)->refcount, __ATOMIC_ACQUIRE) || /* retained meanwhile */
        block_at(h, off)->size != got + SHM_HDR) { /* or freed and carved anew by a racing free */
        __atomic_store_n(w, BLOCK_WORD(slot + 1, 0), __ATOMIC_RELEASE);
        goto declined;
    }
    FAULT_POINT(FAULT_CACHE_PUSHED);
    keep_freed(h, slot, k, off, got);
    rc = trim_to_bounds(h, slot, k);
    slot_unlock(h, slot);
    return rc == SHM_OK ? (int64_t)got : rc;
declined:
    slot_unlock(h, slot);
    return CACHE_DECLINED;
}

/* Push the claimed (REMOTE) block at off onto owner's remote list and count it as freed there;
 * returns the bytes now waiting on that list. */
static uint64_t remote_push(shm_handle_t *h, int owner, uint64_t off) {
    shm_cache_t *theirs = cache_of(h, owner);
    uint64_t head = __atomic_load_n(&theirs->remote_head, __ATOMIC_RELAXED);
    do {
        *block_cache_link(h, off) = head;
    } while (!__atomic_compare_exchange_n(&theirs->remote_head, &head, off, 1, __ATOMIC_RELEASE,
                                          __ATOMIC_RELAXED));
    __atomic_fetch_add(&theirs->remote_blocks, 1, __ATOMIC_RELAXED); /* freed, as users see it */
    return __atomic_add_fetch(&theirs->remote_bytes, block_at(h, off)->size - SHM_HDR,
                              __ATOMIC_RELAXED);
}

/* Free a block another live process owns: claim it, push it onto that process's remote list.
 * The pending word is the slot's, and so shared by the threads of its process: it is taken with
 * a compare-and-swap from 0, never overwritten. A thread that finds it taken (another thread of
 * this process is between its claim and its push) declines, and the heap path frees the block
 * under the heap lock: a store would hide the other thread's block from the collector, and its
 * clear at the end would hide this one's. */
static int64_t remote_free(shm_handle_t *h, int slot, uint64_t off, int owner) {
    shm_cache_t *mine = cache_of(h, slot);
    uint64_t *w = block_word(h, off);
    uint64_t got = block_at(h, off)->size - SHM_HDR;
    uint64_t none = 0; /* taken before the claim, sequentially consistent: see gc.c */
    if (!__atomic_compare_exchange_n(&mine->pending, &none, off, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_RELAXED))
        return CACHE_DECLINED;
    uint64_t expect = BLOCK_WORD(owner + 1, 0);
    if (!__atomic_compare_exchange_n(w, &expect, BLOCK_WORD(owner + 1, SHM_BF_REMOTE), 0,
                                     __ATOMIC_SEQ_CST, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&mine->pending, 0, __ATOMIC_RELEASE);
        return CACHE_DECLINED;
    }
    if (__atomic_load_n(&block_at(h, off)->refcount, __ATOMIC_SEQ_CST) || /* retained meanwhile */
        block_at(h, off)->size != got + SHM_HDR) {
        __atomic_store_n(w, BLOCK_WORD(owner + 1, 0), __ATOMIC_RELEASE);
        __atomic_store_n(&mine->pending, 0, __ATOMIC_RELEASE);
        return CACHE_DECLINED;
    }
    FAULT_POINT(FAULT_REMOTE_CLAIMED);
    uint64_t waiting = remote_push(h, owner, off);
    __atomic_store_n(&mine->pending, 0, __ATOMIC_RELEASE);
    if (UNLIKELY(waiting > REMOTE_HELP_BYTES)) help_drain(h, owner);
    return (int64_t)got;
}

int64_t cache_free(shm_handle_t *h, int slot, uint64_t address) {
    uint64_t off = address - SHM_HDR;
    unsigned k;
    if (UNLIKELY(!A_LOAD(&h->arena->counters.cache_limit) || address < h->heap_off + SHM_HDR ||
                 address >= h->heap_end || address % SHM_ALIGN ||
                 block_validate(h, off) != SHM_OK || !class_exact(block_at(h, off)->size, &k)))
        return CACHE_DECLINED; /* the heap path reports bad addresses, retries torn reads */
    uint64_t word = __atomic_load_n(block_word(h, off), __ATOMIC_ACQUIRE);
    uint32_t owner = (uint32_t)word, flags = (uint32_t)(word >> 32);
    if (flags || !owner || owner > SHM_MAX_PROCS || block_at(h, off)->refcount)
        return CACHE_DECLINED;
    if ((int)owner - 1 == slot) return own_free(h, slot, off, k);
    if (A_LOAD(&h->arena->procs[owner - 1].state) != SHM_PROC_LIVE) return CACHE_DECLINED;
    return remote_free(h, slot, off, (int)owner - 1);
}

/* Give slot's whole cache and its remote list back to the heap. */
int cache_flush(shm_handle_t *h, int slot) {
    int rc = slot_lock(h, slot, 1);
    if (rc != SHM_OK) return rc;
    if (A_LOAD(&h->arena->procs[slot].state) == SHM_PROC_LIVE) rc = drain_remote(h, slot);
    shm_cache_t *c = cache_of(h, slot);
    int any = 0;
    for (unsigned k = 0; k < SHM_CACHE_CLASSES; k++) any |= c->count[k] != 0;
    if (rc == SHM_OK && any && A_LOAD(&h->arena->procs[slot].state) == SHM_PROC_LIVE &&
        (rc = heap_lock(h)) == SHM_OK) {
        for (unsigned k = 0; k < SHM_CACHE_CLASSES && rc == SHM_OK; k++)
            rc = list_release(h, slot, k, c->count[k]);
        heap_unlock(h);
    }
    slot_unlock(h, slot);
    return rc;
}

/* Every live process's cache back to the heap: the last resort before out of memory. */
void cache_flush_all(shm_handle_t *h) {
    for (int i = 0; i < SHM_MAX_PROCS; i++)
        if (A_LOAD(&h->arena->procs[i].state) == SHM_PROC_LIVE &&
            (A_LOAD(&cache_of(h, i)->cached_blocks) || A_LOAD(&cache_of(h, i)->remote_head)))
            cache_flush(h, i); /* best effort: a failure here leaves the out-of-memory to report */
}

/* A process that died between claiming another's block (REMOTE) and pushing it onto that owner's
 * remote list left the block in its `pending` word: finish the push for it, unless it is on the
 * list already or a live process is pushing it. Runs before a collection, without the heap lock
 * (the owner's slot lock keeps the owner from draining the list while it is walked). */
void cache_finish_pushes(shm_handle_t *h) {
    for (int i = 0; i < SHM_MAX_PROCS; i++) {
        shm_cache_t *dead = cache_of(h, i);
        uint64_t off = A_LOAD(&dead->pending);
        if (!off || A_LOAD(&h->arena->procs[i].state) != SHM_PROC_DEAD) continue;
        unsigned k;
        if (block_validate(h, off) != SHM_OK || !class_exact(block_at(h, off)->size, &k)) {
            A_STORE(&dead->pending, 0);
            continue;
        }
        uint32_t owner = block_at(h, off)->owner;
        if (!owner || owner > SHM_MAX_PROCS || slot_lock(h, (int)owner - 1, 1) != SHM_OK) continue;
        shm_cache_t *theirs = cache_of(h, (int)owner - 1);
        if (__atomic_load_n(block_word(h, off), __ATOMIC_ACQUIRE) ==
                BLOCK_WORD(owner, SHM_BF_REMOTE) &&
            !cache_pending_live(h, off)) {
            int listed = 0;
            uint64_t cur = __atomic_load_n(&theirs->remote_head, __ATOMIC_ACQUIRE);
            for (uint64_t n = 0; cur && n < REMOTE_WALK_MAX && !listed; n++) {
                if (!heap_offset_ok(h, cur)) break;
                listed = cur == off;
                cur = *block_cache_link(h, cur);
            }
            if (!listed) remote_push(h, (int)owner - 1, off);
        }
        A_STORE(&dead->pending, 0);
        slot_unlock(h, (int)owner - 1);
    }
}

int shm_cache_flush(shm_handle_t *h, int32_t slot) {
    SHM_GATE(h);
    int rc = proc_slot_check(slot);
    if (rc != SHM_OK) return rc;
    return cache_flush(h, slot);
}

int shm_cache_set_limit(shm_handle_t *h, uint64_t limit) {
    SHM_GATE(h);
    if (limit > h->heap_end - h->heap_off)
        return err_set(SHM_EINVAL, limit,
                       "a cache limit of %llu bytes exceeds the heap (%llu bytes)",
                       (unsigned long long)limit, (unsigned long long)(h->heap_end - h->heap_off));
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    uint64_t old = h->arena->counters.cache_limit;
    A_STORE(&h->arena->counters.cache_limit, limit);
    heap_unlock(h);
    if (limit < old) cache_flush_all(h); /* live processes trim the rest as they go */
    return SHM_OK;
}

int shm_cache_info(shm_handle_t *h, int32_t slot, shm_cache_info_t *out) {
    SHM_GATE(h);
    int rc = proc_slot_check(slot);
    if (rc != SHM_OK) return rc;
    const shm_cache_t *c = cache_of(h, slot);
    out->cached_bytes = A_LOAD(&c->cached_bytes);
    out->cached_blocks = A_LOAD(&c->cached_blocks);
    out->nallocs = A_LOAD(&c->nallocs);
    out->nfrees = A_LOAD(&c->nfrees);
    out->remote_pending = __atomic_load_n(&c->remote_head, __ATOMIC_RELAXED) != 0;
    out->remote_bytes = A_LOAD(&c->remote_bytes);
    return SHM_OK;
}
