/* wait.c -- sleeping on a word of the segment until another process changes it.
 *
 * A waiter sleeps in the kernel on a 32-bit word of the shared mapping with the futex system call.
 * The mapping is MAP_SHARED across processes, so the calls use the shared futex operations
 * (FUTEX_WAIT, FUTEX_WAKE without FUTEX_PRIVATE_FLAG): the kernel keys them by the segment's inode
 * and offset, not by this process's address.
 *
 * The protocol on a wait word is a sequence counter, never a lock:
 *   waiter:  s = load(word); if (condition holds) done; shm_wait(word, s, time left); repeat
 *   waker:   make the condition true (under whatever lock guards it); word += 1; shm_wake(word)
 * The kernel sleeps only while the word still equals s, atomically with its check, so a bump
 * between the waiter's load and its sleep is never missed. Nothing is held while sleeping, so:
 *   - a waiter killed at any instruction leaves nothing behind (a count of waiters it raised, if
 *     any, only makes wakers call the kernel once more);
 *   - a waker killed before its bump never made its change visible to this protocol, and one
 *     killed between its bump and its wake leaves waiters asleep until their timeout, or until the
 *     next waker: callers that wait without a timeout cap each sleep (objects.py) and re-check, so
 *     a dead waker delays them by that cap at most, and never wedges them;
 *   - every wake-up may be spurious: a waiter always re-checks its condition.
 * Signals interrupt the sleep (SHM_EINTR) so that Python can run its handlers; the caller waits
 * again with the time left. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "shm_internal.h"

static int word_at(const shm_handle_t *h, uint64_t off, uint32_t **out) {
    if (off % 4 != 0 || h->capacity < 4 || off > h->capacity - 4)
        return err_set(SHM_EINVAL, off,
                       "no wait word at segment offset %#llx: it must be 4-aligned and inside "
                       "the segment",
                       (unsigned long long)off);
    *out = (uint32_t *)(void *)(h->base + off);
    return SHM_OK;
}

static long futex(uint32_t *w, int op, uint32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, w, op, val, ts, NULL, 0);
}

int shm_wait(shm_handle_t *h, uint64_t word_offset, uint32_t expected, int64_t timeout_ns) {
    SHM_GATE(h);
    uint32_t *w = NULL;
    int rc = word_at(h, word_offset, &w);
    if (rc != SHM_OK) return rc;
    struct timespec ts, *tp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = (time_t)(timeout_ns / 1000000000);
        ts.tv_nsec = (long)(timeout_ns % 1000000000);
        tp = &ts;
    }
    if (__atomic_load_n(w, __ATOMIC_ACQUIRE) != expected) return SHM_OK;
    if (futex(w, FUTEX_WAIT, expected, tp) == 0) return SHM_OK;
    switch (errno) {
    case EAGAIN:
        return SHM_OK; /* the word changed before we slept */
    case ETIMEDOUT:
        return err_set(SHM_ETIMEDOUT, word_offset, "nothing changed the word at %#llx in time",
                       (unsigned long long)word_offset);
    case EINTR:
        return err_set(SHM_EINTR, word_offset, "a signal interrupted the wait");
    default:
        return err_sys(errno, "futex(FUTEX_WAIT) on a word of the segment");
    }
}

/* Spin up to SPIN_NS for the word to leave `expected`, before a sleep: a hand-off between two
 * processes on two CPUs then costs no futex round trip (tens of microseconds on a busy host, most
 * of a small item's latency), the way adaptive mutexes spin before they park. Returns 1 when the
 * word changed. No spin with a single usable CPU: the process to change the word cannot run.
 * Every few rounds of pauses the spinner yields its CPU, which the process it waits for may be
 * queued for on a busy host (pauses alone made a round trip 4x slower there). SHMALLOC_SPIN_NS
 * sets the budget (0: never spin), read once per process. */
/* 200 us covers a 1 MiB array's hand-off and its answer: that round trip went from about 300 to
 * 200 us against a 50 us spin (two futex sleeps and wake-ups less). A waiter that must sleep
 * anyway burns this much CPU once. */
#define SPIN_NS 200000
/* A round is SPIN_PAUSES pauses and a look at the clock (about 0.5 us with a 30 ns pause); every
 * SPIN_YIELD_EVERY rounds, a sched_yield (about 0.8 us on a VM, a system call even when nobody
 * else waits). Rounds of 64 pauses with a yield each let a change wait up to about 3 us to be
 * seen, and a small round trip paid that on each of its hops. */
#define SPIN_PAUSES 16
#define SPIN_YIELD_EVERY 4
static int spin_budget = -1; /* ns; -1: not known yet (a benign race: every thread finds one) */

int wait_spin(const uint32_t *w, uint32_t expected) {
    int budget = __atomic_load_n(&spin_budget, __ATOMIC_RELAXED);
    if (budget < 0) {
        int cpus = usable_cores();
        const char *env = getenv("SHMALLOC_SPIN_NS"); /* 0: never spin */
        long asked = env && *env ? strtol(env, NULL, 10) : SPIN_NS;
        budget = cpus > 1 && asked > 0 ? (int)(asked < 1000000 ? asked : 1000000) : 0;
        __atomic_store_n(&spin_budget, budget, __ATOMIC_RELAXED);
    }
    if (!budget) return 0;
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned round = 1;; round++) {
        for (int i = 0; i < SPIN_PAUSES; i++) {
            if (__atomic_load_n(w, __ATOMIC_ACQUIRE) != expected) return 1;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#elif defined(__aarch64__)
            __asm__ __volatile__("yield");
#endif
        }
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) >= budget) return 0;
        if (round % SPIN_YIELD_EVERY == 0)
            sched_yield(); /* the process to change the word may be waiting for this CPU */
    }
}

int shm_wake(shm_handle_t *h, uint64_t word_offset, int32_t n) {
    SHM_GATE(h);
    uint32_t *w = NULL;
    int rc = word_at(h, word_offset, &w);
    if (rc != SHM_OK) return rc;
    long r = futex(w, FUTEX_WAKE, n < 0 ? (uint32_t)INT_MAX : (uint32_t)n, NULL);
    return r < 0 ? err_sys(errno, "futex(FUTEX_WAKE) on a word of the segment") : (int)r;
}

int shm_word_bump(shm_handle_t *h, uint64_t word_offset, int32_t n) {
    SHM_GATE(h);
    uint32_t *w = NULL;
    int rc = word_at(h, word_offset, &w);
    if (rc != SHM_OK) return rc;
    __atomic_add_fetch(w, 1, __ATOMIC_RELEASE);
    return shm_wake(h, word_offset, n);
}

int64_t shm_word_load(shm_handle_t *h, uint64_t word_offset) {
    SHM_GATE(h);
    uint32_t *w = NULL;
    int rc = word_at(h, word_offset, &w);
    return rc != SHM_OK ? rc : (int64_t)__atomic_load_n(w, __ATOMIC_ACQUIRE);
}
