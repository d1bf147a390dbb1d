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
#include <sys/stat.h>
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
 * FUTEX_WAITERS and FUTEX_OWNER_DIED bits above it, and again in __owner. When a holder dies the
 * kernel clears the thread id and sets FUTEX_OWNER_DIED. These functions are the only places that
 * know it. */
#define LOCK_TID_MASK 0x3fffffffu   /* FUTEX_TID_MASK */
#define LOCK_OWNER_DIED 0x40000000u /* FUTEX_OWNER_DIED */

static uint32_t lock_word(const shm_lock_t *l) {
    const pthread_mutex_t *m = (const pthread_mutex_t *)(const void *)l->mutex;
    return (uint32_t)__atomic_load_n(&m->__data.__lock, __ATOMIC_ACQUIRE);
}

static uint32_t lock_holder(shm_lock_t *l) { return lock_word(l) & LOCK_TID_MASK; }

int lock_peek(const shm_lock_t *l) {
    uint32_t w = lock_word(l);
    if (w & LOCK_TID_MASK) return LOCK_PEEK_HELD;
    return (w & LOCK_OWNER_DIED) ? LOCK_PEEK_OWNER_DIED : LOCK_PEEK_FREE;
}

static void lock_forge(shm_lock_t *l, uint32_t tid) {
    pthread_mutex_t *m = lock_mutex(l);
    m->__data.__count = 0;
    m->__data.__owner = (int)tid;
    __atomic_store_n(&m->__data.__lock, (int)tid, __ATOMIC_RELEASE);
}

/* This process's PID namespace (the inode of /proc/self/ns/pid), read once; a fork child reads it
 * again (its parent may have made it in a new namespace). 0 when there is no /proc: unknown. */
static uint64_t self_ns;
static pthread_once_t self_ns_once = PTHREAD_ONCE_INIT;

static void self_ns_forget(void) { self_ns = 0; }
static void self_ns_register(void) { pthread_atfork(NULL, NULL, self_ns_forget); }

uint64_t lock_self_ns(void) {
    uint64_t ns = __atomic_load_n(&self_ns, __ATOMIC_RELAXED);
    if (UNLIKELY(!ns)) {
        struct stat st;
        pthread_once(&self_ns_once, self_ns_register);
        if (stat("/proc/self/ns/pid", &st) != 0) return 0;
        ns = (uint64_t)st.st_ino;
        __atomic_store_n(&self_ns, ns, __ATOMIC_RELAXED);
    }
    return ns;
}

/* The holder's stamps (shm_lock_t): written right after taking the lock, cleared before letting
 * go. A waiter reads them to judge a holder it cannot see. */
static void lock_stamp(shm_handle_t *h, shm_lock_t *l) {
    A_STORE(&l->holder_ns, lock_self_ns());
    A_STORE(&l->holder_slot, (uint32_t)(h->slot + 1));
}

static void lock_unstamp(shm_lock_t *l) {
    A_STORE(&l->holder_slot, 0);
    A_STORE(&l->holder_ns, 0);
}

/* Is the holder that lock l names gone without the kernel's owner-died mark (damaged lock
 * bytes)? A thread id only means something in the holder's own PID namespace:
 *   - stamped by a process of our namespace (or not stamped: damaged bytes, or a holder between
 *     its lock and its stamp, which the second look a second later settles): kill(tid, 0) says;
 *   - stamped by a process of another namespace: its tid means nothing here. It is a ghost only if
 *     the slot it stamped says its process has ended (that slot's life lock, life.c, read here
 *     as a lock word); a holder
 *     without a slot there cannot be judged from here, and is waited for. */
static int lock_holder_is_ghost(shm_handle_t *h, shm_lock_t *l, uint32_t tid) {
    uint64_t ns = A_LOAD(&l->holder_ns), mine = lock_self_ns();
    uint32_t slot = A_LOAD(&l->holder_slot);
    if (ns && mine && ns != mine)
        return slot >= 1 && slot <= SHM_MAX_PROCS &&
               lock_peek(&h->arena->life_locks[slot - 1]) == LOCK_PEEK_OWNER_DIED;
    return kill((pid_t)tid, 0) != 0 && errno == ESRCH;
}

/* Wait for the mutex, but never forever on a holder that does not exist: damaged lock bytes can
 * name a thread that is gone without the kernel's owner-died mark. Every second of waiting, look
 * at the holder; if it is a ghost twice in a row (the same thread id), or twice in a row no holder
 * is named (which a hand-over between two holders cannot explain), report corruption instead of
 * hanging. */
static int lock_wait(shm_handle_t *h, shm_lock_t *l) {
    pthread_mutex_t *m = lock_mutex(l);
    int rc = pthread_mutex_trylock(m);
    if (LIKELY(rc != EBUSY)) return rc;
    uint32_t last_ghost = 0;
    for (int nobody = 0;;) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 1;
        rc = pthread_mutex_timedlock(m, &until);
        if (rc != ETIMEDOUT) return rc;
        uint32_t tid = lock_holder(l);
        nobody = tid == 0 ? nobody + 1 : 0;
        uint32_t ghost = tid && lock_holder_is_ghost(h, l, tid) ? tid : 0;
        if (nobody >= 2 || (ghost && ghost == last_ghost))
            return err_set(SHM_ECORRUPT, (uint64_t)((uint8_t *)l - h->base),
                           "the %s lock is held by thread %u, which does not exist",
                           l == &h->arena->heap_lock ? "heap" : "process cache", tid);
        last_ghost = ghost;
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
int shm_debug_lock_forge(shm_handle_t *h, int32_t which, uint32_t tid, uint64_t ns, int32_t slot) {
    SHM_GATE(h);
    shm_lock_t *l = lock_named(h, which);
    if (!l) return SHM_EINVAL;
    if (tid > LOCK_TID_MASK)
        return err_set(SHM_EINVAL, tid, "thread id %u does not fit a futex word", tid);
    if (slot < -1 || slot >= SHM_MAX_PROCS)
        return err_set(SHM_EINVAL, (uint64_t)(int64_t)slot, "no process slot %d", slot);
    lock_forge(l, tid);
    A_STORE(&l->holder_ns, tid ? ns : 0);
    A_STORE(&l->holder_slot, tid ? (uint32_t)(slot + 1) : 0);
    return SHM_OK;
}

uint64_t shm_pid_namespace(void) { return lock_self_ns(); }

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
    lock_stamp(h, l);
    return SHM_OK;
}

/* A slot lock (cache.c): no journal. With wait == 0 it does not wait (SHM_EBUSY if another
 * thread holds it). Returns SHM_OK, SHM_LOCK_RECOVERED when its holder died (the lock is ours and
 * consistent again; what it guarded must be repaired), or a status. */
int lock_take(shm_handle_t *h, shm_lock_t *l, int wait) {
    shm_assert(l != &h->arena->heap_lock); /* the heap lock goes through heap_lock(): its journal */
    int rc = wait ? lock_wait(h, l) : pthread_mutex_trylock(lock_mutex(l));
    if (LIKELY(rc == 0)) {
        lock_stamp(h, l);
        return SHM_OK;
    }
    if (rc == SHM_ECORRUPT) return rc;
    if (rc == EBUSY)
        return err_set(SHM_EBUSY, (uint64_t)((uint8_t *)l - h->base), "the lock at %#llx is held",
                       (unsigned long long)((uint8_t *)l - h->base));
    if (rc == EOWNERDEAD) {
        if ((rc = pthread_mutex_consistent(lock_mutex(l))) != 0) {
            pthread_mutex_unlock(lock_mutex(l));
            return err_sys(rc, "pthread_mutex_consistent");
        }
        lock_stamp(h, l);
        return SHM_LOCK_RECOVERED;
    }
    if (rc == ENOTRECOVERABLE)
        return err_set(SHM_ECORRUPT, (uint64_t)((uint8_t *)l - h->base),
                       "a process cache lock is not recoverable");
    return err_sys(rc, "pthread_mutex_lock");
}

void lock_give(shm_lock_t *l) {
    lock_unstamp(l);
    pthread_mutex_unlock(lock_mutex(l));
}

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
    lock_unstamp(&h->arena->heap_lock);
    pthread_mutex_unlock(lock_mutex(&h->arena->heap_lock));
}
