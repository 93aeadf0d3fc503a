/* The held events' compiled fast path: a batch of ShardEvents as the columns HeldEvents holds.
 *
 * state/held.py asks columns() for the events of one add: it reads each event's fields by their
 * slot (the struct's member descriptors give the places), splits each value exactly into a whole
 * part and a fraction of 10**18, and numbers each key (org, customer, code) in the bucket's
 * table the way _KeyTable.numbers does (a new key with its org and code shared through the
 * table's strings). What it cannot hold in a column (a whole part beyond 64 bits) it names by
 * position; held.py keeps those values aside, exactly as its pure-Python path does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>

#define VALUE_UNIT 1000000000000000000LL

enum { F_DIGEST, F_ORG, F_CUSTOMER, F_CODE, F_TIME, F_VALUE, F_OFFSET, F_METRICS, N_FIELDS };

/* The slot offsets of the fields, from a tuple of member descriptors; 0 on error. */
static int slot_offsets(PyObject *descriptors, Py_ssize_t *offsets) {
    if (!PyTuple_Check(descriptors) || PyTuple_GET_SIZE(descriptors) != N_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "columns(): expected a tuple of 8 member descriptors");
        return 0;
    }
    for (int i = 0; i < N_FIELDS; i++) {
        PyObject *descriptor = PyTuple_GET_ITEM(descriptors, i);
        if (!Py_IS_TYPE(descriptor, &PyMemberDescr_Type)) {
            PyErr_SetString(PyExc_TypeError, "columns(): a field is not a member descriptor");
            return 0;
        }
        PyMemberDef *member = ((PyMemberDescrObject *)descriptor)->d_member;
        if (member->type != T_OBJECT_EX && member->type != T_OBJECT) {
            PyErr_SetString(PyExc_TypeError, "columns(): a field is not an object slot");
            return 0;
        }
        offsets[i] = member->offset;
    }
    return 1;
}

static inline PyObject *slot(PyObject *event, Py_ssize_t offset) {
    return *(PyObject **)((char *)event + offset);
}

/* value as an int128: 1, or 0 where it needs more than 127 bits, -1 on error. CPython 3.11 keeps
 * an int as 30-bit digits with its sign in the size: read them where up to 4 (120 bits). */
static int as_int128(PyObject *value, __int128 *out) {
#if PY_VERSION_HEX < 0x030C0000
    if (PyLong_CheckExact(value)) {
        Py_ssize_t size = Py_SIZE(value), digits = size < 0 ? -size : size;
        if (digits <= 4) {
            unsigned __int128 magnitude = 0;
            for (Py_ssize_t i = digits - 1; i >= 0; i--)
                magnitude = (magnitude << PyLong_SHIFT) | ((PyLongObject *)value)->ob_digit[i];
            *out = size < 0 ? -(__int128)magnitude : (__int128)magnitude;
            return 1;
        }
    }
#endif
    if (!PyLong_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "columns(): a value that is not an int");
        return -1;
    }
    unsigned char bytes[16];
    if (_PyLong_AsByteArray((PyLongObject *)value, bytes, 16, 1, 1) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();
        return 0;
    }
    memcpy(out, bytes, 16); /* little-endian, two's complement: this machine's int128 */
    return 1;
}

/* Split value into whole * 10**18 + fraction (0 <= fraction < 10**18); 0 where the whole part
 * is not in [-(2**63 - 1), 2**63 - 1], -1 on error. */
static int split_value(PyObject *value, int64_t *whole, int64_t *fraction) {
    __int128 wide;
    int read = as_int128(value, &wide);
    if (read <= 0) return read;
    __int128 quotient = wide / VALUE_UNIT, rest = wide - quotient * VALUE_UNIT;
    if (rest < 0) {
        rest += VALUE_UNIT;
        quotient -= 1;
    }
    if (quotient > INT64_MAX || quotient < -INT64_MAX) return 0;
    *whole = (int64_t)quotient;
    *fraction = (int64_t)rest;
    return 1;
}

/* The number of (org, customer, code) in the table, a new key numbered; -1 on error. ``probe``:
 * a 3-tuple of this call's own (no one else holds it), refilled for each look-up. */
static long long key_number(PyObject *org, PyObject *customer, PyObject *code, PyObject *probe,
                            PyObject *ids, PyObject *keys, PyObject *strings) {
    PyObject *parts[3] = {org, customer, code};
    for (int i = 0; i < 3; i++) {
        PyObject *old = PyTuple_GET_ITEM(probe, i);
        Py_INCREF(parts[i]);
        PyTuple_SET_ITEM(probe, i, parts[i]);
        Py_DECREF(old);
    }
    PyObject *found = PyDict_GetItemWithError(ids, probe); /* borrowed */
    if (found != NULL) return PyLong_AsLongLong(found);
    if (PyErr_Occurred()) return -1;
    PyObject *shared_org = PyDict_SetDefault(strings, org, org); /* borrowed */
    if (shared_org == NULL) return -1;
    PyObject *shared_code = PyDict_SetDefault(strings, code, code);
    if (shared_code == NULL) return -1;
    PyObject *key = PyTuple_Pack(3, shared_org, customer, shared_code);
    if (key == NULL) return -1;
    Py_ssize_t number = PyList_GET_SIZE(keys);
    PyObject *boxed = PyLong_FromSsize_t(number);
    int failed = boxed == NULL || PyDict_SetItem(ids, key, boxed) < 0 || PyList_Append(keys, key) < 0;
    Py_XDECREF(boxed);
    Py_DECREF(key);
    return failed ? -1 : number;
}

static int64_t as_int64(PyObject *number, int *failed) {
    long long value = PyLong_AsLongLong(number);
    if (value == -1 && PyErr_Occurred()) *failed = 1;
    return value;
}

PyDoc_STRVAR(columns_doc,
"columns(events, struct_type, descriptors, ids, keys, strings)\n"
"    -> (times, offsets, digests, wholes, fractions, key_ids, wide, has_metrics, first, last)\n"
"\n"
"The columns of events (a list of struct_type), as bytes of native int64 (key_ids: int32);\n"
"wide: the positions whose whole part needs more than 64 bits (their whole and fraction 0);\n"
"keys numbered in (ids, keys, strings), the bucket's key table, new keys appended;\n"
"first, last: the least and the greatest time (0, 0 for no events).");

static PyObject *columns(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "columns() takes 6 arguments");
        return NULL;
    }
    PyObject *events = args[0], *struct_type = args[1], *ids = args[3], *keys = args[4],
             *strings = args[5];
    Py_ssize_t offsets[N_FIELDS];
    if (!PyList_Check(events) || !PyType_Check(struct_type) || !PyDict_Check(ids) ||
        !PyList_Check(keys) || !PyDict_Check(strings)) {
        PyErr_SetString(PyExc_TypeError, "columns(): expected a list, a type, a dict, a list and a dict");
        return NULL;
    }
    if (!slot_offsets(args[2], offsets)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(events);
    PyObject *out[6] = {NULL};
    PyObject *wide = PyList_New(0), *result = NULL;
    if (wide == NULL) return NULL;
    PyObject *probe = PyTuple_Pack(3, Py_None, Py_None, Py_None);
    if (probe == NULL) goto done;
    for (int i = 0; i < 6; i++) {
        out[i] = PyBytes_FromStringAndSize(NULL, n * (i == 5 ? 4 : 8));
        if (out[i] == NULL) goto done;
    }
    int64_t *times = (int64_t *)PyBytes_AS_STRING(out[0]), *places = (int64_t *)PyBytes_AS_STRING(out[1]),
            *digests = (int64_t *)PyBytes_AS_STRING(out[2]), *wholes = (int64_t *)PyBytes_AS_STRING(out[3]),
            *fractions = (int64_t *)PyBytes_AS_STRING(out[4]);
    int32_t *key_ids = (int32_t *)PyBytes_AS_STRING(out[5]);
    int has_metrics = 0, failed = 0;
    int64_t first = n ? INT64_MAX : 0, last = n ? INT64_MIN : 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *event = PyList_GET_ITEM(events, i);
        if (!Py_IS_TYPE(event, (PyTypeObject *)struct_type)) {
            PyErr_SetString(PyExc_TypeError, "columns(): an event of another type");
            goto done;
        }
        PyObject *fields[N_FIELDS];
        for (int f = 0; f < N_FIELDS; f++) {
            fields[f] = slot(event, offsets[f]);
            if (fields[f] == NULL) {
                PyErr_SetString(PyExc_AttributeError, "columns(): an event with a field unset");
                goto done;
            }
        }
        times[i] = as_int64(fields[F_TIME], &failed);
        places[i] = as_int64(fields[F_OFFSET], &failed);
        digests[i] = as_int64(fields[F_DIGEST], &failed);
        if (failed) goto done;
        if (times[i] < first) first = times[i];
        if (times[i] > last) last = times[i];
        int split = split_value(fields[F_VALUE], &wholes[i], &fractions[i]);
        if (split < 0) goto done;
        if (split == 0) {
            wholes[i] = fractions[i] = 0;
            PyObject *position = PyLong_FromSsize_t(i);
            int appended = position != NULL && PyList_Append(wide, position) == 0;
            Py_XDECREF(position);
            if (!appended) goto done;
        }
        if (Py_REFCNT(probe) != 1) { /* kept by a key's __eq__ or __hash__: take another */
            Py_SETREF(probe, PyTuple_Pack(3, Py_None, Py_None, Py_None));
            if (probe == NULL) goto done;
        }
        long long number = key_number(fields[F_ORG], fields[F_CUSTOMER], fields[F_CODE], probe, ids, keys,
                                      strings);
        if (number < 0) goto done;
        if (number > INT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "columns(): more than 2**31 keys in a bucket");
            goto done;
        }
        key_ids[i] = (int32_t)number;
        if (fields[F_METRICS] != Py_None) has_metrics = 1;
    }
    result = Py_BuildValue("(OOOOOOOOLL)", out[0], out[1], out[2], out[3], out[4], out[5], wide,
                           has_metrics ? Py_True : Py_False, (long long)first, (long long)last);
done:
    for (int i = 0; i < 6; i++) Py_XDECREF(out[i]);
    Py_XDECREF(probe);
    Py_DECREF(wide);
    return result;
}

PyDoc_STRVAR(time_range_doc,
"time_range(events, struct_type, descriptor) -> (first, last)\n"
"\n"
"The least and the greatest of the events' field at descriptor (an int64 each); events: a\n"
"non-empty list of struct_type.");

static PyObject *time_range(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_Check(args[0]) || PyList_GET_SIZE(args[0]) == 0 || !PyType_Check(args[1]) ||
        !Py_IS_TYPE(args[2], &PyMemberDescr_Type)) {
        PyErr_SetString(PyExc_TypeError, "time_range(): expected a non-empty list, a type and a member descriptor");
        return NULL;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)args[2])->d_member;
    if (member->type != T_OBJECT_EX && member->type != T_OBJECT) {
        PyErr_SetString(PyExc_TypeError, "time_range(): the field is not an object slot");
        return NULL;
    }
    int64_t first = INT64_MAX, last = INT64_MIN;
    int failed = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(args[0]); i++) {
        PyObject *event = PyList_GET_ITEM(args[0], i);
        if (!Py_IS_TYPE(event, (PyTypeObject *)args[1])) {
            PyErr_SetString(PyExc_TypeError, "time_range(): an event of another type");
            return NULL;
        }
        PyObject *field = slot(event, member->offset);
        if (field == NULL) {
            PyErr_SetString(PyExc_AttributeError, "time_range(): an event with the field unset");
            return NULL;
        }
        int64_t time = as_int64(field, &failed);
        if (failed) return NULL;
        if (time < first) first = time;
        if (time > last) last = time;
    }
    return Py_BuildValue("(LL)", (long long)first, (long long)last);
}

PyDoc_STRVAR(scaled_doc,
"scaled(wholes, fractions) -> list[int]\n"
"\n"
"whole * 10**18 + fraction for each pair of two buffers of native int64 (of one length).");

static PyObject *scaled(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "scaled() takes 2 arguments");
        return NULL;
    }
    Py_buffer wholes, fractions;
    if (PyObject_GetBuffer(args[0], &wholes, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[1], &fractions, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&wholes);
        return NULL;
    }
    PyObject *result = NULL;
    if (wholes.len != fractions.len || wholes.len % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "scaled(): two int64 buffers of one length expected");
        goto done;
    }
    Py_ssize_t n = wholes.len / 8;
    const int64_t *whole = wholes.buf, *fraction = fractions.buf;
    result = PyList_New(n);
    if (result == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        __int128 value = (__int128)whole[i] * VALUE_UNIT + fraction[i];
        PyObject *number = value >= INT64_MIN && value <= INT64_MAX
            ? PyLong_FromLongLong((long long)value)
            : _PyLong_FromByteArray((const unsigned char *)&value, 16, 1, 1);
        if (number == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, number);
    }
done:
    PyBuffer_Release(&wholes);
    PyBuffer_Release(&fractions);
    return result;
}

static PyMethodDef methods[] = {
    {"scaled", (PyCFunction)(void (*)(void))scaled, METH_FASTCALL, scaled_doc},
    {"columns", (PyCFunction)(void (*)(void))columns, METH_FASTCALL, columns_doc},
    {"time_range", (PyCFunction)(void (*)(void))time_range, METH_FASTCALL, time_range_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "state._fastheld",
    "The held events' compiled fast path (see state/held.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastheld(void) {
    PyObject *created = PyModule_Create(&module);
    /* what state/held.py expects (_INTERFACE): a build from another version is not used */
    if (created != NULL && PyModule_AddIntConstant(created, "INTERFACE", 2) < 0) Py_CLEAR(created);
    return created;
}
