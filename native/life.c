/* life.c -- life locks: whether the process in a slot still runs, answered the same way in every
 * PID namespace.
 *
 * A pid means nothing across PID namespaces (two containers sharing /dev/shm number their
 * processes each from 1), so /proc cannot say whether a slot's process lives: it may see another
 * process under that pid, or none. Each slot has a life lock instead (shm_arena_t.life_locks), a
 * robust process-shared mutex that the slot's process holds for as long as it is attached. When
 * it dies, however it dies and in whatever namespace, the kernel walks its robust list and marks
 * the mutex owner-died. So, for a LIVE slot:
 *   held          its process runs                                          SHM_LIFE_HELD
 *   owner died    its process has ended (or exec'd: exec releases the list) SHM_LIFE_DEAD
 *   free          nobody holds it: the process detached (closed its last     SHM_LIFE_UNHELD
 *                 attachment) while owning blocks, or the slot accounts for
 *                 another pid (allocate(pid=...)), or the keeper could not
 *                 start: only then does /proc (pid, start time) decide
 * A robust mutex belongs to the thread that locked it: if the thread that claimed the slot ended
 * while its process ran on, the kernel would mark the lock owner-died. So the locks are taken by
 * the keeper, one small thread per process (started on the first claim, all signals blocked),
 * which takes and lets go of this process's life locks on request and otherwise sleeps. It maps
 * the pages of the life locks itself, so the lock stays mapped for as long as it is held whatever
 * the application does with its own mappings; the mapping goes when this process's last handle
 * on the segment closes (shm_handle_close), and the lock with it. A child made by fork has no
 * keeper and holds nothing (its parent still holds its own locks); its first claim starts its own.
 *
 * Who touches a life lock: its process's keeper (take, let go), and any process holding the heap
 * lock (life_probe: a trylock that, on owner-died, makes the lock consistent again and unlocks).
 * A claimer takes the lock under the heap lock before the slot becomes LIVE, and probes run under
 * the heap lock, so a probe never holds a lock a claimer wants. life_peek reads the futex word
 * without taking anything (lock.c knows its layout), for readers that only look. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "shm_internal.h"

/* What this process's keeper holds, per segment: the keeper's own mapping of the life locks. */
typedef struct life_entry {
    uint64_t dev, ino; /* the segment */
    int slot;          /* whose life lock the keeper holds, -1 for none */
    uint8_t *map;      /* mapping of [map_off, map_off + map_len) of the segment */
    size_t map_off, map_len;
    struct life_entry *next;
} life_entry_t;

enum { KEEP_TAKE = 1, KEEP_LET_GO = 2 };

static pthread_once_t life_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t calls_mu = PTHREAD_MUTEX_INITIALIZER;  /* one caller at a time; entries */
static pthread_mutex_t keeper_mu = PTHREAD_MUTEX_INITIALIZER; /* the request below */
static pthread_cond_t keeper_cv = PTHREAD_COND_INITIALIZER;   /* a request is waiting */
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;     /* the request is done */
static int keeper_running;
static uint64_t req_seq, done_seq;
static int req_op, req_rc;
static pthread_mutex_t *req_mutex;
static life_entry_t *entries;

static void *keeper_main(void *arg) {
    (void)arg;
    pthread_mutex_lock(&keeper_mu);
    for (;;) {
        while (req_seq == done_seq) pthread_cond_wait(&keeper_cv, &keeper_mu);
        pthread_mutex_t *m = req_mutex;
        int rc;
        if (req_op == KEEP_TAKE) {
            rc = pthread_mutex_trylock(m);
            if (rc == EOWNERDEAD) rc = pthread_mutex_consistent(m); /* a claimer that died */
        } else {
            rc = pthread_mutex_unlock(m);
        }
        req_rc = rc;
        done_seq = req_seq;
        pthread_cond_broadcast(&done_cv);
    }
    return NULL;
}

/* Fork: the child has no keeper and holds no life lock (the parent's stay the parent's); its
 * entries keep their mappings for its own claims. The locks are taken around fork so that the
 * child's copies of the entries and the request are whole. */
static void life_prepare(void) {
    pthread_mutex_lock(&calls_mu);
    pthread_mutex_lock(&keeper_mu);
}

static void life_parent(void) {
    pthread_mutex_unlock(&keeper_mu);
    pthread_mutex_unlock(&calls_mu);
}

static void life_child(void) {
    pthread_mutex_init(&calls_mu, NULL);
    pthread_mutex_init(&keeper_mu, NULL);
    pthread_cond_init(&keeper_cv, NULL);
    pthread_cond_init(&done_cv, NULL);
    keeper_running = 0;
    req_seq = done_seq = 0;
    for (life_entry_t *e = entries; e; e = e->next) e->slot = -1;
}

static void life_init(void) { pthread_atfork(life_prepare, life_parent, life_child); }

/* calls_mu held: have the keeper take or let go of m; starts the keeper if need be. */
static int keeper_call(int op, pthread_mutex_t *m) {
    if (!keeper_running) {
        pthread_attr_t attr;
        sigset_t all, old;
        pthread_t t;
        sigfillset(&all);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 * 1024); /* it calls trylock and unlock, no more */
        pthread_sigmask(SIG_SETMASK, &all, &old);    /* signals go to the application's threads */
        int rc = pthread_create(&t, &attr, keeper_main, NULL);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);
        if (rc) return err_sys(rc, "pthread_create (the life-lock keeper)");
        keeper_running = 1;
    }
    pthread_mutex_lock(&keeper_mu);
    req_op = op;
    req_mutex = m;
    uint64_t seq = ++req_seq;
    pthread_cond_signal(&keeper_cv);
    while (done_seq != seq) pthread_cond_wait(&done_cv, &keeper_mu);
    int rc = req_rc;
    pthread_mutex_unlock(&keeper_mu);
    return rc ? err_sys(rc, op == KEEP_TAKE ? "taking a life lock" : "letting go of a life lock")
              : SHM_OK;
}

static pthread_mutex_t *entry_mutex(const life_entry_t *e, int slot) {
    size_t off = offsetof(shm_arena_t, life_locks) + (size_t)slot * sizeof(shm_lock_t);
    return (pthread_mutex_t *)(void *)(e->map + (off - e->map_off));
}

static life_entry_t *entry_find(uint64_t dev, uint64_t ino) {
    for (life_entry_t *e = entries; e; e = e->next)
        if (e->dev == dev && e->ino == ino) return e;
    return NULL;
}

/* Heap lock held, slot about to become (or being) this process's own: the keeper takes its life
 * lock, letting go of another slot's of the same segment it held. */
int life_hold(shm_handle_t *h, int slot) {
    pthread_once(&life_once, life_init);
    pthread_mutex_lock(&calls_mu);
    life_entry_t *e = entry_find(h->seg_dev, h->seg_ino);
    int rc = SHM_OK;
    if (!e) {
        size_t first = offsetof(shm_arena_t, life_locks), page = (size_t)sysconf(_SC_PAGESIZE);
        size_t off = first & ~(page - 1);
        size_t len = ((first + sizeof h->arena->life_locks - off) + page - 1) & ~(page - 1);
        void *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, h->fd, (off_t)off);
        if (map == MAP_FAILED) {
            rc = err_sys(errno, "mmap of the life locks");
        } else if (!(e = calloc(1, sizeof *e))) {
            munmap(map, len);
            rc = err_sys(ENOMEM, "calloc");
        } else {
            *e = (life_entry_t){h->seg_dev, h->seg_ino, -1, map, off, len, entries};
            entries = e;
        }
    }
    if (e && e->slot != slot) {
        if (e->slot >= 0) keeper_call(KEEP_LET_GO, entry_mutex(e, e->slot));
        e->slot = -1;
        if ((rc = keeper_call(KEEP_TAKE, entry_mutex(e, slot))) == SHM_OK) e->slot = slot;
    }
    pthread_mutex_unlock(&calls_mu);
    return rc;
}

/* Does this process's keeper hold slot's life lock? */
int life_is_mine(const shm_handle_t *h, int slot) {
    pthread_once(&life_once, life_init);
    pthread_mutex_lock(&calls_mu);
    const life_entry_t *e = entry_find(h->seg_dev, h->seg_ino);
    int mine = e && e->slot == slot;
    pthread_mutex_unlock(&calls_mu);
    return mine;
}

/* This process gives slot back (heap lock held): the keeper lets go of its life lock. */
void life_let_go(shm_handle_t *h, int slot) {
    pthread_once(&life_once, life_init);
    pthread_mutex_lock(&calls_mu);
    life_entry_t *e = entry_find(h->seg_dev, h->seg_ino);
    if (e && e->slot == slot) {
        keeper_call(KEEP_LET_GO, entry_mutex(e, slot));
        e->slot = -1;
    }
    pthread_mutex_unlock(&calls_mu);
}

/* This process's last handle on the segment closes: let go of its life lock and unmap. */
void life_forget(uint64_t dev, uint64_t ino) {
    pthread_once(&life_once, life_init);
    pthread_mutex_lock(&calls_mu);
    for (life_entry_t **p = &entries; *p; p = &(*p)->next) {
        life_entry_t *e = *p;
        if (e->dev != dev || e->ino != ino) continue;
        if (e->slot >= 0) keeper_call(KEEP_LET_GO, entry_mutex(e, e->slot));
        munmap(e->map, e->map_len);
        *p = e->next;
        free(e);
        break;
    }
    pthread_mutex_unlock(&calls_mu);
}

/* Without any lock: what slot's life lock says now. */
int life_peek(const shm_handle_t *h, int slot) {
    switch (lock_peek(&h->arena->life_locks[slot])) {
    case LOCK_PEEK_HELD:
        return SHM_LIFE_HELD;
    case LOCK_PEEK_OWNER_DIED:
        return SHM_LIFE_DEAD;
    default:
        return SHM_LIFE_UNHELD;
    }
}

/* Heap lock held: ask slot's life lock, and leave it clean: a lock whose holder died is made
 * consistent and unlocked (the caller marks the slot DEAD), one nobody held is unlocked again. */
int life_probe(shm_handle_t *h, int slot) {
    shm_lock_t *l = &h->arena->life_locks[slot];
    pthread_mutex_t *m = (pthread_mutex_t *)(void *)l->mutex;
    int rc = pthread_mutex_trylock(m);
    if (rc == EBUSY) return SHM_LIFE_HELD;
    if (rc == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        pthread_mutex_unlock(m);
        return SHM_LIFE_DEAD;
    }
    if (rc == 0)
        pthread_mutex_unlock(m);
    else
        lock_init(l); /* not recoverable: nobody can hold it; make it a lock again */
    return SHM_LIFE_UNHELD;
}

int shm_proc_life(shm_handle_t *h, int32_t slot) {
    SHM_GATE(h);
    int rc = proc_slot_check(slot);
    if (rc != SHM_OK) return rc;
    return life_peek(h, slot);
}
