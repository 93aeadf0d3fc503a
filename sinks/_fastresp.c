/* The live-totals writer's compiled fast path: the Redis commands that write a round's totals.
 *
 * sinks/redis_sink.py asks commands() for the RESP bytes of MULTI, HSET key count N value V,
 * EXPIRE key TTL per total, EXEC, a transaction per `per_transaction` totals, for the next
 * `limit` (key, total) pairs of an iterator (a round's items, a pipeline at a time, so no
 * pipeline is copied out of the round's dict), exactly what its pure-Python encode_pipeline
 * builds. It hands the pairs it took back as a list where the pure path must encode them: an id
 * that needs percent-encoding (%, :, control characters), a count beyond 64 bits, a total beyond
 * 128 bits, or a key or total not shaped as the live-totals step makes them.
 *
 * Most of its time was waiting for memory (a round's keys and totals lie scattered): it takes
 * the pairs first and asks for the objects of later totals ahead of their turn, and writes
 * straight into the caller's bytearray, kept from pipeline to pipeline.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define VALUE_UNIT 1000000000000000000LL
#define SCALE 18

/* The output, written straight into the caller's bytearray, which it keeps from pipeline to
 * pipeline: its memory stays mapped (a fresh 2.4 MB each time took ~570 page faults). */
typedef struct {
    PyObject *out; /* borrowed bytearray */
    char *data;
    size_t size, capacity;
} Buffer;

static int reserve(Buffer *buffer, size_t more) {
    if (buffer->size + more <= buffer->capacity) return 1;
    size_t capacity = buffer->capacity ? buffer->capacity : 4096;
    while (capacity < buffer->size + more) capacity *= 2;
    if (PyByteArray_Resize(buffer->out, (Py_ssize_t)capacity) < 0) return 0;
    buffer->data = PyByteArray_AS_STRING(buffer->out);
    buffer->capacity = capacity;
    return 1;
}

static inline __attribute__((always_inline)) void put(Buffer *buffer, const char *text,
                                                      size_t size) {
    memcpy(buffer->data + buffer->size, text, size);
    buffer->size += size;
}

/* A string literal, its size known when compiled. */
#define PUT_TEXT(buffer, literal) put((buffer), (literal), sizeof(literal) - 1)

/* The decimal digits of value into out (at least 20 bytes); their count. */
static inline int u64_digits(uint64_t value, char *out) {
    char reversed[20];
    int n = 0;
    do {
        reversed[n++] = (char)('0' + (int)(value % 10));
        value /= 10;
    } while (value);
    for (int i = 0; i < n; i++) out[i] = reversed[n - 1 - i];
    return n;
}

/* The decimal digits of value. */
static inline void put_uint(Buffer *buffer, uint64_t value) {
    buffer->size += (size_t)u64_digits(value, buffer->data + buffer->size);
}

/* "$<size>\r\n" */
static inline __attribute__((always_inline)) void put_length(Buffer *buffer, size_t size) {
    buffer->data[buffer->size++] = '$';
    put_uint(buffer, size);
    PUT_TEXT(buffer, "\r\n");
}

/* 1 when the UTF-8 text needs no percent-encoding (no %, :, control character). */
static int plain(const char *text, Py_ssize_t size) {
    for (Py_ssize_t i = 0; i < size; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c < 0x20 || c == 0x7f || c == '%' || c == ':') return 0;
    }
    return 1;
}

/* Decimal digits of an unsigned 128-bit integer into out (at least 40 bytes); their count. */
static int u128_digits(unsigned __int128 value, char *out) {
    char reversed[40];
    int n = 0;
    do {
        reversed[n++] = (char)('0' + (int)(value % 10));
        value /= 10;
    } while (value);
    for (int i = 0; i < n; i++) out[i] = reversed[n - 1 - i];
    return n;
}

/* An int of at most 4 digits of 30 bits (below 2**120 in magnitude: most totals) read from
 * its digits, where CPython's layout is known (3.11); 0 for the general conversion. */
static inline int small_int(PyObject *number, __int128 *value) {
#if PY_VERSION_HEX < 0x030C0000 && PYLONG_BITS_IN_DIGIT == 30
    Py_ssize_t size = Py_SIZE(number), digits = size < 0 ? -size : size;
    if (digits > 4) return 0;
    const digit *of = ((PyLongObject *)number)->ob_digit;
    unsigned __int128 magnitude = 0;
    for (Py_ssize_t i = digits - 1; i >= 0; i--) magnitude = (magnitude << 30) | of[i];
    *value = size < 0 ? -(__int128)magnitude : (__int128)magnitude;
    return 1;
#else
    (void)number;
    (void)value;
    return 0;
#endif
}

/* The exact decimal text of a 10**18-scaled total (as format_scaled writes it) into out (at
 * least 64 bytes): its length, 0 when the total is beyond 128 bits, -1 on error. */
static int scaled_text(PyObject *total, char *out) {
    __int128 value = 0;
    if (!small_int(total, &value)) {
        unsigned char bytes[16];
        if (_PyLong_AsByteArray((PyLongObject *)total, bytes, 16, 1, 1) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
            PyErr_Clear();
            return 0;
        }
        memcpy(&value, bytes, 16); /* little-endian, as asked */
    }
    int n = 0;
    unsigned __int128 magnitude = (unsigned __int128)value;
    if (value < 0) {
        out[n++] = '-';
        magnitude = -magnitude;
    }
    unsigned __int128 whole = magnitude / VALUE_UNIT;
    n += whole <= UINT64_MAX ? u64_digits((uint64_t)whole, out + n) : u128_digits(whole, out + n);
    out[n++] = '.';
    uint64_t fraction = (uint64_t)(magnitude % VALUE_UNIT);
    for (int i = SCALE - 1; i >= 0; i--) {
        out[n + i] = (char)('0' + (int)(fraction % 10));
        fraction /= 10;
    }
    return n + SCALE;
}

/* Period labels already asked for in this call (a round holds a few periods). */
#define LABELS_KEPT 16
typedef struct {
    PyObject *kind, *start, *label; /* owned */
} Label;
typedef struct {
    Label kept[LABELS_KEPT];
    int count, next;
    PyObject *ttl_kind[2], *ttl[2]; /* the last kinds whose TTL was looked up (borrowed) */
} Labels;

/* The TTL argument of kind (borrowed; NULL if none, or on error): looked up in ttls once for
 * each kind object met (the batch holds them all, so each is the same object while it runs). */
static inline PyObject *ttl_of(Labels *labels, PyObject *ttls, PyObject *kind) {
    for (int i = 0; i < 2; i++)
        if (labels->ttl_kind[i] == kind) return labels->ttl[i];
    PyObject *ttl = PyDict_GetItemWithError(ttls, kind);
    if (ttl != NULL) {
        labels->ttl_kind[1] = labels->ttl_kind[0];
        labels->ttl[1] = labels->ttl[0];
        labels->ttl_kind[0] = kind;
        labels->ttl[0] = ttl;
    }
    return ttl;
}

static void forget_labels(Labels *labels) {
    for (int i = 0; i < labels->count; i++) {
        Py_DECREF(labels->kept[i].kind);
        Py_DECREF(labels->kept[i].start);
        Py_DECREF(labels->kept[i].label);
    }
}

/* The label of (kind, start): kept, or label_of(kind, start); borrowed, NULL on error. */
static PyObject *label(Labels *labels, PyObject *label_of, PyObject *kind, PyObject *start) {
    for (int i = 0; i < labels->count; i++) {
        Label *kept = &labels->kept[i];
        if (kept->kind != kind && PyUnicode_Compare(kept->kind, kind) != 0) continue;
        int same = kept->start == start ? 1 : PyObject_RichCompareBool(kept->start, start, Py_EQ);
        if (same < 0) return NULL;
        if (same) return kept->label;
    }
    PyObject *found = PyObject_CallFunctionObjArgs(label_of, kind, start, NULL);
    if (found == NULL) return NULL;
    Label *slot;
    if (labels->count < LABELS_KEPT) {
        slot = &labels->kept[labels->count++];
    } else {
        slot = &labels->kept[labels->next];
        labels->next = (labels->next + 1) % LABELS_KEPT;
        Py_DECREF(slot->kind);
        Py_DECREF(slot->start);
        Py_DECREF(slot->label);
    }
    Py_INCREF(kind);
    Py_INCREF(start);
    slot->kind = kind;
    slot->start = start;
    slot->label = found;
    return found;
}

/* The UTF-8 text of a str: read in place for ASCII (nearly always), else asked for. */
static inline const char *utf8_of(PyObject *text, Py_ssize_t *size) {
    if (PyUnicode_IS_COMPACT_ASCII(text)) {
        *size = PyUnicode_GET_LENGTH(text);
        return (const char *)PyUnicode_DATA(text);
    }
    return PyUnicode_AsUTF8AndSize(text, size);
}

/* Append the commands of one total; 1 done, 0 for the pure path, -1 on error. */
static int put_total(Buffer *buffer, const char *prefix, Py_ssize_t prefix_size, PyObject *key,
                     PyObject *entry, Labels *labels, PyObject *label_of, PyObject *ttls) {
    if (!PyTuple_CheckExact(key) || PyTuple_GET_SIZE(key) != 5 || !PyTuple_CheckExact(entry) ||
        PyTuple_GET_SIZE(entry) != 2)
        return 0;
    const char *parts[4];
    Py_ssize_t sizes[4];
    for (int i = 0; i < 3; i++) {
        PyObject *id = PyTuple_GET_ITEM(key, i);
        if (!PyUnicode_CheckExact(id)) return 0;
        parts[i] = utf8_of(id, &sizes[i]);
        if (parts[i] == NULL) return -1;
        if (!plain(parts[i], sizes[i])) return 0;
    }
    PyObject *kind = PyTuple_GET_ITEM(key, 3), *start = PyTuple_GET_ITEM(key, 4);
    if (!PyUnicode_CheckExact(kind)) return 0;
    PyObject *ttl = ttl_of(labels, ttls, kind);
    if (ttl == NULL) return PyErr_Occurred() ? -1 : 0;
    PyObject *period = label(labels, label_of, kind, start);
    if (period == NULL) return -1;
    if (!PyUnicode_CheckExact(period) || !PyBytes_CheckExact(ttl)) return 0;
    parts[3] = utf8_of(period, &sizes[3]);
    if (parts[3] == NULL) return -1;

    PyObject *count = PyTuple_GET_ITEM(entry, 0), *total = PyTuple_GET_ITEM(entry, 1);
    if (!PyLong_CheckExact(count) || !PyLong_CheckExact(total)) return 0;
    int overflow = 0;
    long long count_value = PyLong_AsLongLongAndOverflow(count, &overflow);
    if (count_value == -1 && PyErr_Occurred()) return -1;
    if (overflow) return 0;
    char count_text[24], value_text[64];
    int count_size = 0;
    uint64_t count_magnitude = (uint64_t)count_value;
    if (count_value < 0) {
        count_text[count_size++] = '-';
        count_magnitude = 0 - count_magnitude;
    }
    count_size += u64_digits(count_magnitude, count_text + count_size);
    int value_size = scaled_text(total, value_text);
    if (value_size <= 0) return value_size;

    size_t name_size = (size_t)prefix_size + 3;
    for (int i = 0; i < 4; i++) name_size += (size_t)sizes[i];
    if (!reserve(buffer, 2 * name_size + (size_t)count_size + (size_t)value_size +
                         (size_t)PyBytes_GET_SIZE(ttl) + 160))
        return -1;
    for (int copy = 0; copy < 2; copy++) {
        if (copy)
            PUT_TEXT(buffer, "*3\r\n$6\r\nEXPIRE\r\n");
        else
            PUT_TEXT(buffer, "*6\r\n$4\r\nHSET\r\n");
        put_length(buffer, name_size);
        put(buffer, prefix, (size_t)prefix_size);
        for (int i = 0; i < 4; i++) {
            put(buffer, parts[i], (size_t)sizes[i]);
            if (i < 3) PUT_TEXT(buffer, ":");
        }
        PUT_TEXT(buffer, "\r\n");
        if (copy) break;
        PUT_TEXT(buffer, "$5\r\ncount\r\n");
        put_length(buffer, (size_t)count_size);
        put(buffer, count_text, (size_t)count_size);
        PUT_TEXT(buffer, "\r\n$5\r\nvalue\r\n");
        put_length(buffer, (size_t)value_size);
        put(buffer, value_text, (size_t)value_size);
        PUT_TEXT(buffer, "\r\n");
    }
    put(buffer, PyBytes_AS_STRING(ttl), (size_t)PyBytes_GET_SIZE(ttl));
    return 1;
}

/* How far ahead the objects of later totals are fetched into the cache: a round's keys and
 * totals lie scattered in memory, and waiting for each in turn was most of the time. */
#define AHEAD 8

/* Ask for the objects of the total at i + AHEAD (its key and entry tuples) and, those having
 * come meanwhile, for the ids and numbers of the total at i + AHEAD / 2. */
static inline void fetch_ahead(PyObject **keys, PyObject **entries, Py_ssize_t i, Py_ssize_t n) {
    if (i + AHEAD < n) {
        __builtin_prefetch(keys[i + AHEAD]);
        __builtin_prefetch(entries[i + AHEAD]);
    }
    Py_ssize_t j = i + AHEAD / 2;
    if (j < n && PyTuple_CheckExact(keys[j]) && PyTuple_GET_SIZE(keys[j]) == 5 &&
        PyTuple_CheckExact(entries[j]) && PyTuple_GET_SIZE(entries[j]) == 2) {
        for (int k = 0; k < 3; k++) __builtin_prefetch(PyTuple_GET_ITEM(keys[j], k));
        __builtin_prefetch(PyTuple_GET_ITEM(entries[j], 0));
        __builtin_prefetch(PyTuple_GET_ITEM(entries[j], 1));
    }
}

/* The pairs taken, given back as a list of (key, entry) for the pure path. */
static PyObject *taken_pairs(PyObject **keys, PyObject **entries, Py_ssize_t taken) {
    PyObject *pairs = PyList_New(taken);
    if (pairs == NULL) return NULL;
    for (Py_ssize_t i = 0; i < taken; i++) {
        PyObject *pair = PyTuple_Pack(2, keys[i], entries[i]);
        if (pair == NULL) {
            Py_DECREF(pairs);
            return NULL;
        }
        PyList_SET_ITEM(pairs, i, pair);
    }
    return pairs;
}

static PyObject *commands(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *totals, *prefix_text, *label_of, *ttls, *out;
    Py_ssize_t per_transaction, limit;
    if (!PyArg_ParseTuple(args, "OUOO!nnO!:commands", &totals, &prefix_text, &label_of, &PyDict_Type,
                          &ttls, &per_transaction, &limit, &PyByteArray_Type, &out))
        return NULL;
    if (!PyIter_Check(totals)) {
        PyErr_SetString(PyExc_TypeError, "commands(): totals must be an iterator of pairs");
        return NULL;
    }
    if (per_transaction < 1 || limit < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "commands(): per_transaction must be at least 1, limit at least 0");
        return NULL;
    }
    Py_ssize_t prefix_size;
    const char *prefix = PyUnicode_AsUTF8AndSize(prefix_text, &prefix_size);
    if (prefix == NULL) return NULL;
    /* Room for the pipeline as most are (a total takes about 240 bytes), asked for before a
     * pair is taken: a bytearray that cannot be resized (a view of it is held) fails here. */
    Py_ssize_t expected = PyObject_LengthHint(totals, limit);
    if (expected < 0) return NULL;
    Buffer buffer = {out, NULL, 0, (size_t)(expected < limit ? expected : limit) * 256 + 64};
    if (PyByteArray_Resize(out, (Py_ssize_t)buffer.capacity) < 0) return NULL;
    buffer.data = PyByteArray_AS_STRING(out);
    /* The pairs first (the iterator of a dict's items reuses its pair: no allocation), so
     * that the objects of later totals can be fetched ahead of their turn. */
    Py_ssize_t room = limit < 1024 ? limit : 1024;
    PyObject **keys = PyMem_Malloc(2 * (size_t)(room ? room : 1) * sizeof(PyObject *));
    if (keys == NULL) return PyErr_NoMemory();
    PyObject **entries = keys + room;
    Py_ssize_t taken = 0;
    int status = 1;
    while (taken < limit) {
        PyObject *pair = PyIter_Next(totals);
        if (pair == NULL) {
            if (PyErr_Occurred()) status = -1;
            break;
        }
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
            Py_DECREF(pair);
            PyErr_SetString(PyExc_TypeError, "commands(): totals must be an iterator of pairs");
            status = -1;
            break;
        }
        if (taken == room) {
            Py_ssize_t grown = room * 2;
            PyObject **more = PyMem_Malloc(2 * (size_t)grown * sizeof(PyObject *));
            if (more == NULL) {
                Py_DECREF(pair);
                PyErr_NoMemory();
                status = -1;
                break;
            }
            memcpy(more, keys, (size_t)taken * sizeof(PyObject *));
            memcpy(more + grown, entries, (size_t)taken * sizeof(PyObject *));
            PyMem_Free(keys);
            keys = more;
            entries = more + grown;
            room = grown;
        }
        keys[taken] = Py_NewRef(PyTuple_GET_ITEM(pair, 0));
        entries[taken++] = Py_NewRef(PyTuple_GET_ITEM(pair, 1));
        Py_DECREF(pair);
    }
    Labels labels = {.count = 0, .next = 0, .ttl_kind = {NULL, NULL}};
    PyObject *result = NULL;
    for (Py_ssize_t done = 0; status > 0 && done < taken; done++) {
        fetch_ahead(keys, entries, done, taken);
        if (!reserve(&buffer, 32)) {
            status = -1;
            break;
        }
        if (done % per_transaction == 0) {
            if (done)
                PUT_TEXT(&buffer, "*1\r\n$4\r\nEXEC\r\n*1\r\n$5\r\nMULTI\r\n");
            else
                PUT_TEXT(&buffer, "*1\r\n$5\r\nMULTI\r\n");
        }
        status = put_total(&buffer, prefix, prefix_size, keys[done], entries[done], &labels,
                           label_of, ttls);
    }
    if (status > 0 && taken && reserve(&buffer, 16)) PUT_TEXT(&buffer, "*1\r\n$4\r\nEXEC\r\n");
    else if (status > 0 && taken) status = -1;
    /* out holds the commands (nothing where the pure path is to encode, or on an error); a
     * bytearray keeps its memory when it shrinks by less than half */
    if (PyByteArray_Resize(out, status > 0 ? (Py_ssize_t)buffer.size : 0) < 0) status = -1;
    if (status > 0) {
        Py_ssize_t transactions = (taken + per_transaction - 1) / per_transaction;
        result = Py_BuildValue("(nn)", 2 * transactions + 4 * taken, taken);
    } else if (status == 0) {
        result = taken_pairs(keys, entries, taken);
    }
    for (Py_ssize_t i = 0; i < taken; i++) {
        Py_DECREF(keys[i]);
        Py_DECREF(entries[i]);
    }
    PyMem_Free(keys);
    forget_labels(&labels);
    return result;
}

static PyMethodDef methods[] = {
    {"commands", commands, METH_VARARGS,
     "commands(pairs, prefix, label_of, ttls, per_transaction, limit, out) -> (replies, count)\n"
     "or the list of the pairs taken: the RESP of MULTI, HSET + EXPIRE per total, EXEC for the\n"
     "next `limit` (key, total) pairs of the iterator, into the bytearray out (see\n"
     "sinks/redis_sink.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_fastresp", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__fastresp(void) {
    PyObject *created = PyModule_Create(&module);
    /* what sinks/redis_sink.py expects (_INTERFACE): a build from another version is not used */
    if (created != NULL && PyModule_AddIntConstant(created, "INTERFACE", 3) < 0) Py_CLEAR(created);
    return created;
}
