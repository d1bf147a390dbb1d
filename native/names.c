/* names.c -- the named-block directory: bind/lookup/unbind/names.
 *
 * A fixed table of (address, name) entries in the segment, under the heap lock. Binding a name
 * makes its block persistent (no owner, never collected) and marks it SHM_BF_NAMED so that freeing
 * it removes its names [N1]. Names are at most SHM_NAME_LEN - 1 bytes and unique [N2]. */
#include <string.h>

#include "shm_internal.h"

static int name_check(const char *name) {
    size_t n = strnlen(name, SHM_NAME_LEN);
    if (n == 0 || n >= SHM_NAME_LEN)
        return err_set(SHM_EINVAL, n, "a block name must be 1 to %d bytes of UTF-8",
                       SHM_NAME_LEN - 1);
    return SHM_OK;
}

static shm_name_t *name_find(shm_handle_t *h, const char *name) {
    shm_name_t *t = h->arena->names;
    for (int i = 0; i < SHM_MAX_NAMES; i++)
        if (t[i].address && strncmp(t[i].name, name, SHM_NAME_LEN) == 0) return &t[i];
    return NULL;
}

static int bind_locked(shm_handle_t *h, const char *name, uint64_t address) {
    uint64_t off;
    int rc = block_from_address(h, address, &off);
    if (rc != SHM_OK || (rc = block_claim(h, off)) != SHM_OK) return rc;
    if (name_find(h, name))
        return err_set(SHM_EEXIST, address, "the name '%s' is already bound; unbind it first",
                       name);
    int names_here = 0;
    for (int i = 0; i < SHM_MAX_NAMES; i++) names_here += h->arena->names[i].address == address;
    if (names_here >= SHM_MAX_NAMES_PER_BLOCK)
        return err_set(SHM_EFULL, address,
                       "the block at %#llx already has %d names, the most one block may have "
                       "(SHM_MAX_NAMES_PER_BLOCK); unbind one of them first",
                       (unsigned long long)address, SHM_MAX_NAMES_PER_BLOCK);
    shm_name_t *t = h->arena->names, *slot = NULL;
    for (int i = 0; i < SHM_MAX_NAMES && !slot; i++)
        if (!t[i].address) slot = &t[i];
    if (!slot)
        return err_table_full(address, "the names directory", SHM_MAX_NAMES, "SHM_MAX_NAMES",
                              "unbind names you no longer need");
    shm_block_t *b = block_edit(h, off);
    proc_move(h, b->owner, 0, b->size - SHM_HDR);
    b->owner = 0;
    b->flags |= SHM_BF_PERSIST | SHM_BF_NAMED;
    block_reseal(h, off);
    J(h, slot);
    memset(slot->name, 0, SHM_NAME_LEN);
    memcpy(slot->name, name, strlen(name));
    slot->address = address;
    /* wake every get(name) asleep on bind_seq: bumped here, woken after unlocking (wait.c) */
    __atomic_add_fetch(&h->arena->objects.bind_seq, 1, __ATOMIC_RELEASE);
    return SHM_OK;
}

int shm_name_bind(shm_handle_t *h, const char *name, uint64_t address) {
    SHM_GATE(h);
    int rc = name_check(name);
    if (rc != SHM_OK) return rc;
    if ((rc = heap_lock(h)) != SHM_OK) return rc;
    rc = bind_locked(h, name, address);
    heap_unlock(h);
    if (rc == SHM_OK) shm_wake(h, offsetof(shm_arena_t, objects.bind_seq), -1);
    return rc;
}

int64_t shm_name_lookup(shm_handle_t *h, const char *name) {
    SHM_GATE(h);
    int rc = name_check(name);
    if (rc != SHM_OK) return rc;
    if ((rc = heap_lock(h)) != SHM_OK) return rc;
    shm_name_t *e = name_find(h, name);
    uint64_t off;
    int64_t r = !e ? err_set(SHM_ENOENT, 0, "no block is bound to the name '%s'", name)
                : block_from_address(h, e->address, &off) != SHM_OK
                    ? err_set(SHM_ECORRUPT, (uint64_t)((uint8_t *)e - h->base),
                              "[N1] the name '%s' is bound to %#llx, which is not a live block",
                              name, (unsigned long long)e->address)
                    : (int64_t)e->address;
    heap_unlock(h);
    return r;
}

static int address_is_named(shm_handle_t *h, uint64_t address) {
    const shm_name_t *t = h->arena->names;
    for (int i = 0; i < SHM_MAX_NAMES; i++)
        if (t[i].address == address) return 1;
    return 0;
}

/* Unbind name (heap lock held). *off_out: the block's header offset if that was its last name
 * (objects.c's shm_name_unbind then applies the objects' rule to it), else 0. */
int names_unbind_locked(shm_handle_t *h, const char *name, uint64_t *off_out) {
    *off_out = 0;
    shm_name_t *e = name_find(h, name);
    if (!e) return err_set(SHM_ENOENT, 0, "no block is bound to the name '%s'", name);
    uint64_t address = e->address, off;
    J(h, e);
    e->address = 0;
    memset(e->name, 0, SHM_NAME_LEN);
    if (address_is_named(h, address)) return SHM_OK;
    int rc = block_from_address(h, address, &off);
    if (rc != SHM_OK) return rc;
    block_edit(h, off)->flags &= ~(uint32_t)SHM_BF_NAMED; /* stays persistent */
    block_reseal(h, off);
    *off_out = off;
    return SHM_OK;
}

int names_check(const char *name) { return name_check(name); }

/* The address bound to name, or SHM_ENOENT (objects.c's lookup under the caller's lock). */
int64_t names_find_address(shm_handle_t *h, const char *name) {
    if (name_check(name) != SHM_OK) return SHM_EINVAL;
    const shm_name_t *e = name_find(h, name);
    return e ? (int64_t)e->address
             : err_set(SHM_ENOENT, 0, "no object is bound to the name '%s'", name);
}

/* The block at address is being freed: its names go. */
void names_drop_address(shm_handle_t *h, uint64_t address) {
    shm_name_t *t = h->arena->names;
    for (int i = 0; i < SHM_MAX_NAMES; i++)
        if (t[i].address == address) {
            J(h, &t[i]);
            t[i].address = 0;
            memset(t[i].name, 0, SHM_NAME_LEN);
        }
}

/* Entry `index` of the directory: 1 and its name and address if in use, 0 if empty. */
int shm_name_at(shm_handle_t *h, uint32_t index, char *name_out, uint64_t *address_out) {
    SHM_GATE(h);
    if (index >= SHM_MAX_NAMES) return err_set(SHM_EINVAL, index, "no directory entry %u", index);
    int rc = heap_lock(h);
    if (rc != SHM_OK) return rc;
    const shm_name_t *e = &h->arena->names[index];
    rc = 0;
    if (e->address) {
        memcpy(name_out, e->name, SHM_NAME_LEN);
        name_out[SHM_NAME_LEN - 1] = 0;
        *address_out = e->address;
        rc = 1;
    }
    heap_unlock(h);
    return rc;
}
