/* The live totals' compiled fast path: folding one batch of counted usage into the totals.
 *
 * operators/live_totals.py asks fold() to add each delta of a CountedUsage,
 * ``{(org, customer, code, day_start_ms): (count, total_scaled, latest_ms)}``, to the running
 * totals of its UTC day and month, ``{(org, customer, code, kind, start): (count, total)}``,
 * noting each new total in ``changed`` (in the deltas' order: day, then month) and, for
 * watched codes, the latest event time per changed total in ``latest_of``: what
 * LiveTotalsLogic's pure-Python loop does, with the same dicts in the same order.
 *
 * At one delta per event the totals hold millions of keys: the time goes to building the two
 * 5-tuple keys and to the dict operations, whose probes of the big totals dict miss the
 * cache one by one. So the keys are built and hashed first, once each (the loop hashes a key
 * at every get and store), and the stores then prefetch the totals' index slots and entries
 * some keys ahead, their misses overlapping, and where the totals hold a key, its key and
 * total objects and their items (the key is compared item by item, the total added and
 * freed). The prefetch reads CPython 3.11's (and 3.12's) dict layout, checked at import on
 * a dict of its own (else, or on other versions, nothing is prefetched); a prefetch changes
 * no result. Totals are Python ints of any size, added with
 * PyNumber_Add (exactly the loop's ``+``). The tuples made of str and int only are left out
 * of the cyclic GC at once (it would untrack them at its first look, after walking them).
 *
 * Also here: presized(), the dict a batch's changed totals go into, and add_days(), the
 * shard step's summing of its day groups into the deltas fold() reads (operators/
 * usage_windows.py _add_days: ``key + (day,)`` and the summed (count, total, latest)).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define AHEAD 8  /* periods between fetching index slots, their entries, and the stores */
#define PROBES 3 /* slots fetched per key: a lookup of a new key probes ~1.5-3 at 2/3 full */

static PyObject *DAY, *MONTH, *NO_LATEST; /* "day", "month", -1 */
static int layout_known = 0; /* set at import when a dict of the module's own reads right */

/* d[key] with key's hash known: a borrowed reference, or NULL (an error set, or absent). */
static PyObject *get_known(PyObject *d, PyObject *key, Py_hash_t hash) {
#if PY_VERSION_HEX < 0x030D0000
    return _PyDict_GetItem_KnownHash(d, key, hash);
#else
    (void)hash;
    return PyDict_GetItemWithError(d, key);
#endif
}

static int set_known(PyObject *d, PyObject *key, PyObject *value, Py_hash_t hash) {
#if PY_VERSION_HEX < 0x030D0000
    return _PyDict_SetItem_KnownHash(d, key, value, hash);
#else
    (void)hash;
    return PyDict_SetItem(d, key, value);
#endif
}

/* ``tuple``, left out of the cyclic GC if it holds only str and int (it can be in no cycle):
 * the collector would leave it out at its first look, after walking it. */
static PyObject *plain(PyObject *tuple) {
    if (tuple == NULL) return NULL;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(tuple); k++) {
        PyObject *item = PyTuple_GET_ITEM(tuple, k);
        if (!PyLong_CheckExact(item) && !PyUnicode_CheckExact(item)) return tuple;
    }
    PyObject_GC_UnTrack(tuple);
    return tuple;
}

/* ``had[index]`` (had: a total, a tuple as the fold makes them or anything indexable). */
static PyObject *item(PyObject *had, Py_ssize_t index) {
    if (PyTuple_CheckExact(had) && PyTuple_GET_SIZE(had) > index) {
        PyObject *value = PyTuple_GET_ITEM(had, index);
        Py_INCREF(value);
        return value;
    }
    PyObject *at = PyLong_FromSsize_t(index), *value = at == NULL ? NULL : PyObject_GetItem(had, at);
    Py_XDECREF(at);
    return value;
}

/* The new total of ``key``: ``(count, total)`` if absent, else the old one plus them. */
static PyObject *new_total(PyObject *totals, PyObject *key, Py_hash_t hash, PyObject *count,
                           PyObject *total) {
    PyObject *had = get_known(totals, key, hash);
    if (had == NULL)
        return PyErr_Occurred() ? NULL : plain(PyTuple_Pack(2, count, total));
    Py_INCREF(had); /* an addition may run Python code that changes the dict */
    PyObject *old_count = item(had, 0), *old_total = NULL, *sum_count = NULL, *sum_total = NULL;
    if (old_count != NULL) old_total = item(had, 1);
    Py_DECREF(had);
    if (old_total != NULL) sum_count = PyNumber_Add(old_count, count);
    if (sum_count != NULL) sum_total = PyNumber_Add(old_total, total);
    PyObject *result = NULL;
    if (sum_total != NULL) {
        result = PyTuple_New(2);
        if (result != NULL) {
            PyTuple_SET_ITEM(result, 0, sum_count);
            PyTuple_SET_ITEM(result, 1, sum_total);
            sum_count = sum_total = NULL;
            plain(result);
        }
    }
    Py_XDECREF(old_count);
    Py_XDECREF(old_total);
    Py_XDECREF(sum_count);
    Py_XDECREF(sum_total);
    return result;
}

/* ``latest_of[key] = latest`` if it held none or an earlier time; 0 on error. */
static int note_latest(PyObject *latest_of, PyObject *key, Py_hash_t hash, PyObject *latest) {
    PyObject *seen = get_known(latest_of, key, hash);
    if (seen == NULL && PyErr_Occurred()) return 0;
    Py_INCREF(seen != NULL ? seen : NO_LATEST);
    int later = PyObject_RichCompareBool(seen != NULL ? seen : NO_LATEST, latest, Py_LT);
    Py_DECREF(seen != NULL ? seen : NO_LATEST);
    return later < 0 ? 0 : (!later || set_known(latest_of, key, latest, hash) == 0);
}

/* One total to change: its key, the key's hash, the delta's (count, total, latest). */
typedef struct {
    PyObject *key;
    Py_hash_t hash;
    PyObject *const *sums;
    int watched;
} Period;

/* ``period``'s total plus its delta, stored in ``changed`` and ``totals`` (``dicts[1]``,
 * ``dicts[0]``); its latest event time noted in ``dicts[2]`` if watched. */
static int add_period(const Period *period, PyObject *const *dicts) {
    PyObject *key = period->key, *const *sums = period->sums;
    Py_hash_t hash = period->hash;
    PyObject *value = new_total(dicts[0], key, hash, sums[0], sums[1]);
    int ok = value != NULL && set_known(dicts[1], key, value, hash) == 0
        && set_known(dicts[0], key, value, hash) == 0
        && (!period->watched || note_latest(dicts[2], key, hash, sums[2]));
    Py_XDECREF(value);
    return ok;
}

/* ``period`` for (org, customer, code, kind, start); 0 on error. */
static int period_of(Period *period, PyObject *const *id, PyObject *kind, PyObject *start,
                     PyObject *const *sums, int watched) {
    period->key = plain(PyTuple_Pack(5, id[0], id[1], id[2], kind, start));
    if (period->key == NULL) return 0;
    period->hash = PyObject_Hash(period->key);
    period->sums = sums;
    period->watched = watched;
    return period->hash != -1;
}

/* The month start of ``day`` from ``months`` (the batch's cache), else month_start(day). */
static PyObject *month_of(PyObject *months, PyObject *month_start, PyObject *day) {
    PyObject *month = PyDict_GetItemWithError(months, day);
    if (month != NULL) {
        Py_INCREF(month);
        return month;
    }
    if (PyErr_Occurred()) return NULL;
    month = PyObject_CallOneArg(month_start, day);
    if (month != NULL && PyDict_SetItem(months, day, month) < 0) Py_CLEAR(month);
    return month;
}

/* Whether every delta is a 4-tuple key with a 3-tuple value (as the shard makes them). */
static int plain_deltas(PyObject *deltas) {
    Py_ssize_t at = 0;
    PyObject *key, *value;
    while (PyDict_Next(deltas, &at, &key, &value))
        if (!PyTuple_CheckExact(key) || PyTuple_GET_SIZE(key) != 4 || !PyTuple_CheckExact(value)
                || PyTuple_GET_SIZE(value) != 3)
            return 0;
    return 1;
}

/* The day and month periods of every delta, in order, into ``periods`` (``*made`` of them;
 * ``held``: the deltas' values, kept alive while their sums are read); 0 on error. */
static int periods_of(PyObject *deltas, PyObject *months, PyObject *month_start,
                      PyObject *watched, Period *periods, PyObject **held, Py_ssize_t *made) {
    Py_ssize_t at = 0, n = PyDict_GET_SIZE(deltas);
    PyObject *key, *value;
    int check = PyObject_IsTrue(watched);
    if (check < 0) return 0;
    while (*made < 2 * n && PyDict_Next(deltas, &at, &key, &value)) {
        if (!PyTuple_CheckExact(key) || PyTuple_GET_SIZE(key) != 4 || !PyTuple_CheckExact(value)
                || PyTuple_GET_SIZE(value) != 3) {
            PyErr_SetString(PyExc_RuntimeError, "fold(): the deltas changed while folded");
            return 0;
        }
        Py_INCREF(value);
        held[*made / 2] = value;
        PyObject *const *id = &PyTuple_GET_ITEM(key, 0), *const *sums = &PyTuple_GET_ITEM(value, 0);
        int watch = check ? PySequence_Contains(watched, id[2]) : 0;
        PyObject *month = watch < 0 ? NULL : month_of(months, month_start, id[3]);
        Period *day_period = &periods[(*made)++], *month_period = &periods[(*made)++];
        int ok = month != NULL && period_of(day_period, id, DAY, id[3], sums, watch)
            && period_of(month_period, id, MONTH, month, sums, watch);
        Py_XDECREF(month);
        if (!ok) return 0;
    }
    return 1;
}

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030D0000
/* CPython 3.11's and 3.12's dict keys (Include/internal/pycore_dict.h), read to prefetch. */
typedef struct {
    Py_ssize_t dk_refcnt;
    uint8_t dk_log2_size;
    uint8_t dk_log2_index_bytes;
    uint8_t dk_kind;
    uint32_t dk_version;
    Py_ssize_t dk_usable;
    Py_ssize_t dk_nentries;
    char dk_indices[];
} Keys;

typedef struct {
    Py_hash_t me_hash;
    PyObject *me_key;
    PyObject *me_value;
} Entry;

static Keys *keys_of(PyObject *d) { return (Keys *)((PyDictObject *)d)->ma_keys; }

/* The index slot ``i`` of ``keys``. */
static const char *slot_at(const Keys *keys, size_t i) {
    return keys->dk_indices + (i << (keys->dk_log2_index_bytes - keys->dk_log2_size));
}

/* The entry that index slot ``i`` of ``keys`` points to; NULL for an empty slot, -1 cast for
 * a deleted one. */
static const Entry *entry_at(const Keys *keys, size_t i) {
    const char *slot = slot_at(keys, i);
    Py_ssize_t index;
    switch (keys->dk_log2_index_bytes - keys->dk_log2_size) {
    case 0: index = *(const int8_t *)slot; break;
    case 1: index = *(const int16_t *)slot; break;
    case 2: index = *(const int32_t *)slot; break;
    default: index = *(const int64_t *)slot; break;
    }
    if (index == -1) return NULL; /* DKIX_EMPTY: the probes stop here */
    if (index < 0 || index >= keys->dk_nentries) return (const Entry *)-1; /* DKIX_DUMMY */
    return (const Entry *)(keys->dk_indices + ((size_t)1 << keys->dk_log2_index_bytes)) + index;
}

/* The live entry holding ``hash`` among the first PROBES slots of ``keys`` (a key's
 * entry where the totals hold it), or NULL; only for keys of any kind (the totals'). */
static const Entry *entry_of(const Keys *keys, Py_hash_t hash) {
    if (keys->dk_kind != 0) return NULL; /* DICT_KEYS_GENERAL: entries as Entry says */
    size_t mask = ((size_t)1 << keys->dk_log2_size) - 1, perturb = (size_t)hash, i = perturb & mask;
    for (int probe = 0; probe < PROBES; probe++) {
        const Entry *entry = entry_at(keys, i);
        if (entry == NULL) return NULL;
        if (entry != (const Entry *)-1 && entry->me_hash == hash) return entry;
        perturb >>= 5;
        i = mask & (i * 5 + perturb + 1);
    }
    return NULL;
}

/* Fetch the items of ``tuple`` (an object the dict holds), if it is a tuple. */
static void fetch_items(PyObject *tuple) {
    if (tuple == NULL || !PyTuple_CheckExact(tuple)) return;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(tuple); k++)
        __builtin_prefetch(PyTuple_GET_ITEM(tuple, k));
}

/* Fetch what the stores of the periods ahead will read, each in its turn: the first PROBES
 * index slots of the one 2 * AHEAD ahead (a lookup probes the slots of a hash in a fixed
 * order); the entries those of the one AHEAD ahead point to, up to an empty slot; for the one
 * AHEAD / 2 ahead, the key and total objects of the entry holding its key, if the totals
 * hold it; and for the one AHEAD / 4 ahead, their items (the key compared item by item, the
 * count and total added, the old total freed). Small dicts stay in the cache: nothing is
 * fetched for them. Not inlined nor analysed (noipa): GCC finds a function that only reads
 * and prefetches pure, and drops its calls, prefetches and all. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((noipa))
#endif
static void prefetch(PyObject *d, const Period *periods, Py_ssize_t k, Py_ssize_t n) {
    const Keys *keys = keys_of(d);
    if (!layout_known || keys->dk_log2_size < 14) return;
    size_t mask = ((size_t)1 << keys->dk_log2_size) - 1;
    if (k + 2 * AHEAD < n) {
        size_t perturb = (size_t)periods[k + 2 * AHEAD].hash, i = perturb & mask;
        for (int probe = 0; probe < PROBES; probe++) {
            __builtin_prefetch(slot_at(keys, i));
            perturb >>= 5;
            i = mask & (i * 5 + perturb + 1);
        }
    }
    if (k + AHEAD < n) {
        size_t perturb = (size_t)periods[k + AHEAD].hash, i = perturb & mask;
        for (int probe = 0; probe < PROBES; probe++) {
            const Entry *entry = entry_at(keys, i);
            if (entry == NULL) break;
            if (entry != (const Entry *)-1) __builtin_prefetch(entry);
            perturb >>= 5;
            i = mask & (i * 5 + perturb + 1);
        }
    }
    const Entry *entry = k + AHEAD / 2 < n ? entry_of(keys, periods[k + AHEAD / 2].hash) : NULL;
    if (entry != NULL) {
        __builtin_prefetch(entry->me_key);
        __builtin_prefetch(entry->me_value);
    }
    entry = k + AHEAD / 4 < n ? entry_of(keys, periods[k + AHEAD / 4].hash) : NULL;
    if (entry != NULL) {
        fetch_items(entry->me_key);
        fetch_items(entry->me_value);
    }
}

/* Whether a dict made here reads as the layout above says: else nothing is prefetched. */
static int check_layout(void) {
    PyObject *d = PyDict_New(), *key = PyLong_FromLong(12345);
    int ok = d != NULL && key != NULL;
    for (long k = 0; ok && k < 300; k++) { /* 1-byte, then 2-byte indices */
        PyObject *filler = PyLong_FromLong(1000000 + k);
        ok = filler != NULL && PyDict_SetItem(d, filler, Py_None) == 0;
        Py_XDECREF(filler);
        if (ok && (k == 0 || k == 299)) {
            ok = PyDict_SetItem(d, key, Py_True) == 0;
            const Keys *keys = keys_of(d);
            ok = ok && keys->dk_kind == 0 && keys->dk_log2_size >= 3
                && keys->dk_log2_size < 8 * sizeof(Py_ssize_t)
                && keys->dk_log2_index_bytes >= keys->dk_log2_size
                && keys->dk_log2_index_bytes <= keys->dk_log2_size + 3;
            /* 12345 hashes to itself and no other key shares its first slot */
            size_t slot = 12345 & (((size_t)1 << (ok ? keys->dk_log2_size : 0)) - 1);
            const Entry *entry = ok ? entry_at(keys, slot) : NULL;
            ok = ok && entry != NULL && entry != (const Entry *)-1 && entry->me_key == key
                && entry->me_value == Py_True && entry->me_hash == 12345
                && PyDict_DelItem(d, key) == 0;
        }
    }
    Py_XDECREF(d);
    Py_XDECREF(key);
    PyErr_Clear();
    return ok;
}
#else
static void prefetch(PyObject *d, const Period *periods, Py_ssize_t k, Py_ssize_t n) {
    (void)d, (void)periods, (void)k, (void)n;
}
static int check_layout(void) { return 0; }
#endif

/* Fold every delta; 0 on error. */
static int fold_deltas(PyObject *deltas, PyObject *months, PyObject *month_start,
                       PyObject *watched, PyObject *const *dicts) {
    Py_ssize_t n = PyDict_GET_SIZE(deltas), made = 0;
    Period *periods = PyMem_Calloc(2 * n + 1, sizeof(Period));
    PyObject **held = PyMem_Calloc(n + 1, sizeof(PyObject *));
    int ok = periods != NULL && held != NULL;
    if (!ok) PyErr_NoMemory();
    ok = ok && periods_of(deltas, months, month_start, watched, periods, held, &made);
    for (Py_ssize_t k = 0; ok && k < made; k++) {
        prefetch(dicts[0], periods, k, made); /* the totals */
        ok = add_period(&periods[k], dicts);
    }
    for (Py_ssize_t k = 0; periods != NULL && k < made; k++) Py_XDECREF(periods[k].key);
    for (Py_ssize_t k = 0; held != NULL && k < n; k++) Py_XDECREF(held[k]);
    PyMem_Free(periods);
    PyMem_Free(held);
    return ok;
}

PyDoc_STRVAR(fold_doc,
"fold(deltas, totals, changed, latest_of, months, month_start, watched) -> bool\n\n"
"Add each delta ``{(org, customer, code, day): (count, total, latest)}`` to the totals of its\n"
"day and month (``month_start(day)``, cached in ``months``), storing each new total in\n"
"``totals`` and ``changed``; for a code in ``watched``, ``latest_of[key]`` becomes\n"
"the latest event time. False, with nothing changed, if a key is not a 4-tuple or a value\n"
"not a 3-tuple (the pure path then folds them).");

static PyObject *fold(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "fold() takes 7 arguments");
        return NULL;
    }
    PyObject *deltas = args[0], *months = args[4], *month_start = args[5], *watched = args[6];
    for (int d = 0; d < 5; d++)
        if (!PyDict_CheckExact(args[d])) {
            PyErr_SetString(PyExc_TypeError, "fold(): deltas, totals, changed, latest_of "
                                             "and months must be dicts");
            return NULL;
        }
    if (!plain_deltas(deltas)) Py_RETURN_FALSE;
    if (!fold_deltas(deltas, months, month_start, watched, args + 1)) return NULL;
    Py_RETURN_TRUE;
}

/* ``key + (start,)``, a tuple (``key`` is one). */
static PyObject *day_key_of(PyObject *key, PyObject *start) {
    Py_ssize_t width = PyTuple_GET_SIZE(key);
    PyObject *day_key = PyTuple_New(width + 1);
    if (day_key == NULL) return NULL;
    for (Py_ssize_t k = 0; k < width; k++) {
        Py_INCREF(PyTuple_GET_ITEM(key, k));
        PyTuple_SET_ITEM(day_key, k, PyTuple_GET_ITEM(key, k));
    }
    Py_INCREF(start);
    PyTuple_SET_ITEM(day_key, width, start);
    return plain(day_key);
}

/* ``(count, total, latest)``, or ``had``'s plus them (the later of the two times). */
static PyObject *day_sums(PyObject *had, PyObject *count, PyObject *total, PyObject *latest) {
    if (had == NULL) return plain(PyTuple_Pack(3, count, total, latest));
    PyObject *sums = PyTuple_New(3);
    if (sums == NULL) return NULL;
    Py_INCREF(had); /* an addition may run Python code that changes the dict */
    PyObject *parts[3] = {NULL, NULL, NULL}, *adds[2] = {count, total};
    int ok = 1;
    for (Py_ssize_t k = 0; ok && k < 3; k++) ok = (parts[k] = item(had, k)) != NULL;
    for (int k = 0; ok && k < 2; k++) {
        PyObject *sum = PyNumber_Add(parts[k], adds[k]);
        ok = sum != NULL;
        Py_XSETREF(parts[k], sum);
    }
    int later = ok ? PyObject_RichCompareBool(latest, parts[2], Py_GT) : -1; /* max(old, latest) */
    if (later > 0) {
        Py_INCREF(latest);
        Py_SETREF(parts[2], latest);
    }
    Py_DECREF(had);
    if (later < 0) {
        for (int k = 0; k < 3; k++) Py_XDECREF(parts[k]);
        Py_DECREF(sums);
        return NULL;
    }
    for (int k = 0; k < 3; k++) PyTuple_SET_ITEM(sums, k, parts[k]);
    return plain(sums);
}

PyDoc_STRVAR(add_days_doc,
"add_days(counted, keys, starts, counts, totals, latest) -> bool\n\n"
"Add the day groups (parallel lists) to ``counted``, ``{key + (start,): (count, total,\n"
"latest)}``, in their order: stored as they are where ``counted`` is empty, else summed with\n"
"what it holds (the later time). False, with nothing changed, if a list is not a list or a\n"
"key not a tuple (the pure path then adds them).");

static PyObject *add_days(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "add_days() takes 6 arguments");
        return NULL;
    }
    PyObject *counted = args[0];
    if (!PyDict_CheckExact(counted)) {
        PyErr_SetString(PyExc_TypeError, "add_days(): counted must be a dict");
        return NULL;
    }
    Py_ssize_t n = PY_SSIZE_T_MAX;
    for (int c = 1; c < 6; c++) {
        if (!PyList_CheckExact(args[c])) Py_RETURN_FALSE;
        if (PyList_GET_SIZE(args[c]) < n) n = PyList_GET_SIZE(args[c]); /* zip's length */
    }
    for (Py_ssize_t k = 0; k < n; k++)
        if (!PyTuple_CheckExact(PyList_GET_ITEM(args[1], k))) Py_RETURN_FALSE;
    int fresh = PyDict_GET_SIZE(counted) == 0; /* the batch's first decision: stored as they are */
    PyObject *lists = PyTuple_Pack(5, args[1], args[2], args[3], args[4], args[5]);
    if (lists == NULL) return NULL; /* held: the lists' items stay alive while added */
    int ok = 1;
    for (Py_ssize_t k = 0; ok && k < n; k++) {
        PyObject *at[5];
        for (int c = 0; c < 5; c++) {
            PyObject *column = PyTuple_GET_ITEM(lists, c);
            ok = ok && k < PyList_GET_SIZE(column);
            at[c] = ok ? PyList_GET_ITEM(column, k) : NULL;
            Py_XINCREF(at[c]);
        }
        if (!ok) PyErr_SetString(PyExc_RuntimeError, "add_days(): the groups changed while added");
        ok = ok && PyTuple_Check(at[0]);
        PyObject *day_key = ok ? day_key_of(at[0], at[1]) : NULL, *sums = NULL;
        Py_hash_t hash = day_key == NULL ? -1 : PyObject_Hash(day_key);
        if (hash != -1) {
            PyObject *had = fresh ? NULL : get_known(counted, day_key, hash);
            if (had != NULL || !PyErr_Occurred()) sums = day_sums(had, at[2], at[3], at[4]);
        }
        ok = sums != NULL && set_known(counted, day_key, sums, hash) == 0;
        Py_XDECREF(sums);
        Py_XDECREF(day_key);
        for (int c = 0; c < 5; c++) Py_XDECREF(at[c]);
    }
    Py_DECREF(lists);
    if (!ok) return NULL;
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(presized_doc,
"presized(n) -> dict\n\n"
"An empty dict with room for ``n`` entries: a batch's changed totals are stored in it\n"
"without the dict growing (and rehashing) a dozen times on the way.");

static PyObject *presized(PyObject *self, PyObject *n) {
    Py_ssize_t entries = PyLong_AsSsize_t(n);
    if (entries == -1 && PyErr_Occurred()) return NULL;
    return _PyDict_NewPresized(entries < 0 ? 0 : entries);
}

static PyMethodDef methods[] = {
    {"fold", (PyCFunction)(void (*)(void))fold, METH_FASTCALL, fold_doc},
    {"presized", (PyCFunction)presized, METH_O, presized_doc},
    {"add_days", (PyCFunction)(void (*)(void))add_days, METH_FASTCALL, add_days_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "operators._fastlive",
    "The live totals' compiled fast path (see operators/live_totals.py).", -1, methods, NULL, NULL,
    NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastlive(void) {
    DAY = PyUnicode_InternFromString("day");
    MONTH = PyUnicode_InternFromString("month");
    NO_LATEST = PyLong_FromLong(-1);
    if (DAY == NULL || MONTH == NULL || NO_LATEST == NULL) return NULL;
    layout_known = check_layout();
    PyObject *created = PyModule_Create(&module);
    /* what operators/live_totals.py expects (_INTERFACE): a build from another version is not used */
    if (created != NULL && PyModule_AddIntConstant(created, "INTERFACE", 3) < 0) Py_CLEAR(created);
    /* whether the dicts' slots are prefetched (CPython 3.11 or 3.12, its layout checked) */
    if (created != NULL && PyModule_AddIntConstant(created, "PREFETCH", layout_known) < 0) Py_CLEAR(created);
    return created;
}
