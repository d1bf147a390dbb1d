/* process.c -- the process table: one slot per attached process, keyed by (pid, start time).
 *
 * A slot is claimed by shm_proc_attach() under the heap lock and stays LIVE while its process
 * runs. A process claiming its own slot has its keeper take the slot's life lock first (life.c):
 * whether the slot's process still runs is the life lock's answer, in any PID namespace. (pid,
 * start time) stays the identity shown to people and the key a process finds its slot by; the
 * start time (field 22 of /proc/<pid>/stat) tells a recycled pid from the process that held the
 * slot before: an attach that finds the same pid with another start time marks the old slot
 * DEAD, unless its life lock is held (a process of another PID namespace with the same number).
 * A slot returns to FREE only once it owns nothing, so a block's owner always names the
 * process that allocated it [B6]. Membership and usage change under the heap lock, journaled, as
 * relaxed atomics that readers load without a lock; peak, limit and the trim pair are written
 * without the heap lock (shm_layout.h, Concurrency). */
#include <string.h>
#include <unistd.h>

#include "shm_internal.h"

/* Journal the counters of a slot (usage, nblocks .. nfrees) before they change. Not the peak: a
 * process's cache raises it without the heap lock, so a rollback must not lower it. */
static void proc_journal_counters(shm_handle_t *h, shm_proc_t *p) {
    J(h, &p->usage);
    journal_save(h, &p->nblocks, offsetof(shm_proc_t, trim_seq) - offsetof(shm_proc_t, nblocks));
}

/* What the process in slot uses: the heap side here plus its cache side (cache.c). */
uint64_t proc_usage(const shm_handle_t *h, int slot) {
    return A_LOAD(&h->arena->procs[slot].usage) + A_LOAD(&h->arena->caches[slot].usage);
}

/* The slot is claimed anew or becomes FREE (heap lock held): fold its cache's lifetime counts into
 * the arena's and empty it. Its lists hold no blocks any more (the caller freed them). */
static void proc_reset_cache(shm_handle_t *h, int slot) {
    shm_cache_t *c = &h->arena->caches[slot];
    shm_counters_t *ct = &h->arena->counters;
    A_ADD(&ct->allocations, A_LOAD(&c->nallocs));
    A_ADD(&ct->deallocations, A_LOAD(&c->nfrees));
    A_SUB(&ct->gc_cache_base, A_LOAD(&c->nfrees));
    journal_save(h, &c->usage, sizeof *c - offsetof(shm_cache_t, usage));
    memset(&c->usage, 0, sizeof *c - offsetof(shm_cache_t, usage));
    __atomic_store_n(&c->remote_head, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&c->remote_bytes, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&c->remote_blocks, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&c->pending, 0, __ATOMIC_RELAXED);
}

int proc_charge(shm_handle_t *h, uint32_t owner, uint64_t bytes) {
    if (!owner) return SHM_OK;
    if (UNLIKELY(owner > SHM_MAX_PROCS || h->arena->procs[owner - 1].state != SHM_PROC_LIVE))
        return err_set(SHM_EINVAL, owner - 1, "process slot %u is not attached", owner - 1);
    if (!bytes) return SHM_OK;
    shm_proc_t *p = &h->arena->procs[owner - 1];
    proc_journal_counters(h, p);
    A_ADD(&p->usage, bytes);
    a_raise_max(&p->peak, proc_usage(h, (int)owner - 1));
    A_ADD(&p->nblocks, 1);
    A_ADD(&p->nallocs, 1);
    return SHM_OK;
}

void proc_credit(shm_handle_t *h, uint32_t owner, uint64_t bytes) {
    if (!proc_slot_is_valid(h, owner)) return;
    shm_proc_t *p = &h->arena->procs[owner - 1];
    proc_journal_counters(h, p);
    A_SUB(&p->usage, bytes);
    A_SUB(&p->nblocks, 1);
    A_ADD(&p->nfrees, 1);
}

/* The slot's process has ended: mark it DEAD (heap lock held); gc.c frees what it owned. */
static void proc_mark(shm_handle_t *h, shm_proc_t *p) {
    J(h, p);
    A_STORE(&p->state, SHM_PROC_DEAD);
}

int shm_proc_attach(shm_handle_t *h, uint32_t pid, uint64_t start_time) {
    SHM_GATE(h);
    if (pid == 0) return err_set(SHM_EINVAL, 0, "pid 0 cannot own memory");
    int self = pid == (uint32_t)getpid();
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    int found = -1, free_slot = -1;
    for (int i = 0; i < SHM_MAX_PROCS; i++) {
        shm_proc_t *p = &h->arena->procs[i];
        if (p->state == SHM_PROC_FREE) {
            if (free_slot < 0) free_slot = i;
        } else if (p->pid == pid && p->state == SHM_PROC_LIVE) {
            int life = life_probe(h, i);
            if (life == SHM_LIFE_DEAD)
                proc_mark(h, p); /* whoever it was has ended */
            else if (p->start_time != start_time) {
                /* held: a live process of another PID namespace numbered like us; else the pid
                 * was recycled (the /proc fallback, life.c) */
                if (life != SHM_LIFE_HELD) proc_mark(h, p);
            } else if (!self || life != SHM_LIFE_HELD || life_is_mine(h, i))
                found = i; /* held by another process: a twin (pid, start) of another namespace */
        }
    }
    if (found >= 0 && self) life_hold(h, found); /* again after a close; failing: /proc decides */
    if (found < 0 && free_slot >= 0) {
        shm_proc_t *p = &h->arena->procs[free_slot];
        /* before the slot is LIVE, so that no probe finds it LIVE and unheld; if the keeper cannot
         * take it, the slot's liveness falls back to /proc (life.c) */
        if (self) life_hold(h, free_slot);
        J(h, p);
        proc_reset_cache(h, free_slot);
        p->pid = pid;
        p->start_time = start_time;
        A_STORE(&p->usage, 0);
        A_STORE(&p->peak, 0);
        A_STORE(&p->limit, 0);
        A_STORE(&p->nblocks, 0);
        A_STORE(&p->nallocs, 0);
        A_STORE(&p->nfrees, 0);
        A_STORE(&p->trim_seq, 0);
        A_STORE(&p->trim_ack, 0);
        A_STORE(&p->state, SHM_PROC_LIVE);
        found = free_slot;
    }
    heap_unlock(h);
    if (found >= 0 && pid == (uint32_t)getpid()) h->slot = found; /* this process's own cache */
    if (found < 0)
        return err_set(SHM_EPROCS, 0, "all %d process slots are taken; collect dead processes",
                       SHM_MAX_PROCS);
    return found;
}

int shm_proc_find(shm_handle_t *h, uint32_t pid) {
    SHM_GATE(h);
    for (int i = 0; i < SHM_MAX_PROCS; i++) {
        const shm_proc_t *p = &h->arena->procs[i];
        if (A_LOAD(&p->state) == SHM_PROC_LIVE && A_LOAD(&p->pid) == pid) return i;
    }
    return err_set(SHM_EINVAL, pid, "process %u is not attached to this arena", pid);
}

int shm_proc_info(shm_handle_t *h, int32_t slot, shm_proc_info_t *out) {
    SHM_GATE(h);
    int rc = proc_slot_check(slot);
    if (rc != SHM_OK) return rc;
    const shm_proc_t *p = &h->arena->procs[slot];
    out->slot = slot;
    out->state = A_LOAD(&p->state);
    out->pid = A_LOAD(&p->pid);
    out->start_time = A_LOAD(&p->start_time);
    const shm_cache_t *c = &h->arena->caches[slot];
    /* blocks other processes freed to it and it has not drained yet are freed, as users see it */
    uint64_t rbytes = A_LOAD(&c->remote_bytes), rblocks = A_LOAD(&c->remote_blocks);
    uint64_t usage = proc_usage(h, slot), nblocks = A_LOAD(&p->nblocks) + A_LOAD(&c->nblocks);
    out->usage = usage > rbytes ? usage - rbytes : 0;
    out->peak = A_LOAD(&p->peak);
    out->limit = A_LOAD(&p->limit);
    out->nblocks = nblocks > rblocks ? nblocks - rblocks : 0;
    out->nallocs = A_LOAD(&p->nallocs) + A_LOAD(&c->nallocs);
    out->nfrees = A_LOAD(&p->nfrees) + A_LOAD(&c->nfrees) + rblocks;
    if (out->peak < out->usage) out->peak = out->usage; /* read between the two halves' updates */
    return SHM_OK;
}

int shm_proc_set_limit(shm_handle_t *h, int32_t slot, uint64_t limit) {
    SHM_GATE(h);
    int rc = proc_live_check(h, slot);
    if (rc != SHM_OK) return rc;
    A_STORE(&h->arena->procs[slot].limit, limit);
    return SHM_OK;
}

/* The slot owns nothing any more: give it back (heap lock held), its cache's counts folded into
 * the arena's. */
void proc_free_slot(shm_handle_t *h, int slot) {
    shm_proc_t *p = &h->arena->procs[slot];
    J(h, p);
    proc_reset_cache(h, slot);
    A_STORE(&p->usage, 0);
    A_STORE(&p->nblocks, 0);
    A_STORE(&p->state, SHM_PROC_FREE);
}

/* Move the accounting of one block of `bytes` from owner `from` to owner `to` (either may be 0). */
void proc_move(shm_handle_t *h, uint32_t from, uint32_t to, uint64_t bytes) {
    if (from == to) return;
    if (proc_slot_is_valid(h, from)) {
        shm_proc_t *p = &h->arena->procs[from - 1];
        proc_journal_counters(h, p);
        A_SUB(&p->usage, bytes);
        A_SUB(&p->nblocks, 1);
    }
    if (proc_slot_is_valid(h, to)) {
        shm_proc_t *p = &h->arena->procs[to - 1];
        proc_journal_counters(h, p);
        A_ADD(&p->usage, bytes);
        a_raise_max(&p->peak, proc_usage(h, (int)to - 1));
        A_ADD(&p->nblocks, 1);
    }
}

/* Ask the process in slot to trim: it runs its on_pressure callbacks when it next enters the
 * library (it compares trim_seq with the last value it saw). */
int shm_proc_trim_request(shm_handle_t *h, int32_t slot) {
    SHM_GATE(h);
    int rc = proc_slot_check(slot);
    if (rc != SHM_OK) return rc;
    __atomic_add_fetch(&h->arena->procs[slot].trim_seq, 1, __ATOMIC_RELAXED); /* no lock here */
    return SHM_OK;
}

int shm_proc_trim_ack(shm_handle_t *h, int32_t slot) {
    SHM_GATE(h);
    int rc = proc_slot_check(slot);
    if (rc != SHM_OK) return rc;
    shm_proc_t *p = &h->arena->procs[slot];
    A_STORE(&p->trim_ack, A_LOAD(&p->trim_seq));
    return SHM_OK;
}

/* A collector found the process in slot dead (its life lock's holder died, or nobody holds the
 * life lock and /proc no longer shows (pid, start time)): mark it, if the slot still holds that
 * process and its life lock is not held (a held one is alive, whatever /proc says: another PID
 * namespace). Returns 1 if marked. */
int shm_proc_mark_dead(shm_handle_t *h, int32_t slot, uint32_t pid, uint64_t start_time) {
    SHM_GATE(h);
    int rc = proc_slot_check(slot);
    if (rc != SHM_OK) return rc;
    rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    shm_proc_t *p = &h->arena->procs[slot];
    int marked = 0;
    if (p->state == SHM_PROC_LIVE && p->pid == pid && p->start_time == start_time &&
        life_probe(h, slot) != SHM_LIFE_HELD) {
        proc_mark(h, p);
        marked = 1;
    }
    heap_unlock(h);
    return marked;
}
