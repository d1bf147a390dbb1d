/* lock.c -- the process-shared robust mutexes: the heap lock, which guards the heap, the bins and
 * the process table, and the slot locks, which guard each process's cache (cache.c).
 *
 * The mutex lives in the segment (shm_lock_t.mutex). It is PTHREAD_PROCESS_SHARED so every
 * process that maps the segment can take it, and PTHREAD_MUTEX_ROBUST so that when its holder
 * dies (kill -9 at any instruction) the next taker gets EOWNERDEAD instead of waiting forever.
 * On EOWNERDEAD the dead holder's half-done step is rolled back from the undo journal
 * (journal.c), the mutex is marked consistent and the recovery counted. Every lock_acquire begins
 * a journal and every lock_release ends it. */
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

/* Wait for the mutex, but never forever on a holder that does not exist: damaged lock bytes can
 * name a thread that is gone without the kernel's owner-died mark. Every second of waiting, look
 * at the holder's thread id; if there is no such thread, report corruption instead of hanging. */
static int lock_wait(shm_handle_t *h, shm_lock_t *l) {
    pthread_mutex_t *m = lock_mutex(l);
    int rc = pthread_mutex_trylock(m);
    if (LIKELY(rc != EBUSY)) return rc;
    for (;;) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 1;
        rc = pthread_mutex_timedlock(m, &until);
        if (rc != ETIMEDOUT) return rc;
        int tid = m->__data.__owner & 0x3fffffff; /* glibc: the holder's tid, flag bits masked */
        if (tid <= 0 || (kill(tid, 0) != 0 && errno == ESRCH))
            return err_set(SHM_ECORRUPT, (uint64_t)((uint8_t *)l - h->base),
                           "the %s lock is held by thread %d, which does not exist",
                           l == &h->arena->heap_lock ? "heap" : "process cache", tid);
    }
}

int lock_acquire(shm_handle_t *h, shm_lock_t *l) {
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
            lock_release(h, l);
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

/* A slot lock (cache.c): no journal. With wait == 0 it does not wait (SHM_EFULL if another
 * thread holds it). Returns SHM_OK, SHM_LOCK_RECOVERED when its holder died (the lock is ours and
 * consistent again; what it guarded must be repaired), or a status. */
int lock_take(shm_handle_t *h, shm_lock_t *l, int wait) {
    int rc = wait ? lock_wait(h, l) : pthread_mutex_trylock(lock_mutex(l));
    if (LIKELY(rc == 0)) return SHM_OK;
    if (rc == SHM_ECORRUPT) return rc;
    if (rc == EBUSY) return SHM_EFULL;
    if (rc == EOWNERDEAD) {
        if ((rc = pthread_mutex_consistent(lock_mutex(l))) != 0) {
            pthread_mutex_unlock(lock_mutex(l));
            return err_sys(rc, "pthread_mutex_consistent");
        }
        return SHM_LOCK_RECOVERED;
    }
    if (rc == ENOTRECOVERABLE)
        return err_set(SHM_ECORRUPT, (uint64_t)((uint8_t *)l - h->base), "a process cache lock is not recoverable");
    return err_sys(rc, "pthread_mutex_lock");
}

void lock_give(shm_lock_t *l) { pthread_mutex_unlock(lock_mutex(l)); }

void lock_release(shm_handle_t *h, shm_lock_t *l) {
#if SHMALLOC_DEBUG >= 3
    /* debug level 3: every operation leaves a heap that passes the full walk */
    shm_check_report_t r;
    if (check_locked(h, &r, 0) != SHM_OK) {
        fprintf(stderr, "shmalloc debug: heap invariant broken: %s\n", shm_last_error()->detail);
        abort();
    }
#endif
    if (h->claimed) block_unclaim(h, h->claimed);
    journal_end(h);
    pthread_mutex_unlock(lock_mutex(l));
}
