/* journal.c -- the undo journal that makes every heap-locked operation all-or-nothing.
 *
 * Protocol. The journal records what the heap lock's holder writes: the heap's headers and free
 * links, the bins, the counters, the process table, the references, the names and the lease. One
 * journal suffices because there is one heap lock: only its holder appends, and only the next
 * holder rolls back. Writes made without the heap lock (the transient bits of a block's
 * (owner, flags) word, the links and counters of the caches, peaks, limits, the ring) are not
 * journaled, and the holder never journals bytes that such a writer may change meanwhile
 * (shm_layout.h, Concurrency): a rollback cannot undo someone else's write.
 *   1. heap_lock() calls journal_begin(): the journal is empty; the counters are saved.
 *   2. Before the holder changes any other byte under the lock it calls journal_save(ptr, len),
 *      which appends (offset, len, old bytes) to the log and only then bumps `count` (release
 *      store). A record that is not counted describes a write that has not happened yet.
 *   3. Long operations (collection) call journal_checkpoint() between self-contained steps: the
 *      steps done so far are kept, the log restarts.
 *   4. heap_unlock() calls journal_end(): count = 0 (one aligned store), then unlocks.
 * If the holder dies anywhere in between, the robust mutex hands the next taker EOWNERDEAD, and
 * journal_rollback() writes the counted records back, newest first: the heap is exactly as it was
 * before the dead holder's (current step of its) operation. A slot lock has no journal: its
 * holder's death is repaired from the heap (cache.c, cache_repair). Rolling back twice is harmless
 * (the same old bytes), so a recoverer that dies mid-rollback is recovered in turn. Records are
 * validated before use; a damaged journal is reported, not followed.
 *
 * Invariants: [J1] count == 0 whenever the lock is free; [J2] used <= sizeof log, and the counted
 * records are well formed and end at `used` (or before it, if their writer died between its two
 * stores). */
#include <string.h>

#include "shm_internal.h"

#define REC_HDR JOURNAL_REC_HDR
#define rec_size journal_rec_size

/* journal_save is inline (shm_internal.h); this is its rare path: a record that does not fit. */
void journal_overflow(shm_handle_t *h) {
    /* Cannot happen within the bounds of our own operations (see the checkpoints); if it did, the
     * operation goes on without a record and is then no longer crash-atomic. */
    A_ADD(&h->arena->journal.overflows, 1);
}

void journal_begin(shm_handle_t *h) {
    shm_journal_t *j = &h->arena->journal;
    j->used = 0;
    __atomic_store_n(&j->count, 0, __ATOMIC_RELEASE);
    journal_save(h, &h->arena->counters, sizeof h->arena->counters);
}

void journal_checkpoint(shm_handle_t *h) { journal_begin(h); }

void journal_end(shm_handle_t *h) {
    shm_journal_t *j = &h->arena->journal;
    __atomic_store_n(&j->count, 0, __ATOMIC_RELEASE);
    j->used = 0;
}

/* Is [off, off+len) a range that journal_save records? The counters, the bins through the names
 * table (bitmap, bins, process table, references, names: contiguous), the objects section, or
 * the heap. Never the
 * lock, the ring or the journal itself: a damaged record must not be able to overwrite them. */
static int journal_may_restore(const shm_handle_t *h, uint64_t off, uint64_t len) {
    const uint64_t c0 = offsetof(shm_arena_t, counters), c1 = c0 + sizeof(shm_counters_t);
    const uint64_t t0 = offsetof(shm_arena_t, bitmap), t1 = offsetof(shm_arena_t, ring);
    if (off >= h->heap_off) return off <= h->capacity && len <= h->capacity - off;
    const uint64_t o0 = offsetof(shm_arena_t, objects), o1 = o0 + sizeof(shm_objects_t);
    if (off >= c0 && off + len <= c1) return 1;
    if (off >= o0 && off + len <= o1) return 1;
    return off >= t0 && off + len <= t1;
}

/* [J2]: the counted records of the journal are well formed and lie in ranges the journal may
 * restore. Their starts go to starts[] (room for SHM_JOURNAL_MAX_RECORDS) if it is not NULL, the
 * end of the last one to *end. Returns the number of records, or SHM_ECORRUPT. */
int journal_validate(const shm_handle_t *h, uint64_t *starts, uint64_t *end) {
    const shm_journal_t *j = &h->arena->journal;
    uint64_t count = __atomic_load_n(&j->count, __ATOMIC_ACQUIRE);
    uint64_t joff = (uint64_t)((const uint8_t *)j - h->base);
    if (count > SHM_JOURNAL_MAX_RECORDS)
        return err_set(SHM_ECORRUPT, joff, "[J2] the journal claims %llu records",
                       (unsigned long long)count);
    uint64_t pos = 0;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t off, len;
        if (pos + REC_HDR > sizeof j->log)
            return err_set(SHM_ECORRUPT, joff, "[J2] journal overrun");
        memcpy(&off, j->log + pos, 8);
        memcpy(&len, j->log + pos + 8, 8);
        if (len > sizeof j->log || pos + rec_size(len) > sizeof j->log ||
            !journal_may_restore(h, off, len))
            return err_set(SHM_ECORRUPT, joff, "[J2] journal record %llu: %llu bytes at %#llx",
                           (unsigned long long)i, (unsigned long long)len, (unsigned long long)off);
        if (starts) starts[i] = pos;
        pos += rec_size(len);
    }
    *end = pos;
    return (int)count;
}

/* Undo what a dead lock holder left half done. Returns the records rolled back, or a status. */
int journal_rollback(shm_handle_t *h) {
    shm_journal_t *j = &h->arena->journal;
    uint64_t starts[SHM_JOURNAL_MAX_RECORDS], end;
    int n = journal_validate(h, starts, &end); /* every record before writing any */
    if (n < 0) return n;
    uint64_t count = (uint64_t)n;
    for (uint64_t i = count; i-- > 0;) {
        uint64_t off, len;
        memcpy(&off, j->log + starts[i], 8);
        memcpy(&len, j->log + starts[i] + 8, 8);
        memcpy(h->base + off, j->log + starts[i] + REC_HDR, len);
    }
    journal_end(h);
    return (int)count;
}
