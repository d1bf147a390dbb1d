/* lock.c -- the process-shared robust mutexes: the heap lock, which guards the heap, the bins and
 * the process table, and the slot locks, which guard each process's cache (cache.c). What each
 * guards exactly, the lock order and what a dead holder leaves: shm_layout.h, Concurrency.
 *
 * The mutex lives in the segment (shm_lock_t.mutex). It is PTHREAD_PROCESS_SHARED so every
 * process that maps the segment can take it, and PTHREAD_MUTEX_ROBUST so that when its holder
 * dies (kill -9 at any instruction) the next taker gets EOWNERDEAD instead of waiting forever.
 * On EOWNERDEAD the dead holder's half-done step is rolled back from the undo journal
 * (journal.c), the mutex is marked consistent and the recovery counted. Every heap_lock begins
 * a journal and every heap_unlock ends it. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "shm_internal.h"

_Static_assert(sizeof(pthread_mutex_t) <= sizeof(((shm_lock_t *)0)->mutex),
               "shm_lock_t.mutex too small for pthread_mutex_t");

static pthread_mutex_t *lock_mutex(shm_lock_t *l) { return (pthread_mutex_t *)(void *)l->mutex; }

int lock_init(shm_lock_t *l) {
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc) return err_sys(rc, "pthread_mutexattr_init");
    if ((rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)) ||
        (rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST))) {
        pthread_mutexattr_destroy(&attr);
        return err_sys(rc, "pthread_mutexattr_set*");
    }
    memset(l, 0, sizeof *l);
    rc = pthread_mutex_init(lock_mutex(l), &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc) return err_sys(rc, "pthread_mutex_init");
    return SHM_OK;
}

/* glibc's robust mutex keeps its holder's thread id in the futex word (__lock), with the kernel's
 * FUTEX_WAITERS and FUTEX_OWNER_DIED bits above it, and again in __owner. These two functions are
 * the only places that know it. */
#define LOCK_TID_MASK 0x3fffffffu /* FUTEX_TID_MASK */

static uint32_t lock_holder(shm_lock_t *l) {
    const pthread_mutex_t *m = lock_mutex(l);
    return (uint32_t)__atomic_load_n(&m->__data.__lock, __ATOMIC_RELAXED) & LOCK_TID_MASK;
}

static void lock_forge(shm_lock_t *l, uint32_t tid) {
    pthread_mutex_t *m = lock_mutex(l);
    m->__data.__count = 0;
    m->__data.__owner = (int)tid;
    __atomic_store_n(&m->__data.__lock, (int)tid, __ATOMIC_RELEASE);
}

/* Wait for the mutex, but never forever on a holder that does not exist: damaged lock bytes can
 * name a thread that is gone without the kernel's owner-died mark. Every second of waiting, look
 * at the holder's thread id; if there is no such thread (or twice in a row none is named, which a
 * hand-over between two holders cannot explain), report corruption instead of hanging. */
static int lock_wait(shm_handle_t *h, shm_lock_t *l) {
    pthread_mutex_t *m = lock_mutex(l);
    int rc = pthread_mutex_trylock(m);
    if (LIKELY(rc != EBUSY)) return rc;
    for (int nobody = 0;;) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 1;
        rc = pthread_mutex_timedlock(m, &until);
        if (rc != ETIMEDOUT) return rc;
        uint32_t tid = lock_holder(l);
        nobody = tid == 0 ? nobody + 1 : 0;
        if (nobody >= 2 || (tid && kill((pid_t)tid, 0) != 0 && errno == ESRCH))
            return err_set(SHM_ECORRUPT, (uint64_t)((uint8_t *)l - h->base),
                           "the %s lock is held by thread %u, which does not exist",
                           l == &h->arena->heap_lock ? "heap" : "process cache", tid);
    }
}

/* which = -1: the heap lock; 0..SHM_MAX_PROCS-1: that slot's lock; NULL otherwise. */
static shm_lock_t *lock_named(shm_handle_t *h, int32_t which) {
    if (which == -1) return &h->arena->heap_lock;
    if (which >= 0 && which < SHM_MAX_PROCS) return &h->arena->slot_locks[which];
    err_set(SHM_EINVAL, (uint64_t)(int64_t)which, "no lock %d (-1: the heap lock, 0..%d: a slot's)",
            which, SHM_MAX_PROCS - 1);
    return NULL;
}

int64_t shm_lock_offset(int32_t which) {
    if (which == -1) return (int64_t)offsetof(shm_arena_t, heap_lock);
    if (which >= 0 && which < SHM_MAX_PROCS)
        return (int64_t)(offsetof(shm_arena_t, slot_locks) + (uint64_t)which * sizeof(shm_lock_t));
    return err_set(SHM_EINVAL, (uint64_t)(int64_t)which,
                   "no lock %d (-1: the heap lock, 0..%d: a slot's)", which, SHM_MAX_PROCS - 1);
}

int shm_lock_owner(shm_handle_t *h, int32_t which, uint32_t *tid_out) {
    SHM_GATE(h);
    shm_lock_t *l = lock_named(h, which);
    if (!l) return SHM_EINVAL;
    *tid_out = lock_holder(l);
    return SHM_OK;
}

/* Test-only: the lock as a holder that died without the kernel's robust-list cleanup leaves it
 * (tid != 0), or unlocked again (tid == 0). */
int shm_debug_lock_forge(shm_handle_t *h, int32_t which, uint32_t tid) {
    SHM_GATE(h);
    shm_lock_t *l = lock_named(h, which);
    if (!l) return SHM_EINVAL;
    if (tid > LOCK_TID_MASK)
        return err_set(SHM_EINVAL, tid, "thread id %u does not fit a futex word", tid);
    lock_forge(l, tid);
    return SHM_OK;
}

/* Take the heap lock and begin the journal; a dead holder's half-done step is rolled back first. */
int heap_lock(shm_handle_t *h) {
    shm_lock_t *l = &h->arena->heap_lock;
    int rc = lock_wait(h, l);
    if (UNLIKELY(rc == SHM_ECORRUPT)) return rc;
    if (UNLIKELY(rc == EOWNERDEAD)) {
        /* The holder died: undo its half-done step (the counters come back with it), then count
         * the recovery. If we die in here, the next taker gets EOWNERDEAD and rolls back again. */
        int undone = journal_rollback(h);
        A_ADD(&h->arena->counters.lock_recoveries, 1);
        if (undone > 0) A_ADD(&h->arena->journal.rollbacks, 1);
        rc = pthread_mutex_consistent(lock_mutex(l));
        if (rc) {
            pthread_mutex_unlock(lock_mutex(l));
            return err_sys(rc, "pthread_mutex_consistent");
        }
        if (undone < 0) {
            journal_begin(h);
            heap_unlock(h);
            return undone;
        }
    } else if (UNLIKELY(rc)) {
        if (rc == ENOTRECOVERABLE)
            return err_set(SHM_ECORRUPT, (uint64_t)((uint8_t *)l - h->base),
                           "the heap lock is not recoverable");
        return err_sys(rc, "pthread_mutex_lock");
    }
    journal_begin(h);
    return SHM_OK;
}

/* A slot lock (cache.c): no journal. With wait == 0 it does not wait (SHM_EBUSY if another
 * thread holds it). Returns SHM_OK, SHM_LOCK_RECOVERED when its holder died (the lock is ours and
 * consistent again; what it guarded must be repaired), or a status. */
int lock_take(shm_handle_t *h, shm_lock_t *l, int wait) {
    shm_assert(l != &h->arena->heap_lock); /* the heap lock goes through heap_lock(): its journal */
    int rc = wait ? lock_wait(h, l) : pthread_mutex_trylock(lock_mutex(l));
    if (LIKELY(rc == 0)) return SHM_OK;
    if (rc == SHM_ECORRUPT) return rc;
    if (rc == EBUSY)
        return err_set(SHM_EBUSY, (uint64_t)((uint8_t *)l - h->base), "the lock at %#llx is held",
                       (unsigned long long)((uint8_t *)l - h->base));
    if (rc == EOWNERDEAD) {
        if ((rc = pthread_mutex_consistent(lock_mutex(l))) != 0) {
            pthread_mutex_unlock(lock_mutex(l));
            return err_sys(rc, "pthread_mutex_consistent");
        }
        return SHM_LOCK_RECOVERED;
    }
    if (rc == ENOTRECOVERABLE)
        return err_set(SHM_ECORRUPT, (uint64_t)((uint8_t *)l - h->base),
                       "a process cache lock is not recoverable");
    return err_sys(rc, "pthread_mutex_lock");
}

void lock_give(shm_lock_t *l) { pthread_mutex_unlock(lock_mutex(l)); }

/* End the journal (the operation is done: nothing to roll back), let go of the claimed block, and
 * unlock. */
void heap_unlock(shm_handle_t *h) {
#if SHMALLOC_DEBUG >= 3
    /* debug level 3: every operation leaves a heap that passes the full walk */
    shm_check_report_t r;
    if (check_locked(h, &r, 0) != SHM_OK)
        shm_assert_fail(shm_last_error()->detail, __FILE__, __LINE__);
#endif
    if (h->claimed) block_unclaim(h, h->claimed);
    journal_end(h);
    pthread_mutex_unlock(lock_mutex(&h->arena->heap_lock));
}
