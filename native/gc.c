/* gc.c -- the end of a slot: reclaiming the blocks of dead processes, cleaning their slots, and a
 * living process's detach.
 *
 * Which processes are dead is decided in Python (tracking.py: the slot's life lock, life.c, and
 * only where nobody holds it, pid and start time from /proc); it marks their slots DEAD with
 * shm_proc_mark_dead() (process.c), which refuses a slot whose life lock is held. shm_gc() first
 * finishes the remote pushes that dead processes left half done and drains live processes' remote
 * lists (cache.c; each under the owner's slot lock, before the heap lock: the lock order), then,
 * under the heap lock:
 *   1. drops the references held by DEAD slots (references die with their holder);
 *   2. walks the heap and frees, for slot == -1, every block whose owner is DEAD and which no live
 *      process references; for slot >= 0 the same restricted to that slot, or with all_blocks
 *      every block of that slot, dead or alive, referenced or not (an operator's targeted action);
 *   3. returns DEAD slots that own nothing to FREE.
 * A dead process's cached blocks (CACHED) go back to the heap in the same walk, and so do blocks
 * other processes freed to it (REMOTE), except one whose push a live process has not finished
 * (its `pending` word names it; cache.c): that one waits for the next collection. A live
 * process's cache is left to it (it returns it when asked to trim). A dead slot's cache counters
 * are written here under the heap lock alone: nobody else writes them once the slot is DEAD.
 * Freeing merges neighbours at once, so the walk continues from the end of the merged block. */
#include "shm_internal.h"

/* Free one block of a dead (or targeted) process in the walk; *off moves past it. */
static int gc_take(shm_handle_t *h, uint64_t *off, int owner, shm_gc_result_t *out) {
    const shm_block_t *b = block_at(h, *off);
    uint64_t size = b->size;
    int rc;
    if (b->flags & SHM_BF_CACHED) { /* a dead process's cache: free already from the user's view */
        shm_cache_t *c = &h->arena->caches[owner];
        A_SUB(&c->cached_bytes, size - SHM_HDR);
        A_SUB(&c->cached_blocks, 1);
        rc = heap_release_block(
            h, *off, SHM_TOMB(SHM_TOMB_CACHE, proc_owner_pid(h, (uint32_t)owner + 1)), off);
    } else {
        if (b->flags & SHM_BF_REMOTE)
            cache_remote_done(h, owner, size - SHM_HDR);
        else if (block_claim(h, *off) != SHM_OK) {
            *off += size; /* its live owner cached it, or another process freed it, meanwhile */
            return SHM_OK;
        }
        if ((rc = alloc_free_block(h, *off, SHM_TOMB(SHM_TOMB_RECLAIMED, self_pid(h)), off)) !=
            SHM_OK)
            return rc;
        out->freed_blocks++;
        out->freed_bytes += size - SHM_HDR;
    }
    journal_checkpoint(h); /* each freed block is a step of its own */
    FAULT_POINT(FAULT_GC_STEP);
    return rc;
}

static int gc_locked(shm_handle_t *h, int32_t slot, int all_blocks, shm_gc_result_t *out) {
    shm_arena_t *a = h->arena;
    uint64_t remaining[SHM_MAX_PROCS] = {0};
    for (int i = 0; i < SHM_MAX_PROCS; i++)
        if (a->procs[i].state == SHM_PROC_DEAD && (slot < 0 || slot == i)) {
            out->refs_dropped += refs_drop_slot(h, (uint32_t)i + 1);
            journal_checkpoint(h);
        }
    uint64_t off = h->heap_off;
    while (off < h->heap_end) {
        if (block_validate(h, off) != SHM_OK) return SHM_ECORRUPT;
        const shm_block_t *b = block_at(h, off);
        uint64_t size = b->size;
        int32_t owner = (int32_t)b->owner - 1;
        if ((b->flags & SHM_BF_FREE) || owner < 0 || owner >= SHM_MAX_PROCS) {
            off += size;
            continue;
        }
        int dead = a->procs[owner].state == SHM_PROC_DEAD;
        int take = 0;
        if (b->flags & SHM_BF_CACHED)
            take = dead && (slot < 0 || owner == slot); /* a live process's cache is its own */
        else if (b->flags & SHM_BF_REMOTE) /* unless another process is still pushing it */
            take = dead && (slot < 0 || owner == slot) && !cache_pending_live(h, off);
        else if (slot >= 0 && owner != slot)
            take = 0;
        else if (slot >= 0 && all_blocks)
            take = 1;
        else
            take = dead && b->refcount == 0;
        if (!take) {
            remaining[owner]++;
            off += size;
            continue;
        }
        int rc = gc_take(h, &off, owner, out);
        if (rc != SHM_OK) return rc;
    }
    for (int i = 0; i < SHM_MAX_PROCS; i++) {
        shm_proc_t *p = &a->procs[i];
        if (p->state == SHM_PROC_DEAD && remaining[i] == 0 && !objects_held(h, i) &&
            (slot < 0 || slot == i)) {
            refs_drop_slot(h, (uint32_t)i + 1);
            proc_free_slot(h, i);
            out->procs_cleaned++;
            journal_checkpoint(h); /* a slot and its cache (1 KiB of journal) per step */
        }
    }
    A_ADD(&a->counters.gc_runs, 1);
    A_STORE(&a->counters.frees_since_gc, 0);
    A_STORE(&a->counters.gc_cache_base, heap_cache_sum(h, offsetof(shm_cache_t, nfrees)));
    return SHM_OK;
}

/* slot >= 0 with pid != 0: only if the slot still holds that process (pid, start_time); else
 * SHM_ENOENT, so that a slot freed and claimed by a new process meanwhile is never collected by
 * mistake. */
int shm_gc(shm_handle_t *h, int32_t slot, int all_blocks, uint32_t pid, uint64_t start_time,
           shm_gc_result_t *out) {
    SHM_GATE(h);
    if (slot < -1 || slot >= SHM_MAX_PROCS)
        return err_set(SHM_EINVAL, (uint64_t)slot, "no process slot %d", slot);
    shm_gc_result_t r = {0};
    cache_finish_pushes(h);  /* remote frees that dead processes left half done */
    cache_help_drain_all(h); /* and blocks freed to live processes that have not taken them in */
    int rc = objects_collect(h, slot); /* dead slots' object references, expired tickets */
    if (rc != SHM_OK) return rc;
    if ((rc = heap_lock(h)) != SHM_OK) return rc;
    if (rc != SHM_OK) return rc;
    const shm_proc_t *p = slot >= 0 ? &h->arena->procs[slot] : NULL;
    if (p && pid && (p->state == SHM_PROC_FREE || p->pid != pid || p->start_time != start_time))
        rc = err_set(SHM_ENOENT, (uint64_t)slot, "slot %d no longer holds process %u", slot, pid);
    else
        rc = gc_locked(h, slot, all_blocks, &r);
    heap_unlock(h);
    *out = r; /* partial figures too: what was freed before a failure stays freed */
    return rc;
}

/* This process detaches (close): its cache goes back to the heap; a slot that then owns nothing
 * and holds no references is given back; otherwise it stays LIVE until the process ends and a
 * collection cleans it. Returns 1 if freed. */
int shm_proc_detach(shm_handle_t *h, int32_t slot) {
    SHM_GATE(h);
    int rc = proc_slot_check(slot);
    if (rc != SHM_OK) return rc;
    rc = cache_flush(h, slot); /* not shm_cache_flush: this call has passed the gate */
    if (rc != SHM_OK) return rc;
    if ((rc = heap_lock(h)) != SHM_OK) return rc;
    shm_proc_t *p = &h->arena->procs[slot];
    const shm_cache_t *c = &h->arena->caches[slot];
    int freed = 0;
    if (p->state == SHM_PROC_LIVE && A_LOAD(&p->nblocks) + A_LOAD(&c->nblocks) == 0 &&
        !A_LOAD(&c->cached_blocks) && !A_LOAD(&c->remote_head) &&
        !refs_held_by(h, (uint32_t)slot + 1) && !objects_held(h, slot)) {
        proc_free_slot(h, slot);
        life_let_go(h, slot); /* if this process's keeper holds it: the slot is given back */
        freed = 1;
    }
    heap_unlock(h);
    if (freed && h->slot == slot) h->slot = -1;
    return freed;
}
