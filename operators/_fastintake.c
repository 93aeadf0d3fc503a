/* The intake's compiled fast path: decode, validate and route the usual usage event.
 *
 * One function, scan(), walks a poll's values from an index and finishes every event whose
 * message has the usual shape: a flat JSON object, ids of printable ASCII, an epoch-ms or usual
 * RFC 3339 timestamp, an unsigned plain-decimal value, an organization already routed, on time,
 * of a code with no catalog metric. It stops at the first message it does not finish and
 * returns that index: the pure-Python intake (operators/intake.py) handles that one message by
 * the general rule, then calls scan() again after it. So the compiled code never decides
 * anything the Python code would decide differently: it either gives the same ShardEvent or
 * declines (tests/test_fast_intake.py checks both paths against each other).
 *
 * Declining is always safe, so every doubt declines: escapes, non-ASCII bytes, exponents,
 * signs, duplicate fields, nesting deeper than MAX_SKIP_DEPTH, numbers of more digits than
 * fit, leap seconds, timestamps outside 1970-01-01..2260-12-31.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_ID_LENGTH 256
#define MAX_TIMESTAMP_MS 9183110399999LL
#define VALUE_SCALE 18
#define MAX_VALUE_DIGITS 38
#define MAX_SKIP_DEPTH 16

typedef struct {
    const char *start;
    Py_ssize_t length;
} Span;

typedef struct {
    Span ids[4]; /* transaction_id, organization_id, external_customer_id, code */
    int64_t timestamp_ms;
    unsigned __int128 value_scaled;
    unsigned seen;
} Fields;

enum { F_TRANSACTION, F_ORGANIZATION, F_CUSTOMER, F_CODE, F_TIMESTAMP, F_VALUE, F_PROPERTIES };

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

/* A JSON string of printable ASCII with no escape, p at its opening quote: the text inside. */
static const char *plain_string(const char *p, const char *end, Span *text) {
    const char *q = p + 1;
    while (q < end) {
        unsigned char c = (unsigned char)*q;
        if (c == '"') {
            text->start = p + 1;
            text->length = q - p - 1;
            return q + 1;
        }
        if (c < 0x20 || c > 0x7E || c == '\\') return NULL;
        q++;
    }
    return NULL;
}

/* A JSON number without sign or exponent: int part, then an optional fraction. */
static const char *plain_number(const char *p, const char *end, Span *whole, Span *fraction) {
    const char *q = p;
    if (q >= end || !is_digit(*q)) return NULL;
    if (*q == '0') {
        q++;
    } else {
        while (q < end && is_digit(*q)) q++;
    }
    whole->start = p;
    whole->length = q - p;
    fraction->start = q;
    fraction->length = 0;
    if (q < end && *q == '.') {
        const char *f = ++q;
        while (q < end && is_digit(*q)) q++;
        if (q == f) return NULL;
        fraction->start = f;
        fraction->length = q - f;
    }
    if (q < end && (*q == 'e' || *q == 'E' || is_digit(*q))) return NULL;
    return q;
}

/* Skip any JSON value the decoder surely accepts and reads exactly; NULL to decline. */
static const char *skip_value(const char *p, const char *end, int depth) {
    Span a, b;
    if (p >= end) return NULL;
    switch (*p) {
    case '"':
        return plain_string(p, end, &a);
    case '{':
    case '[': {
        char close = *p == '{' ? '}' : ']';
        int object = *p == '{';
        if (depth >= MAX_SKIP_DEPTH) return NULL;
        p = skip_ws(p + 1, end);
        if (p < end && *p == close) return p + 1;
        for (;;) {
            if (object) {
                if (p >= end || *p != '"') return NULL;
                p = plain_string(p, end, &a);
                if (p == NULL) return NULL;
                p = skip_ws(p, end);
                if (p >= end || *p != ':') return NULL;
                p = skip_ws(p + 1, end);
            }
            p = skip_value(p, end, depth + 1);
            if (p == NULL) return NULL;
            p = skip_ws(p, end);
            if (p >= end) return NULL;
            if (*p == close) return p + 1;
            if (*p != ',') return NULL;
            p = skip_ws(p + 1, end);
        }
    }
    case 't':
        return end - p >= 4 && memcmp(p, "true", 4) == 0 ? p + 4 : NULL;
    case 'f':
        return end - p >= 5 && memcmp(p, "false", 5) == 0 ? p + 5 : NULL;
    case 'n':
        return end - p >= 4 && memcmp(p, "null", 4) == 0 ? p + 4 : NULL;
    default: {
        const char *q = plain_number(p, end, &a, &b);
        /* integers of up to 18 digits (64 bits) and plain decimals: exact in the decoder */
        if (q == NULL || (b.length == 0 && a.length > 18)) return NULL;
        return q;
    }
    }
}

static int64_t two_digits(const char *p) {
    if (!is_digit(p[0]) || !is_digit(p[1])) return -1;
    return (p[0] - '0') * 10 + (p[1] - '0');
}

static int64_t days_from_civil(int64_t year, int64_t month, int64_t day) {
    year -= month <= 2;
    int64_t era = (year >= 0 ? year : year - 399) / 400;
    int64_t year_of_era = year - era * 400;
    int64_t day_of_year = (153 * (month + (month > 2 ? -3 : 9)) + 2) / 5 + day - 1;
    int64_t day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    return era * 146097 + day_of_era - 719468;
}

/* Epoch ms of YYYY-MM-DD[Tt ]HH:MM:SS[.digits](Z|z|+hh:mm|-hh:mm); -1 to decline. */
static int64_t rfc3339_ms(const char *s, Py_ssize_t n) {
    static const int days_in_month[13] = {0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (n < 20 || s[4] != '-' || s[7] != '-' || s[13] != ':' || s[16] != ':') return -1;
    if (s[10] != 'T' && s[10] != 't' && s[10] != ' ') return -1;
    int64_t century = two_digits(s), year_in = two_digits(s + 2), month = two_digits(s + 5),
            day = two_digits(s + 8), hour = two_digits(s + 11), minute = two_digits(s + 14),
            second = two_digits(s + 17);
    if (century < 0 || year_in < 0 || month < 1 || month > 12 || day < 1 || hour < 0 || hour > 23 ||
        minute < 0 || minute > 59 || second < 0 || second > 59)
        return -1;
    int64_t year = century * 100 + year_in;
    int leap = month == 2 && year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    if (day > days_in_month[month] + leap) return -1;
    Py_ssize_t i = 19;
    int64_t millis = 0;
    if (s[i] == '.') {
        Py_ssize_t first = ++i;
        while (i < n && is_digit(s[i])) {
            if (i - first < 3) millis = millis * 10 + (s[i] - '0');
            i++;
        }
        if (i == first) return -1;
        for (Py_ssize_t k = i - first; k < 3; k++) millis *= 10;
    }
    int64_t offset_ms = 0;
    if (i + 1 == n && (s[i] == 'Z' || s[i] == 'z')) {
        offset_ms = 0;
    } else if (i + 6 == n && (s[i] == '+' || s[i] == '-') && s[i + 3] == ':') {
        int64_t offset_hours = two_digits(s + i + 1), offset_minutes = two_digits(s + i + 4);
        if (offset_hours < 0 || offset_hours > 23 || offset_minutes < 0 || offset_minutes > 59)
            return -1;
        offset_ms = (offset_hours * 60 + offset_minutes) * 60000;
        if (s[i] == '+') offset_ms = -offset_ms;
    } else {
        return -1;
    }
    int64_t result =
        ((days_from_civil(year, month, day) * 24 + hour) * 60 + minute) * 60000 + second * 1000 +
        millis + offset_ms;
    return result >= 0 && result <= MAX_TIMESTAMP_MS ? result : -1;
}

static const char *read_timestamp(const char *p, const char *end, int64_t *out) {
    if (*p == '"') {
        Span text;
        const char *q = plain_string(p, end, &text);
        if (q == NULL) return NULL;
        *out = rfc3339_ms(text.start, text.length);
        return *out < 0 ? NULL : q;
    }
    Span whole, fraction;
    const char *q = plain_number(p, end, &whole, &fraction);
    if (q == NULL || fraction.length > 0 || whole.length > 16) return NULL;
    int64_t millis = 0;
    for (Py_ssize_t i = 0; i < whole.length; i++) millis = millis * 10 + (whole.start[i] - '0');
    if (millis > MAX_TIMESTAMP_MS) return NULL;
    *out = millis;
    return q;
}

/* digits scaled by 10**18: at most 38 digits in all, at most 18 after the point */
static int scale_digits(Span whole, Span fraction, unsigned __int128 *out) {
    if (whole.length + fraction.length == 0 || whole.length + fraction.length > MAX_VALUE_DIGITS ||
        fraction.length > VALUE_SCALE)
        return 0;
    unsigned __int128 scaled = 0;
    int significant = 0;
    for (Py_ssize_t i = 0; i < whole.length; i++) {
        if (!is_digit(whole.start[i])) return 0;
        scaled = scaled * 10 + (unsigned)(whole.start[i] - '0');
        if (scaled) significant++;
    }
    for (Py_ssize_t i = 0; i < fraction.length; i++) {
        if (!is_digit(fraction.start[i])) return 0;
        scaled = scaled * 10 + (unsigned)(fraction.start[i] - '0');
        if (scaled) significant++;
    }
    /* at most 38 digits once scaled: below 10**38, and far below 2**128 while computing */
    if (significant + VALUE_SCALE - fraction.length > MAX_VALUE_DIGITS) return 0;
    for (Py_ssize_t i = fraction.length; i < VALUE_SCALE; i++) scaled *= 10;
    *out = scaled;
    return 1;
}

static const char *read_value(const char *p, const char *end, unsigned __int128 *out) {
    Span whole, fraction;
    if (*p == 'n') {
        if (end - p < 4 || memcmp(p, "null", 4) != 0) return NULL;
        *out = 0;
        return p + 4;
    }
    if (*p == '"') { /* a numeric string: digits, at most one point, at least one digit */
        Span text;
        const char *q = plain_string(p, end, &text);
        if (q == NULL) return NULL;
        const char *point = memchr(text.start, '.', text.length);
        whole.start = text.start;
        whole.length = point ? point - text.start : text.length;
        fraction.start = point ? point + 1 : text.start + text.length;
        fraction.length = point ? text.start + text.length - point - 1 : 0;
        return scale_digits(whole, fraction, out) ? q : NULL;
    }
    const char *q = plain_number(p, end, &whole, &fraction);
    if (q == NULL) return NULL;
    return scale_digits(whole, fraction, out) ? q : NULL;
}

static int field_of(Span key) {
    switch (key.length) {
    case 4:
        if (memcmp(key.start, "code", 4) == 0) return F_CODE;
        break;
    case 5:
        if (memcmp(key.start, "value", 5) == 0) return F_VALUE;
        break;
    case 9:
        if (memcmp(key.start, "timestamp", 9) == 0) return F_TIMESTAMP;
        break;
    case 10:
        if (memcmp(key.start, "properties", 10) == 0) return F_PROPERTIES;
        break;
    case 14:
        if (memcmp(key.start, "transaction_id", 14) == 0) return F_TRANSACTION;
        break;
    case 15:
        if (memcmp(key.start, "organization_id", 15) == 0) return F_ORGANIZATION;
        break;
    case 20:
        if (memcmp(key.start, "external_customer_id", 20) == 0) return F_CUSTOMER;
        break;
    }
    return -1;
}

/* Decode the usual event; 0 to decline. */
static int decode_event(const char *p, Py_ssize_t n, Fields *out) {
    const char *end = p + n;
    out->seen = 0;
    out->value_scaled = 0;
    p = skip_ws(p, end);
    if (p >= end || *p != '{') return 0;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') return 0; /* no fields: missing ones */
    for (;;) {
        Span key;
        if (p >= end || *p != '"') return 0;
        p = plain_string(p, end, &key);
        if (p == NULL) return 0;
        p = skip_ws(p, end);
        if (p >= end || *p != ':') return 0;
        p = skip_ws(p + 1, end);
        if (p >= end) return 0;
        int field = field_of(key);
        if (field >= 0) {
            if (out->seen & (1u << field)) return 0; /* a repeated field */
            out->seen |= 1u << field;
        }
        if (field >= F_TRANSACTION && field <= F_CODE) {
            Span *id = &out->ids[field];
            if (*p != '"') return 0;
            p = plain_string(p, end, id);
            if (p == NULL || id->length < 1 || id->length > MAX_ID_LENGTH) return 0;
        } else if (field == F_TIMESTAMP) {
            p = read_timestamp(p, end, &out->timestamp_ms);
        } else if (field == F_VALUE) {
            p = read_value(p, end, &out->value_scaled);
        } else if (field == F_PROPERTIES) {
            if (*p != '{') return 0;
            p = skip_value(p, end, 1);
        } else {
            p = skip_value(p, end, 1);
        }
        if (p == NULL) return 0;
        p = skip_ws(p, end);
        if (p >= end) return 0;
        if (*p == '}') break;
        if (*p != ',') return 0;
        p = skip_ws(p + 1, end);
    }
    const unsigned required = (1u << F_TRANSACTION) | (1u << F_ORGANIZATION) |
                              (1u << F_CUSTOMER) | (1u << F_CODE) | (1u << F_TIMESTAMP);
    if ((out->seen & required) != required) return 0;
    return skip_ws(p + 1, end) == end;
}

static PyObject *ascii_text(Span span) {
    PyObject *text = PyUnicode_New(span.length, 127);
    if (text != NULL) memcpy(PyUnicode_1BYTE_DATA(text), span.start, span.length);
    return text;
}

#define TEXT_CACHE_SLOTS 256
static PyObject *organization_texts[TEXT_CACHE_SLOTS], *code_texts[TEXT_CACHE_SLOTS];

/* The str of an id that repeats (organizations, codes): the last one made for its slot when it
 * has the same text, so events share one object and its hash is computed once. */
static PyObject *cached_text(PyObject **cache, Span span) {
    uint32_t hash = 2166136261u;
    for (Py_ssize_t i = 0; i < span.length; i++) hash = (hash ^ (unsigned char)span.start[i]) * 16777619u;
    PyObject **slot = &cache[hash & (TEXT_CACHE_SLOTS - 1)];
    PyObject *text = *slot;
    if (text != NULL && PyUnicode_GET_LENGTH(text) == span.length &&
        memcmp(PyUnicode_1BYTE_DATA(text), span.start, span.length) == 0) {
        Py_INCREF(text);
        return text;
    }
    text = ascii_text(span);
    if (text == NULL) return NULL;
    Py_INCREF(text);
    Py_XSETREF(*slot, text);
    return text;
}

static PyObject *scaled_int(unsigned __int128 value) {
    if (value <= (unsigned __int128)INT64_MAX) return PyLong_FromLongLong((long long)value);
    unsigned char bytes[16];
    for (int i = 0; i < 16; i++) bytes[i] = (unsigned char)(value >> (8 * i));
    return _PyLong_FromByteArray(bytes, 16, 1, 0);
}

static int as_int64(PyObject *number, int64_t *out) {
    long long value = PyLong_AsLongLong(number);
    if (value == -1 && PyErr_Occurred()) return 0;
    *out = value;
    return 1;
}

/* The dedup digest: digest_of(prefix + transaction_id) - 2**63, as a signed 64-bit int. */
static PyObject *digest(PyObject *digest_of, PyObject *prefix, Span transaction) {
    Py_ssize_t prefix_length = PyBytes_GET_SIZE(prefix);
    PyObject *text = PyBytes_FromStringAndSize(NULL, prefix_length + transaction.length);
    if (text == NULL) return NULL;
    memcpy(PyBytes_AS_STRING(text), PyBytes_AS_STRING(prefix), prefix_length);
    memcpy(PyBytes_AS_STRING(text) + prefix_length, transaction.start, transaction.length);
    PyObject *hashed = PyObject_CallOneArg(digest_of, text);
    Py_DECREF(text);
    if (hashed == NULL) return NULL;
    unsigned long long unsigned_digest = PyLong_AsUnsignedLongLong(hashed);
    Py_DECREF(hashed);
    if (unsigned_digest == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong((long long)(unsigned_digest - (1ULL << 63)));
}

/* Build the ShardEvent of a decoded event and append it to its shard's list. */
static int append_event(PyObject *event_type, PyObject *events, Fields *fields, PyObject *organization,
                        PyObject *code, PyObject *prefix, PyObject *digest_of, int64_t watermark,
                        PyObject *offset) {
    PyObject *args[10] = {NULL};
    int ok = 0;
    args[0] = digest(digest_of, prefix, fields->ids[F_TRANSACTION]);
    args[1] = organization;
    Py_INCREF(organization);
    args[2] = ascii_text(fields->ids[F_CUSTOMER]);
    args[3] = code;
    Py_INCREF(code);
    args[4] = PyLong_FromLongLong(fields->timestamp_ms);
    args[5] = scaled_int(fields->value_scaled);
    args[6] = PyLong_FromLongLong(watermark);
    args[7] = offset;
    Py_INCREF(offset);
    args[8] = ascii_text(fields->ids[F_TRANSACTION]);
    args[9] = Py_None;
    Py_INCREF(Py_None);
    for (int i = 0; i < 10; i++)
        if (args[i] == NULL) goto done;
    PyObject *event = PyObject_Vectorcall(event_type, args, 10, NULL);
    if (event == NULL) goto done;
    ok = PyList_Append(events, event) == 0;
    Py_DECREF(event);
done:
    for (int i = 0; i < 10; i++) Py_XDECREF(args[i]);
    return ok;
}

/* Route a decoded event and append its ShardEvent: 1 done, 0 left to Python, -1 an error. */
static int finish_event(PyObject *const *args, Py_ssize_t index, Fields *fields, PyObject *organization,
                        PyObject *code, int64_t watermark) {
    PyObject *offsets = args[1], *routes = args[9], *digest_of = args[10], *event_type = args[11],
             *metric_codes = args[12], *shard_events = args[13];
    PyObject *route = PyDict_GetItemWithError(routes, organization);
    if (route == NULL) return PyErr_Occurred() ? -1 : 0; /* a new organization: Python routes it */
    if (metric_codes != Py_None) {
        int has_metrics = PySequence_Contains(metric_codes, code);
        if (has_metrics != 0) return has_metrics < 0 ? -1 : 0; /* catalog metrics: Python reads them */
    }
    Py_ssize_t shard = PyLong_AsSsize_t(PyTuple_GET_ITEM(route, 0));
    if (shard == -1 && PyErr_Occurred()) return -1;
    if (shard < 0 || shard >= PyList_GET_SIZE(shard_events)) {
        PyErr_SetString(PyExc_IndexError, "scan(): shard out of range");
        return -1;
    }
    return append_event(event_type, PyList_GET_ITEM(shard_events, shard), fields, organization, code,
                        PyTuple_GET_ITEM(route, 1), digest_of, watermark, PyList_GET_ITEM(offsets, index))
               ? 1 : -1;
}

PyDoc_STRVAR(scan_doc,
"scan(values, offsets, start, record_times, skew_limit, step, end_offset, out_of_orderness,\n"
"     max_event, routes, digest_of, event_type, metric_codes, shard_events) -> (index, max_event)\n"
"\n"
"Finish the usual events of values[start:] in order, appending a ShardEvent to\n"
"shard_events[shard] for each, until a message that needs the general rule: return its\n"
"index (len(values) when none) and the max event time so far (None before any event).\n"
"record_times is None, or each record's (kind, timestamp_ms) when skew_limit applies.");

static PyObject *scan(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "scan() takes 14 arguments");
        return NULL;
    }
    PyObject *values = args[0], *offsets = args[1], *record_times = args[3], *routes = args[9],
             *metric_codes = args[12], *shard_events = args[13];
    Py_ssize_t index = PyLong_AsSsize_t(args[2]);
    int64_t skew_limit, step, end_offset, out_of_orderness, max_event = 0;
    if ((index == -1 && PyErr_Occurred()) || !as_int64(args[4], &skew_limit) ||
        !as_int64(args[5], &step) || !as_int64(args[6], &end_offset) ||
        !as_int64(args[7], &out_of_orderness))
        return NULL;
    int has_max_event = args[8] != Py_None;
    if (has_max_event && !as_int64(args[8], &max_event)) return NULL;
    if (!PyList_Check(values) || !PyList_Check(offsets) || !PyDict_Check(routes) ||
        !PyList_Check(shard_events) || (record_times != Py_None && !PyList_Check(record_times)) ||
        (metric_codes != Py_None && !PyAnySet_Check(metric_codes) && !PyDict_Check(metric_codes)) ||
        step <= 0) {
        PyErr_SetString(PyExc_TypeError, "scan(): unexpected argument types");
        return NULL;
    }
    Py_ssize_t count = PyList_GET_SIZE(values);
    if (PyList_GET_SIZE(offsets) < count ||
        (record_times != Py_None && PyList_GET_SIZE(record_times) < count)) {
        PyErr_SetString(PyExc_ValueError, "scan(): fewer offsets or record times than values");
        return NULL;
    }
    for (; index < count; index++) {
        PyObject *raw = PyList_GET_ITEM(values, index);
        Fields fields;
        if (!PyBytes_Check(raw) || !decode_event(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), &fields))
            break;
        int64_t timestamp = fields.timestamp_ms;
        if (record_times != Py_None) {
            PyObject *time = PyList_GET_ITEM(record_times, index);
            int64_t kind, record_ms;
            if (!PyTuple_Check(time) || PyTuple_GET_SIZE(time) != 2 ||
                !as_int64(PyTuple_GET_ITEM(time, 0), &kind) ||
                !as_int64(PyTuple_GET_ITEM(time, 1), &record_ms)) {
                PyErr_Clear();
                break;
            }
            if (kind && (__int128)timestamp - record_ms > skew_limit) break;
        }
        if (!has_max_event) break; /* a partition's first event: the Python path starts it */
        int64_t watermark = max_event - out_of_orderness; /* both within the accepted range */
        __int128 due = (__int128)timestamp - timestamp % step + end_offset;
        if (due <= watermark) break; /* late: the Python path records it */
        PyObject *organization = cached_text(organization_texts, fields.ids[F_ORGANIZATION]);
        if (organization == NULL) return NULL;
        PyObject *code = cached_text(code_texts, fields.ids[F_CODE]);
        if (code == NULL) {
            Py_DECREF(organization);
            return NULL;
        }
        int finished = finish_event(args, index, &fields, organization, code, watermark);
        Py_DECREF(organization);
        Py_DECREF(code);
        if (finished < 0) return NULL;
        if (finished == 0) break;
        if (timestamp > max_event) max_event = timestamp;
    }
    if (has_max_event) return Py_BuildValue("(nL)", index, (long long)max_event);
    return Py_BuildValue("(nO)", index, Py_None);
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL, scan_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "operators._fastintake",
    "The intake's compiled fast path (see operators/intake.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__fastintake(void) {
    PyObject *created = PyModule_Create(&module);
    /* what operators/intake.py expects (_INTERFACE): a build from another version is not used */
    if (created != NULL && PyModule_AddIntConstant(created, "INTERFACE", 1) < 0) Py_CLEAR(created);
    return created;
}
