/* The live-totals writer's compiled fast path: the Redis commands that write a round's totals.
 *
 * sinks/redis_sink.py asks commands() for the RESP bytes of MULTI, HSET key count N value V,
 * EXPIRE key TTL per total, EXEC, a transaction per `per_transaction` totals, exactly what its
 * pure-Python encode_writes builds. It answers None where the pure path must do it: an id that
 * needs percent-encoding (%, :, control characters), a count beyond 64 bits, a total beyond 128
 * bits, or a key or total not shaped as the live-totals step makes them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define VALUE_UNIT 1000000000000000000LL
#define SCALE 18

typedef struct {
    char *data;
    size_t size, capacity;
} Buffer;

static int reserve(Buffer *buffer, size_t more) {
    if (buffer->size + more <= buffer->capacity) return 1;
    size_t capacity = buffer->capacity ? buffer->capacity : 1 << 16;
    while (capacity < buffer->size + more) capacity *= 2;
    char *grown = PyMem_Realloc(buffer->data, capacity);
    if (grown == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    buffer->data = grown;
    buffer->capacity = capacity;
    return 1;
}

static inline void put(Buffer *buffer, const char *text, size_t size) {
    memcpy(buffer->data + buffer->size, text, size);
    buffer->size += size;
}

static inline void put_text(Buffer *buffer, const char *text) { put(buffer, text, strlen(text)); }

/* The decimal digits of value. */
static inline void put_uint(Buffer *buffer, uint64_t value) {
    char reversed[20];
    int n = 0;
    do {
        reversed[n++] = (char)('0' + (int)(value % 10));
        value /= 10;
    } while (value);
    while (n) buffer->data[buffer->size++] = reversed[--n];
}

/* "$<size>\r\n" */
static inline void put_length(Buffer *buffer, size_t size) {
    buffer->data[buffer->size++] = '$';
    put_uint(buffer, size);
    put(buffer, "\r\n", 2);
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

/* The exact decimal text of a 10**18-scaled total (as format_scaled writes it) into out (at
 * least 64 bytes): its length, 0 when the total is beyond 128 bits, -1 on error. */
static int scaled_text(PyObject *total, char *out) {
    unsigned char bytes[16];
    if (_PyLong_AsByteArray((PyLongObject *)total, bytes, 16, 1, 1) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();
        return 0;
    }
    __int128 value = 0;
    memcpy(&value, bytes, 16); /* little-endian, as asked */
    int n = 0;
    unsigned __int128 magnitude = (unsigned __int128)value;
    if (value < 0) {
        out[n++] = '-';
        magnitude = -magnitude;
    }
    n += u128_digits(magnitude / VALUE_UNIT, out + n);
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
} Labels;

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

/* Append the commands of one total; 1 done, 0 for the pure path, -1 on error. */
static int put_total(Buffer *buffer, PyObject *prefix_text, PyObject *key, PyObject *entry,
                     Labels *labels, PyObject *label_of, PyObject *ttls) {
    if (!PyTuple_CheckExact(key) || PyTuple_GET_SIZE(key) != 5 || !PyTuple_CheckExact(entry) ||
        PyTuple_GET_SIZE(entry) != 2)
        return 0;
    const char *parts[4];
    Py_ssize_t sizes[4];
    for (int i = 0; i < 3; i++) {
        PyObject *id = PyTuple_GET_ITEM(key, i);
        if (!PyUnicode_CheckExact(id)) return 0;
        parts[i] = PyUnicode_AsUTF8AndSize(id, &sizes[i]);
        if (parts[i] == NULL) return -1;
        if (!plain(parts[i], sizes[i])) return 0;
    }
    PyObject *kind = PyTuple_GET_ITEM(key, 3), *start = PyTuple_GET_ITEM(key, 4);
    if (!PyUnicode_CheckExact(kind)) return 0;
    PyObject *ttl = PyDict_GetItemWithError(ttls, kind);
    if (ttl == NULL) return PyErr_Occurred() ? -1 : 0;
    PyObject *period = label(labels, label_of, kind, start);
    if (period == NULL) return -1;
    if (!PyUnicode_CheckExact(period) || !PyBytes_CheckExact(ttl)) return 0;
    parts[3] = PyUnicode_AsUTF8AndSize(period, &sizes[3]);
    if (parts[3] == NULL) return -1;
    Py_ssize_t prefix_size;
    const char *prefix = PyUnicode_AsUTF8AndSize(prefix_text, &prefix_size);
    if (prefix == NULL) return -1;

    PyObject *count = PyTuple_GET_ITEM(entry, 0), *total = PyTuple_GET_ITEM(entry, 1);
    if (!PyLong_CheckExact(count) || !PyLong_CheckExact(total)) return 0;
    int overflow = 0;
    long long count_value = PyLong_AsLongLongAndOverflow(count, &overflow);
    if (count_value == -1 && PyErr_Occurred()) return -1;
    if (overflow) return 0;
    char count_text[48], value_text[64];
    int count_size = 0;
    unsigned long long count_magnitude = (unsigned long long)count_value;
    if (count_value < 0) {
        count_text[count_size++] = '-';
        count_magnitude = 0 - count_magnitude;
    }
    count_size += u128_digits(count_magnitude, count_text + count_size);
    int value_size = scaled_text(total, value_text);
    if (value_size <= 0) return value_size;

    size_t name_size = (size_t)prefix_size + 3;
    for (int i = 0; i < 4; i++) name_size += (size_t)sizes[i];
    if (!reserve(buffer, 2 * name_size + (size_t)count_size + (size_t)value_size +
                         (size_t)PyBytes_GET_SIZE(ttl) + 160))
        return -1;
    for (int copy = 0; copy < 2; copy++) {
        put_text(buffer, copy ? "*3\r\n$6\r\nEXPIRE\r\n" : "*6\r\n$4\r\nHSET\r\n");
        put_length(buffer, name_size);
        put(buffer, prefix, (size_t)prefix_size);
        for (int i = 0; i < 4; i++) {
            put(buffer, parts[i], (size_t)sizes[i]);
            if (i < 3) put(buffer, ":", 1);
        }
        put(buffer, "\r\n", 2);
        if (copy) break;
        put_text(buffer, "$5\r\ncount\r\n");
        put_length(buffer, (size_t)count_size);
        put(buffer, count_text, (size_t)count_size);
        put_text(buffer, "\r\n$5\r\nvalue\r\n");
        put_length(buffer, (size_t)value_size);
        put(buffer, value_text, (size_t)value_size);
        put(buffer, "\r\n", 2);
    }
    put(buffer, PyBytes_AS_STRING(ttl), (size_t)PyBytes_GET_SIZE(ttl));
    return 1;
}

static PyObject *commands(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *totals, *prefix, *label_of, *ttls;
    Py_ssize_t per_transaction;
    if (!PyArg_ParseTuple(args, "O!UOO!n:commands", &PyDict_Type, &totals, &prefix, &label_of,
                          &PyDict_Type, &ttls, &per_transaction))
        return NULL;
    if (per_transaction < 1) {
        PyErr_SetString(PyExc_ValueError, "commands(): per_transaction must be at least 1");
        return NULL;
    }
    Buffer buffer = {NULL, 0, 0};
    Labels labels = {.count = 0, .next = 0};
    PyObject *result = NULL;
    PyObject *key, *entry;
    Py_ssize_t position = 0, done = 0;
    int status = 1;
    while (PyDict_Next(totals, &position, &key, &entry)) {
        if (!reserve(&buffer, 32)) {
            status = -1;
            break;
        }
        if (done % per_transaction == 0) put_text(&buffer, done ? "*1\r\n$4\r\nEXEC\r\n*1\r\n$5\r\nMULTI\r\n"
                                                               : "*1\r\n$5\r\nMULTI\r\n");
        status = put_total(&buffer, prefix, key, entry, &labels, label_of, ttls);
        if (status <= 0) break;
        done++;
    }
    if (status > 0 && done) {
        if (reserve(&buffer, 16)) {
            put_text(&buffer, "*1\r\n$4\r\nEXEC\r\n");
            Py_ssize_t transactions = (done + per_transaction - 1) / per_transaction;
            result = Py_BuildValue("(y#n)", buffer.data, (Py_ssize_t)buffer.size,
                                   2 * transactions + 4 * done);
        }
    } else if (status > 0) {
        result = Py_BuildValue("(y#n)", "", (Py_ssize_t)0, (Py_ssize_t)0);
    } else if (status == 0) {
        result = Py_NewRef(Py_None);
    }
    PyMem_Free(buffer.data);
    forget_labels(&labels);
    return result;
}

static PyMethodDef methods[] = {
    {"commands", commands, METH_VARARGS,
     "commands(totals, prefix, label_of, ttls, per_transaction) -> (bytes, replies) or None:\n"
     "the RESP of MULTI, HSET + EXPIRE per total, EXEC (see sinks/redis_sink.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_fastresp", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__fastresp(void) {
    PyObject *created = PyModule_Create(&module);
    /* what sinks/redis_sink.py expects (_INTERFACE): a build from another version is not used */
    if (created != NULL && PyModule_AddIntConstant(created, "INTERFACE", 1) < 0) Py_CLEAR(created);
    return created;
}
