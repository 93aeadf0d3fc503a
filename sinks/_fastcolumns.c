/* The ClickHouse sink's compiled row-block encoding: Arrow buffers built from Python objects.
 *
 * sinks/columnar.py asks text_buffers() for the String columns of a list of key tuples (the
 * int32 offsets and UTF-8 data of each position, what pa.Array.from_buffers takes), and
 * int128_words() for scaled sums as little-endian two's complement 64-bit words. Each answers
 * None where the pure path must do it: a row that is not a tuple of `width` str, a str that
 * UTF-8 cannot hold (a lone surrogate), a column past 2 GiB of text (int32 offsets), a sum that
 * is not an int or does not fit 128 bits. key_order() sorts a row block's keys by the
 * table's ORDER BY (organization_id, external_customer_id, code as UTF-8 bytes, then
 * window_start), stably, and gives their String columns in that order with the order itself,
 * so the batch is built sorted and not sorted again.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* 1 when rows are `width`-tuples of str; their UTF-8 sizes summed per position into sizes. */
static int measure(PyObject *rows, Py_ssize_t width, Py_ssize_t *sizes) {
    Py_ssize_t count = PyList_GET_SIZE(rows);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != width) return 0;
        for (Py_ssize_t j = 0; j < width; j++) {
            PyObject *text = PyTuple_GET_ITEM(row, j);
            Py_ssize_t size;
            if (!PyUnicode_Check(text)) return 0;
            if (PyUnicode_IS_ASCII(text)) {
                size = PyUnicode_GET_LENGTH(text);
            } else if (PyUnicode_AsUTF8AndSize(text, &size) == NULL) {
                PyErr_Clear(); /* a lone surrogate: the pure path replaces it */
                return 0;
            }
            sizes[j] += size;
            if (sizes[j] > INT32_MAX) return 0;
        }
    }
    return 1;
}

PyDoc_STRVAR(text_buffers_doc,
"text_buffers(rows: list, width: int) -> list[tuple[bytes, bytes]] | None\n\n"
"Per position of the rows (tuples of `width` str): the Arrow string column's int32 offsets and\n"
"UTF-8 data; None where the pure path must build them.");

static PyObject *text_buffers(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "text_buffers(rows: list, width: int)");
        return NULL;
    }
    PyObject *rows = args[0];
    Py_ssize_t width = PyLong_AsSsize_t(args[1]);
    if (width == -1 && PyErr_Occurred()) return NULL;
    if (width < 1 || width > 64) Py_RETURN_NONE;
    Py_ssize_t sizes[64] = {0};
    if (!measure(rows, width, sizes)) Py_RETURN_NONE;

    Py_ssize_t count = PyList_GET_SIZE(rows);
    PyObject *result = PyList_New(width);
    if (result == NULL) return NULL;
    int32_t *offsets[64];
    char *data[64];
    for (Py_ssize_t j = 0; j < width; j++) {
        PyObject *offsets_bytes = PyBytes_FromStringAndSize(NULL, (count + 1) * (Py_ssize_t)sizeof(int32_t));
        PyObject *data_bytes = PyBytes_FromStringAndSize(NULL, sizes[j]);
        PyObject *pair = (offsets_bytes && data_bytes) ? PyTuple_Pack(2, offsets_bytes, data_bytes) : NULL;
        Py_XDECREF(offsets_bytes);
        Py_XDECREF(data_bytes);
        if (pair == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyList_SET_ITEM(result, j, pair);
        offsets[j] = (int32_t *)PyBytes_AS_STRING(offsets_bytes);
        data[j] = PyBytes_AS_STRING(data_bytes);
        offsets[j][0] = 0;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        for (Py_ssize_t j = 0; j < width; j++) {
            PyObject *text = PyTuple_GET_ITEM(row, j);
            Py_ssize_t size;
            const char *utf8;
            if (PyUnicode_IS_ASCII(text)) {
                utf8 = (const char *)PyUnicode_DATA(text);
                size = PyUnicode_GET_LENGTH(text);
            } else {
                utf8 = PyUnicode_AsUTF8AndSize(text, &size); /* cached by measure() */
            }
            int32_t end = offsets[j][i];
            memcpy(data[j] + end, utf8, (size_t)size);
            offsets[j][i + 1] = end + (int32_t)size;
        }
    }
    return result;
}

PyDoc_STRVAR(int128_words_doc,
"int128_words(values: list, words: int) -> bytes | None\n\n"
"The ints as rows of `words` (2 or more) little-endian 64-bit words, two's complement; None\n"
"where one is not an int or does not fit 128 bits.");

static PyObject *int128_words(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "int128_words(values: list, words: int)");
        return NULL;
    }
    PyObject *values = args[0];
    Py_ssize_t words = PyLong_AsSsize_t(args[1]);
    if (words == -1 && PyErr_Occurred()) return NULL;
    if (words < 2) Py_RETURN_NONE;
    Py_ssize_t count = PyList_GET_SIZE(values);
    PyObject *result = PyBytes_FromStringAndSize(NULL, count * words * (Py_ssize_t)sizeof(int64_t));
    if (result == NULL) return NULL;
    int64_t *out = (int64_t *)PyBytes_AS_STRING(result);
    for (Py_ssize_t i = 0; i < count; i++, out += words) {
        PyObject *value = PyList_GET_ITEM(values, i);
        if (!PyLong_Check(value)) goto decline;
        int overflow;
        long long small = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (small == -1 && PyErr_Occurred()) goto error;
        if (!overflow) {
            out[0] = small;
            out[1] = small < 0 ? -1 : 0;
        } else {
            unsigned char bytes[16];
            if (_PyLong_AsByteArray((PyLongObject *)value, bytes, 16, 1, 1) < 0) {
                if (!PyErr_ExceptionMatches(PyExc_OverflowError)) goto error;
                PyErr_Clear();
                goto decline; /* beyond 128 bits */
            }
            memcpy(out, bytes, 16);
        }
        for (Py_ssize_t w = 2; w < words; w++) out[w] = out[1] < 0 ? -1 : 0; /* the sign, extended */
    }
    return result;
decline:
    Py_DECREF(result);
    Py_RETURN_NONE;
error:
    Py_DECREF(result);
    return NULL;
}

/* One row's sort key: per key string its UTF-8 (pointer, size) and its first 8 bytes as a
 * big-endian integer, zero-padded (a differing prefix orders two strings as their bytes do;
 * equal prefixes are compared in full), then the row's window start. */
_Static_assert(sizeof(Py_ssize_t) == sizeof(int64_t), "key_order writes row indices as int64");

/* A key string: its UTF-8 bytes and its (cached) str hash. */
typedef struct {
    const char *utf8;
    Py_ssize_t size;
    Py_hash_t hash;
} Text;

/* <0, 0, >0 as text a's UTF-8 bytes sort before, with, after b's. */
static int compare_texts(const Text *a, const Text *b) {
    int order = memcmp(a->utf8, b->utf8, (size_t)(a->size < b->size ? a->size : b->size));
    if (order != 0) return order;
    return (a->size > b->size) - (a->size < b->size);
}

typedef struct {
    const Text *text;
    Py_ssize_t id;
    uint64_t prefix; /* see sort_distinct */
} Distinct;

static int compare_distinct(const void *a, const void *b) {
    return compare_texts(((const Distinct *)a)->text, ((const Distinct *)b)->text);
}

static int compare_prefixed(const void *a, const void *b) {
    uint64_t x = ((const Distinct *)a)->prefix, y = ((const Distinct *)b)->prefix;
    return x != y ? (x > y) - (x < y) : compare_distinct(a, b);
}

#define RADIX_FROM 4096 /* fewer distinct values: one qsort by prefix, then bytes */

#define PREFIX_DIGIT_BITS 16

/* The distinct values (found of them) in the order of their UTF-8 bytes. The bytes they all
 * share at the start are skipped; the next 8 (zero-padded) are each value's prefix, a
 * big-endian integer: values whose prefixes differ are ordered as their prefixes, with no
 * pointer followed, by a stable radix sort (``spare``: room for found more); only runs of
 * equal prefixes are then compared byte by byte (a shorter value zero-padded ties with a
 * longer one, so it is compared too). A batch's customer ids (``cus_001_0042``, uuids) mostly
 * differ within those 8 bytes: a qsort of 50k of them by memcmp cost ~4x more. */
static void sort_distinct(Distinct *distinct, Distinct *spare, Py_ssize_t found) {
    if (found < 2) return;
    Py_ssize_t shared = distinct[0].text->size;
    for (Py_ssize_t i = 1; i < found && shared; i++) {
        const Text *text = distinct[i].text;
        Py_ssize_t n = text->size < shared ? text->size : shared, k = 0;
        while (k < n && text->utf8[k] == distinct[0].text->utf8[k]) k++;
        shared = k;
    }
    for (Py_ssize_t i = 0; i < found; i++) {
        const Text *text = distinct[i].text;
        uint64_t prefix = 0;
        for (Py_ssize_t k = 0; k < 8; k++) {
            Py_ssize_t at = shared + k;
            prefix = (prefix << 8) | (at < text->size ? (unsigned char)text->utf8[at] : 0);
        }
        distinct[i].prefix = prefix;
    }
    if (found < RADIX_FROM) {
        qsort(distinct, (size_t)found, sizeof(Distinct), compare_prefixed);
        return;
    }
    static Py_ssize_t starts[1 << PREFIX_DIGIT_BITS]; /* under the GIL */
    Distinct *from = distinct, *to = spare;
    for (int shift = 0; shift < 64; shift += PREFIX_DIGIT_BITS) {
        memset(starts, 0, sizeof(starts));
        for (Py_ssize_t i = 0; i < found; i++) starts[(from[i].prefix >> shift) & 0xFFFF]++;
        Py_ssize_t at = 0;
        for (int digit = 0; digit < (1 << PREFIX_DIGIT_BITS); digit++) {
            Py_ssize_t many = starts[digit];
            starts[digit] = at;
            at += many;
        }
        for (Py_ssize_t i = 0; i < found; i++) to[starts[(from[i].prefix >> shift) & 0xFFFF]++] = from[i];
        Distinct *swap = from;
        from = to;
        to = swap;
    } /* 4 passes: the result is back in distinct */
    for (Py_ssize_t first = 0; first < found;) {
        Py_ssize_t end = first + 1;
        while (end < found && distinct[end].prefix == distinct[first].prefix) end++;
        if (end - first > 1)
            qsort(distinct + first, (size_t)(end - first), sizeof(Distinct), compare_distinct);
        first = end;
    }
}

/* The row's key strings into texts[0:3); 0 where it is not a 3-tuple of str (not a subclass)
 * that UTF-8 holds. */
static int read_key(PyObject *row, Text *texts) {
    if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 3) return 0;
    for (int j = 0; j < 3; j++) {
        PyObject *text = PyTuple_GET_ITEM(row, j);
        if (!PyUnicode_CheckExact(text)) return 0; /* a subclass may hash otherwise */
        if (PyUnicode_IS_ASCII(text)) {
            texts[j].utf8 = (const char *)PyUnicode_DATA(text);
            texts[j].size = PyUnicode_GET_LENGTH(text);
        } else if ((texts[j].utf8 = PyUnicode_AsUTF8AndSize(text, &texts[j].size)) == NULL) {
            PyErr_Clear(); /* a lone surrogate: the pure path replaces it, then sorts */
            return 0;
        }
        texts[j].hash = PyObject_Hash(text); /* a str's is cached, and cannot fail */
    }
    return 1;
}

typedef struct {
    Py_hash_t hash;
    Py_ssize_t id; /* a distinct value's, + 1; 0: an empty slot */
} Slot;

/* slots (capacity of them, a power of 2) with each of the found distinct values in place. */
static void place_distinct(Slot *slots, Py_ssize_t capacity, const Distinct *distinct, Py_ssize_t found) {
    for (Py_ssize_t id = 0; id < found; id++) {
        size_t slot = (size_t)distinct[id].text->hash & (size_t)(capacity - 1);
        while (slots[slot].id != 0) slot = (slot + 1) & (size_t)(capacity - 1);
        slots[slot] = (Slot){distinct[id].text->hash, id + 1};
    }
}

/* A row to sort: its key (the ranks folded), its index, its key strings' ranks. */
typedef struct {
    uint64_t key;
    int32_t row;
    int32_t rank[3];
} Keyed;

/* Each row's rank (into its rank[j]) among the distinct values of key position j (texts: 3 a row),
 * by their UTF-8 bytes, and those values in that order (into distinct, room for count); the
 * number of them, or -1 out of memory. The values are found distinct by a hash table on their
 * str hashes (kept at about twice their number, to stay in cache), and only those are sorted. */
static Py_ssize_t rank_texts(const Text *texts, int j, Py_ssize_t count, Keyed *keyed, Distinct *distinct) {
    Py_ssize_t capacity = 64;
    Slot *slots = PyMem_Calloc((size_t)capacity, sizeof(Slot));
    Py_ssize_t found = -1;
    if (slots == NULL) goto done;
    found = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        const Text *text = &texts[3 * i + j];
        size_t slot = (size_t)text->hash & (size_t)(capacity - 1);
        for (;; slot = (slot + 1) & (size_t)(capacity - 1)) {
            if (slots[slot].id == 0) {
                distinct[found] = (Distinct){text, found, 0};
                slots[slot] = (Slot){text->hash, ++found};
                break;
            }
            if (slots[slot].hash != text->hash) continue;
            const Text *seen = distinct[slots[slot].id - 1].text;
            if (seen->size == text->size
                && (seen->utf8 == text->utf8 || memcmp(seen->utf8, text->utf8, (size_t)text->size) == 0)) break;
        }
        keyed[i].rank[j] = (int32_t)(slots[slot].id - 1); /* the distinct id, for now */
        if (2 * found > capacity) {
            PyMem_Free(slots);
            capacity *= 4;
            if ((slots = PyMem_Calloc((size_t)capacity, sizeof(Slot))) == NULL) {
                found = -1;
                goto done;
            }
            place_distinct(slots, capacity, distinct, found);
        }
    }
    Distinct *spare = PyMem_Malloc((size_t)(found ? found : 1) * sizeof(Distinct));
    if (spare == NULL) {
        found = -1;
        goto done;
    }
    sort_distinct(distinct, spare, found);
    PyMem_Free(spare);
    int32_t *rank_of = (int32_t *)slots; /* the table is done with; capacity > found */
    for (Py_ssize_t rank = 0; rank < found; rank++) rank_of[distinct[rank].id] = (int32_t)rank;
    for (Py_ssize_t i = 0; i < count; i++) keyed[i].rank[j] = rank_of[keyed[i].rank[j]];
done:
    PyMem_Free(slots);
    return found;
}


#define DIGIT_BITS 13
#define DIGITS (1 << DIGIT_BITS)

/* Stable LSD radix sort of rows by key (below 2**bits), 13 bits a pass; the result in *rows. */
static void radix_sort(Keyed **rows, Keyed **spare, Py_ssize_t count, int bits) {
    static Py_ssize_t starts[DIGITS]; /* under the GIL */
    for (int shift = 0; shift < bits; shift += DIGIT_BITS) {
        memset(starts, 0, sizeof(starts));
        for (Py_ssize_t i = 0; i < count; i++) starts[((*rows)[i].key >> shift) & (DIGITS - 1)]++;
        Py_ssize_t at = 0;
        for (int digit = 0; digit < DIGITS; digit++) {
            Py_ssize_t many = starts[digit];
            starts[digit] = at;
            at += many;
        }
        for (Py_ssize_t i = 0; i < count; i++) (*spare)[starts[((*rows)[i].key >> shift) & (DIGITS - 1)]++] = (*rows)[i];
        Keyed *sorted = *spare;
        *spare = *rows;
        *rows = sorted;
    }
}

/* Key position j's String column for the rows in order (the sorted keyed rows): its int32
 * offsets and UTF-8 data as a pair of bytes, copied by rank from the distinct values (found of
 * them, in rank order) gathered first into one buffer (compact: in cache); None past 2 GiB. */
static PyObject *ordered_column(const Keyed *keyed, Py_ssize_t count, int j, const Distinct *distinct,
                                Py_ssize_t found, Py_ssize_t size) {
    if (size > INT32_MAX) Py_RETURN_NONE;
    Py_ssize_t values_size = 0;
    for (Py_ssize_t rank = 0; rank < found; rank++) values_size += distinct[rank].text->size;
    Py_ssize_t *starts = PyMem_Malloc((size_t)(found + 1) * sizeof(Py_ssize_t));
    char *values = PyMem_Malloc((size_t)(values_size ? values_size : 1));
    PyObject *offsets_bytes = PyBytes_FromStringAndSize(NULL, (count + 1) * (Py_ssize_t)sizeof(int32_t));
    PyObject *data_bytes = PyBytes_FromStringAndSize(NULL, size);
    PyObject *pair = (offsets_bytes && data_bytes) ? PyTuple_Pack(2, offsets_bytes, data_bytes) : NULL;
    if (pair != NULL && (starts == NULL || values == NULL)) {
        Py_CLEAR(pair);
        PyErr_NoMemory();
    }
    if (pair != NULL) {
        starts[0] = 0;
        for (Py_ssize_t rank = 0; rank < found; rank++) {
            const Text *text = distinct[rank].text;
            memcpy(values + starts[rank], text->utf8, (size_t)text->size);
            starts[rank + 1] = starts[rank] + text->size;
        }
        int32_t *offsets = (int32_t *)PyBytes_AS_STRING(offsets_bytes);
        char *data = PyBytes_AS_STRING(data_bytes);
        offsets[0] = 0;
        for (Py_ssize_t i = 0; i < count; i++) {
            int32_t rank = keyed[i].rank[j];
            Py_ssize_t length = starts[rank + 1] - starts[rank];
            memcpy(data + offsets[i], values + starts[rank], (size_t)length);
            offsets[i + 1] = offsets[i] + (int32_t)length;
        }
    }
    PyMem_Free(starts);
    PyMem_Free(values);
    Py_XDECREF(offsets_bytes);
    Py_XDECREF(data_bytes);
    return pair;
}

PyDoc_STRVAR(key_order_doc,
"key_order(keys: list, start_ranks: bytes, starts: int) -> tuple[list, bytes] | None\n\n"
"The rows of the keys (tuples of organization_id, external_customer_id, code) in the stable\n"
"order of the strings' UTF-8 bytes, then of the rows' window start ranks (native int64 below\n"
"`starts`, one a row): the String columns of the keys so ordered (what text_buffers gives)\n"
"and the order (native int64 row indices); None where a key is not 3 str that UTF-8 holds, a\n"
"column passes 2 GiB, or the ranks together pass 64 bits.");

static PyObject *key_order(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "key_order(keys: list, start_ranks: bytes, starts: int)");
        return NULL;
    }
    PyObject *rows = args[0];
    Py_ssize_t count = PyList_GET_SIZE(rows);
    Py_ssize_t starts = PyLong_AsSsize_t(args[2]);
    if (starts == -1 && PyErr_Occurred()) return NULL;
    Py_buffer start_ranks;
    if (PyObject_GetBuffer(args[1], &start_ranks, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *result = NULL, *columns = NULL, *order_bytes = NULL;
    size_t room = (size_t)(count ? count : 1);
    Text *texts = PyMem_Malloc(room * 3 * sizeof(Text));
    Distinct *distinct = PyMem_Malloc(room * 3 * sizeof(Distinct));
    Keyed *keyed = PyMem_Malloc(room * sizeof(Keyed));
    Keyed *spare = PyMem_Malloc(room * sizeof(Keyed));
    if (start_ranks.len != count * (Py_ssize_t)sizeof(int64_t) || starts < 1) {
        PyErr_SetString(PyExc_ValueError, "key_order: one int64 start rank a key, below starts");
        goto done;
    }
    if (count > INT32_MAX) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (texts == NULL || distinct == NULL || keyed == NULL || spare == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t sizes[3] = {0, 0, 0};
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!read_key(PyList_GET_ITEM(rows, i), &texts[3 * i])) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        for (int j = 0; j < 3; j++) sizes[j] += texts[3 * i + j].size;
        keyed[i] = (Keyed){0, (int32_t)i, {0, 0, 0}};
    }
    uint64_t span = 1;
    Py_ssize_t found[3];
    for (int j = 0; j < 3; j++) {
        found[j] = rank_texts(texts, j, count, keyed, distinct + j * count);
        if (found[j] < 0) {
            PyErr_NoMemory();
            goto done;
        }
        if (found[j] && __builtin_mul_overflow(span, (uint64_t)found[j], &span)) {
            result = Py_NewRef(Py_None); /* past 64 bits: the pure path re-ranks */
            goto done;
        }
        for (Py_ssize_t i = 0; i < count; i++) {
            keyed[i].key = keyed[i].key * (uint64_t)found[j] + (uint64_t)keyed[i].rank[j];
        }
    }
    if (__builtin_mul_overflow(span, (uint64_t)starts, &span)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    const int64_t *start_rank = (const int64_t *)start_ranks.buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (start_rank[i] < 0 || start_rank[i] >= starts) {
            PyErr_SetString(PyExc_ValueError, "key_order: a start rank not below starts");
            goto done;
        }
        keyed[i].key = keyed[i].key * (uint64_t)starts + (uint64_t)start_rank[i];
    }
    radix_sort(&keyed, &spare, count, span > 1 ? 64 - __builtin_clzll(span - 1) : 0);
    order_bytes = PyBytes_FromStringAndSize(NULL, count * (Py_ssize_t)sizeof(int64_t));
    columns = PyList_New(3);
    if (order_bytes == NULL || columns == NULL) goto done;
    int64_t *order = (int64_t *)PyBytes_AS_STRING(order_bytes);
    for (Py_ssize_t i = 0; i < count; i++) order[i] = keyed[i].row;
    for (int j = 0; j < 3; j++) {
        PyObject *column = ordered_column(keyed, count, j, distinct + j * count, found[j], sizes[j]);
        if (column == NULL) goto done;
        if (column == Py_None) {
            result = column;
            goto done;
        }
        PyList_SET_ITEM(columns, j, column);
    }
    result = PyTuple_Pack(2, columns, order_bytes);
done:
    Py_XDECREF(columns);
    Py_XDECREF(order_bytes);
    PyMem_Free(texts);
    PyMem_Free(distinct);
    PyMem_Free(keyed);
    PyMem_Free(spare);
    PyBuffer_Release(&start_ranks);
    return result;
}

static PyMethodDef methods[] = {
    {"text_buffers", (PyCFunction)(void (*)(void))text_buffers, METH_FASTCALL, text_buffers_doc},
    {"int128_words", (PyCFunction)(void (*)(void))int128_words, METH_FASTCALL, int128_words_doc},
    {"key_order", (PyCFunction)(void (*)(void))key_order, METH_FASTCALL, key_order_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sinks._fastcolumns",
    "The ClickHouse sink's compiled row-block encoding (see sinks/columnar.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastcolumns(void) {
    PyObject *created = PyModule_Create(&module);
    /* what sinks/columnar.py expects (_INTERFACE): a build from another version is not used */
    if (created != NULL && PyModule_AddIntConstant(created, "INTERFACE", 2) < 0) Py_CLEAR(created);
    return created;
}
