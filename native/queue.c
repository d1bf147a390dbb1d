/* queue.c -- multi-producer multi-consumer queues of objects, living in the segment.
 *
 * A queue is an object (objects.c) with flag SHM_OBJ_QUEUE: its "pickle stream" is the control
 * struct shm_queue_t (shm_layout.h) and its one buffer is the ring, an array of shm_qcell_t.
 * Processes hold the queue as they hold any object (a holder bit per slot; a pickled Queue is a
 * pickled ObjectRef, with its transit ticket), so the queue lives while any process has it and
 * goes, with every item still in it, when the last one lets go (objects.c calls
 * queue_release_items from obj_free).
 *
 * Items. Each item is an object of its own; the cell that names it holds one anonymous hold on
 * it (shm_object_t.holds). put() builds the item as an unpublished object owned by the producer
 * (plain blocks: collection frees them if the producer dies), then one call publishes it straight
 * into the queue. get() turns the cell's hold into the consumer's holder bit in one call.
 *
 * Why the heap lock and not a lock-free ring. Every transition below changes an object's holds or
 * holder bits, which live under the heap lock and its undo journal; a Vyukov ring beside them
 * would need a claimed-but-not-committed cell state, a repair path for cells a dead process left
 * claimed, and a second commit under the heap lock anyway. Under the heap lock each transition is
 * one journaled step: a process killed at any instruction inside it is rolled back by the next
 * taker of the lock (journal.c), and one killed outside it has either done the whole step or
 * none of it. So a cell has two states and no intermediate one:
 *
 *          put: publish the item, holds = 1, cell = (object, id), head += 1
 *    EMPTY ------------------------------------------------------------------> FULL
 *          <------------------------------------------------------------------
 *          get: consumer's holder bit set, holds -= 1, cell = 0, tail += 1
 *
 * and the queue's words move only forward: head (items ever put), tail (items ever taken). What a
 * death leaves behind, by where it strikes:
 *   - a producer before put's step: an unpublished object of its dead slot, freed by collection;
 *     the queue never saw it (its put did not return);
 *   - a producer inside the step: rolled back, as above; after it: the item is in the queue (the
 *     put is done, whether or not Python got to return), its getters maybe not woken (below);
 *   - a consumer inside get's step: rolled back, the item stays in its cell for the next get;
 *     after it: the item was delivered to that consumer (its holder bit), and collection drops
 *     the bit with the rest of what the dead process held: delivered once, never twice;
 *   - a process growing the ring (a step of put): rolled back, the new ring block goes back to
 *     the heap;
 *   - the last holder freeing the queue: obj_free marks it DYING, then queue_release_items drops
 *     one item per checkpointed step (cell cleared, tail advanced and the item's hold dropped,
 *     together); collection finishes a DYING queue from its tail.
 * So no item is delivered twice, no item whose put returned is lost while a consumer lives, and
 * nothing leaks.
 *
 * The ring grows by doubling, from QUEUE_FIRST_CELLS, up to maxsize (0: no bound but the arena's
 * memory; a forced put, which asyncio's cancelled get makes to give an item back, may go past
 * it), inside put's step: a new ring block is carved, the cells copied in position order, the
 * old one freed. It does not shrink (an emptied queue keeps its ring until it is freed).
 *
 * Sleeping. A put that finds the queue full and a get that finds it empty return the wait word's
 * value read under the lock (not_full, not_empty); the caller sleeps on it with shm_queue_wait,
 * which first spins a few tens of microseconds, uncounted, for the word to change (wait.c's
 * wait_spin: a hand-off between two busy processes then costs no system call on either side),
 * then counts itself among the sleepers (putters, getters) for the time of the futex wait. The
 * other side bumps the word under the lock and, after unlocking, wakes one sleeper if the count is
 * not 0 (no system call when nobody sleeps). The count is raised before the sleep's comparison
 * and the bump precedes the count's read (both sequentially consistent), so a wake-up is never
 * lost: either the waker sees the sleeper counted, or the sleeper's futex sees the bumped word.
 * A sleeper killed while counted leaves the count one too high: wakers then make one system call
 * too many, nothing worse. A waker killed between its step and its wake leaves a sleeper asleep
 * until its timeout; Python caps each sleep (queues.RECHECK) and looks again. */
#define _GNU_SOURCE
#include <string.h>

#include "shm_internal.h"

_Static_assert(sizeof(shm_queue_t) == 128, "a queue's control struct is two cache lines");
_Static_assert(sizeof(shm_qcell_t) == 16, "a cell is two words");
_Static_assert(offsetof(shm_queue_t, not_empty) % 4 == 0, "wait words are futex words");

#define QUEUE_FIRST_CELLS 64
#define RING_BYTES(cells) ((cells) * (uint64_t)sizeof(shm_qcell_t))

static shm_queue_t *queue_control(shm_object_t *o) {
    return (shm_queue_t *)(void *)((uint8_t *)(o + 1) + o->nbuffers * sizeof(shm_objbuf_t));
}

static shm_objbuf_t *queue_ring_entry(shm_object_t *o) { return (shm_objbuf_t *)(void *)(o + 1); }

static shm_qcell_t *queue_cell(shm_handle_t *h, shm_object_t *o, uint64_t pos) {
    shm_qcell_t *ring = (shm_qcell_t *)(void *)(h->base + queue_ring_entry(o)->address);
    return &ring[pos % queue_control(o)->capacity];
}

/* [Q1]: the control struct and the ring of the queue object o (header block at off) make sense. */
static int queue_valid(shm_handle_t *h, uint64_t off, shm_object_t *o) {
    shm_queue_t *q = queue_control(o);
    uint64_t boff;
    if (!(o->flags & SHM_OBJ_QUEUE) || o->nbuffers != 1 || o->pickle_len < sizeof *q ||
        q->magic != SHM_QUEUE_MAGIC || !q->capacity || q->tail > q->head ||
        q->head - q->tail > q->capacity || queue_ring_entry(o)->nbytes != RING_BYTES(q->capacity) ||
        block_from_address(h, queue_ring_entry(o)->address, &boff) != SHM_OK ||
        !(block_at(h, boff)->flags & SHM_BF_OBJPART) ||
        block_at(h, boff)->size - SHM_HDR < RING_BYTES(q->capacity))
        return err_set(SHM_ECORRUPT, off + SHM_HDR, "[Q1] the queue at %#llx is damaged",
                       (unsigned long long)(off + SHM_HDR));
    return SHM_OK;
}

/* The live queue (queue, id), under the heap lock. */
static int queue_find(shm_handle_t *h, uint64_t queue, uint64_t id, shm_object_t **out) {
    uint64_t off;
    int rc = objects_find(h, queue, id, &off, out);
    if (rc != SHM_OK) return rc;
    if (!((*out)->flags & SHM_OBJ_QUEUE))
        return err_set(SHM_EINVAL, queue, "the object at %#llx is not a queue",
                       (unsigned long long)queue);
    return queue_valid(h, off, *out);
}

/* queue_find, for callers that need only the control block. */
static int queue_find_control(shm_handle_t *h, uint64_t queue, uint64_t id, shm_queue_t **out) {
    shm_object_t *qo;
    int rc = queue_find(h, queue, id, &qo);
    if (rc == SHM_OK) *out = queue_control(qo);
    return rc;
}

static void wake_if_sleeping(shm_handle_t *h, uint32_t *word, uint32_t *sleepers, int32_t n) {
    if (__atomic_load_n(sleepers, __ATOMIC_SEQ_CST))
        shm_wake(h, (uint64_t)((uint8_t *)word - h->base), n);
}

static void bump(uint32_t *word) { __atomic_add_fetch(word, 1, __ATOMIC_SEQ_CST); }

/* ------------------------------------------------------------------ create */

int shm_queue_create(shm_handle_t *h, int32_t slot, uint64_t maxsize, int joinable,
                     uint64_t *queue_out, uint64_t *id_out) {
    SHM_GATE(h);
    uint64_t cells = maxsize && maxsize < QUEUE_FIRST_CELLS ? maxsize : QUEUE_FIRST_CELLS;
    uint64_t ring = RING_BYTES(cells), out[3];
    int rc = shm_object_create(h, slot, sizeof(shm_queue_t), 1, &ring, out);
    if (rc != SHM_OK) return rc;
    shm_queue_t *q = (shm_queue_t *)(void *)(h->base + out[1]);
    memset(q, 0, sizeof *q);
    memset(h->base + out[2], 0, ring);
    q->magic = SHM_QUEUE_MAGIC;
    q->maxsize = maxsize;
    q->capacity = cells;
    q->joinable = joinable != 0;
    if ((rc = heap_lock(h)) != SHM_OK) goto fail;
    rc = objects_publish_locked(h, slot, out[0], 1, id_out);
    if (rc == SHM_OK) {
        shm_object_t *o = (shm_object_t *)(void *)(h->base + out[0]);
        J(h, &o->flags);
        o->flags |= SHM_OBJ_QUEUE;
    }
    heap_unlock(h);
    if (rc == SHM_OK) {
        *queue_out = out[0];
        return SHM_OK;
    }
fail:; /* not published: the blocks are still plain blocks of this process */
    shm_error_info_t saved = *shm_last_error();
    shm_free(h, out[2]);
    shm_free(h, out[0]);
    err_restore(&saved);
    return rc;
}

/* ------------------------------------------------------------------ put */

/* Double the ring (up to maxsize unless forced), in the caller's journaled step. */
static int queue_grow(shm_handle_t *h, shm_object_t *o, int forced) {
    shm_queue_t *q = queue_control(o);
    uint64_t cap = q->capacity, ncap = cap * 2;
    if (q->maxsize && ncap > q->maxsize && cap < q->maxsize) ncap = q->maxsize;
    if (q->maxsize && cap >= q->maxsize && !forced) ncap = cap; /* full: refused below */
    if (ncap <= cap || ncap > (h->heap_end - h->heap_off) / sizeof(shm_qcell_t))
        return alloc_oom_report(h, RING_BYTES(cap) * 2);
    uint64_t need = (SHM_HDR + RING_BYTES(ncap) + SHM_ALIGN - 1) & ~(uint64_t)(SHM_ALIGN - 1), noff;
    int rc = heap_carve(h, need, 0, 0, SHM_BF_PERSIST | SHM_BF_OBJPART, UINT64_MAX, &noff);
    if (rc == SHM_ENOMEM || rc == SHM_ENOSPC) return alloc_oom_report(h, RING_BYTES(ncap));
    if (rc != SHM_OK) return rc;
    A_ADD(&h->arena->counters.allocations, 1);
    heap_note_peak(h, -1);
    pressure_update(h, NULL);
    /* a fresh block: its bytes need no journal (a rollback gives the whole block back) */
    shm_qcell_t *nring = (shm_qcell_t *)(void *)(h->base + noff + SHM_HDR);
    memset(nring, 0, RING_BYTES(ncap));
    for (uint64_t pos = q->tail; pos < q->head; pos++) nring[pos % ncap] = *queue_cell(h, o, pos);
    FAULT_POINT(FAULT_QUEUE_GROW);
    shm_objbuf_t *e = queue_ring_entry(o);
    uint64_t old = e->address - SHM_HDR;
    J(h, e);
    J(h, &o->nbytes);
    J(h, &q->capacity);
    e->address = noff + SHM_HDR;
    e->nbytes = RING_BYTES(ncap);
    o->nbytes = o->pickle_len + e->nbytes;
    q->capacity = ncap;
    if ((rc = block_claim(h, old)) != SHM_OK) return rc;
    return alloc_free_block(h, old, SHM_TOMB(SHM_TOMB_OBJECT, self_pid(h)), NULL);
}

/* The item to put: a new object of slot's, published here, or an existing one, held once more. */
static int item_take(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t *id, uint32_t mode) {
    uint64_t off;
    shm_object_t *o;
    int rc;
    if ((mode & SHM_QPUT_KIND) == SHM_QPUT_NEW) {
        if ((rc = objects_publish_locked(h, slot, object, 0, id)) != SHM_OK) return rc;
        if ((rc = objects_find(h, object, *id, &off, &o)) != SHM_OK) return rc;
        objects_holder_set(h, o, slot, 0); /* the queue holds it, not the producer */
    } else {
        if ((rc = objects_find(h, object, *id, &off, &o)) != SHM_OK) return rc;
        if (o->flags & (SHM_OBJ_DELETED | SHM_OBJ_QUEUE))
            return err_set(SHM_EINVAL, object, "the object at %#llx is %s",
                           (unsigned long long)object,
                           o->flags & SHM_OBJ_QUEUE ? "a queue" : "deleted");
        if (o->holds == UINT32_MAX)
            return err_set(SHM_EFULL, object, "the object has too many anonymous holds");
    }
    J(h, &o->holds);
    o->holds++;
    return SHM_OK;
}

static int put_locked(shm_handle_t *h, int32_t slot, shm_object_t *qo, uint64_t object,
                      uint64_t object_id, uint32_t mode, uint32_t *seq_out) {
    shm_queue_t *q = queue_control(qo);
    uint64_t size = q->head - q->tail;
    if (q->maxsize && size >= q->maxsize && !(mode & SHM_QPUT_FORCE)) {
        *seq_out = __atomic_load_n(&q->not_full, __ATOMIC_SEQ_CST);
        return SHM_QPUT_FULL;
    }
    int rc;
    if (size == q->capacity && (rc = queue_grow(h, qo, (mode & SHM_QPUT_FORCE) != 0)) != SHM_OK)
        return rc;
    uint64_t id = object_id;
    if ((rc = item_take(h, slot, object, &id, mode)) != SHM_OK) return rc;
    shm_qcell_t *c = queue_cell(h, qo, q->head);
    J(h, c);
    c->object = object | ((mode & SHM_QPUT_KIND) == SHM_QPUT_REF ? SHM_QCELL_REF : 0);
    c->id = id;
    FAULT_POINT(FAULT_QUEUE_PUT_HALF);
    J(h, &q->head);
    A_STORE(&q->head, q->head + 1);
    if (q->joinable) {
        J(h, &q->unfinished);
        A_STORE(&q->unfinished, q->unfinished + 1);
    }
    bump(&q->not_empty);
    return SHM_OK;
}

int shm_queue_put(shm_handle_t *h, int32_t slot, uint64_t queue, uint64_t queue_id, uint64_t object,
                  uint64_t object_id, uint32_t mode, uint32_t *seq_out) {
    SHM_GATE(h);
    int rc = proc_live_check(h, slot);
    if (rc != SHM_OK) return rc;
    if ((mode & SHM_QPUT_KIND) > SHM_QPUT_REF ||
        (mode & ~(uint32_t)(SHM_QPUT_KIND | SHM_QPUT_FORCE)))
        return err_set(SHM_EINVAL, mode, "no put mode %u", mode);
    if ((rc = heap_lock(h)) != SHM_OK) return rc;
    shm_object_t *qo;
    rc = queue_find(h, queue, queue_id, &qo);
    if (rc == SHM_OK) rc = put_locked(h, slot, qo, object, object_id, mode, seq_out);
    heap_unlock(h);
    if (rc == SHM_OK) {
        FAULT_POINT(FAULT_QUEUE_PUT_DONE);
        shm_queue_t *q = queue_control(qo);
        wake_if_sleeping(h, &q->not_empty, &q->getters, 1);
    }
    return rc;
}

/* ------------------------------------------------------------------ get */

/* An item queue_take copies out into a buffer of cap bytes: a value (not a reference) without
 * out-of-band buffers whose stream fits. */
static int copied_out(int ref, uint32_t nbuffers, uint64_t pickle_len, uint64_t cap) {
    return !ref && !nbuffers && pickle_len <= cap;
}

/* Take the oldest item into out (slot holds it). With copy_max, only an item that queue_take will
 * copy out (copied_out) is taken; another is left in place, nothing changed (SHM_QGET_HELD). */
static int get_locked(shm_handle_t *h, int32_t slot, shm_object_t *qo, shm_object_view_t *out,
                      uint64_t *bufs, uint32_t cap, uint64_t copy_max, uint32_t *seq_out) {
    shm_queue_t *q = queue_control(qo);
    while (q->head != q->tail) {
        shm_qcell_t *c = queue_cell(h, qo, q->tail);
        uint64_t object = c->object & ~(uint64_t)SHM_QCELL_REF, id = c->id;
        int ref = (c->object & SHM_QCELL_REF) != 0;
        uint64_t off;
        shm_object_t *o;
        int rc = objects_find(h, object, id, &off, &o);
        int gone = rc == SHM_ENOENT || (rc == SHM_OK && (o->flags & SHM_OBJ_DELETED));
        /* Any other failure (a damaged item) is reported with the item left in place: the step
         * changes nothing it cannot finish. */
        if (!gone && rc != SHM_OK) return rc;
        if (!gone && copy_max && !copied_out(ref, o->nbuffers, o->pickle_len, copy_max))
            return SHM_QGET_HELD;
        if (!gone && (rc = objects_open_found(h, slot, off, o, out, bufs, cap)) != SHM_OK)
            return rc;
        J(h, c);
        c->object = c->id = 0;
        J(h, &q->tail);
        A_STORE(&q->tail, q->tail + 1);
        bump(&q->not_full);
        if (gone) { /* deleted while it waited (delete() drops every hold): skip it */
            if (q->joinable && q->unfinished) {
                J(h, &q->unfinished);
                A_STORE(&q->unfinished, q->unfinished - 1);
            }
            continue;
        }
        FAULT_POINT(FAULT_QUEUE_GET_HALF);
        if (o->holds) {
            J(h, &o->holds);
            o->holds--;
        }
        return ref ? SHM_QGET_REF : SHM_QGET_VALUE;
    }
    *seq_out = __atomic_load_n(&q->not_empty, __ATOMIC_SEQ_CST);
    return SHM_QGET_EMPTY;
}

int queue_take(shm_handle_t *h, int32_t slot, uint64_t queue, uint64_t queue_id,
               shm_object_view_t *out, uint64_t *bufs, uint32_t cap, void *dst, uint64_t dst_cap,
               int copy_only, uint32_t *seq_out) {
    memset(out, 0, sizeof *out);
    int rc = proc_live_check(h, slot);
    if (rc != SHM_OK || (rc = heap_lock(h)) != SHM_OK) return rc;
    shm_object_t *qo;
    shm_queue_t *q = NULL;
    rc = queue_find(h, queue, queue_id, &qo);
    if (rc == SHM_OK) {
        q = queue_control(qo);
        rc = get_locked(h, slot, qo, out, bufs, cap, copy_only ? dst_cap : 0, seq_out);
    }
    if (rc == SHM_QGET_VALUE && dst && copied_out(0, out->nbuffers, out->pickle_len, dst_cap)) {
        /* read and free in the same hold of the lock: the take is a step of its own, so a
         * process killed during the copy leaves the item held by its slot, delivered to it */
        journal_checkpoint(h);
        if (objects_take_stream(h, slot, out->address, out->id, dst, dst_cap) == SHM_OK)
            rc = SHM_QGET_COPIED;
    }
    heap_unlock(h);
    if (rc == SHM_QGET_VALUE || rc == SHM_QGET_REF || rc == SHM_QGET_COPIED) {
        FAULT_POINT(FAULT_QUEUE_GET_DONE);
        wake_if_sleeping(h, &q->not_full, &q->putters, 1);
    }
    return rc;
}

int shm_queue_get(shm_handle_t *h, int32_t slot, uint64_t queue, uint64_t queue_id,
                  shm_object_view_t *out, uint64_t *bufs, uint32_t cap, uint32_t *seq_out) {
    SHM_GATE(h);
    return queue_take(h, slot, queue, queue_id, out, bufs, cap, NULL, 0, 0, seq_out);
}

/* ------------------------------------------------------------------ join, counts, waits */

static int task_done_locked(shm_handle_t *h, uint64_t queue, uint64_t queue_id, int *zero) {
    shm_queue_t *q;
    int rc = queue_find_control(h, queue, queue_id, &q);
    if (rc != SHM_OK) return rc;
    if (!q->joinable) return err_set(SHM_EINVAL, queue, "the queue is not joinable");
    if (!q->unfinished) return err_set(SHM_EINVAL, queue, "task_done() called too many times");
    J(h, &q->unfinished);
    A_STORE(&q->unfinished, q->unfinished - 1);
    if (!q->unfinished) bump(&q->all_done);
    *zero = q->unfinished == 0;
    return SHM_OK;
}

int shm_queue_task_done(shm_handle_t *h, uint64_t queue, uint64_t queue_id) {
    SHM_GATE(h);
    int zero = 0, rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    rc = task_done_locked(h, queue, queue_id, &zero);
    shm_queue_t *q = NULL; /* stays NULL unless found */
    if (zero) (void)queue_find_control(h, queue, queue_id, &q);
    heap_unlock(h);
    if (q) wake_if_sleeping(h, &q->all_done, &q->joiners, -1);
    return rc;
}

static int info_locked(shm_handle_t *h, uint64_t queue, uint64_t queue_id, shm_queue_info_t *out) {
    shm_queue_t *q;
    int rc = queue_find_control(h, queue, queue_id, &q);
    if (rc != SHM_OK) return rc;
    out->size = q->head - q->tail;
    out->maxsize = q->maxsize;
    out->capacity = q->capacity;
    out->unfinished = q->unfinished;
    out->put = q->head;
    out->control = (uint64_t)((uint8_t *)q - h->base);
    out->all_done_seq = __atomic_load_n(&q->all_done, __ATOMIC_SEQ_CST);
    out->joinable = q->joinable;
    return SHM_OK;
}

int shm_queue_info(shm_handle_t *h, uint64_t queue, uint64_t queue_id, shm_queue_info_t *out) {
    SHM_GATE(h);
    memset(out, 0, sizeof *out);
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    rc = info_locked(h, queue, queue_id, out);
    heap_unlock(h);
    return rc;
}

int shm_queue_wait(shm_handle_t *h, uint64_t control, int32_t which, uint32_t seq,
                   int64_t timeout_ns) {
    SHM_GATE(h);
    if (control % SHM_ALIGN || control < h->heap_off || control > h->heap_end - sizeof(shm_queue_t))
        return err_set(SHM_EINVAL, control, "no queue at segment offset %#llx",
                       (unsigned long long)control);
    shm_queue_t *q = (shm_queue_t *)(void *)(h->base + control);
    if (__atomic_load_n(&q->magic, __ATOMIC_ACQUIRE) != SHM_QUEUE_MAGIC)
        return err_set(SHM_ENOENT, control, "the queue at segment offset %#llx is gone",
                       (unsigned long long)control);
    uint32_t *word, *sleepers;
    switch (which) {
    case SHM_QWAIT_NOT_EMPTY:
        word = &q->not_empty, sleepers = &q->getters;
        break;
    case SHM_QWAIT_NOT_FULL:
        word = &q->not_full, sleepers = &q->putters;
        break;
    case SHM_QWAIT_ALL_DONE:
        word = &q->all_done, sleepers = &q->joiners;
        break;
    default:
        return err_set(SHM_EINVAL, (uint64_t)which, "no queue wait word %d", which);
    }
    /* Spin first, uncounted: a waker that finds no sleeper makes no system call. */
    if (timeout_ns != 0 && wait_spin(word, seq)) return SHM_OK;
    __atomic_add_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
    int rc = shm_wait(h, (uint64_t)((uint8_t *)word - h->base), seq, timeout_ns);
    __atomic_sub_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
    return rc;
}

/* ------------------------------------------------------------------ freeing a queue */

/* objects.c's obj_free, under the heap lock, for a queue it marked DYING: drop every item's hold,
 * one checkpointed step per item (see the essay). A damaged queue keeps its items (check() tells);
 * freeing them would risk freeing what is not ours. */
int queue_release_items(shm_handle_t *h, uint64_t off, shm_object_t *qo) {
    if (queue_valid(h, off, qo) != SHM_OK) return SHM_OK;
    shm_queue_t *q = queue_control(qo);
    while (q->tail != q->head) {
        shm_qcell_t *c = queue_cell(h, qo, q->tail);
        uint64_t object = c->object & ~(uint64_t)SHM_QCELL_REF, id = c->id, ioff;
        shm_object_t *o;
        J(h, c);
        c->object = c->id = 0;
        J(h, &q->tail);
        q->tail++;
        if (objects_find(h, object, id, &ioff, &o) == SHM_OK && o->holds) {
            J(h, &o->holds);
            o->holds--;
            int rc = objects_settle(h, ioff, o);
            if (rc < 0) return rc;
        }
        journal_checkpoint(h);
        if (q->tail != q->head) FAULT_POINT(FAULT_QUEUE_DRAIN);
    }
    return SHM_OK;
}
