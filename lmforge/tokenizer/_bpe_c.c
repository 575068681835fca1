/* C extension `_bpe_c`: fast paths for byte-level BPE.
 *
 * This file: word splitting and counting with the GPT-2 / GPT-4 pretokenization patterns (exact
 * re-implementations of regex findall, tested equal to it), and the encoder's word -> ids cache loop
 * (the BPE of a new word stays in Python). _bpe_merge.c: the incremental merge loop. Unicode classes
 * (\p{L}, \p{N}, \s) come from a table that Python builds with the `regex` module itself, so both
 * paths see the same Unicode version.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CLS_L 1
#define CLS_N 2
#define CLS_S 4
#define N_CODEPOINTS 0x110000

static uint8_t *g_cls = NULL;     /* class bits per code point */
static Py_UCS4 g_fold[64][2];     /* (code point, ascii letter it case-folds to) for GPT-4 contractions */
static int g_nfold = 0;

/* ------------------------------------------------------------------ word counter */

typedef struct {
    uint64_t hash;
    uint64_t off;    /* offset of the word's bytes in the arena */
    uint32_t len;
    int64_t count;   /* 0 = empty slot */
} WordSlot;

typedef struct {
    WordSlot *slots;
    size_t cap, used;
    char *arena;
    size_t arena_len, arena_cap;
} WordTable;

static uint64_t hash_bytes(const char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;  /* FNV-1a, then a final mix */
    for (size_t i = 0; i < n; i++) { h ^= (uint8_t)p[i]; h *= 1099511628211ULL; }
    h ^= h >> 33; h *= 0xff51afd7ed558ccdULL; h ^= h >> 33;
    return h;
}

static int table_grow(WordTable *t) {
    size_t ncap = t->cap ? t->cap * 2 : 1 << 16;
    WordSlot *ns = calloc(ncap, sizeof(WordSlot));
    if (!ns) return -1;
    for (size_t i = 0; i < t->cap; i++) {
        WordSlot *s = &t->slots[i];
        if (!s->count) continue;
        size_t j = s->hash & (ncap - 1);
        while (ns[j].count) j = (j + 1) & (ncap - 1);
        ns[j] = *s;
    }
    free(t->slots);
    t->slots = ns;
    t->cap = ncap;
    return 0;
}

static int table_add(WordTable *t, const char *p, size_t n) {
    if ((t->used + 1) * 2 > t->cap && table_grow(t) < 0) return -1;
    uint64_t h = hash_bytes(p, n);
    size_t j = h & (t->cap - 1);
    while (t->slots[j].count) {
        WordSlot *s = &t->slots[j];
        if (s->hash == h && s->len == n && memcmp(t->arena + s->off, p, n) == 0) { s->count++; return 0; }
        j = (j + 1) & (t->cap - 1);
    }
    if (t->arena_len + n > t->arena_cap) {
        size_t ncap = t->arena_cap ? t->arena_cap * 2 : 1 << 20;
        while (ncap < t->arena_len + n) ncap *= 2;
        char *na = realloc(t->arena, ncap);
        if (!na) return -1;
        t->arena = na;
        t->arena_cap = ncap;
    }
    memcpy(t->arena + t->arena_len, p, n);
    t->slots[j].hash = h; t->slots[j].off = t->arena_len; t->slots[j].len = (uint32_t)n; t->slots[j].count = 1;
    t->arena_len += n;
    t->used++;
    return 0;
}

static inline int cls(Py_UCS4 c) { return c < N_CODEPOINTS ? g_cls[c] : 0; }
static inline int is_other(Py_UCS4 c) { return !(cls(c) & (CLS_L | CLS_N | CLS_S)); }
static inline int is_crlf(Py_UCS4 c) { return c == '\r' || c == '\n'; }

static Py_UCS4 fold(Py_UCS4 c) {
    if (c < 128) return (c >= 'A' && c <= 'Z') ? c + 32 : c;
    for (int i = 0; i < g_nfold; i++) if (g_fold[i][0] == c) return g_fold[i][1];
    return c;
}

/* End of the whitespace alternatives `\s+(?!\S)|\s+` for a whitespace run starting at i. */
static Py_ssize_t ws_end(const Py_UCS4 *s, Py_ssize_t i, Py_ssize_t n) {
    Py_ssize_t j = i;
    while (j < n && (cls(s[j]) & CLS_S)) j++;
    if (j == n) return n;
    if (j - 1 > i) return j - 1;
    return j;
}

/* One GPT-2 pattern match starting at i; returns its end. */
static Py_ssize_t match_gpt2(const Py_UCS4 *s, Py_ssize_t i, Py_ssize_t n) {
    Py_UCS4 c = s[i];
    if (c == '\'' && i + 1 < n) {
        Py_UCS4 d = s[i + 1];
        if (d == 's' || d == 't' || d == 'm' || d == 'd') return i + 2;
        if (i + 2 < n && ((d == 'r' && s[i + 2] == 'e') || (d == 'v' && s[i + 2] == 'e') ||
                          (d == 'l' && s[i + 2] == 'l'))) return i + 3;
    }
    Py_ssize_t st = (c == ' ') ? i + 1 : i;
    if (st < n) {
        int k = cls(s[st]);
        Py_ssize_t j = st;
        if (k & CLS_L) { while (j < n && (cls(s[j]) & CLS_L)) j++; return j; }
        if (k & CLS_N) { while (j < n && (cls(s[j]) & CLS_N)) j++; return j; }
        if (is_other(s[st])) { while (j < n && is_other(s[j])) j++; return j; }
    }
    if (cls(c) & CLS_S) return ws_end(s, i, n);
    return i + 1;  /* unreachable: every character is L, N, S or other */
}

/* One GPT-4 (cl100k) pattern match starting at i; returns its end. */
static Py_ssize_t match_gpt4(const Py_UCS4 *s, Py_ssize_t i, Py_ssize_t n) {
    Py_UCS4 c = s[i];
    if (c == '\'' && i + 1 < n) {
        Py_UCS4 d = fold(s[i + 1]);
        if (d == 's' || d == 'd' || d == 'm' || d == 't') return i + 2;
        if (i + 2 < n) {
            Py_UCS4 e = fold(s[i + 2]);
            if ((d == 'l' && e == 'l') || (d == 'v' && e == 'e') || (d == 'r' && e == 'e')) return i + 3;
        }
    }
    int k = cls(c);
    /* [^\r\n\p{L}\p{N}]?+\p{L}+ */
    if (k & CLS_L) { Py_ssize_t j = i; while (j < n && (cls(s[j]) & CLS_L)) j++; return j; }
    if (!is_crlf(c) && !(k & CLS_N) && i + 1 < n && (cls(s[i + 1]) & CLS_L)) {
        Py_ssize_t j = i + 1; while (j < n && (cls(s[j]) & CLS_L)) j++; return j;
    }
    /* \p{N}{1,3} */
    if (k & CLS_N) { Py_ssize_t j = i; while (j < n && j < i + 3 && (cls(s[j]) & CLS_N)) j++; return j; }
    /*  ?[^\s\p{L}\p{N}]++[\r\n]* */
    Py_ssize_t st = (c == ' ' && i + 1 < n && is_other(s[i + 1])) ? i + 1 : i;
    if (is_other(s[st])) {
        Py_ssize_t j = st;
        while (j < n && is_other(s[j])) j++;
        while (j < n && is_crlf(s[j])) j++;
        return j;
    }
    if (k & CLS_S) {
        /* \s*[\r\n]: up to the last CR/LF of the whitespace run */
        Py_ssize_t j = i, last = -1;
        while (j < n && (cls(s[j]) & CLS_S)) { if (is_crlf(s[j])) last = j; j++; }
        if (last >= 0) return last + 1;
        return ws_end(s, i, n);
    }
    return i + 1;  /* unreachable */
}

static void table_free(PyObject *capsule) {
    WordTable *t = PyCapsule_GetPointer(capsule, "lmforge.WordTable");
    if (!t) return;
    free(t->slots); free(t->arena); free(t);
}

static PyObject *py_set_tables(PyObject *self, PyObject *args) {
    Py_buffer buf;
    PyObject *folds;
    if (!PyArg_ParseTuple(args, "y*O", &buf, &folds)) return NULL;
    if (buf.len != N_CODEPOINTS) { PyBuffer_Release(&buf); PyErr_SetString(PyExc_ValueError, "class table size"); return NULL; }
    if (!g_cls) g_cls = malloc(N_CODEPOINTS);
    if (!g_cls) { PyBuffer_Release(&buf); return PyErr_NoMemory(); }
    memcpy(g_cls, buf.buf, N_CODEPOINTS);
    PyBuffer_Release(&buf);
    g_nfold = 0;
    Py_ssize_t nf = PyList_Size(folds);
    for (Py_ssize_t i = 0; i < nf && g_nfold < 64; i++) {
        unsigned long cp, to;
        if (!PyArg_ParseTuple(PyList_GetItem(folds, i), "kk", &cp, &to)) return NULL;
        g_fold[g_nfold][0] = (Py_UCS4)cp; g_fold[g_nfold][1] = (Py_UCS4)to; g_nfold++;
    }
    Py_RETURN_NONE;
}

static PyObject *py_table_new(PyObject *self, PyObject *noargs) {
    WordTable *t = calloc(1, sizeof(WordTable));
    if (!t) return PyErr_NoMemory();
    return PyCapsule_New(t, "lmforge.WordTable", table_free);
}

static inline int utf8_len(Py_UCS4 c) { return c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4; }

/* count(table, pattern_id, text): split text into words and count their UTF-8 bytes in table. */
static PyObject *py_count(PyObject *self, PyObject *args) {
    PyObject *cap, *text;
    int pid;
    if (!PyArg_ParseTuple(args, "OiU", &cap, &pid, &text)) return NULL;
    WordTable *t = PyCapsule_GetPointer(cap, "lmforge.WordTable");
    if (!t) return NULL;
    if (!g_cls) { PyErr_SetString(PyExc_RuntimeError, "set_tables not called"); return NULL; }
    Py_ssize_t n = PyUnicode_GetLength(text), blen;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &blen);  /* fails on lone surrogates */
    if (!utf8) return NULL;
    Py_UCS4 *s = PyUnicode_AsUCS4Copy(text);
    if (!s) return NULL;
    Py_ssize_t i = 0, b = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    while (i < n) {
        Py_ssize_t j = pid == 2 ? match_gpt4(s, i, n) : match_gpt2(s, i, n);
        Py_ssize_t bj = b;
        for (Py_ssize_t k = i; k < j; k++) bj += utf8_len(s[k]);
        if (table_add(t, utf8 + b, (size_t)(bj - b)) < 0) { err = 1; break; }
        i = j; b = bj;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(s);
    if (err) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* split(pattern_id, text) -> list[str]: the words of text (what regex findall returns). */
static PyObject *py_split(PyObject *self, PyObject *args) {
    PyObject *text;
    int pid;
    if (!PyArg_ParseTuple(args, "iU", &pid, &text)) return NULL;
    if (!g_cls) { PyErr_SetString(PyExc_RuntimeError, "set_tables not called"); return NULL; }
    Py_ssize_t n = PyUnicode_GetLength(text);
    Py_UCS4 *s = PyUnicode_AsUCS4Copy(text);
    if (!s) return NULL;
    PyObject *out = PyList_New(0);
    Py_ssize_t i = 0;
    while (out && i < n) {
        Py_ssize_t j = pid == 2 ? match_gpt4(s, i, n) : match_gpt2(s, i, n);
        PyObject *w = PyUnicode_Substring(text, i, j);
        if (!w || PyList_Append(out, w) < 0) { Py_XDECREF(w); Py_CLEAR(out); break; }
        Py_DECREF(w);
        i = j;
    }
    PyMem_Free(s);
    return out;
}

/* encode(pattern_id, text, cache, encode_word, limit) -> list[int]: split text into words and
 * concatenate each word's ids from `cache` (str -> list[int]); a miss calls encode_word(word) and
 * stores the result (the cache is cleared when it reaches `limit` entries). */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    PyObject *text, *cache, *fn;
    int pid;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "iUO!On", &pid, &text, &PyDict_Type, &cache, &fn, &limit)) return NULL;
    if (!g_cls) { PyErr_SetString(PyExc_RuntimeError, "set_tables not called"); return NULL; }
    Py_ssize_t n = PyUnicode_GetLength(text);
    Py_UCS4 *s = PyUnicode_AsUCS4Copy(text);
    if (!s) return NULL;
    PyObject *out = PyList_New(0);
    Py_ssize_t i = 0;
    while (out && i < n) {
        Py_ssize_t j = pid == 2 ? match_gpt4(s, i, n) : match_gpt2(s, i, n);
        PyObject *w = PyUnicode_Substring(text, i, j);
        if (!w) { Py_CLEAR(out); break; }
        PyObject *ids = PyDict_GetItemWithError(cache, w);  /* borrowed */
        if (ids) Py_INCREF(ids);
        else if (!PyErr_Occurred()) {
            ids = PyObject_CallOneArg(fn, w);
            if (ids && PyDict_GET_SIZE(cache) >= limit) PyDict_Clear(cache);
            if (ids && PyDict_SetItem(cache, w, ids) < 0) Py_CLEAR(ids);
        }
        Py_DECREF(w);
        if (!ids || !PyList_Check(ids)) {
            if (ids) PyErr_SetString(PyExc_TypeError, "encode_word must return a list");
            Py_XDECREF(ids); Py_CLEAR(out); break;
        }
        Py_ssize_t m = PyList_GET_SIZE(out);
        int rc = PyList_SetSlice(out, m, m, ids);
        Py_DECREF(ids);
        if (rc < 0) { Py_CLEAR(out); break; }
        i = j;
    }
    PyMem_Free(s);
    return out;
}

/* items(table, dict): add every word count in the table to a Python dict {bytes: int}. */
static PyObject *py_items(PyObject *self, PyObject *args) {
    PyObject *cap, *dict;
    if (!PyArg_ParseTuple(args, "OO!", &cap, &PyDict_Type, &dict)) return NULL;
    WordTable *t = PyCapsule_GetPointer(cap, "lmforge.WordTable");
    if (!t) return NULL;
    for (size_t i = 0; i < t->cap; i++) {
        WordSlot *s = &t->slots[i];
        if (!s->count) continue;
        PyObject *key = PyBytes_FromStringAndSize(t->arena + s->off, s->len);
        if (!key) return NULL;
        PyObject *old = PyDict_GetItemWithError(dict, key);
        if (!old && PyErr_Occurred()) { Py_DECREF(key); return NULL; }
        long long v = s->count + (old ? PyLong_AsLongLong(old) : 0);
        PyObject *val = PyLong_FromLongLong(v);
        int rc = val ? PyDict_SetItem(dict, key, val) : -1;
        Py_DECREF(key); Py_XDECREF(val);
        if (rc < 0) return NULL;
    }
    Py_RETURN_NONE;
}

/* in _bpe_merge.c */
PyObject *lmforge_bpe_train(PyObject *self, PyObject *args);

static PyMethodDef methods[] = {
    {"set_tables", py_set_tables, METH_VARARGS, "set_tables(class_table: bytes, folds: list[(cp, ascii)])"},
    {"table_new", py_table_new, METH_NOARGS, "a new empty word table"},
    {"count", py_count, METH_VARARGS, "count(table, pattern_id (1 gpt2, 2 gpt4), text)"},
    {"split", py_split, METH_VARARGS, "split(pattern_id, text) -> list of words"},
    {"encode", py_encode, METH_VARARGS, "encode(pattern_id, text, cache, encode_word, limit) -> ids"},
    {"items", py_items, METH_VARARGS, "items(table, dict): add the table's counts to dict"},
    {"train", lmforge_bpe_train, METH_VARARGS, "train(words, counts, n_merges, progress) -> merges"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bpe_c", "BPE training fast paths", -1, methods};

PyMODINIT_FUNC PyInit__bpe_c(void) { return PyModule_Create(&module); }
