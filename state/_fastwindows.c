/* The window stores' compiled fast path: adding a batch's groups to one window.
 *
 * state/windows.py asks add_known() to add each group whose key the window already holds to
 * the aggregate at that key's position (count and scaled total, exact Python ints), noting
 * the position as changed, in the groups' order (a window's changed positions are noted
 * in a dict made at its first change); the groups with a new key come back, in
 * their order, for the window to append: what WindowStore's pure-Python path does.
 *
 * At one row per event a window holds hundreds of thousands of keys and each group touches
 * them at random: the time goes to cache misses, not to the interpreter. So the keys are
 * looked up first, in one pass, and the additions then fetch the columns' slots and totals
 * some groups ahead (prefetch), their misses overlapping instead of waiting one by one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define AHEAD 8 /* groups between fetching a slot and its total, and between that and adding */

/* window[position] += amount, if the window still has that position; 0 on error. */
static int add_at(PyObject *window, Py_ssize_t position, PyObject *amount) {
    if (position >= PyList_GET_SIZE(window)) {
        PyErr_SetString(PyExc_IndexError, "add_known(): a key's position is outside the window");
        return 0;
    }
    PyObject *sum = PyNumber_Add(PyList_GET_ITEM(window, position), amount);
    return sum != NULL && PyList_SetItem(window, position, sum) == 0;
}

/* Fetch the slots of the known group ``k`` (if any) and the totals of the one AHEAD before.
 * Inlined always: as a function of its own GCC found it without effect (it only reads
 * memory) and removed every call, so the build held no prefetch at all. */
static inline __attribute__((always_inline)) void prefetch(PyObject *counts, PyObject *totals, const Py_ssize_t *positions,
                     Py_ssize_t k, Py_ssize_t known) {
    Py_ssize_t held = PyList_GET_SIZE(counts) < PyList_GET_SIZE(totals)
        ? PyList_GET_SIZE(counts) : PyList_GET_SIZE(totals);
    if (k < known && positions[k] < held) {
        __builtin_prefetch(&PyList_GET_ITEM(counts, positions[k]), 1);
        __builtin_prefetch(&PyList_GET_ITEM(totals, positions[k]), 1);
    }
    if (k >= AHEAD && k - AHEAD < known && positions[k - AHEAD] < held)
        __builtin_prefetch(PyList_GET_ITEM(totals, positions[k - AHEAD]));
}

/* Sort the groups into known ones (``found`` positions, new references, and the group's
 * index in ``which``) and new ones (appended to ``new``); the number known, or -1 on error. */
static Py_ssize_t look_up(PyObject *index, PyObject **columns[3], Py_ssize_t n, PyObject **found,
                          Py_ssize_t *which, PyObject *new[3]) {
    Py_ssize_t known = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *position = PyDict_GetItemWithError(index, columns[0][i]);
        if (position != NULL) {
            Py_INCREF(position);
            found[known] = position;
            which[known++] = i;
            continue;
        }
        if (PyErr_Occurred()) return -1;
        for (int c = 0; c < 3; c++)
            if (PyList_Append(new[c], columns[c][i]) < 0) return -1;
    }
    return known;
}

/* Add the known groups at their positions and note them changed; 0 on error. */
static int add_found(PyObject *found[], const Py_ssize_t *which, Py_ssize_t *positions,
                     Py_ssize_t known, PyObject **columns[3], PyObject *counts, PyObject *totals,
                     PyObject **changed) {
    if (known && *changed == Py_None) {
        Py_SETREF(*changed, PyDict_New());
        if (*changed == NULL) return 0;
    }
    for (Py_ssize_t k = 0; k < known; k++) {
        positions[k] = PyLong_AsSsize_t(found[k]);
        if (positions[k] == -1 && PyErr_Occurred()) return 0;
        if (positions[k] < 0) {
            PyErr_SetString(PyExc_IndexError, "add_known(): a key's position is negative");
            return 0;
        }
    }
    for (Py_ssize_t k = 0; k < 2 * AHEAD; k++) prefetch(counts, totals, positions, k, known);
    for (Py_ssize_t k = 0; k < known; k++) {
        prefetch(counts, totals, positions, k + 2 * AHEAD, known);
        Py_ssize_t i = which[k];
        if (!add_at(counts, positions[k], columns[1][i]) || !add_at(totals, positions[k], columns[2][i])
                || PyDict_SetItem(*changed, found[k], Py_None) < 0)
            return 0;
    }
    return 1;
}

PyDoc_STRVAR(add_known_doc,
"add_known(positions, keys, counts, totals, window_counts, window_totals, changed)\n"
"--\n\n"
"Add each group whose key ``positions`` holds to the window's columns at its position and\n"
"note the position in ``changed`` (a dict of positions to None, or None: a new dict where\n"
"a key is known), in order; return the other groups as (keys, counts, totals) lists, in\n"
"order, and ``changed``.");

static PyObject *add_known(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "add_known() takes 7 arguments");
        return NULL;
    }
    PyObject *index = args[0], *counts = args[4], *totals = args[5], *changed = args[6];
    if (!PyDict_Check(index) || !(changed == Py_None || PyDict_Check(changed)) || !PyList_Check(counts)
            || !PyList_Check(totals)) {
        PyErr_SetString(PyExc_TypeError, "add_known(): expected dicts and the window's lists");
        return NULL;
    }
    PyObject *groups[3] = {NULL, NULL, NULL}, *new[3] = {NULL, NULL, NULL}, *result = NULL;
    PyObject **found = NULL;
    Py_INCREF(changed);
    Py_ssize_t *which = NULL, *positions = NULL, known = 0;
    for (int c = 0; c < 3; c++) {
        groups[c] = PySequence_Fast(args[1 + c], "add_known(): groups must be sequences");
        new[c] = PyList_New(0);
        if (groups[c] == NULL || new[c] == NULL) goto done;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(groups[0]);
    if (PySequence_Fast_GET_SIZE(groups[1]) != n || PySequence_Fast_GET_SIZE(groups[2]) != n) {
        PyErr_SetString(PyExc_ValueError, "add_known(): keys, counts and totals differ in length");
        goto done;
    }
    PyObject **columns[3];
    for (int c = 0; c < 3; c++) columns[c] = PySequence_Fast_ITEMS(groups[c]);
    found = PyMem_New(PyObject *, n + 1);
    which = PyMem_New(Py_ssize_t, n + 1);
    positions = PyMem_New(Py_ssize_t, n + 1);
    if (found == NULL || which == NULL || positions == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    known = look_up(index, columns, n, found, which, new);
    if (known >= 0 && add_found(found, which, positions, known, columns, counts, totals, &changed))
        result = PyTuple_Pack(4, new[0], new[1], new[2], changed);
done:
    for (Py_ssize_t k = 0; k < known; k++) Py_DECREF(found[k]);
    PyMem_Free(found);
    PyMem_Free(which);
    PyMem_Free(positions);
    Py_XDECREF(changed);
    for (int c = 0; c < 3; c++) {
        Py_XDECREF(groups[c]);
        Py_XDECREF(new[c]);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"add_known", (PyCFunction)(void (*)(void))add_known, METH_FASTCALL, add_known_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "state._fastwindows",
    "The window stores' compiled fast path (see state/windows.py).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastwindows(void) {
    PyObject *created = PyModule_Create(&module);
    /* what state/windows.py expects (_INTERFACE): a build from another version is not used */
    if (created != NULL && PyModule_AddIntConstant(created, "INTERFACE", 1) < 0) Py_CLEAR(created);
    return created;
}
