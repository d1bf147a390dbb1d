/* shm_api.h -- what Python may call. Parser-clean for cffi (see shm_layout.h).
 *
 * Conventions: functions return an int status (SHM_OK or a negative SHM_E*). The hot paths
 * (shm_alloc, shm_free, shm_block_size) return an int64 that is the result when >= 0 and a
 * status when < 0, so that one call answers without an out-parameter. After any failure the
 * calling thread's shm_last_error() says what was asked, what was found and where.
 *
 * Addresses are payload offsets from the segment base. A handle is process-local: it holds this
 * process's mapping address and descriptor, never anything another process needs. */

#define SHM_OK 0
#define SHM_ENOMEM -1     /* the arena has no free block large enough */
#define SHM_ENOSPC -2     /* the backing tmpfs could not supply pages (fallocate) */
#define SHM_EADDR -3      /* not the address of a live block of this arena */
#define SHM_ECORRUPT -4   /* a structure in the segment fails its invariants */
#define SHM_EALIGN -5     /* alignment not a power of two up to SHM_PAGE */
#define SHM_EPROTECT -6   /* write to a sealed block */
#define SHM_ELIMIT -7     /* the owner's process limit would be exceeded */
#define SHM_EINVAL -8     /* an argument value is out of range */
#define SHM_EPROCS -9     /* the process table is full */
#define SHM_ESYS -10      /* a system call failed; sys_errno says why */
#define SHM_ELAYOUT -11   /* the segment is not an arena of this layout version */
#define SHM_EEXIST -12    /* the name is already bound */
#define SHM_ENOENT -13    /* no such name, or no such reference */
#define SHM_EFULL -14     /* a fixed table in the segment (names, references, ring) is full */
#define SHM_EBUSY -15     /* a lock another thread or process holds (a trylock gave up) */
#define SHM_ENOTARENA -16 /* the segment exists but is not a shmalloc arena */
#define SHM_ECLOSED -17   /* the handle is closed (or closing) in this process */
#define SHM_ETIMEDOUT -18 /* a wait ended at its timeout */
#define SHM_EINTR -19     /* a wait was interrupted by a signal: run the handlers, wait again */

/* Bit set in shm_alloc's result when this allocation moved the arena into a higher pressure
 * level (once per crossing, arena-wide); the address is the result with the bit cleared. */
#define SHM_ALLOC_PRESSURE_FLAG 4611686018427387904
/* Bit set in shm_alloc's result when a collector asked the allocating process to trim. */
#define SHM_ALLOC_TRIM_FLAG 2305843009213693952
/* (1 << 61) - 1: the address bits of a non-negative shm_alloc result (the flags lie above). */
#define SHM_ALLOC_ADDRESS_MASK 2305843009213693951

/* What shm_segment_probe found at the head of a segment. */
#define SHM_SEG_ARENA 0         /* an arena of this layout version */
#define SHM_SEG_FORMATTING 1    /* all-zero magic: a creator is still formatting it, or empty */
#define SHM_SEG_OTHER_VERSION 2 /* our magic, another layout version */
#define SHM_SEG_FOREIGN 3       /* anything else, including a head too short to tell */

typedef struct shm_handle shm_handle_t;

typedef struct shm_error_info {
    int status;
    int sys_errno;
    uint64_t offset;    /* the address or segment offset concerned */
    uint64_t requested; /* OOM / limit: bytes asked for */
    uint64_t available; /* OOM: free bytes in the arena */
    uint64_t used;      /* OOM: arena used bytes; limit: the process's usage */
    uint64_t total;     /* OOM: heap bytes */
    uint64_t limit;     /* limit: the process's limit */
    uint32_t pid;       /* limit: the process */
    uint32_t pad;
    char detail[200]; /* what was found, for a person */
} shm_error_info_t;

typedef struct shm_stats {
    uint64_t total;     /* heap bytes (capacity less the arena header) */
    uint64_t used;      /* usable bytes of allocated blocks */
    uint64_t available; /* usable bytes of free blocks (their sizes less one header each) */
    uint64_t overhead;  /* headers of allocated blocks */
    uint64_t peak;
    uint64_t allocated_blocks;
    uint64_t free_blocks;
    uint64_t allocations;
    uint64_t deallocations;
    uint64_t frees_since_gc;
    uint64_t reserved; /* bytes of tmpfs reserved so far */
    uint64_t capacity;
    uint64_t lock_recoveries;
    uint64_t oom_events;
    uint64_t gc_runs;
    uint64_t cached;      /* usable bytes in per-process caches (counted in available) */
    uint64_t cache_limit; /* most usable bytes one process may keep cached (0: caches off) */
} shm_stats_t;

typedef struct shm_check_report {
    uint64_t blocks;
    uint64_t allocated_blocks;
    uint64_t free_blocks;
    uint64_t used;
    uint64_t free_bytes;
    uint64_t largest_free; /* usable bytes of the largest free block */
    uint64_t live_procs;
    uint64_t dead_procs;
    uint64_t cached_blocks; /* in per-process caches: allocated for the heap, free for users */
    uint64_t cached_bytes;  /* (allocated_blocks and used above leave them out) */
    uint64_t objects;       /* objects in the heap (dying ones included) */
    uint64_t tickets;       /* references in transit */
    uint64_t queues;        /* queues among the objects */
    uint64_t queued;        /* items waiting in them */
} shm_check_report_t;

typedef struct shm_block_info {
    uint64_t address;
    uint64_t size;  /* usable bytes */
    uint32_t pid;   /* owner's pid, 0 when the block has no owner */
    uint32_t flags; /* SHM_BF_* */
    uint32_t refcount;
    int32_t slot; /* owner's slot, -1 when none */
} shm_block_info_t;

/* What shm_queue_get found: where the pickle stream is, and the object's size. The buffers'
 * (address, nbytes) pairs go to the caller's array. */
typedef struct shm_object_view {
    uint64_t address;    /* the object's header address */
    uint64_t id;         /* its id: (address, id) names it */
    uint64_t pickle;     /* address of the pickle stream */
    uint64_t pickle_len; /* its length */
    uint64_t nbytes;     /* pickle_len + the buffers' bytes */
    uint32_t nbuffers;
    uint32_t flags;    /* SHM_OBJ_* */
    uint32_t bind_seq; /* unused (shm_object_get reports it in its out words) */
    uint32_t pad;
} shm_object_view_t;

typedef struct shm_objects_info {
    uint64_t live;               /* objects published and not freed */
    uint64_t tickets;            /* references in transit */
    uint64_t dying;              /* objects whose freeing was interrupted, for collection */
    uint64_t transit_timeout_ns; /* how long a pickled reference keeps its object alive */
    uint64_t held;               /* objects the given slot holds */
} shm_objects_info_t;

/* What shm_queue_info found (a snapshot under the heap lock). */
typedef struct shm_queue_info {
    uint64_t size;         /* items waiting */
    uint64_t maxsize;      /* 0: unbounded */
    uint64_t capacity;     /* cells in the ring now */
    uint64_t unfinished;   /* joinable: items put and not yet task_done() */
    uint64_t put;          /* items ever put */
    uint64_t control;      /* segment offset of the queue's shm_queue_t, for shm_queue_wait */
    uint32_t all_done_seq; /* the all_done wait word, read with unfinished */
    uint32_t joinable;
} shm_queue_info_t;

typedef struct shm_gc_result {
    uint64_t freed_blocks;
    uint64_t freed_bytes;
    uint64_t procs_cleaned;
    uint64_t refs_dropped;
} shm_gc_result_t;

typedef struct shm_proc_info {
    int32_t slot;
    uint32_t state;
    uint32_t pid;
    uint32_t pad;
    uint64_t start_time;
    uint64_t usage;
    uint64_t peak;
    uint64_t limit;
    uint64_t nblocks;
    uint64_t nallocs;
    uint64_t nfrees;
} shm_proc_info_t;

typedef struct shm_cache_info {
    uint64_t cached_bytes; /* usable bytes of the free blocks the process keeps */
    uint64_t cached_blocks;
    uint64_t nallocs;        /* allocations served from the cache, ever (while the slot lived) */
    uint64_t nfrees;         /* frees into it, its own and other processes' */
    uint64_t remote_bytes;   /* usable bytes other processes freed to it, not taken in yet */
    uint32_t remote_pending; /* 1 if other processes freed blocks it has not collected yet */
    uint32_t pad;
} shm_cache_info_t;

/* alloc.c */
int64_t shm_alloc(shm_handle_t *h, uint64_t size, uint64_t align, int32_t slot);
int64_t shm_free(shm_handle_t *h, uint64_t address);
int shm_block_release(shm_handle_t *h, uint64_t address, int32_t slot);
int64_t shm_block_size(shm_handle_t *h, uint64_t address, int for_write);
/* Bytes [offset, offset + n) of the live block at address (n = UINT64_MAX: to its end), checked
 * as shm_block_size checks the block, and within it: n (resolved), or a status. */
int64_t shm_block_span(shm_handle_t *h, uint64_t address, uint64_t offset, uint64_t n,
                       int for_write);
/* Copy n bytes of data into the block at address, from offset (checked as shm_block_span with
 * for_write): n, or a status. data must not overlap the block's bytes it goes to (a large copy is
 * made in parts, by several threads). */
int64_t shm_block_write(shm_handle_t *h, uint64_t address, uint64_t offset, const void *data,
                        uint64_t n);
int shm_block_seal(shm_handle_t *h, uint64_t address);
int shm_block_info(shm_handle_t *h, uint64_t address, shm_block_info_t *out);

/* arena.c */
int shm_arena_format(void *base, uint64_t capacity, int fd, uint64_t salt, uint64_t now_ns);
int shm_handle_open(void *base, uint64_t capacity, int fd, shm_handle_t **out);
/* Closing a handle, in three steps (arena.c, the gate): shutdown refuses new calls (SHM_ECLOSED)
 * but the calling thread's and waits until no other thread is inside one; it returns 1 to the one
 * caller that may now detach and unmap, 0 to any other (the handle was closing already). reopen
 * undoes a shutdown whose unmap could not be done; closed, after the unmap, refuses the closing
 * thread too. free gives the memory back once no thread can
 * hold the pointer (Python: when its last reference goes). shm_handle_close is shutdown and free,
 * for C callers. */
int shm_handle_shutdown(shm_handle_t *h);
void shm_handle_reopen(shm_handle_t *h);
void shm_handle_closed(shm_handle_t *h);
void shm_handle_free(shm_handle_t *h);
void shm_handle_close(shm_handle_t *h);
int shm_stats_read(shm_handle_t *h, shm_stats_t *out);
int64_t shm_largest_free(shm_handle_t *h);
int shm_check(shm_handle_t *h, shm_check_report_t *out);
uint64_t shm_header_size(void);
int shm_debug_level(void); /* SHMALLOC_DEBUG this core was built with */
int shm_pressure_level(shm_handle_t *h);
uint32_t shm_layout_version(void);
uint64_t shm_segment_probe_size(void); /* bytes of a segment's head that shm_segment_probe reads */
int shm_segment_probe(const void *head, uint64_t len); /* SHM_SEG_*; a pure function of the bytes */

/* block.c: the checksum block.c would store in the header at header_offset of the segment mapped
 * at base (salt read from its arena header); 0 if the offset is out of range. A pure read. */
uint64_t shm_debug_block_checksum(const void *base, uint64_t capacity, uint64_t header_offset);

/* check.c: SHM_ECORRUPT if the segment is shorter than the mapping (truncated); one fstat */
int shm_segment_check(shm_handle_t *h);

/* cache.c */
int shm_cache_flush(shm_handle_t *h, int32_t slot);
/* limit 0: no caches, every call takes the heap lock */
int shm_cache_set_limit(shm_handle_t *h, uint64_t limit);
int shm_cache_info(shm_handle_t *h, int32_t slot, shm_cache_info_t *out);

/* error.c */
const shm_error_info_t *shm_last_error(void);
const char *shm_strerror(int status);

/* fault.c */
int shm_fault_step_count(void);
const char *shm_fault_step_name(int index); /* NULL if out of range */

/* gc.c */
int shm_gc(shm_handle_t *h, int32_t slot, int all_blocks, uint32_t pid, uint64_t start_time,
           shm_gc_result_t *out);
int shm_proc_detach(shm_handle_t *h, int32_t slot);

/* heap.c: pressure, one formula; available counts cached blocks as free (shm_stats_t.available) */
double shm_usage_percent(uint64_t total, uint64_t available); /* 0 if total == 0 */
int shm_pressure_of_percent(double pct); /* SHM_PRESSURE_*: < 60, 60-79, 80-94, >= 95 */

/* lease.c */
int shm_lease_get(shm_handle_t *h, uint64_t *pid, uint64_t *start_time);
int shm_lease_swap(shm_handle_t *h, uint64_t old_pid, uint64_t old_start, uint64_t new_pid,
                   uint64_t new_start);

/* lock.c: which = -1 names the heap lock, 0..SHM_MAX_PROCS-1 that slot's lock */
int shm_lock_owner(shm_handle_t *h, int32_t which, uint32_t *tid_out); /* 0: free; no lock taken */
/* tests: make a lock look held by thread tid (0: unlocked), stamped with a PID namespace inode and
 * a holder slot (-1: none) as its holder would stamp it */
int shm_debug_lock_forge(shm_handle_t *h, int32_t which, uint32_t tid, uint64_t ns, int32_t slot);
uint64_t shm_pid_namespace(void);       /* inode of this process's PID namespace; 0 if unknown */
int64_t shm_lock_offset(int32_t which); /* segment offset of that lock */

/* names.c */
int shm_name_bind(shm_handle_t *h, const char *name, uint64_t address);
int64_t shm_name_lookup(shm_handle_t *h, const char *name);
int shm_name_at(shm_handle_t *h, uint32_t index, char *name_out, uint64_t *address_out);

/* objects.c: objects in the arena (shm_layout.h, shm_object_t). `object` is the header block's
 * address, `id` the object's id (0: any). Every call validates both and answers SHM_ENOENT for an
 * object that is gone (freed, reused, deleted). */
/* Allocate, owned by slot, an unpublished object: a header block with room for the buffer table
 * and pickle_len bytes, and one block per buffer. out[0] = the header's address, out[1] = where
 * the pickle stream goes, out[2 + i] = buffer i's address. Write them, then publish. A process
 * killed before publish leaves plain blocks of its own: collection frees them. */
int shm_object_create(shm_handle_t *h, int32_t slot, uint64_t pickle_len, uint32_t nbuffers,
                      const uint64_t *sizes, uint64_t *out);
/* Make the written object live: blocks become persistent object blocks (buffers sealed unless
 * writable), and slot holds it. Its id goes to *id_out. */
int shm_object_publish(shm_handle_t *h, int32_t slot, uint64_t object, int writable,
                       uint64_t *id_out);
/* get() in one call: slot holds the object (address, id), or the one bound to name if name is not
 * NULL, and learns its layout in out: SHM_GET_WORDS words (SHM_GET_*), then nbuffers (address,
 * nbytes) pairs; cap is the room for pairs. An object without out-of-band buffers whose pickle
 * stream fits in dst_cap bytes is copied to dst instead, under the lock, and slot's hold is left
 * as it was: returns 1 then, 0 when slot holds the object now. SHM_ENOENT as the open calls
 * (out[SHM_GET_BIND_SEQ] is set for a name). */
#define SHM_GET_ADDRESS 0
#define SHM_GET_ID 1
#define SHM_GET_PICKLE 2
#define SHM_GET_PICKLE_LEN 3
#define SHM_GET_NBYTES 4
#define SHM_GET_FLAGS 5
#define SHM_GET_NBUFFERS 6
#define SHM_GET_BIND_SEQ 7
#define SHM_GET_WORDS 8
int shm_object_get(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id, const char *name,
                   uint64_t *out, uint32_t cap, void *dst, uint64_t dst_cap);
/* Drop slot's process reference: 1 if that freed the object, 0 if not, SHM_ENOENT if slot held
 * none. */
int shm_object_release(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id);
/* delete(): no new references from now on; its names go, its owner and anonymous holds
 * (tickets, queue slots, handles) are dropped: a later shm_object_drop of one answers
 * SHM_ENOENT. 1 if freed. */
int shm_object_delete(shm_handle_t *h, uint64_t object, uint64_t id);
/* slot becomes the object's owner: it holds the object until it ends or anyone deletes it
 * (shmalloc.arrays' producer and adopt). */
int shm_object_own(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id);
/* An anonymous hold (a queue slot, a reference in transit): keeps the object alive without a
 * process. drop returns 1 when that freed the object. */
int shm_object_hold(shm_handle_t *h, uint64_t object);
int shm_object_drop(shm_handle_t *h, uint64_t object);
/* A pickled reference: a ticket holding the object until claimed or transit_timeout passes. */
int shm_ticket_issue(shm_handle_t *h, uint64_t object, uint64_t id, uint64_t *ticket_out,
                     uint64_t *ticket_id_out);
/* Unpickling: slot takes a process reference and the ticket (if still there) is dropped: 1 if
 * the ticket was claimed, 0 if it was gone but the object lives (a plain reference taken). */
int shm_ticket_claim(shm_handle_t *h, int32_t slot, uint64_t ticket, uint64_t ticket_id,
                     uint64_t object, uint64_t id);
/* Drop expired tickets (and free what they alone held); returns how many. */
int64_t shm_objects_expire(shm_handle_t *h);
int shm_objects_set_transit_timeout(shm_handle_t *h, uint64_t ns);
/* Counts for stats and tests; held is for slot (-1: 0). */
int shm_objects_info(shm_handle_t *h, int32_t slot, shm_objects_info_t *out);
uint64_t shm_bind_seq_offset(void); /* segment offset of the bind_seq wait word */
/* Publish, held by slot, an object whose one buffer is the plain block of slot's at address (the
 * memory of a numpy array of slot's process: npalloc.c), without a copy: pickle_len bytes of
 * stream, nbytes of the block. The object is LENT: slot also holds it as its owner until
 * shm_object_unlend (the array frees the block) or slot's collection. out[0] = the object's
 * address, out[1] = its id. */
int shm_object_lend(shm_handle_t *h, int32_t slot, const void *pickle, uint64_t pickle_len,
                    uint64_t address, uint64_t nbytes, uint64_t *out);
/* The lender's array is gone: drop its hold. 1 if that freed the object. */
int shm_object_unlend(shm_handle_t *h, int32_t slot, uint64_t object, uint64_t id);
/* names: unbind lives in objects.c (a name is one of an object's holds; unbinding the last may
 * free it) */
int shm_name_unbind(shm_handle_t *h, const char *name);

/* queue.c: queues of objects (shm_layout.h, shm_queue_t; the state machine is drawn in queue.c).
 * `queue`, `queue_id` name the queue object; slot is the caller's. */
#define SHM_QPUT_NEW 0   /* mode: object is an unpublished object of slot's: publish it in */
#define SHM_QPUT_VALUE 1 /* mode: an existing object (object_id), delivered as its value */
#define SHM_QPUT_REF 2   /* mode: an existing object, delivered as a reference to it */
#define SHM_QPUT_KIND 3
#define SHM_QPUT_FORCE 4 /* with a mode: ignore maxsize (putting back what a get took) */
#define SHM_QPUT_FULL 1  /* shm_queue_put: the queue is full, *seq_out is not_full's value */
#define SHM_QGET_VALUE 0 /* shm_queue_get: an item to unpickle (out, and bufs as pairs) */
#define SHM_QGET_REF 1   /* shm_queue_get: an item that is a reference to the object in out */
#define SHM_QGET_EMPTY 2 /* shm_queue_get: nothing waits, *seq_out is not_empty's value */
#define SHM_QWAIT_NOT_EMPTY 0
#define SHM_QWAIT_NOT_FULL 1
#define SHM_QWAIT_ALL_DONE 2
/* A new queue (maxsize 0: unbounded), held by slot. */
int shm_queue_create(shm_handle_t *h, int32_t slot, uint64_t maxsize, int joinable,
                     uint64_t *queue_out, uint64_t *id_out);
/* Put an item: SHM_OK (woken: one sleeping getter), SHM_QPUT_FULL, or a status. */
int shm_queue_put(shm_handle_t *h, int32_t slot, uint64_t queue, uint64_t queue_id, uint64_t object,
                  uint64_t object_id, uint32_t mode, uint32_t *seq_out);
/* Take the oldest item, held by slot from now on: SHM_QGET_VALUE / _REF / _EMPTY, or a status. */
int shm_queue_get(shm_handle_t *h, int32_t slot, uint64_t queue, uint64_t queue_id,
                  shm_object_view_t *out, uint64_t *bufs, uint32_t cap, uint32_t *seq_out);
/* JoinableQueue.task_done(): SHM_EINVAL if called more often than items were put. */
int shm_queue_task_done(shm_handle_t *h, uint64_t queue, uint64_t queue_id);
int shm_queue_info(shm_handle_t *h, uint64_t queue, uint64_t queue_id, shm_queue_info_t *out);
/* Sleep while the wait word `which` (SHM_QWAIT_*) of the queue whose control struct is at
 * segment offset `control` holds seq, counted as a sleeper; returns as shm_wait. */
int shm_queue_wait(shm_handle_t *h, uint64_t control, int32_t which, uint32_t seq,
                   int64_t timeout_ns);

/* handoff.c: the combined calls of a hand-off (one C call where Python made several).
 * put() in one call: shm_object_create for the pickle stream and nbuffers buffers (bufs[i],
 * sizes[i] bytes each; bufs NULL or bufs[i] NULL: left unwritten), the stream and buffers copied
 * in, shm_object_publish. out[0] = the object's address, out[1] = its id, out[2 + i] = buffer i's
 * address. A process killed before the publish leaves plain blocks of its own (collection frees
 * them). */
int shm_object_put(shm_handle_t *h, int32_t slot, const void *pickle, uint64_t pickle_len,
                   uint32_t nbuffers, const void *const *bufs, const uint64_t *sizes, int writable,
                   uint64_t *out);
/* Queue.put() of a new item in one call: the object made as shm_object_put makes it, then put in
 * the queue as shm_queue_put(SHM_QPUT_NEW). SHM_QPUT_FULL leaves it unpublished, its blocks in
 * out as shm_object_create's (out[0] header, out[2 + i] buffers; out[1] unused): put it with
 * shm_queue_put once there is room, or free them. Any failure frees them. */
int shm_queue_put_new(shm_handle_t *h, int32_t slot, uint64_t queue, uint64_t queue_id,
                      const void *pickle, uint64_t pickle_len, uint32_t nbuffers,
                      const void *const *bufs, const uint64_t *sizes, uint64_t *out,
                      uint32_t *seq_out);
/* Queue.get() in one call: shm_queue_get, the view laid out in out as shm_object_get lays it out;
 * a value without out-of-band buffers whose stream fits in dst_cap bytes is copied to dst and
 * slot's hold dropped at once, in the same hold of the heap lock (SHM_QGET_COPIED). With
 * copy_only, any other item stays in the queue, nothing changed (SHM_QGET_HELD): a caller that
 * keeps its own count of holds (Python's) takes those under its own lock. */
#define SHM_QGET_COPIED 3
#define SHM_QGET_HELD 4
int shm_queue_take(shm_handle_t *h, int32_t slot, uint64_t queue, uint64_t queue_id, uint64_t *out,
                   uint32_t cap, void *dst, uint64_t dst_cap, int copy_only, uint32_t *seq_out);

/* npalloc.c: numpy's memory handler over an arena (NEP 49), for one process and one handle.
 * shm_np_new makes one: requests of at least threshold bytes get arena blocks owned by slot,
 * others (and those the arena cannot serve) go to the handler whose PyDataMem_Handler is at
 * fallback (numpy's default, from PyDataMem_GetHandler). shm_np_handler is the
 * PyDataMem_Handler to wrap in a capsule named "mem_handler" whose destructor is
 * shm_np_capsule_free (build_ffi.py: the Python side of it) and whose context is a Python object
 * that keeps the handle and the mapping alive (the destructor drops it and calls shm_np_free).
 * NULL: out of memory. */
typedef struct shm_np shm_np_t;
typedef struct shm_np_stats {
    uint64_t arena_allocs;  /* blocks handed to numpy from the arena, ever */
    uint64_t arena_blocks;  /* of them, not freed by numpy yet */
    uint64_t fallbacks;     /* requests of threshold bytes or more the arena could not serve */
    uint64_t lent;          /* blocks lent to objects, ever */
    uint64_t lent_live;     /* of them, still used by numpy */
    uint64_t free_failures; /* frees the core refused (the block stays its slot's) */
} shm_np_stats_t;
shm_np_t *shm_np_new(shm_handle_t *h, int32_t slot, uint64_t threshold, const void *fallback);
void *shm_np_handler(shm_np_t *np);
void shm_np_free(shm_np_t *np);
const char *shm_np_capsule_name(void); /* "mem_handler", static */
/* The arena address of data, a pointer numpy got from np's arena, or SHM_EINVAL. */
int64_t shm_np_address(shm_np_t *np, uint64_t data);
/* shm_object_lend of the block under data (nbytes of it), remembered so that numpy's free of
 * the block drops the object's hold instead of freeing it. out as shm_object_lend's. */
int shm_np_lend(shm_np_t *np, uint64_t data, const void *pickle, uint64_t pickle_len,
                uint64_t nbytes, uint64_t *out);
void shm_np_stats(shm_np_t *np, shm_np_stats_t *out);

/* own.c */
int shm_block_adopt(shm_handle_t *h, uint64_t address, int32_t slot);
int shm_block_persist(shm_handle_t *h, uint64_t address);
int shm_block_retain(shm_handle_t *h, uint64_t address, int32_t slot);
int shm_blocks_list(shm_handle_t *h, int32_t slot, shm_block_info_t *out, uint64_t cap,
                    uint64_t *count);

/* wait.c: sleeping on a 32-bit word of the segment (futex, shared across processes).
 * word_offset: a 4-aligned segment offset. timeout_ns < 0: no timeout. shm_wait returns SHM_OK
 * when woken or when the word no longer holds `expected` (the caller re-checks its condition
 * either way), SHM_ETIMEDOUT, or SHM_EINTR (a signal: let its handler run, wait again with the
 * time left). shm_wake wakes up to n waiters (n < 0: all) and returns how many it woke;
 * shm_word_bump adds 1 to the word and then wakes n: the waker's half of the protocol. */
int shm_wait(shm_handle_t *h, uint64_t word_offset, uint32_t expected, int64_t timeout_ns);
int shm_wake(shm_handle_t *h, uint64_t word_offset, int32_t n);
int shm_word_bump(shm_handle_t *h, uint64_t word_offset, int32_t n);
int64_t shm_word_load(shm_handle_t *h, uint64_t word_offset); /* the word (>= 0) or a status */

/* process.c */
int shm_proc_attach(shm_handle_t *h, uint32_t pid, uint64_t start_time);
int shm_proc_find(shm_handle_t *h, uint32_t pid);
int shm_proc_info(shm_handle_t *h, int32_t slot, shm_proc_info_t *out);
int shm_proc_set_limit(shm_handle_t *h, int32_t slot, uint64_t limit);
int shm_proc_mark_dead(shm_handle_t *h, int32_t slot, uint32_t pid, uint64_t start_time);
int shm_proc_trim_request(shm_handle_t *h, int32_t slot);
int shm_proc_trim_ack(shm_handle_t *h, int32_t slot);

/* life.c: whether a slot's process runs, from its life lock, in any PID namespace. A read of the
 * lock word, no lock taken. */
#define SHM_LIFE_UNHELD 0 /* nobody holds it: detached, or kept for another pid; ask /proc */
#define SHM_LIFE_HELD 1   /* its process holds it: alive */
#define SHM_LIFE_DEAD 2   /* its holder died: the process has ended */
int shm_proc_life(shm_handle_t *h, int32_t slot);

/* ring.c */
int shm_event_push(shm_handle_t *h, uint32_t kind, uint32_t pid, uint64_t time_ns, uint64_t f0,
                   uint64_t f1, uint64_t f2, uint64_t f3, uint64_t f4);
int shm_event_pop(shm_handle_t *h, shm_event_t *out);
uint64_t shm_event_dropped(shm_handle_t *h);
