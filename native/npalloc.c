/* npalloc.c -- numpy's memory handler over an arena (NEP 49): large arrays made in the arena.
 *
 * Why: a value that must end up in the arena (a Dask task's result) is made by numpy in private
 * memory and then copied in; made in the arena from the start, it needs no copy: the block numpy
 * wrote becomes the object's buffer (shm_np_lend, objects.c's shm_object_lend).
 *
 * A handler is numpy's PyDataMem_Handler {name, version 1, {ctx, malloc, calloc, realloc, free}}
 * in a capsule named "mem_handler" (made by shmalloc/npalloc.py; numpy's headers are not needed
 * here: the two structs below are NEP 49's, stable since numpy 1.22). numpy keeps the capsule of
 * the handler that allocated an array's data in the array, and frees with it, so the capsule, and
 * with it this struct, the handle and the mapping (its context), live until the last such array is
 * gone. Requests of at least `threshold` bytes get a plain block owned by the process's slot;
 * smaller ones, those the arena cannot serve (full, a process limit), and every call in a fork
 * child (the slot is the parent's) go to the fallback handler, numpy's default. free tells the
 * two apart by address: a pointer inside the mapped heap is a block.
 *
 * Lending: shm_np_lend publishes an object around a block numpy still uses, and notes (block,
 * object) in `lent`, this process's table. numpy's free of a lent block drops the object's LENT
 * hold (shm_object_unlend) instead of freeing the block: the object lives on while other holders
 * have it. The table is only a way back from the block to its object: the holds are in the
 * segment, so a process killed with lent arrays alive leaves owners that collection clears.
 *
 * Threads: numpy may call the handler from any thread, with or without the GIL. Nothing here
 * touches Python (the capsule's destructor, which does, is in the cffi module: build_ffi.py,
 * so that the core stays a plain C library). The core's calls are
 * thread-safe (the gate, the locks); `lock` guards the table and is never held across a call into
 * the core; the counters are atomic. A realloc of a block moves it (allocate, copy, free): a lent
 * block's memory is shared and never changes size. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shm_internal.h"

typedef struct np_allocator { /* NEP 49's PyDataMemAllocator */
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} np_allocator_t;

typedef struct np_handler { /* NEP 49's PyDataMem_Handler */
    char name[127];
    uint8_t version;
    np_allocator_t allocator;
} np_handler_t;

#define CAPSULE_NAME "mem_handler"
#define LENT_BUCKETS 256

typedef struct lent {
    struct lent *next;
    uint64_t address; /* the block's */
    uint64_t object, id;
} lent_t;

struct shm_np {
    np_handler_t handler; /* first: the capsule's pointer is this struct's */
    np_allocator_t fallback;
    shm_handle_t *h;
    uint8_t *lo, *hi; /* the heap in this process's mapping */
    uint64_t threshold;
    int32_t slot;
    pid_t pid;
    pthread_mutex_t lock; /* guards lent */
    lent_t *lent[LENT_BUCKETS];
    shm_np_stats_t stats; /* atomic adds */
};

#define COUNT(np, field, n) __atomic_fetch_add(&(np)->stats.field, (n), __ATOMIC_RELAXED)

static int in_heap(const shm_np_t *np, const void *ptr) {
    const uint8_t *p = ptr;
    return p >= np->lo && p < np->hi;
}

static lent_t **bucket(shm_np_t *np, uint64_t address) {
    return &np->lent[(address >> 12) % LENT_BUCKETS];
}

/* Take the table's entry for the block at address off the table: NULL if it is not lent. */
static lent_t *lent_take(shm_np_t *np, uint64_t address) {
    pthread_mutex_lock(&np->lock);
    lent_t **at = bucket(np, address);
    while (*at && (*at)->address != address) at = &(*at)->next;
    lent_t *e = *at;
    if (e) *at = e->next;
    pthread_mutex_unlock(&np->lock);
    return e;
}

/* A block of at least size bytes for numpy, or NULL (the caller falls back). None once the
 * handle's slot is not the handler's any more (this process detached it: it may be another's). */
static void *arena_take(shm_np_t *np, size_t size) {
    if (getpid() != np->pid) return NULL; /* a fork child: the slot is its parent's */
    if (__atomic_load_n(&np->h->slot, __ATOMIC_RELAXED) != np->slot) return NULL;
    int64_t r = shm_alloc(np->h, size ? size : 1, 0, np->slot);
    if (r < 0) {
        COUNT(np, fallbacks, 1);
        return NULL;
    }
    COUNT(np, arena_allocs, 1);
    COUNT(np, arena_blocks, 1);
    return np->h->base + ((uint64_t)r & SHM_ALLOC_ADDRESS_MASK);
}

static void *np_malloc(void *ctx, size_t size) {
    shm_np_t *np = ctx;
    void *p = size >= np->threshold ? arena_take(np, size) : NULL;
    return p ? p : np->fallback.malloc(np->fallback.ctx, size);
}

static void *np_calloc(void *ctx, size_t nelem, size_t elsize) {
    shm_np_t *np = ctx;
    size_t size;
    if (__builtin_mul_overflow(nelem, elsize, &size)) return NULL;
    void *p = size >= np->threshold ? arena_take(np, size) : NULL;
    if (!p) return np->fallback.calloc(np->fallback.ctx, nelem, elsize);
    memset(p, 0, size); /* a block may be reused memory */
    return p;
}

/* Give back a block numpy is done with: drop its LENT hold if it was lent, else free it.
 * Nothing in a fork child: the block is its parent's. */
static void block_give_back(shm_np_t *np, void *ptr) {
    if (getpid() != np->pid) return;
    uint64_t address = (uint64_t)((uint8_t *)ptr - np->h->base);
    lent_t *e = lent_take(np, address);
    int64_t rc;
    if (e) {
        rc = shm_object_unlend(np->h, np->slot, e->object, e->id);
        __atomic_fetch_sub(&np->stats.lent_live, 1, __ATOMIC_RELAXED);
        free(e);
    } else {
        rc = shm_free(np->h, address);
    }
    if (rc < 0) COUNT(np, free_failures, 1);
    __atomic_fetch_sub(&np->stats.arena_blocks, 1, __ATOMIC_RELAXED);
}

static void np_free(void *ctx, void *ptr, size_t size) {
    shm_np_t *np = ctx;
    if (!in_heap(np, ptr)) {
        np->fallback.free(np->fallback.ctx, ptr, size);
        return;
    }
    block_give_back(np, ptr);
}

static void *np_realloc(void *ctx, void *ptr, size_t new_size) {
    shm_np_t *np = ctx;
    if (!in_heap(np, ptr)) return np->fallback.realloc(np->fallback.ctx, ptr, new_size);
    int64_t old = shm_block_size(np->h, (uint64_t)((uint8_t *)ptr - np->h->base), 0);
    if (old < 0) return NULL;
    void *q = new_size >= np->threshold ? arena_take(np, new_size) : NULL;
    if (!q) q = np->fallback.malloc(np->fallback.ctx, new_size ? new_size : 1);
    if (!q) return NULL;
    memcpy(q, ptr, (uint64_t)old < new_size ? (size_t)old : new_size);
    block_give_back(np, ptr);
    return q;
}

shm_np_t *shm_np_new(shm_handle_t *h, int32_t slot, uint64_t threshold, const void *fallback) {
    shm_np_t *np = calloc(1, sizeof *np);
    if (!np) return NULL;
    snprintf(np->handler.name, sizeof np->handler.name, "shmalloc_arena");
    np->handler.version = 1;
    np->handler.allocator = (np_allocator_t){np, np_malloc, np_calloc, np_realloc, np_free};
    np->fallback = ((const np_handler_t *)fallback)->allocator;
    np->h = h;
    np->lo = h->base + h->heap_off;
    np->hi = h->base + h->heap_end;
    np->threshold = threshold ? threshold : 1;
    np->slot = slot;
    np->pid = getpid();
    pthread_mutex_init(&np->lock, NULL);
    return np;
}

void *shm_np_handler(shm_np_t *np) { return &np->handler; }

const char *shm_np_capsule_name(void) { return CAPSULE_NAME; }

void shm_np_free(shm_np_t *np) {
    for (int i = 0; i < LENT_BUCKETS; i++) /* empty: every array of this handler is gone */
        while (np->lent[i]) {
            lent_t *e = np->lent[i];
            np->lent[i] = e->next;
            free(e);
        }
    pthread_mutex_destroy(&np->lock);
    free(np);
}

int64_t shm_np_address(shm_np_t *np, uint64_t data) {
    const void *p = (const void *)(uintptr_t)data;
    if (!in_heap(np, p) || getpid() != np->pid)
        return err_set(SHM_EINVAL, 0, "%#llx is not memory of this process's arena handler",
                       (unsigned long long)data);
    return (int64_t)((const uint8_t *)p - np->h->base);
}

int shm_np_lend(shm_np_t *np, uint64_t data, const void *pickle, uint64_t pickle_len,
                uint64_t nbytes, uint64_t *out) {
    int64_t address = shm_np_address(np, data);
    if (address < 0) return (int)address;
    lent_t *e = malloc(sizeof *e);
    if (!e) return err_set(SHM_ESYS, 0, "no memory for the table of lent blocks");
    int rc = shm_object_lend(np->h, np->slot, pickle, pickle_len, (uint64_t)address, nbytes, out);
    if (rc != SHM_OK) {
        free(e);
        return rc;
    }
    *e = (lent_t){NULL, (uint64_t)address, out[0], out[1]};
    pthread_mutex_lock(&np->lock);
    lent_t **at = bucket(np, (uint64_t)address);
    e->next = *at;
    *at = e;
    pthread_mutex_unlock(&np->lock);
    COUNT(np, lent, 1);
    COUNT(np, lent_live, 1);
    return SHM_OK;
}

void shm_np_stats(shm_np_t *np, shm_np_stats_t *out) {
    uint64_t *dst = (uint64_t *)out, *src = (uint64_t *)&np->stats;
    for (size_t i = 0; i < sizeof *out / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}
