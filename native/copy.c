/* copy.c -- the copy of a large buffer into the segment: streamed, and split over the cores.
 *
 * A put of a 64 MiB array is one memcpy into a block of the arena, and that copy is the whole
 * cost of the hand-off. Two things make a copy that large faster than memcpy makes it here:
 *   - Non-temporal stores. A store to a line not in the cache first reads the line (a read for
 *     ownership), so a plain copy moves three bytes over the memory bus for each byte copied;
 *     streaming stores write whole lines without reading them, two for one. glibc streams only
 *     above 3/4 of the shared cache it is told of, and a VM is told of its host's whole L3
 *     (256 MiB here: a threshold of 192 MiB). A copy of COPY_LARGE bytes or more is streamed
 *     (SSE2, on x86-64; elsewhere memcpy). The trade: its lines are not left in the cache, so a
 *     reader that comes at once reads them from memory; for a block this large, most of them
 *     would have left the writer's caches anyway.
 *   - More cores. One core does not saturate the bus on such a copy, so it is cut into one part
 *     per usable core, up to COPY_MAX_PARTS parts of at least COPY_PART_MIN bytes each: the
 *     caller copies the first part, short-lived helper threads the others. Ray's object store
 *     splits its large puts the same way.
 * Measured on this project's 2-core VM, 64 MiB into a block not in the cache: 11-13 ms with
 * memcpy, 8-11 ms streamed, 7-10 ms with memcpy on two threads, 5-7 ms streamed on two threads.
 *
 * Why threads made per copy, not a pool: nothing outlives the call, so there is nothing for a
 * fork to inherit half-made, nothing to shut down at exit, and no state to guard. A thread costs
 * tens of microseconds to start; the smallest split copy takes milliseconds. The helpers start
 * with every signal blocked but those a fault raises, so signals sent to the process still go to
 * its own threads (a fault in a helper, such as reading a truncated file, is reported as one in
 * the caller would be), and do nothing but the copy: each part ends with a store fence, and the
 * caller waits for the helpers before it returns, so the bytes are all in when the call ends, as
 * with memcpy. If a helper cannot be started, the caller copies its part itself. A process killed
 * mid-copy takes its helpers with it; the block is then what any unfinished copy leaves
 * (handoff.c). */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "shm_internal.h"

enum {
    COPY_MAX_PARTS = 4,
};
#define COPY_LARGE ((size_t)16 << 20)
#define COPY_PART_MIN ((size_t)4 << 20)

typedef struct {
    void *dst;
    const void *src;
    size_t n;
} copy_part_t;

/* Raised by a fault in the thread that makes it: never blocked (a blocked one would kill the
 * process without running its handler: faulthandler's traceback, ASan's report). */
static const int fault_signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS};

/* memcpy with non-temporal stores, 64 bytes a round once dst is 16-aligned, then a fence. */
static void stream_copy(char *dst, const char *src, size_t n) {
#if defined(__SSE2__)
    size_t head = (size_t)(-(uintptr_t)dst & 15);
    if (head > n) head = n;
    memcpy(dst, src, head);
    size_t i = head;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 48));
        _mm_stream_si128((__m128i *)(void *)(dst + i), a);
        _mm_stream_si128((__m128i *)(void *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(void *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(void *)(dst + i + 48), d);
    }
    _mm_sfence(); /* streaming stores are weakly ordered: all in before the part is done */
    memcpy(dst + i, src + i, n - i);
#else
    memcpy(dst, src, n);
#endif
}

static void *copy_part(void *arg) {
    const copy_part_t *p = arg;
    stream_copy(p->dst, p->src, p->n);
    return NULL;
}

int usable_cores(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return 1;
    int n = CPU_COUNT(&set);
    return n < 1 ? 1 : n;
}

void copy_in(void *dst, const void *src, size_t n) {
    if (n < COPY_LARGE) {
        memcpy(dst, src, n);
        return;
    }
    int parts = usable_cores();
    if (parts > COPY_MAX_PARTS) parts = COPY_MAX_PARTS;
    if ((size_t)parts > n / COPY_PART_MIN) parts = (int)(n / COPY_PART_MIN);
    if (parts <= 1) {
        stream_copy(dst, src, n);
        return;
    }
    copy_part_t part[COPY_MAX_PARTS];
    pthread_t tid[COPY_MAX_PARTS];
    int started[COPY_MAX_PARTS] = {0};
    /* part i starts at the first destination cache line from i/parts of the way on: no line is
     * written by two threads (each part is millions of bytes, so none is empty) */
    size_t step = n / (size_t)parts, at = 0;
    for (int i = 0; i < parts; i++) {
        size_t end = n;
        if (i < parts - 1)
            end = (size_t)((((uintptr_t)dst + step * (size_t)(i + 1) + 63) & ~(uintptr_t)63) -
                           (uintptr_t)dst);
        part[i] = (copy_part_t){(char *)dst + at, (const char *)src + at, end - at};
        at = end;
    }
    /* the helpers read part[] on this stack: this thread is not cancelled until they are joined */
    int cancel;
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &cancel);
    sigset_t all, old;
    sigfillset(&all);
    for (size_t i = 0; i < sizeof fault_signals / sizeof *fault_signals; i++)
        sigdelset(&all, fault_signals[i]);
    int masked = pthread_sigmask(SIG_SETMASK, &all, &old) == 0;
    for (int i = 1; i < parts && masked; i++)
        started[i] = pthread_create(&tid[i], NULL, copy_part, &part[i]) == 0;
    if (masked) pthread_sigmask(SIG_SETMASK, &old, NULL);
    copy_part(&part[0]);
    for (int i = 1; i < parts; i++) {
        if (started[i])
            pthread_join(tid[i], NULL);
        else
            copy_part(&part[i]);
    }
    pthread_setcancelstate(cancel, NULL);
}
