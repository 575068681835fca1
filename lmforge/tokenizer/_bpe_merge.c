/* The incremental BPE merge loop of the C extension `_bpe_c` (the module itself is in _bpe_c.c).
 *
 * The same algorithm as train.py's train_merges_incremental, which the tests compare it with: pair
 * counts are updated only for the words that contain the merged pair (a pair -> words index), and the
 * best pair comes from a binary heap with lazy deletion (an entry whose count is stale is re-pushed at
 * the current count; counts of existing pairs only go down, new pairs are pushed when created). Ties
 * go to the greater (bytes(a), bytes(b)).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


typedef struct { int32_t a, b; int64_t count; int32_t *words; int32_t nwords, capwords; int32_t pushed_at; } Pair;
typedef struct { int64_t count; int32_t pair; } HeapEntry;

typedef struct {
    Pair *pairs; int32_t npairs, cappairs;
    int64_t *keys; int32_t *vals; size_t mapcap, mapused;  /* (a,b) -> pair index, open addressing */
    HeapEntry *heap; size_t nheap, capheap;
    uint8_t **tok; int32_t *toklen;                           /* bytes of every token */
} Merger;

static uint64_t mix64(uint64_t x) { x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33; return x; }

static int map_grow(Merger *m) {
    size_t ncap = m->mapcap ? m->mapcap * 2 : 1 << 16;
    int64_t *nk = malloc(ncap * sizeof(int64_t));
    int32_t *nv = malloc(ncap * sizeof(int32_t));
    if (!nk || !nv) { free(nk); free(nv); return -1; }
    for (size_t i = 0; i < ncap; i++) nk[i] = -1;
    for (size_t i = 0; i < m->mapcap; i++) {
        if (m->keys[i] < 0) continue;
        size_t j = mix64((uint64_t)m->keys[i]) & (ncap - 1);
        while (nk[j] >= 0) j = (j + 1) & (ncap - 1);
        nk[j] = m->keys[i]; nv[j] = m->vals[i];
    }
    free(m->keys); free(m->vals);
    m->keys = nk; m->vals = nv; m->mapcap = ncap;
    return 0;
}

/* Index of pair (a, b), created with count 0 if new; -1 on out of memory. */
static int32_t pair_get(Merger *m, int32_t a, int32_t b) {
    if ((m->mapused + 1) * 2 > m->mapcap && map_grow(m) < 0) return -1;
    int64_t key = ((int64_t)a << 32) | (uint32_t)b;
    size_t j = mix64((uint64_t)key) & (m->mapcap - 1);
    while (m->keys[j] >= 0) {
        if (m->keys[j] == key) return m->vals[j];
        j = (j + 1) & (m->mapcap - 1);
    }
    if (m->npairs == m->cappairs) {
        int32_t nc = m->cappairs ? m->cappairs * 2 : 1 << 16;
        Pair *np = realloc(m->pairs, (size_t)nc * sizeof(Pair));
        if (!np) return -1;
        m->pairs = np; m->cappairs = nc;
    }
    Pair *p = &m->pairs[m->npairs];
    p->a = a; p->b = b; p->count = 0; p->words = NULL; p->nwords = p->capwords = 0; p->pushed_at = -1;
    m->keys[j] = key; m->vals[j] = m->npairs; m->mapused++;
    return m->npairs++;
}

static int pair_add_word(Pair *p, int32_t w) {
    if (p->nwords && p->words[p->nwords - 1] == w) return 0;
    if (p->nwords == p->capwords) {
        int32_t nc = p->capwords ? p->capwords * 2 : 4;
        int32_t *nw = realloc(p->words, (size_t)nc * sizeof(int32_t));
        if (!nw) return -1;
        p->words = nw; p->capwords = nc;
    }
    p->words[p->nwords++] = w;
    return 0;
}

static int bytes_cmp(const uint8_t *x, int32_t nx, const uint8_t *y, int32_t ny) {
    int c = memcmp(x, y, (size_t)(nx < ny ? nx : ny));
    if (c) return c;
    return (nx > ny) - (nx < ny);
}

/* 1 if heap entry x should come out before y: higher count, then the greater (bytes(a), bytes(b)). */
static int before(Merger *m, HeapEntry *x, HeapEntry *y) {
    if (x->count != y->count) return x->count > y->count;
    Pair *p = &m->pairs[x->pair], *q = &m->pairs[y->pair];
    int c = bytes_cmp(m->tok[p->a], m->toklen[p->a], m->tok[q->a], m->toklen[q->a]);
    if (!c) c = bytes_cmp(m->tok[p->b], m->toklen[p->b], m->tok[q->b], m->toklen[q->b]);
    return c > 0;
}

static int heap_push(Merger *m, int64_t count, int32_t pair) {
    if (m->nheap == m->capheap) {
        size_t nc = m->capheap ? m->capheap * 2 : 1 << 16;
        HeapEntry *nh = realloc(m->heap, nc * sizeof(HeapEntry));
        if (!nh) return -1;
        m->heap = nh; m->capheap = nc;
    }
    size_t i = m->nheap++;
    m->heap[i].count = count; m->heap[i].pair = pair;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(m, &m->heap[i], &m->heap[parent])) break;
        HeapEntry tmp = m->heap[i]; m->heap[i] = m->heap[parent]; m->heap[parent] = tmp;
        i = parent;
    }
    return 0;
}

static void heap_pop(Merger *m) {
    m->heap[0] = m->heap[--m->nheap];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, best = i;
        if (l < m->nheap && before(m, &m->heap[l], &m->heap[best])) best = l;
        if (r < m->nheap && before(m, &m->heap[r], &m->heap[best])) best = r;
        if (best == i) break;
        HeapEntry tmp = m->heap[i]; m->heap[i] = m->heap[best]; m->heap[best] = tmp;
        i = best;
    }
}

/* train(words: list[bytes], counts: list[int], n_merges, progress or None) -> list[(a, b)].
 * Token ids: 0..255 are the bytes, merge k creates id 256 + k. */
PyObject *lmforge_bpe_train(PyObject *self, PyObject *args) {
    PyObject *words_obj, *counts_obj, *progress;
    Py_ssize_t n_merges;
    if (!PyArg_ParseTuple(args, "O!O!nO", &PyList_Type, &words_obj, &PyList_Type, &counts_obj, &n_merges, &progress))
        return NULL;
    Py_ssize_t nw = PyList_GET_SIZE(words_obj);
    if (PyList_GET_SIZE(counts_obj) != nw) { PyErr_SetString(PyExc_ValueError, "words and counts differ in length"); return NULL; }

    PyObject *result = NULL;
    Merger m; memset(&m, 0, sizeof(m));
    int64_t *cnt = malloc((size_t)(nw ? nw : 1) * sizeof(int64_t));
    int64_t *start = malloc((size_t)(nw + 1) * sizeof(int64_t));
    int32_t *len = malloc((size_t)(nw ? nw : 1) * sizeof(int32_t));
    int32_t *ids = NULL, *touched = NULL;
    size_t ntouched = 0, captouched = 0;
    Py_ssize_t ntok = 256 + n_merges;
    m.tok = calloc((size_t)ntok, sizeof(uint8_t *));
    m.toklen = calloc((size_t)ntok, sizeof(int32_t));
    if (!cnt || !start || !len || !m.tok || !m.toklen) { PyErr_NoMemory(); goto done; }
    int64_t total = 0;
    for (Py_ssize_t w = 0; w < nw; w++) {
        PyObject *o = PyList_GET_ITEM(words_obj, w);
        if (!PyBytes_Check(o)) { PyErr_SetString(PyExc_TypeError, "words must be bytes"); goto done; }
        start[w] = total; total += PyBytes_GET_SIZE(o); len[w] = (int32_t)PyBytes_GET_SIZE(o);
        cnt[w] = PyLong_AsLongLong(PyList_GET_ITEM(counts_obj, w));
        if (cnt[w] == -1 && PyErr_Occurred()) goto done;
    }
    start[nw] = total;
    ids = malloc((size_t)(total ? total : 1) * sizeof(int32_t));
    if (!ids) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t w = 0; w < nw; w++) {
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(PyList_GET_ITEM(words_obj, w));
        for (int32_t k = 0; k < len[w]; k++) ids[start[w] + k] = p[k];
    }
    for (int i = 0; i < 256; i++) {
        m.tok[i] = malloc(1); if (!m.tok[i]) { PyErr_NoMemory(); goto done; }
        m.tok[i][0] = (uint8_t)i; m.toklen[i] = 1;
    }
    for (Py_ssize_t w = 0; w < nw; w++) {
        int32_t *x = ids + start[w];
        for (int32_t k = 0; k + 1 < len[w]; k++) {
            int32_t pi = pair_get(&m, x[k], x[k + 1]);
            if (pi < 0 || pair_add_word(&m.pairs[pi], (int32_t)w) < 0) { PyErr_NoMemory(); goto done; }
            m.pairs[pi].count += cnt[w];
        }
    }
    for (int32_t pi = 0; pi < m.npairs; pi++)
        if (m.pairs[pi].count > 0 && heap_push(&m, m.pairs[pi].count, pi) < 0) { PyErr_NoMemory(); goto done; }

    result = PyList_New(0);
    if (!result) goto done;
    for (Py_ssize_t step = 0; step < n_merges; step++) {
        int32_t best = -1;
        while (m.nheap) {
            HeapEntry top = m.heap[0];
            Pair *p = &m.pairs[top.pair];
            if (p->count == top.count) { best = top.pair; heap_pop(&m); break; }
            heap_pop(&m);
            /* stale: counts of existing pairs only go down, so re-queue at the current count */
            if (p->count > 0 && heap_push(&m, p->count, top.pair) < 0) { PyErr_NoMemory(); goto fail; }
        }
        if (best < 0) break;  /* no pairs left: every word is a single token */
        int32_t a = m.pairs[best].a, b = m.pairs[best].b, nid = (int32_t)(256 + step);
        m.toklen[nid] = m.toklen[a] + m.toklen[b];
        m.tok[nid] = malloc((size_t)m.toklen[nid]);
        if (!m.tok[nid]) { PyErr_NoMemory(); goto fail; }
        memcpy(m.tok[nid], m.tok[a], (size_t)m.toklen[a]);
        memcpy(m.tok[nid] + m.toklen[a], m.tok[b], (size_t)m.toklen[b]);
        PyObject *item = Py_BuildValue("(ii)", a, b);
        if (!item || PyList_Append(result, item) < 0) { Py_XDECREF(item); goto fail; }
        Py_DECREF(item);

        /* words can be appended to other pairs' lists below, never to this one's (new pairs all
           contain nid), so iterating it by index is safe even if its buffer is not reallocated */
        ntouched = 0;
        for (int32_t wi = 0; wi < m.pairs[best].nwords; wi++) {
            int32_t w = m.pairs[best].words[wi];
            int32_t *x = ids + start[w], n = len[w], k;
            for (k = 0; k + 1 < n; k++) if (x[k] == a && x[k + 1] == b) break;
            if (k + 1 >= n) continue;  /* stale entry: the pair left this word in an earlier merge */
            for (k = 0; k + 1 < n; k++) m.pairs[pair_get(&m, x[k], x[k + 1])].count -= cnt[w];
            int32_t out = 0;
            for (k = 0; k < n; k++) {
                if (k + 1 < n && x[k] == a && x[k + 1] == b) { x[out++] = nid; k++; }
                else x[out++] = x[k];
            }
            len[w] = n = out;
            for (k = 0; k + 1 < n; k++) {
                int32_t pi = pair_get(&m, x[k], x[k + 1]);
                if (pi < 0) { PyErr_NoMemory(); goto fail; }
                Pair *p = &m.pairs[pi];
                p->count += cnt[w];
                if ((x[k] == nid || x[k + 1] == nid)) {
                    if (pair_add_word(p, w) < 0) { PyErr_NoMemory(); goto fail; }
                    if (p->pushed_at != nid) {
                        p->pushed_at = nid;
                        if (ntouched == captouched) {
                            size_t nc = captouched ? captouched * 2 : 1024;
                            int32_t *nt = realloc(touched, nc * sizeof(int32_t));
                            if (!nt) { PyErr_NoMemory(); goto fail; }
                            touched = nt; captouched = nc;
                        }
                        touched[ntouched++] = pi;
                    }
                }
            }
        }
        m.pairs[best].count = 0;
        for (size_t t = 0; t < ntouched; t++) {
            Pair *p = &m.pairs[touched[t]];
            if (p->count > 0 && heap_push(&m, p->count, touched[t]) < 0) { PyErr_NoMemory(); goto fail; }
        }
        if (progress != Py_None && (step + 1) % 256 == 0) {
            PyObject *r = PyObject_CallFunction(progress, "n", (Py_ssize_t)256);
            if (!r) goto fail;
            Py_DECREF(r);
        }
    }
    goto done;
fail:
    Py_CLEAR(result);
done:
    for (int32_t pi = 0; pi < m.npairs; pi++) free(m.pairs[pi].words);
    free(m.pairs); free(m.keys); free(m.vals); free(m.heap);
    if (m.tok) for (Py_ssize_t i = 0; i < ntok; i++) free(m.tok[i]);
    free(m.tok); free(m.toklen); free(cnt); free(start); free(len); free(ids); free(touched);
    return result;
}

