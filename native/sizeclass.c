/* sizeclass.c -- the size arithmetic of the heap's bins and of the caches' classes.
 *
 * Bins (freelist.c) hold free blocks by whole size, in the ranges drawn in shm_layout.h. Cache
 * classes (cache.c) are the exact whole sizes a per-process cache keeps. Pure functions. */
#include "shm_internal.h"

/* The bin of a free block of whole size s (s >= SHM_MIN_BLOCK). */
unsigned bin_of_size(uint64_t s) {
    shm_assert(s >= SHM_MIN_BLOCK);
    if (s < 4096) return (unsigned)(63 - __builtin_clzll(s)) - 6;
    if (s < 65536) return 6 + (unsigned)(s >> 12) - 1;
    unsigned fl = (unsigned)(63 - __builtin_clzll(s));
    unsigned sl = (unsigned)(s >> (fl - 3)) & 7;
    unsigned b = 21 + (fl - 16) * 8 + sl;
    return b < SHM_NBINS ? b : SHM_NBINS - 1;
}

/* The smallest whole size bin b holds. */
uint64_t bin_min_size(unsigned b) {
    if (b < 6) return (uint64_t)64 << b;
    if (b < 21) return (uint64_t)(b - 5) * 4096;
    unsigned fl = 16 + (b - 21) / 8, sl = (b - 21) % 8;
    return ((uint64_t)1 << fl) + (uint64_t)sl * ((uint64_t)1 << (fl - 3));
}

/* Size classes by whole block size: multiples of 16 from 64 to 256 (classes 0..12), then eight
 * per doubling up to 64 KiB (classes 13..76): at most 1/8 of a block is rounding. */
unsigned cache_class_of(uint64_t need) {
    shm_assert(need >= SHM_MIN_BLOCK && need <= CACHE_MAX_BLOCK);
    if (need <= 256) return (unsigned)((need - SHM_MIN_BLOCK) >> 4);
    unsigned lg = (unsigned)(63 - __builtin_clzll(need - 1)); /* need in (2^lg, 2^(lg+1)] */
    uint64_t step = (uint64_t)1 << (lg - 3);
    unsigned sub = (unsigned)((need - ((uint64_t)1 << lg) + step - 1) >> (lg - 3));
    return 12 + (lg - 8) * 8 + sub;
}

uint64_t cache_class_size(unsigned k) {
    shm_assert(k < SHM_CACHE_CLASSES);
    if (k <= 12) return SHM_MIN_BLOCK + 16 * (uint64_t)k;
    unsigned lg = 8 + (k - 13) / 8, sub = (k - 13) % 8 + 1;
    return ((uint64_t)1 << lg) + (uint64_t)sub * ((uint64_t)1 << (lg - 3));
}
