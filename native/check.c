/* check.c -- the full heap walk: every invariant of shm_layout.h, cited by its id.
 *
 * Runs under the heap lock (shm_check in arena.c takes it, after every live slot's lock so that
 * the caches hold still too; at SHMALLOC_DEBUG >= 3 heap_unlock runs it after every operation,
 * without the slot locks: the cache-side checks are then skipped). Every step is bounded (the heap
 * walk by the heap's size, each list walk by the number of free blocks the heap walk found), so a
 * corrupt segment gives SHM_ECORRUPT with the first bad offset, never a hang or a read outside the
 * segment. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "shm_internal.h"

#define FAIL(off, ...) return err_set(SHM_ECORRUPT, (off), __VA_ARGS__)
#define ULL(x) ((unsigned long long)(x))

typedef struct {
    uint64_t usage, nblocks, cached_bytes, cached_blocks, remote_bytes, remote_blocks;
} proc_sums_t;

/* sum of refcount over allocated blocks, from check_heap */
static __thread uint64_t heap_refcounts;

static int check_heap(shm_handle_t *h, shm_check_report_t *r, proc_sums_t *sums) {
    uint64_t off = h->heap_off, prev_size = 0;
    int prev_free = 0;
    while (off < h->heap_end) {
        if (block_validate(h, off) != SHM_OK) return SHM_ECORRUPT; /* [B1] [B2] */
        const shm_block_t *b = block_at(h, off);
        if (b->prev_size != prev_size)
            FAIL(off, "[B3] block %#llx says prev_size %llu, the previous block is %llu bytes",
                 ULL(off), ULL(b->prev_size), ULL(prev_size));
        int is_free = (b->flags & SHM_BF_FREE) != 0;
        if (is_free) {
            if (b->owner || b->flags != SHM_BF_FREE)
                FAIL(off, "[B4] free block %#llx has owner %u, flags %#x", ULL(off), b->owner,
                     b->flags);
            if (prev_free) FAIL(off, "[B5] free block %#llx follows a free block", ULL(off));
            r->free_blocks++;
            r->free_bytes += b->size;
            if (b->size - SHM_HDR > r->largest_free) r->largest_free = b->size - SHM_HDR;
        } else {
            uint32_t transient = b->flags & SHM_BF_TRANSIENT;
            if (transient && transient != SHM_BF_BUSY &&
                (!b->owner || b->refcount || b->flags != transient))
                FAIL(off, "[B4] cached or remote block %#llx has owner %u, refcount %u, flags %#x",
                     ULL(off), b->owner, b->refcount, b->flags);
            if (b->owner && !proc_slot_is_valid(h, b->owner))
                FAIL(off, "[B6] block %#llx is owned by slot %u, which is not attached", ULL(off),
                     b->owner - 1);
            if (b->owner) {
                sums[b->owner - 1].usage += b->size - SHM_HDR;
                sums[b->owner - 1].nblocks++;
                if (b->flags & SHM_BF_CACHED) {
                    sums[b->owner - 1].cached_bytes += b->size - SHM_HDR;
                    sums[b->owner - 1].cached_blocks++;
                }
                if (b->flags & SHM_BF_REMOTE) { /* freed, as users see it; reported like stats */
                    sums[b->owner - 1].remote_bytes += b->size - SHM_HDR;
                    sums[b->owner - 1].remote_blocks++;
                }
            }
            if (!b->owner && !(b->flags & SHM_BF_PERSIST))
                FAIL(off, "[B6] block %#llx has no owner and is not persistent", ULL(off));
            r->allocated_blocks++;
            r->used += b->size - SHM_HDR;
            heap_refcounts += b->refcount;
        }
        r->blocks++;
        prev_free = is_free;
        prev_size = b->size;
        off += b->size;
    }
    if (off != h->heap_end) FAIL(off, "the heap walk ends at %#llx, not at the heap end", ULL(off));
    return SHM_OK;
}

static int check_bins(shm_handle_t *h, const shm_check_report_t *r) {
    const shm_arena_t *a = h->arena;
    uint64_t listed = 0;
    for (unsigned bin = 0; bin < SHM_NBINS; bin++) {
        uint64_t head = a->bins[bin],
                 bin_off = (uint64_t)((const uint8_t *)&a->bins[bin] - h->base);
        int bit = (a->bitmap[bin / 64] >> (bin % 64)) & 1;
        if (bit != (head != 0))
            FAIL(bin_off, "[F3] bin %u: bitmap bit %d but head %#llx", bin, bit, ULL(head));
        uint64_t prev = 0;
        for (uint64_t cur = head; cur; cur = block_links(h, cur)->next) {
            if (++listed > r->free_blocks)
                FAIL(cur, "[F2] the free lists hold more blocks than the heap (a cycle?) in bin %u",
                     bin);
            if (block_validate(h, cur) != SHM_OK) return SHM_ECORRUPT;
            const shm_block_t *b = block_at(h, cur);
            if (!(b->flags & SHM_BF_FREE))
                FAIL(cur, "[F1] bin %u lists allocated block %#llx", bin, ULL(cur));
            if (bin_of_size(b->size) != bin)
                FAIL(cur, "[F2] block %#llx of %llu bytes is in bin %u, belongs in %u", ULL(cur),
                     ULL(b->size), bin, bin_of_size(b->size));
            if (block_links(h, cur)->prev != prev)
                FAIL(cur, "[F1] block %#llx: prev link %#llx, expected %#llx", ULL(cur),
                     ULL(block_links(h, cur)->prev), ULL(prev));
            prev = cur;
        }
    }
    if (listed != r->free_blocks)
        FAIL(0, "[F2] the free lists hold %llu blocks, the heap has %llu free", ULL(listed),
             ULL(r->free_blocks));
    return SHM_OK;
}

/* With the slot lock held: walk slot's cache lists [K1]. */
static int check_cache_lists(shm_handle_t *h, int slot, uint64_t *bytes, uint64_t *blocks) {
    const shm_cache_t *c = &h->arena->caches[slot];
    uint64_t nbytes = 0, n = 0;
    for (unsigned k = 0; k < SHM_CACHE_CLASSES; k++) {
        uint64_t off = c->head[k], size = cache_class_size(k);
        for (uint32_t i = 0; i < c->count[k]; i++) {
            if (block_validate(h, off) != SHM_OK || block_at(h, off)->size != size ||
                *block_word(h, off) != BLOCK_WORD(slot + 1, SHM_BF_CACHED))
                return err_set(SHM_ECORRUPT, off,
                               "[K1] slot %d class %u: entry %u at %#llx is not a cached block",
                               slot, k, i, (unsigned long long)off);
            nbytes += size - SHM_HDR;
            n++;
            off = *block_cache_link(h, off);
        }
        if (off)
            return err_set(SHM_ECORRUPT, (uint64_t)((const uint8_t *)&c->head[k] - h->base),
                           "[K1] slot %d class %u holds more blocks than its count %u", slot, k,
                           c->count[k]);
    }
    *bytes = nbytes;
    *blocks = n;
    return SHM_OK;
}

static int check_counters(shm_handle_t *h, shm_check_report_t *r, const proc_sums_t *sums,
                          int full) {
    const shm_arena_t *a = h->arena;
    const shm_counters_t *c = &a->counters;
    uint64_t coff = offsetof(shm_arena_t, counters);
    if (A_LOAD(&c->used) != r->used)
        FAIL(coff, "[C1] used counter %llu, blocks sum to %llu", ULL(c->used), ULL(r->used));
    if (A_LOAD(&c->free_bytes) != r->free_bytes)
        FAIL(coff, "[C2] free_bytes counter %llu, free blocks sum to %llu", ULL(c->free_bytes),
             ULL(r->free_bytes));
    if (A_LOAD(&c->allocated_blocks) != r->allocated_blocks ||
        A_LOAD(&c->free_blocks) != r->free_blocks)
        FAIL(coff, "[C3] block counters %llu/%llu, the walk found %llu/%llu",
             ULL(c->allocated_blocks), ULL(c->free_blocks), ULL(r->allocated_blocks),
             ULL(r->free_blocks));
    if (A_LOAD(&c->reserved_top) > h->capacity)
        FAIL(coff, "[A3] reserved_top %llu beyond capacity", ULL(c->reserved_top));
    for (int i = 0; i < SHM_MAX_PROCS; i++) {
        const shm_proc_t *p = &a->procs[i];
        const shm_cache_t *k = &a->caches[i];
        uint64_t poff = offsetof(shm_arena_t, procs) + (uint64_t)i * sizeof *p;
        if (p->state > SHM_PROC_DEAD) FAIL(poff, "[P1] slot %d has state %u", i, p->state);
        /* a LIVE slot whose life lock's holder died is dead already, though not yet marked */
        int ended = p->state == SHM_PROC_LIVE && life_peek(h, i) == SHM_LIFE_DEAD;
        if (p->state == SHM_PROC_LIVE && !ended) r->live_procs++;
        if (p->state == SHM_PROC_DEAD || ended) r->dead_procs++;
        /* The cache side changes under the slot's own lock: only a full check (every live slot
         * locked) can compare it; a dead process's cache may be torn until collected. */
        if (!full || p->state != SHM_PROC_LIVE) continue;
        uint64_t usage = p->usage + k->usage + k->cached_bytes;
        uint64_t nblocks = p->nblocks + k->nblocks + k->cached_blocks;
        if (usage != sums[i].usage || nblocks != sums[i].nblocks)
            FAIL(poff, "[K2] slot %d (pid %u) counts %llu bytes in %llu blocks, owns %llu in %llu",
                 i, p->pid, ULL(usage), ULL(nblocks), ULL(sums[i].usage), ULL(sums[i].nblocks));
        if (p->peak < p->usage + k->usage) FAIL(poff, "[P3] slot %d peak below usage", i);
        uint64_t lbytes = 0, lblocks = 0;
        if (check_cache_lists(h, i, &lbytes, &lblocks) != SHM_OK) return SHM_ECORRUPT;
        if (lbytes != k->cached_bytes || lblocks != k->cached_blocks ||
            lblocks != sums[i].cached_blocks || lbytes != sums[i].cached_bytes)
            FAIL(offsetof(shm_arena_t, caches) + (uint64_t)i * sizeof *k,
                 "[K1] slot %d: lists hold %llu bytes in %llu blocks, counters say %llu in %llu, "
                 "the heap has %llu cached",
                 i, ULL(lbytes), ULL(lblocks), ULL(k->cached_bytes), ULL(k->cached_blocks),
                 ULL(sums[i].cached_blocks));
    }
    return SHM_OK;
}

static int check_refs_names(shm_handle_t *h) {
    const shm_arena_t *a = h->arena;
    uint64_t total = 0;
    for (int i = 0; i < SHM_MAX_REFS; i++) {
        const shm_ref_t *e = &a->refs[i];
        uint64_t eoff = offsetof(shm_arena_t, refs) + (uint64_t)i * sizeof *e;
        if (!e->holder) continue;
        if (!proc_slot_is_valid(h, e->holder) || !e->count)
            FAIL(eoff, "[R1] reference entry %d: holder slot %u, count %u", i, e->holder - 1,
                 e->count);
        if (block_validate(h, e->block) != SHM_OK || (block_at(h, e->block)->flags & SHM_BF_FREE))
            FAIL(eoff, "[R1] reference entry %d names %#llx, not an allocated block", i,
                 ULL(e->block));
        total += e->count;
        int first = 1;
        uint64_t sum = 0;
        for (int j = 0; j < SHM_MAX_REFS; j++) {
            if (a->refs[j].holder && a->refs[j].block == e->block) {
                if (j < i) first = 0;
                sum += a->refs[j].count;
            }
        }
        if (first && sum != block_at(h, e->block)->refcount)
            FAIL(e->block, "[R2] block %#llx has refcount %u, the table holds %llu", ULL(e->block),
                 block_at(h, e->block)->refcount, ULL(sum));
    }
    if (total != heap_refcounts)
        FAIL(offsetof(shm_arena_t, refs), "[R2] blocks count %llu references, the table %llu",
             ULL(heap_refcounts), ULL(total));
    for (int i = 0; i < SHM_MAX_NAMES; i++) {
        const shm_name_t *e = &a->names[i];
        uint64_t eoff = offsetof(shm_arena_t, names) + (uint64_t)i * sizeof *e;
        if (!e->address) continue;
        uint64_t off;
        if (block_from_address(h, e->address, &off) != SHM_OK ||
            (block_at(h, off)->flags & (SHM_BF_NAMED | SHM_BF_PERSIST)) !=
                (SHM_BF_NAMED | SHM_BF_PERSIST))
            FAIL(eoff, "[N1] name entry %d names %#llx, not a named persistent block", i,
                 ULL(e->address));
        if (strnlen(e->name, SHM_NAME_LEN) == SHM_NAME_LEN || !e->name[0])
            FAIL(eoff, "[N2] name entry %d is not a NUL-terminated name", i);
    }
    return SHM_OK;
}

/* ------------------------------------------------------------------ objects, tickets, queues
 *
 * A second walk over the heap (its blocks were validated by the first) that reads every object
 * header [O1]-[O4], every queue [Q1]-[Q4] and the ticket list [T1], and gathers three lists:
 * the blocks that objects and tickets name (each OBJPART block of the heap exactly once: none
 * leaked, none shared), the live objects, and the claims on them (queue cells and tickets), which
 * are then matched against the objects' holds. The lists live in this process's memory (one
 * record per object, part or claim), never in the segment. */

enum { CLAIM_VALUE = 0, CLAIM_REF = SHM_QCELL_REF, CLAIM_TICKET = 2 };

typedef struct {
    uint64_t key;   /* an address (object, part or claimed object) */
    uint64_t id;    /* the object's id (parts: 0) */
    uint64_t kind;  /* claims: CLAIM_*; objects: 1 if it may be named but not held (see below) */
    uint64_t where; /* who names it: the cell, the ticket, or the object owning a part */
} rec_t;

typedef struct {
    rec_t *v;
    size_t n, cap;
} recs_t;

typedef struct {
    recs_t objects, parts, claims;
    uint64_t nparts; /* OBJPART blocks in the heap */
    uint64_t live, dying, next_id;
    uint32_t held[SHM_MAX_PROCS];
} walk_t;

static int recs_push(recs_t *r, uint64_t key, uint64_t id, uint64_t kind, uint64_t where) {
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 256;
        rec_t *v = realloc(r->v, cap * sizeof *v);
        if (!v) return err_sys(ENOMEM, "the object walk of check()");
        r->v = v;
        r->cap = cap;
    }
    r->v[r->n++] = (rec_t){key, id, kind, where};
    return SHM_OK;
}

static int rec_cmp(const void *pa, const void *pb) {
    const rec_t *a = pa, *b = pb;
    if (a->key != b->key) return a->key < b->key ? -1 : 1;
    if (a->id != b->id) return a->id < b->id ? -1 : 1;
    return a->kind < b->kind ? -1 : a->kind > b->kind;
}

static int rec_cmp_object(const void *pa, const void *pb) { /* by address and id only */
    const rec_t *a = pa, *b = pb;
    if (a->key != b->key) return a->key < b->key ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

/* qsort and bsearch of a list that may be empty (its array is then NULL, which they may not get) */
static void recs_sort(recs_t *l) {
    if (l->n > 1) qsort(l->v, l->n, sizeof *l->v, rec_cmp);
}

static const rec_t *recs_find(const recs_t *l, const rec_t *key,
                              int (*cmp)(const void *, const void *)) {
    return l->n ? bsearch(key, l->v, l->n, sizeof *l->v, cmp) : NULL;
}

#define PUSH(list, ...)                                  \
    do {                                                 \
        int push_rc_ = recs_push(&w->list, __VA_ARGS__); \
        if (push_rc_ != SHM_OK) return push_rc_;         \
    } while (0)

/* [Q1]-[Q3] of the queue object o (header block at off), and its cells as claims. */
static int check_queue(shm_handle_t *h, walk_t *w, shm_check_report_t *r, uint64_t off,
                       const shm_object_t *o) {
    uint64_t addr = off + SHM_HDR;
    const shm_objbuf_t *e = (const shm_objbuf_t *)(const void *)(o + 1);
    const shm_queue_t *q = (const shm_queue_t *)(const void *)(e + o->nbuffers);
    if (o->nbuffers != 1 || o->pickle_len < sizeof *q)
        FAIL(addr, "[Q1] the queue at %#llx has %u buffers and a %llu-byte control block",
             ULL(addr), o->nbuffers, ULL(o->pickle_len));
    if (q->magic != SHM_QUEUE_MAGIC) FAIL(addr, "[Q1] the queue at %#llx has no magic", ULL(addr));
    if (q->tail > q->head || q->head - q->tail > q->capacity)
        FAIL(addr, "[Q1] the queue at %#llx: head %llu, tail %llu, capacity %llu", ULL(addr),
             ULL(q->head), ULL(q->tail), ULL(q->capacity));
    if (!q->capacity || e->nbytes % sizeof(shm_qcell_t) ||
        e->nbytes / sizeof(shm_qcell_t) != q->capacity)
        FAIL(addr, "[Q1] the queue at %#llx: capacity %llu, maxsize %llu, a ring of %llu bytes",
             ULL(addr), ULL(q->capacity), ULL(q->maxsize), ULL(e->nbytes));
    if (q->joinable > 1 || (!q->joinable && q->unfinished) || q->unfinished > q->head)
        FAIL(addr, "[Q3] the queue at %#llx: joinable %u, %llu unfinished of %llu ever put",
             ULL(addr), q->joinable, ULL(q->unfinished), ULL(q->head));
    r->queues++;
    uint64_t n = q->head - q->tail;
    if (!e->address) { /* a dying queue whose ring is freed already ([O4]) */
        if (n)
            FAIL(addr, "[Q2] the queue at %#llx lost its ring with %llu items", ULL(addr), ULL(n));
        return SHM_OK;
    }
    r->queued += n;
    const shm_qcell_t *ring = (const shm_qcell_t *)(const void *)(h->base + e->address);
    for (uint64_t i = 0, first = q->tail % q->capacity; i < q->capacity; i++) {
        const shm_qcell_t *c = &ring[i];
        uint64_t where = e->address + i * sizeof *c, item = c->object & ~(uint64_t)SHM_QCELL_REF;
        if ((i + q->capacity - first) % q->capacity >= n) { /* outside [tail, head) */
            if (c->object || c->id)
                FAIL(where, "[Q2] cell %llu of the queue at %#llx is not in use but names %#llx",
                     ULL(i), ULL(addr), ULL(c->object));
            continue;
        }
        if (item % SHM_ALIGN || item < h->heap_off + SHM_HDR || item >= h->heap_end || !c->id ||
            c->id > w->next_id)
            FAIL(where, "[Q2] cell %llu of the queue at %#llx names %#llx (id %llu), not an item",
                 ULL(i), ULL(addr), ULL(c->object), ULL(c->id));
        PUSH(claims, item, c->id, c->object & SHM_QCELL_REF, where);
    }
    return SHM_OK;
}

/* [O1] [O2] [O4] of the object whose header block is at off; a queue's own invariants too. */
static int check_object(shm_handle_t *h, walk_t *w, shm_check_report_t *r, uint64_t off) {
    const shm_block_t *b = block_at(h, off);
    const shm_object_t *o = (const shm_object_t *)(const void *)(h->base + off + SHM_HDR);
    uint64_t addr = off + SHM_HDR, room = b->size - SHM_HDR;
    if (room < sizeof *o || (o->magic != SHM_OBJECT_MAGIC && o->magic != SHM_OBJECT_DYING))
        FAIL(addr, "[O1] the object block at %#llx holds no object", ULL(addr));
    if (b->owner || (b->flags & (SHM_BF_PERSIST | SHM_BF_OBJPART)) != SHM_BF_PERSIST)
        FAIL(addr, "[O1] the object at %#llx: its block has owner %u and flags %#x", ULL(addr),
             b->owner, b->flags);
    room -= sizeof *o;
    if (o->nbuffers > SHM_OBJECT_MAX_BUFFERS || o->nbuffers * sizeof(shm_objbuf_t) > room ||
        o->pickle_len > room - o->nbuffers * sizeof(shm_objbuf_t))
        FAIL(addr, "[O1] the object at %#llx: %u buffers and %llu bytes do not fit its block",
             ULL(addr), o->nbuffers, ULL(o->pickle_len));
    uint32_t known = SHM_OBJ_DELETED | SHM_OBJ_WRITABLE | SHM_OBJ_QUEUE | SHM_OBJ_LENT;
    if (!o->id || o->id > w->next_id || (o->flags & ~known) ||
        ((o->flags & SHM_OBJ_LENT) && !o->owner)) /* [O2]: a lent object's owner is its lender */
        FAIL(addr, "[O1] the object at %#llx has id %llu (last given %llu) and flags %#x",
             ULL(addr), ULL(o->id), ULL(w->next_id), o->flags);
    int dying = o->magic == SHM_OBJECT_DYING, deleted = (o->flags & SHM_OBJ_DELETED) != 0;
    if (dying)
        w->dying++;
    else
        w->live++;
    if (deleted && o->holds)
        FAIL(addr, "[O3] the deleted object at %#llx has %u holds", ULL(addr), o->holds);
    for (int s = 0; s < SHM_MAX_PROCS; s++) {
        if (!((o->holders[s / 64] >> (s % 64)) & 1)) continue;
        if (!proc_slot_is_valid(h, (uint32_t)s + 1))
            FAIL(addr, "[O2] the object at %#llx is held by slot %d, which is free", ULL(addr), s);
        w->held[s]++;
    }
    if (o->owner) {
        if (!proc_slot_is_valid(h, o->owner))
            FAIL(addr, "[O2] the object at %#llx is owned by slot %u, which is free", ULL(addr),
                 o->owner - 1);
        w->held[o->owner - 1]++;
    }
    const shm_objbuf_t *t = (const shm_objbuf_t *)(const void *)(o + 1);
    uint64_t nbytes = o->pickle_len, boff;
    for (uint32_t i = 0; i < o->nbuffers; i++) {
        nbytes += t[i].nbytes;
        if (!t[i].address && dying) continue; /* freed by the interrupted freeing */
        if (block_from_address(h, t[i].address, &boff) != SHM_OK ||
            (block_at(h, boff)->flags & (SHM_BF_OBJPART | SHM_BF_OBJECT)) != SHM_BF_OBJPART ||
            block_at(h, boff)->size - SHM_HDR < t[i].nbytes)
            FAIL(addr, "[O4] buffer %u of the object at %#llx: %#llx is not a part of %llu bytes",
                 i, ULL(addr), ULL(t[i].address), ULL(t[i].nbytes));
        PUSH(parts, t[i].address, 0, 0, addr);
    }
    if (nbytes != o->nbytes)
        FAIL(addr, "[O4] the object at %#llx says %llu bytes, its pickle and buffers have %llu",
             ULL(addr), ULL(o->nbytes), ULL(nbytes));
    r->objects++;
    PUSH(objects, addr, o->id, dying || deleted, addr);
    return (o->flags & SHM_OBJ_QUEUE) ? check_queue(h, w, r, off, o) : SHM_OK;
}

/* [T1]: the ticket list, bounded by the number of OBJPART blocks. */
static int check_tickets(shm_handle_t *h, walk_t *w, shm_check_report_t *r) {
    const shm_objects_t *s = &h->arena->objects;
    uint64_t soff = offsetof(shm_arena_t, objects), prev = 0, boff;
    for (uint64_t a = s->ticket_head; a; r->tickets++) {
        if (r->tickets >= w->nparts)
            FAIL(soff, "[T1] the ticket list is longer than there are parts (a cycle?)");
        const shm_ticket_t *t = (const shm_ticket_t *)(const void *)(h->base + a);
        if (block_from_address(h, a, &boff) != SHM_OK ||
            (block_at(h, boff)->flags & (SHM_BF_OBJPART | SHM_BF_OBJECT)) != SHM_BF_OBJPART ||
            block_at(h, boff)->size - SHM_HDR < sizeof *t || t->magic != SHM_TICKET_MAGIC)
            FAIL(a, "[T1] the ticket list names %#llx, not a ticket", ULL(a));
        if (t->prev != prev || !t->id || t->id > w->next_id)
            FAIL(a, "[T1] the ticket at %#llx: prev %#llx (expected %#llx), id %llu", ULL(a),
                 ULL(t->prev), ULL(prev), ULL(t->id));
        PUSH(parts, a, 0, 0, a);
        PUSH(claims, t->object, t->object_id, CLAIM_TICKET, a);
        prev = a;
        a = t->next;
    }
    if (r->tickets != s->tickets)
        FAIL(soff, "[T1] %llu tickets on the list, the count says %llu", ULL(r->tickets),
             ULL(s->tickets));
    return SHM_OK;
}

/* [O4] [T1]: every OBJPART block is named once, by an object or as a ticket. */
static int check_parts(shm_handle_t *h, walk_t *w) {
    recs_t *p = &w->parts;
    recs_sort(p);
    for (size_t i = 1; i < p->n; i++)
        if (p->v[i].key == p->v[i - 1].key)
            FAIL(p->v[i].key, "[O4] the block at %#llx is a part of both %#llx and %#llx",
                 ULL(p->v[i].key), ULL(p->v[i - 1].where), ULL(p->v[i].where));
    if (p->n == w->nparts) return SHM_OK; /* n distinct parts, each an OBJPART block: all */
    for (uint64_t off = h->heap_off; off < h->heap_end; off += block_at(h, off)->size) {
        rec_t key = {off + SHM_HDR, 0, 0, 0};
        if ((block_at(h, off)->flags & (SHM_BF_OBJPART | SHM_BF_FREE)) == SHM_BF_OBJPART &&
            !recs_find(p, &key, rec_cmp))
            FAIL(off + SHM_HDR, "[O4] the part block at %#llx belongs to no object or ticket",
                 ULL(off + SHM_HDR));
    }
    FAIL(0, "[O4] the heap has %llu part blocks, objects and tickets name %llu", ULL(w->nparts),
         ULL(p->n));
}

/* [O3] [Q4]: the claims on each object (queue cells, tickets) against its holds. */
static int check_claims(shm_handle_t *h, walk_t *w) {
    recs_t *c = &w->claims;
    recs_sort(c);
    for (size_t i = 0, j; i < c->n; i = j) {
        uint64_t cells = 0, values = 0, tickets = 0;
        for (j = i; j < c->n && c->v[j].key == c->v[i].key && c->v[j].id == c->v[i].id; j++) {
            tickets += c->v[j].kind == CLAIM_TICKET;
            values += c->v[j].kind == CLAIM_VALUE;
        }
        cells = j - i - tickets;
        const rec_t *first = &c->v[i];
        rec_t key = {first->key, first->id, 0, 0};
        if (values > 1)
            FAIL(first->where, "[Q4] %llu queue cells hold the object at %#llx as a value",
                 ULL(values), ULL(first->key));
        /* objects are listed in address order, at most one per address: the key finds it */
        const rec_t *obj = recs_find(&w->objects, &key, rec_cmp_object);
        if (!obj) { /* deleted (its holds dropped) and freed: a cell may still name it */
            if (tickets)
                FAIL(first->where, "[T1] a ticket names the object at %#llx (id %llu): gone",
                     ULL(first->key), ULL(first->id));
            continue;
        }
        const shm_object_t *o = (const shm_object_t *)(const void *)(h->base + obj->key);
        if (cells && (o->flags & SHM_OBJ_QUEUE))
            FAIL(first->where, "[Q2] a queue cell names the queue at %#llx", ULL(first->key));
        if (obj->kind && tickets) /* deleted or dying: delete() drops the tickets */
            FAIL(first->where, "[O3] a ticket names the deleted object at %#llx", ULL(obj->key));
        if (!obj->kind && o->holds < cells + tickets)
            FAIL(obj->key, "[O3] the object at %#llx has %u holds; %llu cells, %llu tickets",
                 ULL(obj->key), o->holds, ULL(cells), ULL(tickets));
    }
    return SHM_OK;
}

static int check_objects_walk(shm_handle_t *h, walk_t *w, shm_check_report_t *r) {
    const shm_objects_t *s = &h->arena->objects;
    w->next_id = s->next_id;
    int rc;
    for (uint64_t off = h->heap_off; off < h->heap_end; off += block_at(h, off)->size) {
        uint32_t flags = block_at(h, off)->flags;
        if (flags & SHM_BF_FREE) continue;
        w->nparts += (flags & SHM_BF_OBJPART) != 0;
        if ((flags & SHM_BF_OBJECT) && (rc = check_object(h, w, r, off)) != SHM_OK) return rc;
    }
    if ((rc = check_tickets(h, w, r)) != SHM_OK || (rc = check_parts(h, w)) != SHM_OK ||
        (rc = check_claims(h, w)) != SHM_OK)
        return rc;
    uint64_t soff = offsetof(shm_arena_t, objects);
    if (s->live != w->live || s->dying != w->dying)
        FAIL(soff, "[O1] %llu live and %llu dying objects by count, %llu and %llu in the heap",
             ULL(s->live), ULL(s->dying), ULL(w->live), ULL(w->dying));
    for (int i = 0; i < SHM_MAX_PROCS; i++)
        if (s->held[i] != w->held[i])
            FAIL(soff + offsetof(shm_objects_t, held) + 4 * (uint64_t)i,
                 "[O2] slot %d holds %u objects by count, %u by the objects' bits and owners", i,
                 s->held[i], w->held[i]);
    return SHM_OK;
}

static int check_objects(shm_handle_t *h, shm_check_report_t *r) {
    walk_t w;
    memset(&w, 0, sizeof w);
    int rc = check_objects_walk(h, &w, r);
    free(w.objects.v);
    free(w.parts.v);
    free(w.claims.v);
    return rc;
}

/* [J2]: the journal's counted records are well formed and, under the lock we hold, end at used. */
static int check_journal(shm_handle_t *h) {
    uint64_t end, used = h->arena->journal.used;
    int n = journal_validate(h, NULL, &end);
    if (n < 0) return n;
    if (end != used || used > sizeof h->arena->journal.log)
        FAIL(offsetof(shm_arena_t, journal), "[J2] the journal's %d records end at %llu, used %llu",
             n, ULL(end), ULL(used));
    return SHM_OK;
}

/* The whole walk, the heap lock already held; full: every live slot's lock too. */
int check_locked(shm_handle_t *h, shm_check_report_t *out, int full) {
    shm_check_report_t r = {0};
    proc_sums_t sums[SHM_MAX_PROCS] = {{0}};
    heap_refcounts = 0;
    int rc = check_heap(h, &r, sums);
    if (rc == SHM_OK) rc = check_bins(h, &r);
    if (rc == SHM_OK) rc = check_counters(h, &r, sums, full);
    if (rc == SHM_OK) rc = check_refs_names(h);
    if (rc == SHM_OK) rc = check_journal(h);
    if (rc == SHM_OK) rc = check_objects(h, &r);
    for (int i = 0; i < SHM_MAX_PROCS; i++) { /* the user's view from here on, like stats */
        r.cached_blocks += sums[i].cached_blocks;
        r.cached_bytes += sums[i].cached_bytes;
        r.allocated_blocks -= sums[i].cached_blocks + sums[i].remote_blocks;
        r.used -= sums[i].cached_bytes + sums[i].remote_bytes;
    }
    if (rc == SHM_OK) *out = r;
    return rc;
}

/* Has the segment been truncated under its mapping? The mapping keeps its length, but the pages
 * past the file's new end are gone: touching one kills the toucher with SIGBUS. One fstat, no
 * access to the segment, so that callers ask before they touch anything (shm_check, the
 * coordinator's tick). Truncating an arena is outside what shmalloc defends against (a process of
 * the same user may do anything to its segment): this says so clearly instead of crashing where a
 * check can come first, and cannot protect an access that races the truncation. */
int shm_segment_check(shm_handle_t *h) {
    SHM_GATE(h);
    struct stat st;
    if (fstat(h->fd, &st) != 0) return err_sys(errno, "fstat of the segment");
    if ((uint64_t)st.st_size < h->capacity)
        return err_set(SHM_ECORRUPT, (uint64_t)st.st_size,
                       "the segment was truncated to %llu bytes under a %llu-byte arena (a "
                       "process of this user shrank it): the blocks past the new end are lost, "
                       "and touching them kills a process with SIGBUS",
                       (unsigned long long)st.st_size, (unsigned long long)h->capacity);
    return SHM_OK;
}
