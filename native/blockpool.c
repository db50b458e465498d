/*
 * fusecache._native: block buffers that are filled from the lower file without
 * page faults, and replies assembled from block ranges.
 *
 * Why this exists (measured, see native/README.md): filling a fresh 1 MiB
 * bytearray from a fast lower file runs at ~1.2 GB/s, reusing a buffer at
 * ~8.5 GB/s; the difference is page faults on new memory. A BlockPool hands
 * out read-only Block objects whose memory comes from 2 MiB arenas and goes
 * back to the pool when the last reference (the cache, a memoryview on its way
 * to the kernel) is gone. A cache that
 * evicts one block to make room for the next reuses memory that is already
 * mapped, and a cache that grows maps 2 MiB arenas pre-faulted in one call.
 *
 * The pure-Python twin is fusecache/blockio.py: same API, same results.
 *
 * Threading: every pool structure is touched with the GIL held; only the
 * preadv and memcpy loops run without it, on memory no one else can reach yet.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

/* Arenas are small so that a few live blocks cannot pin much free memory. */
#define ARENA_BYTES ((size_t)2 << 20)
#ifndef IOV_MAX
#define IOV_MAX 1024
#endif
/* Copies below this size are not worth dropping the GIL for. */
#define GIL_FREE_COPY (64 * 1024)

typedef struct {
    PyTypeObject *pool_type;
    PyTypeObject *block_type;
} module_state;

/* One mapping carved into equal slots; linked into the pool's partial or
 * empty list while it has a free slot. */
typedef struct Arena {
    struct Arena *prev, *next;
    char *base;
    int nslots, nfree;
    int on_list; /* 0: full, 1: partial, 2: empty */
    int free_stack[]; /* slot indices, nfree of them valid */
} Arena;

typedef struct {
    Arena *head;
    Py_ssize_t count;
} ArenaList;

typedef struct {
    PyObject_HEAD
    Py_ssize_t slot_size;
    int slots_per_arena;
    size_t arena_bytes;
    Py_ssize_t reserve_arenas; /* empty arenas kept mapped for reuse */
    ArenaList partial, empty;
    Py_ssize_t arenas, live_slots;
    unsigned long long reused, mapped_total;
} PoolObject;

typedef struct {
    PyObject_HEAD
    PoolObject *pool; /* strong reference; NULL for heap memory */
    Arena *arena;
    int slot;
    char *data;
    Py_ssize_t length;
} BlockObject;

/* ---- arenas ---------------------------------------------------------- */

static void
list_push(ArenaList *l, Arena *a, int which)
{
    a->prev = NULL;
    a->next = l->head;
    if (l->head)
        l->head->prev = a;
    l->head = a;
    l->count++;
    a->on_list = which;
}

static void
list_remove(ArenaList *l, Arena *a)
{
    if (a->prev)
        a->prev->next = a->next;
    else
        l->head = a->next;
    if (a->next)
        a->next->prev = a->prev;
    a->prev = a->next = NULL;
    l->count--;
    a->on_list = 0;
}

static Arena *
arena_new(PoolObject *pool)
{
    /* MAP_POPULATE faults the arena in with one call instead of a fault per
     * page (filling 1 GiB of new blocks: 1.5 -> 2.0 GB/s). No MADV_HUGEPAGE:
     * it was faster when free huge pages were at hand (4.6 GB/s) but stalled
     * in direct compaction when they were not (0.36 GB/s). */
    char *base = mmap(NULL, pool->arena_bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    Arena *a = PyMem_RawMalloc(sizeof(Arena) + sizeof(int) * (size_t)pool->slots_per_arena);
    if (a == NULL) {
        munmap(base, pool->arena_bytes);
        errno = ENOMEM;
        return NULL;
    }
    a->base = base;
    a->nslots = a->nfree = pool->slots_per_arena;
    for (int i = 0; i < a->nslots; i++)
        a->free_stack[i] = a->nslots - 1 - i; /* slot 0 first */
    a->prev = a->next = NULL;
    a->on_list = 0;
    pool->arenas++;
    pool->mapped_total += pool->arena_bytes;
    return a;
}

static void
arena_free(PoolObject *pool, Arena *a)
{
    munmap(a->base, pool->arena_bytes);
    PyMem_RawFree(a);
    pool->arenas--;
}

/* Take a slot: from a partly used arena first (so sparse arenas fill up and
 * whole arenas can drain), then from a spare empty one, else map a new one. */
static int
pool_take(PoolObject *pool, Arena **arena, int *slot)
{
    Arena *a = pool->partial.head;
    if (a == NULL) {
        a = pool->empty.head;
        if (a != NULL) {
            list_remove(&pool->empty, a);
            pool->reused++;
        }
        else if ((a = arena_new(pool)) == NULL) {
            return -1;
        }
        if (a->nslots > 1)
            list_push(&pool->partial, a, 1);
    }
    else {
        pool->reused++;
    }
    *slot = a->free_stack[--a->nfree];
    if (a->nfree == 0 && a->on_list == 1)
        list_remove(&pool->partial, a);
    *arena = a;
    pool->live_slots++;
    return 0;
}

static void
pool_give(PoolObject *pool, Arena *a, int slot)
{
    a->free_stack[a->nfree++] = slot;
    pool->live_slots--;
    if (a->nfree == a->nslots) {
        if (a->on_list == 1)
            list_remove(&pool->partial, a);
        if (pool->empty.count < pool->reserve_arenas)
            list_push(&pool->empty, a, 2);
        else
            arena_free(pool, a);
    }
    else if (a->on_list == 0) {
        list_push(&pool->partial, a, 1);
    }
}

/* ---- Block ----------------------------------------------------------- */

/* A new Block of *length* bytes: a pool slot when it fits, else heap memory. */
static BlockObject *
block_new(PoolObject *pool, Py_ssize_t length)
{
    module_state *st = PyType_GetModuleState(Py_TYPE(pool));
    BlockObject *b = PyObject_New(BlockObject, st->block_type);
    if (b == NULL)
        return NULL;
    b->pool = NULL;
    b->arena = NULL;
    b->slot = -1;
    b->length = length;
    if (length <= pool->slot_size) {
        if (pool_take(pool, &b->arena, &b->slot) < 0) {
            b->data = NULL;
            Py_DECREF(b);
            return (BlockObject *)PyErr_SetFromErrno(PyExc_MemoryError);
        }
        b->data = b->arena->base + (size_t)b->slot * (size_t)pool->slot_size;
        Py_INCREF(pool);
        b->pool = pool;
    }
    else {
        b->data = PyMem_RawMalloc(length ? (size_t)length : 1);
        if (b->data == NULL) {
            Py_DECREF(b);
            return (BlockObject *)PyErr_NoMemory();
        }
    }
    return b;
}

static void
block_dealloc(BlockObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->pool != NULL) {
        pool_give(self->pool, self->arena, self->slot);
        Py_DECREF(self->pool);
    }
    else if (self->data != NULL) {
        PyMem_RawFree(self->data);
    }
    PyObject_Free(self);
    Py_DECREF(tp);
}

static int
block_getbuffer(BlockObject *self, Py_buffer *view, int flags)
{
    /* Read-only: a cached block is shared by every reader that asks for it. */
    return PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->length, 1, flags);
}

static Py_ssize_t
block_length(BlockObject *self)
{
    return self->length;
}

static PyObject *
block_repr(BlockObject *self)
{
    return PyUnicode_FromFormat("<fusecache._native.Block of %zd bytes>", self->length);
}

PyDoc_STRVAR(block_doc,
"Read-only bytes of one cached block (or one reply), held in pool memory.\n\n"
"Supports len() and the buffer protocol; the memory returns to its pool when\n"
"the last reference and the last memoryview are gone.");

static PyType_Slot block_slots[] = {
    {Py_tp_dealloc, block_dealloc},
    {Py_tp_repr, block_repr},
    {Py_tp_doc, (void *)block_doc},
    {Py_bf_getbuffer, block_getbuffer},
    {Py_sq_length, block_length},
    {Py_mp_length, block_length},
    {0, NULL},
};

static PyType_Spec block_spec = {
    .name = "fusecache._native.Block",
    .basicsize = sizeof(BlockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = block_slots,
};

/* ---- BlockPool ------------------------------------------------------- */

static PyObject *
pool_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"slot_size", "reserve_bytes", NULL};
    Py_ssize_t slot_size, reserve = 64 << 20;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n|n:BlockPool", kwlist, &slot_size, &reserve))
        return NULL;
    long page = sysconf(_SC_PAGESIZE);
    if (slot_size <= 0 || slot_size % page != 0) {
        PyErr_Format(PyExc_ValueError, "slot_size must be a positive multiple of %ld", page);
        return NULL;
    }
    if (reserve < 0) {
        PyErr_SetString(PyExc_ValueError, "reserve_bytes must not be negative");
        return NULL;
    }
    PoolObject *self = (PoolObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->slot_size = slot_size;
    if ((size_t)slot_size >= ARENA_BYTES) {
        self->slots_per_arena = 1;
        self->arena_bytes = (size_t)slot_size;
    }
    else {
        self->slots_per_arena = (int)(ARENA_BYTES / (size_t)slot_size);
        self->arena_bytes = (size_t)self->slots_per_arena * (size_t)slot_size;
    }
    self->reserve_arenas = reserve / (Py_ssize_t)self->arena_bytes;
    return (PyObject *)self;
}

static int
pool_traverse(PoolObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static void
pool_dealloc(PoolObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    /* Blocks hold a reference to their pool, so every arena is empty here. */
    Arena *a;
    while ((a = self->empty.head) != NULL) {
        list_remove(&self->empty, a);
        arena_free(self, a);
    }
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* preadv until every byte of *iov* is in or the file ends; returns bytes read
 * or -1 with errno set. Runs without the GIL. */
static Py_ssize_t
preadv_full(int fd, struct iovec *iov, int iovcnt, off_t offset)
{
    Py_ssize_t got = 0;
    int first = 0;
    while (first < iovcnt) {
        int cnt = iovcnt - first < IOV_MAX ? iovcnt - first : IOV_MAX;
        ssize_t n = preadv(fd, iov + first, cnt, offset + got);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            break; /* EOF */
        got += n;
        /* A FUSE lower mount may return short reads before EOF: advance past
         * what arrived and ask again for the rest. */
        while (first < iovcnt && (size_t)n >= iov[first].iov_len) {
            n -= (ssize_t)iov[first].iov_len;
            iov[first].iov_len = 0;
            first++;
        }
        if (n > 0) {
            iov[first].iov_base = (char *)iov[first].iov_base + n;
            iov[first].iov_len -= (size_t)n;
        }
    }
    return got;
}

PyDoc_STRVAR(pool_read_doc,
"read(fd, offset, sizes) -> list[Block]\n\n"
"Consecutive blocks of the given sizes from *fd* at *offset*, in as few preadv\n"
"calls as the file allows, without the GIL. Short reads are retried; at end of\n"
"file the blocks come back short, and blocks past it empty.");

static PyObject *
pool_read(PoolObject *self, PyObject *args)
{
    int fd;
    long long offset;
    PyObject *sizes_arg;
    if (!PyArg_ParseTuple(args, "iLO:read", &fd, &offset, &sizes_arg))
        return NULL;
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "offset must not be negative");
        return NULL;
    }
    PyObject *sizes = PySequence_Fast(sizes_arg, "sizes must be a sequence of ints");
    if (sizes == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(sizes);
    if (n > INT_MAX) {
        Py_DECREF(sizes);
        PyErr_SetString(PyExc_ValueError, "too many blocks");
        return NULL;
    }
    PyObject *out = PyList_New(n);
    struct iovec *iov = PyMem_New(struct iovec, n ? (size_t)n : 1);
    if (out == NULL || iov == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t size = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(sizes, i));
        if (size == -1 && PyErr_Occurred())
            goto fail;
        if (size < 0) {
            PyErr_SetString(PyExc_ValueError, "block sizes must not be negative");
            goto fail;
        }
        BlockObject *b = block_new(self, size);
        if (b == NULL)
            goto fail;
        PyList_SET_ITEM(out, i, (PyObject *)b);
        iov[i].iov_base = b->data;
        iov[i].iov_len = (size_t)size;
    }
    Py_ssize_t got;
    int err;
    Py_BEGIN_ALLOW_THREADS
    got = preadv_full(fd, iov, (int)n, (off_t)offset);
    err = errno;
    Py_END_ALLOW_THREADS
    if (got < 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* trim at end of file */
        BlockObject *b = (BlockObject *)PyList_GET_ITEM(out, i);
        Py_ssize_t have = got < b->length ? got : b->length;
        got -= have;
        b->length = have;
    }
    PyMem_Free(iov);
    Py_DECREF(sizes);
    return out;
fail:
    PyMem_Free(iov);
    Py_XDECREF(out);
    Py_DECREF(sizes);
    return NULL;
}

PyDoc_STRVAR(pool_join_doc,
"join(parts) -> Block\n\n"
"One Block holding the concatenation of *parts* (bytes-like objects, typically\n"
"memoryview ranges of cached blocks): a reply that spans blocks.");

static PyObject *
pool_join(PoolObject *self, PyObject *parts_arg)
{
    PyObject *parts = PySequence_Fast(parts_arg, "parts must be a sequence");
    if (parts == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(parts), total = 0, done = 0;
    Py_buffer *views = PyMem_New(Py_buffer, n ? (size_t)n : 1);
    BlockObject *b = NULL;
    if (views == NULL) {
        Py_DECREF(parts);
        return PyErr_NoMemory();
    }
    for (; done < n; done++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(parts, done), &views[done],
                               PyBUF_CONTIG_RO) < 0)
            goto out;
        total += views[done].len;
    }
    if ((b = block_new(self, total)) == NULL)
        goto out;
    char *dst = b->data;
    int release = total >= GIL_FREE_COPY;
    PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(dst, views[i].buf, (size_t)views[i].len);
        dst += views[i].len;
    }
    if (release)
        PyEval_RestoreThread(ts);
out:
    for (Py_ssize_t i = 0; i < done; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    Py_DECREF(parts);
    return (PyObject *)b;
}

PyDoc_STRVAR(pool_statistics_doc,
"statistics() -> dict\n\n"
"slot_size; mapped_bytes (arenas now mapped); live_bytes (slots in use);\n"
"reused (slots handed out from memory that was already mapped).");

static PyObject *
pool_statistics(PoolObject *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{s:n,s:K,s:K,s:K}",
                         "slot_size", self->slot_size,
                         "mapped_bytes", (unsigned long long)self->arenas * self->arena_bytes,
                         "live_bytes", (unsigned long long)self->live_slots * self->slot_size,
                         "reused", self->reused);
}

static PyObject *
pool_page_aligned(PoolObject *Py_UNUSED(self), void *Py_UNUSED(closure))
{
    /* Arenas come from mmap and slot_size is a multiple of the page size. */
    Py_RETURN_TRUE;
}

static PyGetSetDef pool_getset[] = {
    {"page_aligned", (getter)pool_page_aligned, NULL,
     "True: every block starts on a page boundary (O_DIRECT may read into it).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef pool_methods[] = {
    {"read", (PyCFunction)pool_read, METH_VARARGS, pool_read_doc},
    {"join", (PyCFunction)pool_join, METH_O, pool_join_doc},
    {"statistics", (PyCFunction)pool_statistics, METH_NOARGS, pool_statistics_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(pool_doc,
"BlockPool(slot_size, reserve_bytes=64 MiB)\n\n"
"Memory for blocks of up to *slot_size* bytes, in pre-faulted 2 MiB arenas. Up to *reserve_bytes* of empty arenas stay mapped, so\n"
"a cache that evicts and refills reuses memory without page faults.");

static PyType_Slot pool_slots[] = {
    {Py_tp_new, pool_new},
    {Py_tp_dealloc, pool_dealloc},
    {Py_tp_traverse, pool_traverse},
    {Py_tp_methods, pool_methods},
    {Py_tp_getset, pool_getset},
    {Py_tp_doc, (void *)pool_doc},
    {0, NULL},
};

static PyType_Spec pool_spec = {
    .name = "fusecache._native.BlockPool",
    .basicsize = sizeof(PoolObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = pool_slots,
};

/* ---- module ---------------------------------------------------------- */

static int
native_exec(PyObject *module)
{
    module_state *st = PyModule_GetState(module);
    st->block_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &block_spec, NULL);
    if (st->block_type == NULL)
        return -1;
    st->pool_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &pool_spec, NULL);
    if (st->pool_type == NULL)
        return -1;
    if (PyModule_AddType(module, st->block_type) < 0 ||
        PyModule_AddType(module, st->pool_type) < 0)
        return -1;
    return 0;
}

static int
native_traverse(PyObject *module, visitproc visit, void *arg)
{
    module_state *st = PyModule_GetState(module);
    Py_VISIT(st->block_type);
    Py_VISIT(st->pool_type);
    return 0;
}

static int
native_clear(PyObject *module)
{
    module_state *st = PyModule_GetState(module);
    Py_CLEAR(st->block_type);
    Py_CLEAR(st->pool_type);
    return 0;
}

static PyModuleDef_Slot native_module_slots[] = {
    {Py_mod_exec, native_exec},
    {0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fusecache._native",
    .m_doc = "Block memory and block copies for fusecache's read path (see native/README.md).",
    .m_size = sizeof(module_state),
    .m_slots = native_module_slots,
    .m_traverse = native_traverse,
    .m_clear = native_clear,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    return PyModuleDef_Init(&native_module);
}
