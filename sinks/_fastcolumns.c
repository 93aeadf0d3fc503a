/* The ClickHouse sink's compiled row-block encoding: Arrow buffers built from Python objects.
 *
 * sinks/columnar.py asks text_buffers() for the String columns of a list of key tuples (the
 * int32 offsets and UTF-8 data of each position, what pa.Array.from_buffers takes), and
 * int128_words() for scaled sums as little-endian two's complement 64-bit words. Each answers
 * None where the pure path must do it: a row that is not a tuple of `width` str, a str that
 * UTF-8 cannot hold (a lone surrogate), a column past 2 GiB of text (int32 offsets), a sum that
 * is not an int or does not fit 128 bits.
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

static PyMethodDef methods[] = {
    {"text_buffers", (PyCFunction)(void (*)(void))text_buffers, METH_FASTCALL, text_buffers_doc},
    {"int128_words", (PyCFunction)(void (*)(void))int128_words, METH_FASTCALL, int128_words_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sinks._fastcolumns",
    "The ClickHouse sink's compiled row-block encoding (see sinks/columnar.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastcolumns(void) {
    PyObject *created = PyModule_Create(&module);
    /* what sinks/columnar.py expects (_INTERFACE): a build from another version is not used */
    if (created != NULL && PyModule_AddIntConstant(created, "INTERFACE", 1) < 0) Py_CLEAR(created);
    return created;
}
