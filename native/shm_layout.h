/* shm_layout.h -- every struct that lives in the shared segment, defined once, and how processes
 * share it.
 *
 * This file is read twice: by the C compiler (through shm_internal.h) and by cffi's cdef parser
 * (through build_ffi.py). It must therefore stay parser-clean: no #include, no #if, no include
 * guards, no _Alignas, no expressions in array sizes. An array size may be a constant's name
 * (uint64_t bins[SHM_NBINS]) when that constant is #defined to an integer literal in this file.
 * Offsets noted as "+0x.." are pinned with _Static_assert in arena.c and by tests/test_layout.py.
 *
 * Glossary
 *   segment   the POSIX shared-memory object; every process maps it at its own address
 *   arena     the header at offset 0 of the segment (shm_arena_t)
 *   heap      [heap_off, heap_off + heap_size): a sequence of blocks that tiles it exactly
 *   block     a shm_block_t header followed by its payload; addresses handed to users are the
 *             payload offsets (block offset + sizeof(shm_block_t))
 *   bin       a doubly linked list of free blocks whose sizes fall in one size range
 *   slot      an entry of the process table; block owners are slot numbers (+1)
 *   cache     a slot's lists of free blocks of exact class sizes, allocated from the heap's view
 *
 * All links inside the segment are byte offsets from the segment base, never pointers: every
 * process maps the segment at its own address.
 *
 * Concurrency
 * -----------
 * Processes share the segment with three kinds of robust process-shared mutex (lock.c, life.c)
 * and a few lock-free protocols. The heap lock guards the heap's structure: the bins, the block
 * headers' sizes and links, the counters, the process table's membership, the references and the
 * names. Each slot lock guards one process's cache lists and the cache-side counters (cache.c). The
 * small-block hot path takes only its own slot lock; the heap lock is taken to refill or trim a
 * cache and for everything else. Each slot's life lock guards nothing: it is held, for as long as
 * the slot's process is attached, by that process's keeper thread (life.c), and it says whether
 * the process runs, in any PID namespace (a pid does not cross namespaces; a robust mutex's
 * owner-died mark does). Who writes what:
 *
 *   field (group)                    written by                        protected by
 *   -------------------------------  --------------------------------  -------------------------
 *   arena scalars (magic .. nbins)   shm_arena_format, once            written before the magic
 *                                                                      (release store); read-only
 *   counters.* (but the two below)   the heap lock's holder            heap lock; relaxed atomic
 *                                                                      stores so that readers need
 *                                                                      no lock; journaled whole
 *   counters.peak                    heap lock's holder, and stats     CAS raise (a_raise_max)
 *                                    readers without the lock
 *   counters.oom_events              a failing shm_alloc, no lock      atomic fetch-add
 *   bitmap, bins, free links         the heap lock's holder            heap lock, journaled
 *   block header: size, prev_size,   the heap lock's holder            heap lock, journaled;
 *     refcount, check, owner and                                       lock-free readers check
 *     the non-transient flags                                          the checksum and retry
 *                                                                      under the lock
 *   block (owner, flags) word's      CACHED: the owner's slot-lock     compare-and-swap from
 *     transient bits CACHED,         holder; REMOTE: any process       (owner, 0): one actor wins
 *     REMOTE, BUSY                   freeing another's block; BUSY:    ([B4], block.c, cache.c)
 *                                    the heap lock's holder
 *   cached/remote block payload      the cache's slot-lock holder;     slot lock; a remote push
 *     link (block_cache_link)        a remote pusher before its CAS    owns the block it claimed
 *   procs[i].state, pid, start_time  the heap lock's holder            heap lock, journaled
 *   procs[i].usage, nblocks,         the heap lock's holder            heap lock, journaled
 *     nallocs, nfrees
 *   procs[i].peak                    heap-lock and slot-lock holders   CAS raise, not journaled
 *   procs[i].limit                   shm_proc_set_limit, any process   atomic store, no lock
 *   procs[i].trim_seq / trim_ack     a collector / the slot's process  atomic add / store
 *   refs[], names[], lease           the heap lock's holder            heap lock, journaled
 *   objects (but bind_seq), object   the heap lock's holder            heap lock, journaled; an
 *     headers, tickets                                                 object frees in
 *                                                                      checkpointed steps (DYING)
 *   objects.bind_seq                 a binder, under the heap lock     atomic add, then futex wake
 *                                                                      after unlocking (wait.c)
 *   caches[i].head, count, usage,    slot i's lock holder; the heap    slot lock i; once slot i
 *     nblocks, nallocs, nfrees,      lock's holder once slot i is      is DEAD (or FREE) the
 *     cached_bytes, cached_blocks    DEAD or being reset               heap lock
 *   caches[i].remote_head            any process (push), slot i's      CAS push, exchange drain
 *                                    lock holder (drain)
 *   caches[i].remote_bytes, _blocks  pushers (add), the drainer or     atomic add, CAS subtract
 *                                    the collector (subtract)          clamped at 0
 *   caches[i].pending                slot i's own process (one thread  taken by a sequentially
 *                                    at a time); the collector once    consistent CAS from 0,
 *                                    slot i is DEAD                    cleared by its taker
 *   ring (head, tail, cells)         any producer / any consumer       lock-free (ring.c)
 *   queue control (head, tail,       put / get / task_done / grow      heap lock, journaled (the
 *     capacity, unfinished), cells                                     queue is an object: queue.c)
 *   queue wait words, sleeper        put/get/task_done (bump, under    atomic add, never
 *     counts                         the lock); sleepers (counts)      journaled (queue.c)
 *   journal                          the heap lock's holder (and the   heap lock: the next taker
 *                                    next taker, rolling it back)      is the holder
 *   heap_lock, slot_locks[]          pthread                           themselves
 *   their holder_ns, holder_slot     the lock's holder, after taking   the lock itself; relaxed
 *                                    it and before letting go          atomics (read by waiters)
 *   life_locks[i]                    slot i's process's keeper (take,  itself; probes run under
 *                                    let go); a heap-lock holder's     the heap lock, so they
 *                                    probe (trylock, and unlock at     never hold it when a
 *                                    once)                             claimer wants it
 *
 * A block's (owner, flags) word leaves the plain "allocated, flags 0" state by exactly one
 * compare-and-swap, so the heap lock's holder never races a cache on a block: it claims a block
 * BUSY (block_claim) before changing its header, and it journals a whole header only when no
 * lock-free actor can move that block (free, claimed BUSY, or CACHED in a list whose slot lock it
 * holds too). The one header it writes while a lock-free actor may CAS the word, the next
 * block's prev_size, is written without touching that word (heap.c, fix_next_prev_size).
 *
 * Lock order: slot locks before the heap lock, never the other way round. When more than one slot
 * lock is held (only shm_check, which takes all of them) they are taken in slot order. A slot lock
 * may be tried without waiting (help_drain) while no lock is held.
 *
 * Threads of one process share its handle (process-local, shm_internal.h), its slot, its slot
 * lock and its cache; the locks above serialise them as they serialise processes. What is only
 * theirs: the handle's gate (arena.c): every public call enters it and leaves it, and close waits
 * until no other thread is inside before Python detaches and unmaps; a call that comes later is
 * refused (SHM_ECLOSED), and the handle's memory is freed only with Python's last reference. A fork
 * child keeps none of its parent's threads: its handles forget the parent's slot and count no
 * thread inside. The slot claim (process.c) is idempotent for one (pid, start time), so Python
 * needs no lock around it (a lock a fork child or a signal handler could wait on forever). The
 * slot's pending word is taken by one thread at a time (cache.c, remote_free).
 *
 * Death. A process may be killed (SIGKILL) at any instruction; the robust mutex hands the next
 * taker EOWNERDEAD. What each death leaves behind, and who repairs it:
 *   - heap lock holder: the counted records of the undo journal describe every byte the current
 *     step changed; the next heap_lock() rolls them back, newest first (journal.c). A block it
 *     claimed keeps BUSY; the next holder that claims it takes it over (block_claim), a lock-free
 *     actor leaves it alone (its CAS expects flags 0). Collection steps and cache trims
 *     checkpoint the journal, so the steps done before the death stay done.
 *   - slot lock holder: no journal; the lists and the cache-side counters of that slot may be in
 *     any state. The next slot_lock() taker gets SHM_LOCK_RECOVERED and cache_repair() (under the
 *     heap lock, which rolls back first) gives every CACHED block of the slot back to the heap and
 *     recomputes the counters from the heap, which is the truth.
 *   - a remote pusher between its claim (REMOTE) and its push: its `pending` word names the block;
 *     before a collection, cache_finish_pushes() completes the push for DEAD slots, unless the
 *     block is on the list already. The collector never frees a REMOTE block that a live process
 *     names in its pending word. The word is one per process: a second thread of that process
 *     that frees another's block while the first pushes does not overwrite it (it would hide the
 *     first one's block from the collector): it finds the word taken and takes the heap path.
 *   - a ring producer between its claim and its publish: the cell looks unpublished; consumers
 *     retire it once producers are half a ring ahead (ring.c).
 *   - a process killed while freeing an object: the object is DYING, its freed buffers' entries
 *     zeroed; collection finishes it (objects.c). One killed between publishing and binding
 *     leaves an object that only its bit held: collection frees it. A binder killed between its
 *     bump of bind_seq and its wake: waiters find the name at their next look (objects.py caps
 *     each sleep), see wait.c.
 *   - a process inside one of handoff.c's combined calls: what the steps it combines leave (its
 *     blocks are plain blocks of its slot until the publish; see the other items here).
 *   - a process whose numpy arrays live in the arena (npalloc.c): they are plain blocks of its
 *     slot (collection frees them) or buffers of LENT objects it owns (collection clears the
 *     owner, and frees the object if nothing else holds it). Which block is lent to which object
 *     is also kept in the process (a table in its handler), never needed after its death.
 *   - a queue's producer or consumer (queue.c draws the cell's two states): put and get are
 *     one journaled step each, rolled back if the process dies inside; before put's step the
 *     item is an unpublished object of the dying slot (collection frees it), after get's step
 *     it is held by the dying slot (collection drops it: delivered once, to the dead). A queue
 *     freed half way is DYING and collection finishes dropping its items.
 *   - any process, always: its keeper dies with it, and the kernel marks every life lock it held
 *     owner-died, in whatever PID namespace it ran (also on exec). Its slot stays LIVE until a
 *     collector reads that (tracking.py) and marks it DEAD (shm_proc_mark_dead, which probes the
 *     life lock under the heap lock, makes it consistent and unlocks it, and refuses a slot whose
 *     life lock is held: that process runs); collection (gc.c) then frees its blocks (cached,
 *     remotely freed and allocated ones that nobody references), drops its references and returns
 *     the slot to FREE. Only a LIVE slot whose life lock nobody holds (its process closed its
 *     last handle on the segment while owning blocks, or the slot accounts for another pid, or
 *     the keeper could not start) is judged by pid and start time from /proc, which cannot see a
 *     process of another PID namespace: such a process is reclaimed once it detached that way.
 *   - a process that dies between its keeper's take and the slot becoming LIVE: the journal
 *     rolls the slot back to FREE; the next claimer's keeper finds the life lock owner-died and
 *     makes it consistent.
 *   - a damaged lock that names a holder which does not exist (no owner-died mark): a waiter
 *     reports SHM_ECORRUPT after two one-second looks (lock.c) when the holder's stamps say it
 *     ran in this PID namespace and kill(tid, 0) finds no such thread, or say it ran in another
 *     and its slot's life lock says that process has ended; a holder of another namespace
 *     without a slot is waited for (nothing here can tell it is gone).
 *
 * Truncation. A process of the same user can ftruncate the segment under every mapping; the
 * pages past the new end are gone, and any access to one raises SIGBUS in the process that makes
 * it (reader or creator alike). That is outside the threat model (same-user processes are trusted
 * not to do it) and cannot be prevented cheaply. What is survived: shm_segment_check (check.c,
 * one fstat, no access) reports SHM_ECORRUPT naming the truncation; shm_check runs it before its
 * walk, shm_handle_open compares the header's capacity with the segment's size, and the
 * coordinator runs it before each tick. An access that races the truncation is not caught.
 *
 * Files. The C files call each other in layers, without cycles (nm over the objects shows it):
 *   npalloc.c              numpy's memory handler over an arena (NEP 49): blocks for large
 *                          arrays, lent to objects without a copy; above alloc.c and objects.c
 *   handoff.c              the combined calls of a hand-off (put, Queue.put, Queue.get in one
 *                          call each): sequences of objects.c's and queue.c's steps, no state
 *   queue.c                queues of objects, on top of objects.c; the one cycle among the
 *                          files: objects.c's obj_free calls queue_release_items (a hook) to
 *                          drop a freed queue's items, which settles each through objects.c
 *   gc.c, objects.c        collection and detach; objects (with shm_name_unbind: a name is one
 *                          of an object's holds)
 *   alloc.c                the user's calls on blocks
 *   own.c, names.c, cache.c, lease.c, arena.c   ownership, names, per-process caches, lease,
 *                          format/attach/stats/check
 *   process.c              the process table
 *   life.c                 the life locks and this process's keeper thread
 *   heap.c, check.c        carve and release blocks under a lock its callers hold; the full walk
 *   lock.c                 the locks (at SHMALLOC_DEBUG >= 3 heap_unlock runs check.c's walk)
 *   freelist.c, block.c, sizeclass.c, journal.c, fault.c, ring.c, wait.c, error.c   the leaves
 */

/* Bin layout (by whole block size s, header included; s is a multiple of 16 and >= 64):
 *   small   bins  0..5   powers of two:   [64,128) [128,256) ... [2048,4096)
 *   medium  bins  6..20  4 KiB steps:     [4K,8K) [8K,12K) ... [60K,64K)
 *   large   bins 21..212 two-level (TLSF): first level log2(s) in 16..39, second level 8 linear
 *                                        subdivisions of each power of two
 * The bitmap has one bit per bin, set exactly when the bin is non-empty ([F3] in check.c). */
#define SHM_MAGIC 0x434f4c4c414d4853
#define SHM_LAYOUT_VERSION 9
#define SHM_ALIGN 16
#define SHM_MIN_BLOCK 64
#define SHM_NBINS 213
#define SHM_BITMAP_WORDS 4
#define SHM_MAX_PROCS 128
#define SHM_PAGE 4096
#define SHM_MAX_REFS 4096
#define SHM_MAX_NAMES 1024
#define SHM_NAME_LEN 56
#define SHM_RING_SLOTS 4096
#define SHM_JOURNAL_BYTES 65536
#define SHM_JOURNAL_MAX_RECORDS 4096
#define SHM_MAX_NAMES_PER_BLOCK 16
#define SHM_CACHE_CLASSES 77
#define SHM_CACHE_LISTS 80 /* room for SHM_CACHE_CLASSES lists; keeps shm_cache_t 17 lines long */
#define SHM_EVENT_FIELDS 5
#define SHM_MUTEX_BYTES 64         /* room for a pthread_mutex_t (40 bytes on glibc x86-64) */
#define SHM_HOLDER_WORDS 2         /* SHM_MAX_PROCS bits: one per slot that holds an object */
#define SHM_OBJECT_MAX_BUFFERS 256 /* out-of-band buffers of one object (more go in-band) */

/* Block header: 32 bytes in front of every payload.
 * Written by the heap lock's holder, except the transient bits of the (owner, flags) word (see
 * Concurrency above). Read without the lock by shm_block_size() and the cache paths: a header torn
 * by the holder's writes fails its checksum, and the reader asks again under the lock.
 * Invariants checked by check.c:
 *   [B1] check == block_checksum(offset, header)          (smashed headers are detected); the
 *        checksum leaves out the transient flag bits, which change by compare-and-swap without
 *        any lock (cache.c)
 *   [B2] size % 16 == 0, size >= SHM_MIN_BLOCK, offset + size <= heap end
 *   [B3] prev_size == size of the physically previous block (0 for the first block)
 *   [B4] a free block has owner == 0 and no flag but FREE (its refcount word is its tombstone:
 *        who freed it, and how; block.c); a CACHED or REMOTE block has an owner, refcount == 0
 *        and no other flag
 *   [B5] no two physically adjacent blocks are both free (coalescing is eager)
 *   [B6] an allocated block's owner is 0 (persistent) or a slot that is not FREE */
typedef struct shm_block {
    uint64_t size;      /* +0x00 whole block in bytes, header included */
    uint64_t prev_size; /* +0x08 whole size of the physically previous block; 0 for the first */
    uint32_t owner;     /* +0x10 owning slot + 1; 0 = no owner (free or persistent) */
    uint32_t flags;     /* +0x14 SHM_BF_* */
    union {
        uint32_t refcount; /* +0x18 references held by live processes (retain/release) */
        uint32_t tomb;     /* +0x18 of a free or wiped header: who freed it (SHM_TOMB) */
    };
    uint32_t check; /* +0x1c checksum over the fields above, the block's offset and the salt */
} shm_block_t;

/* A free block's payload starts with its bin links.
 *   [F1] next/prev are 0 or offsets of free blocks in the same bin; next->prev == this
 *   [F2] every free block is on exactly one list, the bin of its size */
typedef struct shm_free_links {
    uint64_t next; /* +0x00 */
    uint64_t prev; /* +0x08 */
} shm_free_links_t;

/* Block flags */
#define SHM_BF_FREE 1
#define SHM_BF_SEALED 2
#define SHM_BF_PERSIST 4
#define SHM_BF_NAMED 8
/* Transient bits: set and cleared by compare-and-swap on the 64-bit word (owner, flags), outside
 * the checksum. Exactly one actor can move a block out of the plain "allocated, flags 0" state:
 *   CACHED  the block sits in its owner's per-process cache (cache.c); free from the user's view
 *   REMOTE  another process freed it; it is on (or being pushed to) its owner's remote list
 *   BUSY    the heap lock's holder is changing the header (adopt, retain, free, ...) */
#define SHM_BF_CACHED 16
#define SHM_BF_REMOTE 32
#define SHM_BF_BUSY 64
#define SHM_BF_TRANSIENT 112
/* Objects (objects.c): an object's header block carries OBJECT, each of its buffer blocks and each
 * transit ticket OBJPART. Both are persistent (owner 0) and freed by objects.c alone: deallocate
 * and adopt refuse them. */
#define SHM_BF_OBJECT 128
#define SHM_BF_OBJPART 256

/* Process table slot, one cache line pair per attached process.
 * state/pid/start_time and the counters change under the heap lock, as relaxed atomics so that
 * readers (stats, the coordinator) need no lock; peak, limit and the trim pair do not need the
 * heap lock (see Concurrency above).
 *   [P1] state in {FREE, LIVE, DEAD}; a FREE slot has usage == 0 and nblocks == 0
 *   [P2] sum over slots of usage == arena.used - persistent bytes, likewise nblocks
 *   [P3] peak >= usage */
typedef struct shm_proc {
    uint32_t state;      /* +0x00 SHM_PROC_* */
    uint32_t pid;        /* +0x04 */
    uint64_t start_time; /* +0x08 starttime of /proc/<pid>/stat, clock ticks since boot */
    uint64_t usage;      /* +0x10 usable bytes of the blocks it owns */
    uint64_t peak;       /* +0x18 high-water mark of usage */
    uint64_t limit;      /* +0x20 0 = unlimited */
    uint64_t nblocks;    /* +0x28 blocks it owns */
    uint64_t nallocs;    /* +0x30 allocations made on its account, ever */
    uint64_t nfrees;     /* +0x38 blocks of its account freed, ever */
    uint64_t trim_seq;   /* +0x40 bumped by a collector asking this process to trim */
    uint64_t trim_ack;   /* +0x48 the trim_seq this process last answered */
    uint64_t reserved[6];
} shm_proc_t;

#define SHM_PROC_FREE 0
#define SHM_PROC_LIVE 1
#define SHM_PROC_DEAD 2

/* A process's cache of free small and medium blocks (cache.c), one per slot, and its counters.
 * The lists and the counters below `pending` are written by the holder of the slot's own lock
 * (slot_locks[slot]), or under the heap lock once the slot is DEAD; remote_head by any process
 * with compare-and-swap; pending by one thread at a time of the slot's process (taken from 0 by
 * compare-and-swap; cleared by a collector once the slot is DEAD). See Concurrency above. A
 * process's true usage is procs[].usage + usage here (a two's complement sum: the cache side may
 * count down what the heap side counted up), likewise nblocks, nallocs, nfrees.
 *   [K1] each list holds count[c] blocks of exactly cache_class_size(c) bytes, owned by the slot,
 *        flags CACHED; cached_bytes, cached_blocks are their usable bytes and number
 *   [K2] procs[].usage + usage + cached_bytes == usable bytes of the blocks the slot owns */
typedef struct shm_cache {
    uint64_t remote_head;   /* +0x00 first REMOTE block (header offset); links in payloads */
    uint64_t remote_bytes;  /* +0x08 usable bytes pushed and not yet drained (atomic add/sub) */
    uint64_t remote_blocks; /* +0x10 their number: freed from the user's view, still in usage */
    uint64_t pad0[5];
    uint64_t pending;       /* +0x40 block this process is pushing onto another's remote list */
    uint64_t usage;         /* +0x48 cache-side change to the owner's usage */
    uint64_t nblocks;       /* +0x50 */
    uint64_t nallocs;       /* +0x58 allocations served from the cache, ever */
    uint64_t nfrees;        /* +0x60 frees into the cache (own and drained remote), ever */
    uint64_t cached_bytes;  /* +0x68 usable bytes of the cached blocks */
    uint64_t cached_blocks; /* +0x70 */
    uint64_t pad1;
    uint64_t head[SHM_CACHE_LISTS];  /* +0x80 per size class: first cached block, 0 = empty */
    uint32_t count[SHM_CACHE_LISTS]; /* +0x300 */
} shm_cache_t;

/* A reference held on a block by a process (retain/release). Under the heap lock.
 *   [R1] holder == 0 (empty entry) or holder - 1 is a slot that is not FREE, and count > 0
 *   [R2] for every allocated block, refcount == sum of count over the entries naming it */
typedef struct shm_ref {
    uint64_t block;  /* +0x00 the block's offset (header, not address) */
    uint32_t holder; /* +0x08 holding slot + 1; 0 = empty entry */
    uint32_t count;  /* +0x0c */
} shm_ref_t;

/* A named block (bind/lookup/unbind). Under the heap lock; a bound block is persistent.
 *   [N1] address == 0 (empty) or the address of an allocated block with SHM_BF_PERSIST
 *   [N2] name is NUL-terminated within SHM_NAME_LEN bytes and unique among entries */
typedef struct shm_name {
    uint64_t address;        /* +0x00 */
    char name[SHM_NAME_LEN]; /* +0x08 UTF-8, NUL-terminated */
} shm_name_t;

/* Objects (objects.c): a Python object stored in the arena (pickle protocol 5). Its header block
 * (flag OBJECT) holds this struct, then `nbuffers` shm_objbuf_t, then the pickle stream; each
 * out-of-band buffer has a block of its own (flag OBJPART, sealed unless made by empty()).
 * Written under the heap lock; immutable once published (magic set) but for holders, holds and
 * flags. The lifetime rule, checked by every call that may end it (release, drop, unbind, delete,
 * the collection of a dead slot, ticket expiry):
 *   an object is freed, header and buffers at once, when holders == 0 && holds == 0 && owner == 0
 *   && its header block is not NAMED.
 * Invariants:
 *   [O1] magic in {SHM_OBJECT_MAGIC, SHM_OBJECT_DYING}; the header block is persistent, OBJECT
 *   [O2] bit s of holders is set exactly when slot s holds a process reference; held[s] of
 *        shm_objects_t counts the objects with bit s set plus those whose owner is s + 1 (an
 *        owner, shmalloc.arrays' producer, holds until it ends or anyone deletes the object; a
 *        LENT object's owner is the process whose numpy array uses its buffer, and holds until
 *        that array frees it or the process ends, deleted or not): LENT implies owner != 0
 *   [O3] holds == the transit tickets naming the object + the queue cells naming it + anonymous
 *        holds (hold(): shmalloc.arrays), so holds >= tickets + cells; a deleted object has
 *        holds == 0 and no ticket names it
 *   [O4] every buffer entry with address != 0 is a live OBJPART block of at least nbytes bytes
 *        (all of them unless DYING); nbytes == pickle_len + the entries' nbytes; every OBJPART
 *        block of the heap is one object's buffer or one ticket, exactly once
 *   [O1]..[O4] also: live and dying count the objects of each magic; next_id >= every id
 * A DYING object is being freed: entries already freed have address 0; collection finishes it. */
typedef struct shm_object {
    uint64_t magic; /* +0x00 SHM_OBJECT_MAGIC, or SHM_OBJECT_DYING */
    uint64_t id;    /* +0x08 unique in the arena: a reference is (address, id) */
    uint64_t holders[SHM_HOLDER_WORDS]; /* +0x10 one bit per slot holding a process reference */
    uint32_t holds;                     /* +0x20 anonymous holds: queue slots, tickets, handles */
    uint32_t nbuffers;                  /* +0x24 entries of the buffer table that follows */
    uint32_t flags;                     /* +0x28 SHM_OBJ_* */
    uint32_t owner;                     /* +0x2c slot + 1 holding it while alive; 0: none */
    uint64_t pickle_len;                /* +0x30 bytes of the pickle stream after the table */
    uint64_t nbytes;                    /* +0x38 pickle_len + the buffers' bytes */
} shm_object_t;

#define SHM_OBJECT_MAGIC 0x544345424f4d4853 /* "SHMOBJECT" less the last letter */
#define SHM_OBJECT_DYING 0x474e495944424f53
#define SHM_OBJ_DELETED 1  /* delete() was called: no new references, get() finds nothing */
#define SHM_OBJ_WRITABLE 2 /* made by empty(): its buffer is not sealed */
#define SHM_OBJ_LENT 8     /* its buffer is a numpy array's memory (npalloc.c); owner: lender */

/* One out-of-band buffer of an object: its block's address and the bytes it uses. */
typedef struct shm_objbuf {
    uint64_t address; /* +0x00 payload address of an OBJPART block; 0 once freed (DYING) */
    uint64_t nbytes;  /* +0x08 */
} shm_objbuf_t;

/* A pickled reference in transit (objects.c): a block of its own (flag OBJPART), on the arena's
 * doubly linked list of tickets, holding one of its object's `holds` until a process unpickles
 * the reference (claim) or the deadline passes (collection, the coordinator's tick).
 *   [T1] magic == SHM_TICKET_MAGIC; next/prev link payload addresses of tickets, 0 ends;
 *        `tickets` counts them; each names a live object that is not deleted */
typedef struct shm_ticket {
    uint64_t magic;       /* +0x00 SHM_TICKET_MAGIC */
    uint64_t id;          /* +0x08 unique: a pickled reference names (address, id) */
    uint64_t object;      /* +0x10 the object's header address */
    uint64_t object_id;   /* +0x18 */
    uint64_t deadline_ns; /* +0x20 CLOCK_MONOTONIC */
    uint64_t next;        /* +0x28 */
    uint64_t prev;        /* +0x30 */
    uint64_t pad;         /* +0x38 */
} shm_ticket_t;

#define SHM_TICKET_MAGIC 0x54454b434954534f

/* A queue (queue.c; the essay there draws its state machine): an object (flag SHM_OBJ_QUEUE)
 * whose pickle stream is this control struct and whose one buffer is the ring, an array of
 * `capacity` shm_qcell_t. Processes hold the queue like any object (holder bits, tickets when a
 * Queue is pickled); each item in the ring holds one anonymous hold on its object. Everything
 * but the four wait words and the three sleeper counts changes under the heap lock, journaled;
 * the wait words are bumped under it by atomic add (never journaled: a rollback leaves a bump,
 * which is only a spurious wake-up), the sleeper counts by any process without it.
 *   [Q1] magic == SHM_QUEUE_MAGIC; tail <= head; head - tail <= capacity; capacity == ring's
 *        nbytes / sizeof(shm_qcell_t) (head - tail and capacity may pass maxsize: a forced put,
 *        asyncio's cancelled get giving its item back, is never refused)
 *   [Q2] the cells of positions [tail, head) (index pos % capacity) hold items, the others 0; an
 *        item is an object address (16-aligned, in the heap) and an id <= next_id, never a queue;
 *        it may name an object deleted since (delete() drops the holds: get() skips it)
 *   [Q3] joinable in {0, 1}; unfinished <= head for a joinable queue (task_done() may run ahead
 *        of get(), as multiprocessing's allows), 0 for any other
 *   [Q4] no object is in two cells as a value (SHM_QPUT_VALUE only puts back what a get took):
 *        a value is delivered once; a reference (SHM_QCELL_REF) may be put any number of times
 * check.c walks every queue and matches its cells, with the tickets, against the items' holds. */
typedef struct shm_queue {
    uint64_t magic;      /* +0x00 SHM_QUEUE_MAGIC */
    uint64_t maxsize;    /* +0x08 most items waiting; 0 = no bound but the arena's memory */
    uint64_t capacity;   /* +0x10 cells in the ring; grows by doubling (queue_grow) */
    uint64_t head;       /* +0x18 items ever put: the next put fills cell head % capacity */
    uint64_t tail;       /* +0x20 items ever taken: the next get empties cell tail % capacity */
    uint64_t unfinished; /* +0x28 joinable: items put and not yet task_done() */
    uint32_t joinable;   /* +0x30 1 for a JoinableQueue */
    uint32_t pad0;       /* +0x34 */
    uint64_t pad1[1];    /* +0x38 */
    uint32_t not_empty;  /* +0x40 wait word: bumped by every put */
    uint32_t not_full;   /* +0x44 wait word: bumped by every get */
    uint32_t all_done;   /* +0x48 wait word: bumped when unfinished drops to 0 */
    uint32_t getters;    /* +0x4c processes asleep on not_empty (atomic; wake only if > 0) */
    uint32_t putters;    /* +0x50 asleep on not_full */
    uint32_t joiners;    /* +0x54 asleep on all_done */
    uint64_t pad2[5];    /* +0x58 */
} shm_queue_t;

/* One cell of a queue's ring: the item's object, 0 when the cell is empty. */
typedef struct shm_qcell {
    uint64_t object; /* +0x00 header address of the item's object | SHM_QCELL_REF; 0 = empty */
    uint64_t id;     /* +0x08 the object's id */
} shm_qcell_t;

#define SHM_QUEUE_MAGIC 0x4555455551484d53
#define SHM_QCELL_REF 1 /* the item is the reference itself: get() hands out an ObjectRef */
#define SHM_OBJ_QUEUE 4 /* shm_object_t.flags: the object is a queue (shm_queue_t) */

/* The arena's objects section (objects.c, wait.c). Under the heap lock, journaled, but for the
 * wait word bind_seq, which changes by atomic add (wait.c's protocol): every bind bumps it under
 * the heap lock, after the bind, and wakes its sleepers after unlocking; get(name) reads it with
 * its lookup (under the lock) and sleeps on it until it changes. */
typedef struct shm_objects {
    uint32_t bind_seq;            /* +0x00 futex word */
    uint32_t pad0;                /* +0x04 */
    uint64_t next_id;             /* +0x08 last object or ticket id handed out */
    uint64_t transit_timeout_ns;  /* +0x10 how long a pickled reference holds its object */
    uint64_t live;                /* +0x18 objects published and not freed */
    uint64_t tickets;             /* +0x20 tickets on the list */
    uint64_t ticket_head;         /* +0x28 first ticket (payload address), 0 = none */
    uint64_t dying;               /* +0x30 objects whose freeing a dead process left half done */
    uint64_t reserved[9];         /* +0x38 room for the queue */
    uint32_t held[SHM_MAX_PROCS]; /* +0x80 objects whose holders bit for slot i is set [O2] */
} shm_objects_t;

/* One event in the ring: kind and the meaning of the fields are shmalloc/events.py's table. */
typedef struct shm_event {
    uint64_t seq;                 /* +0x00 ring sequence: publish/consume protocol, see ring.c */
    uint32_t kind;                /* +0x08 */
    uint32_t pid;                 /* +0x0c */
    uint64_t time_ns;             /* +0x10 CLOCK_REALTIME */
    uint64_t f[SHM_EVENT_FIELDS]; /* +0x18 */
} shm_event_t;

/* Bounded lock-free multi-producer ring of events (ring.c), drained by the coordinator.
 * A producer that finds the ring full counts the event in `dropped` and goes on. */
typedef struct shm_ring {
    uint64_t head; /* +0x00 next sequence to claim (producers, CAS) */
    uint64_t pad0[7];
    uint64_t tail; /* +0x40 next sequence to consume (consumers, CAS) */
    uint64_t pad1[7];
    uint64_t dropped; /* +0x80 events lost to a full ring */
    uint64_t pad2[7];
    shm_event_t slots[SHM_RING_SLOTS]; /* +0xc0 */
} shm_ring_t;

/* The undo journal (journal.c explains the protocol). Written only by the heap lock's holder.
 *   [J1] count == 0 whenever the heap lock is free
 *   [J2] the first `count` records of log are well formed and lie in the segment */
typedef struct shm_journal {
    uint64_t count;     /* +0x00 records that describe writes which may have happened */
    uint64_t used;      /* +0x08 bytes of log in use */
    uint64_t rollbacks; /* +0x10 operations undone after their process died */
    uint64_t overflows; /* +0x18 records that did not fit (should stay 0) */
    uint64_t pad[4];
    /* records: offset (8), len (8), the old bytes (len of them, padded to 8) */
    uint8_t log[SHM_JOURNAL_BYTES]; /* +0x40 */
} shm_journal_t;

/* Arena-wide counters, written with relaxed atomics under the heap lock (peak and oom_events
 * also without it, see Concurrency above) and read without it.
 *   [C1] used == sum of (size - header) over allocated blocks
 *   [C2] free_bytes == sum of size over free blocks; used + overhead + free_bytes == heap_size
 *        where overhead == allocated_blocks * sizeof(shm_block_t)
 *   [C3] allocated_blocks, free_blocks == counts from the heap walk */
typedef struct shm_counters {
    uint64_t used;             /* +0x00 */
    uint64_t peak;             /* +0x08 */
    uint64_t free_bytes;       /* +0x10 */
    uint64_t allocated_blocks; /* +0x18 */
    uint64_t free_blocks;      /* +0x20 */
    uint64_t allocations;      /* +0x28 ever */
    uint64_t deallocations;    /* +0x30 ever */
    uint64_t frees_since_gc;   /* +0x38 */
    uint64_t reserved_top;     /* +0x40 offset below which tmpfs pages are reserved (fallocate) */
    uint64_t lock_recoveries;  /* +0x48 times a dead holder's lock was recovered */
    uint64_t oom_events;       /* +0x50 */
    uint64_t gc_runs;          /* +0x58 */
    uint64_t pressure_level;   /* +0x60 SHM_PRESSURE_* the arena was last seen at */
    uint64_t cache_limit;      /* +0x68 most usable bytes one process may keep cached */
    uint64_t gc_cache_base;    /* +0x70 sum of caches' nfrees at the last collection */
    uint64_t pad[9];
} shm_counters_t;

#define SHM_PRESSURE_LOW 0
#define SHM_PRESSURE_MEDIUM 1
#define SHM_PRESSURE_HIGH 2
#define SHM_PRESSURE_CRITICAL 3

/* The coordinator's lease (lease.c): the process that holds the coordinator role, 0 for none. */
typedef struct shm_lease {
    uint64_t pid;        /* +0x00 */
    uint64_t start_time; /* +0x08 its start time, clock ticks since boot */
} shm_lease_t;

/* Storage for a process-shared robust pthread mutex (lock.c casts it; 40 bytes on glibc), and who
 * holds it in terms that mean something in every PID namespace: the futex word inside the mutex
 * names the holder's thread id as the holder's namespace numbers it. The holder writes the two
 * stamps right after taking the lock and clears them before letting go (relaxed atomics); a waiter
 * reads them only to tell a live holder from a ghost (lock.c, lock_wait). Life locks (life.c) are
 * never stamped. */
typedef struct shm_lock {
    uint8_t mutex[SHM_MUTEX_BYTES]; /* +0x00 pthread_mutex_t, process-shared and robust */
    uint64_t
        holder_ns; /* +0x40 inode of the holder's PID namespace (/proc/self/ns/pid), 0 unknown */
    uint32_t holder_slot; /* +0x48 the holder's process slot + 1, 0 when it has none */
    uint32_t pad0;
    uint64_t pad[6]; /* keeps the next field on its own cache line */
} shm_lock_t;

/* Arena header: offset 0 of the segment, written once by create, but for the tables after
 * `nbins`, whose writers and locks the Concurrency section above lists.
 * Invariants checked by check.c:
 *   [A1] magic == SHM_MAGIC, version == SHM_LAYOUT_VERSION, header_size == sizeof(shm_arena_t)
 *   [A2] heap_off % SHM_PAGE == 0, heap_off + heap_size == capacity, heap_size % 16 == 0
 *   [A3] reserved_top <= capacity */
typedef struct shm_arena {
    uint64_t magic;          /* +0x00 */
    uint32_t version;        /* +0x08 bump SHM_LAYOUT_VERSION on any change to this file */
    uint32_t header_size;    /* +0x0c sizeof(shm_arena_t) */
    uint64_t capacity;       /* +0x10 the segment's size */
    uint64_t heap_off;       /* +0x18 */
    uint64_t heap_size;      /* +0x20 */
    uint64_t salt;           /* +0x28 random per arena, mixed into block checksums */
    uint64_t created_ns;     /* +0x30 CLOCK_REALTIME at create */
    uint32_t max_procs;      /* +0x38 SHM_MAX_PROCS */
    uint32_t nbins;          /* +0x3c SHM_NBINS */
    shm_counters_t counters; /* +0x40 */
    shm_lock_t heap_lock;    /* +0x100 guards the heap, the bins and the slots */
    uint64_t bitmap[SHM_BITMAP_WORDS]; /* +0x180 one bit per non-empty bin */
    uint64_t bins[SHM_NBINS];          /* +0x1a0 head offset of each bin's list, 0 = empty */
    shm_lease_t lease;                 /* +0x848 the coordinator's lease */
    uint64_t pad_bins[5];
    shm_proc_t procs[SHM_MAX_PROCS];      /* +0x880 the process table */
    shm_ref_t refs[SHM_MAX_REFS];         /* +0x4880 references held by live processes */
    shm_name_t names[SHM_MAX_NAMES];      /* +0x14880 the named-block directory */
    shm_cache_t caches[SHM_MAX_PROCS];    /* +0x24880 per-process caches, indexed like procs */
    shm_ring_t ring;                      /* +0x46880 the event ring */
    shm_lock_t slot_locks[SHM_MAX_PROCS]; /* +0x86940 slot_locks[i] guards caches[i] */
    shm_journal_t journal;                /* +0x8a940 the undo journal */
    shm_lock_t life_locks[SHM_MAX_PROCS]; /* +0x9a980 held by slot i's process while it lives */
    shm_objects_t objects;                /* +0x9e980 objects, tickets, wait words */
} shm_arena_t;
