# cython: language_level=3, boundscheck=False, wraparound=False
"""The columnar kernel, compiled: the same as `_columnar_py.py` (its specification), with the
per-reading checks in C. The JSON text of a message is scanned by `_scan.pxi`, included at
the end."""

from cpython cimport array
from cpython.object cimport Py_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE
from libc.math cimport NAN, isfinite
from cpython.ref cimport PyObject
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdlib cimport strtod
from libc.string cimport memcmp, memcpy, memset


cdef enum:  # a channel's kind
    NUMBER = 0
    STRING = 1
    BOOLEAN = 2

cdef enum:
    DISTINCT_SLOTS = 1024  # a message run's table of its key objects
    WIDEST = 64  # the most channels of a shape read into a message run

# a time below this is in seconds (refused); above the other, past the year 9999
cdef long long SECONDS_BELOW = 100_000_000_000
cdef long long MAX_LAST_UPDATE = 253_402_300_799_999


cdef struct Reading:
    # one message's values as they are read: per channel 0 (absent), 1 (a Python value in the
    # row list) or 2 (a double in `reals`: no object made for it)
    char state[WIDEST]
    double reals[WIDEST]


cdef inline void _push_long(array.array a, long long v) except *:
    cdef Py_ssize_t k = Py_SIZE(a)
    array.resize_smart(a, k + 1)
    a.data.as_longlongs[k] = v


cdef inline void _push_double(array.array a, double v) except *:
    cdef Py_ssize_t k = Py_SIZE(a)
    array.resize_smart(a, k + 1)
    a.data.as_doubles[k] = v


cdef Py_ssize_t DISTINCT_MAX = 512


cdef object INT64_MIN = -(2**63), INT64_MAX = 2**63 - 1  # a number channel's integers


cdef inline bint _fits(object v, int kind):
    if kind == NUMBER:
        return (type(v) is int and INT64_MIN <= v <= INT64_MAX) or (
            type(v) is float and isfinite(<double>v))
    if kind == STRING:
        return type(v) is str
    if kind == BOOLEAN:
        return type(v) is bool
    return False


def columnar_fits(list times, list columns, list kinds):
    cdef Py_ssize_t i, j, n = len(times), m = len(columns)
    cdef object t
    cdef list column
    cdef int kind
    for i in range(n):
        t = times[i]
        if not (type(t) is int and SECONDS_BELOW <= t <= MAX_LAST_UPDATE):
            return False
    for j in range(m):
        column = <list>columns[j]
        kind = kinds[j]
        for i in range(len(column)):
            if not _fits(column[i], kind):
                return False
    return True


def columnar_updates(list times, list names, list columns, list kinds, object make,
                     object fallback, object invalid):
    cdef list accepted = []
    cdef list rejected = []
    cdef Py_ssize_t n = len(times), m = len(names), i, j
    cdef bint ok
    cdef object t, v
    cdef dict values
    cdef int[64] kind_codes
    cdef list column
    if m > 64:  # wider than any stream we have seen: the twin's way
        from streams.kernels._columnar_py import columnar_updates as twin
        return twin(times, names, columns, kinds, make, fallback, invalid)
    for j in range(m):
        kind_codes[j] = kinds[j]
    for i in range(n):
        t = times[i]
        ok = type(t) is int and SECONDS_BELOW <= t <= MAX_LAST_UPDATE
        values = {}
        j = 0
        while ok and j < m:
            column = <list>columns[j]
            v = column[i]
            ok = _fits(v, kind_codes[j])
            values[names[j]] = v
            j += 1
        if ok:
            accepted.append(make(values, t))
            continue
        try:
            accepted.append(fallback(i))
        except invalid as exc:
            rejected.append(exc.rejection)
    return accepted, rejected


def row_updates(list docs, list kinds, object make):
    cdef list out = []
    cdef Py_ssize_t i, n = len(docs)
    if len(kinds) != n:
        raise ValueError("row_updates: one kinds mapping per document")
    for i in range(n):
        out.append(_row(docs[i], <dict>kinds[i], make))
    return out


cdef object _row(object doc, dict kind_of, object make):
    cdef object t, raw, name, entry, v, k_obj
    cdef dict values
    cdef bint ok
    if type(doc) is not dict or len(<dict>doc) != 2:
        return None
    t = (<dict>doc).get("lastUpdate")
    raw = (<dict>doc).get("channels")
    if type(t) is not int or not SECONDS_BELOW <= t <= MAX_LAST_UPDATE:
        return None
    if type(raw) is not dict or not raw:
        return None
    values = {}
    for name, entry in (<dict>raw).items():
        k_obj = kind_of.get(name)
        if k_obj is None or type(entry) is not dict or len(<dict>entry) != 1:
            return None
        v = (<dict>entry).get("current-value")
        if not _fits(v, k_obj):
            return None
        values[name] = v
    return make(values, t)


cdef object _MessageRun = None, _ColumnRun = None, _columns_of = None


cdef long long _plain(object doc, object shape, list row, Reading* reading) except -1:
    """The twin's `_plain`: the time of a plain document whose channels come in the shape's
    order, its values written into `row` and `reading`; 0 for anything else."""
    cdef object t, raw, name, entry, v, j_obj
    cdef dict column_of = shape.column_of
    cdef list kinds = shape.kinds
    cdef Py_ssize_t j, last = -1
    if type(doc) is not dict or len(<dict>doc) != 2:
        return 0
    t = (<dict>doc).get("lastUpdate")
    raw = (<dict>doc).get("channels")
    if type(t) is not int or not SECONDS_BELOW <= t <= MAX_LAST_UPDATE:
        return 0
    if type(raw) is not dict or not raw:
        return 0
    for name, entry in (<dict>raw).items():
        j_obj = column_of.get(name)
        if j_obj is None:
            return 0
        j = j_obj
        if j <= last or type(entry) is not dict or len(<dict>entry) != 1:
            return 0
        v = (<dict>entry).get("current-value")
        if not _fits(v, kinds[j]):
            return 0
        row[j] = v
        reading.state[j] = 1
        last = j
    return t


cdef bint _plain_list(list docs, object shape, list row, Reading* reading, Py_ssize_t m,
                      bint has_horizon, long long limit) except -1:
    """Whether every update of a list is in the plain shape (`_plain`), none from the
    future: then the list is a message run's rows; else the validator reads it."""
    cdef object doc
    cdef long long t
    if not docs or m > WIDEST:
        return False
    for doc in docs:
        t = _plain(doc, shape, row, reading)
        _clear(row, reading, m)
        if t == 0 or (has_horizon and t > limit):
            return False
    return True


cdef inline void _clear(list row, Reading* reading, Py_ssize_t m) except *:
    """The values of the message read so far dropped: the row and the reading empty again."""
    cdef Py_ssize_t j
    for j in range(min(m, WIDEST)):
        if reading.state[j] == 1:
            row[j] = None
        reading.state[j] = 0


cdef class _Run:
    """The message run being written: its columns, and its key objects counted by identity."""
    cdef object part  # the MessageRun
    cdef list keys, columns, distinct
    cdef array.array times
    cdef PyObject* seen[DISTINCT_SLOTS]

    def __cinit__(self, object shape, list kinds, Py_ssize_t m):
        self.keys, self.times = [], array.clone(_LONGS, 0, False)
        self.columns = [array.clone(_DOUBLES, 0, False) if kinds[j] == NUMBER else []
                        for j in range(m)]
        self.distinct = []
        self.part = _MessageRun(self.keys, self.times, shape.names, self.columns, self.distinct)
        memset(self.seen, 0, sizeof(self.seen))

    cdef int add(self, object key, long long t, list row, Reading* reading,
                 Py_ssize_t m) except -1:
        """One message's reading (then cleared)."""
        cdef Py_ssize_t j
        self.keys.append(key)
        if self.distinct is not None and not _seen(self.seen, <PyObject*>key):
            if len(self.distinct) >= DISTINCT_MAX:  # too many to count this way
                self.part.distinct = self.distinct = None
            else:
                self.distinct.append(key)
        _push_long(self.times, t)
        for j in range(m):
            _cell(self.columns, j, row, reading)
        _clear(row, reading, m)
        return 0


cdef inline int _codec(object content_type, object payload, Py_ssize_t size) except -2:
    """0 for a JSON body the kernel reads (an object or a list), 1 for msgpack (a map or an
    array), -1 for anything else (the slow path detects and words it)."""
    cdef unsigned char first = payload[0]
    if content_type is None:
        if first == 0x7B or first == 0x5B:
            return 0
        if 0x80 <= first <= 0x9F or 0xDC <= first <= 0xDF:
            return 1
        return -1
    if content_type == "application/json":
        return 0 if first == 0x7B or first == 0x5B else -1
    if content_type == "application/msgpack":
        return 1
    return -1


def ingest_rows(object messages, dict routes, Py_ssize_t max_bytes, object horizon,
                object make, object loads, object unpack=None):
    global _MessageRun
    cdef list parts = [], origins = [], slow = [], starts = []
    cdef list rows = None, row = None
    cdef list encoded = None, kinds = None
    cdef _Run current = None
    cdef Reading reading
    cdef long long t
    cdef int codec
    cdef bint text
    cdef Py_ssize_t i = 0, j, m = 0, size
    cdef object message, route, content_type, payload, doc, update, shape = None, run = None
    cdef bint has_horizon = horizon is not None
    cdef long long limit = horizon if has_horizon else 0
    global _ColumnRun, _columns_of
    cdef object columnar
    cdef long long latest = 0
    if _MessageRun is None:
        from streams.accepted import ColumnRun, MessageRun
        from streams.kernels._columnar_py import columns_of
        _MessageRun, _ColumnRun, _columns_of = MessageRun, ColumnRun, columns_of
    memset(&reading, 0, sizeof(reading))
    for message in messages:
        route = routes.get(message.topic)
        content_type = message.content_type
        payload = message.payload
        size = len(payload) if route is not None else 0
        codec = -1 if route is None or size == 0 or size > max_bytes else _codec(
            content_type, payload, size)
        if codec < 0 or (codec == 1 and unpack is None):
            slow.append(i)
            i += 1
            run = rows = None
            continue
        if shape is not (<tuple>route)[1]:  # another shape: another run
            shape = (<tuple>route)[1]
            m = len(<list>shape.names)
            encoded, kinds = shape.encoded, shape.kinds
            row = [None] * m
            run = None
        t = 0
        text = codec == 0 and type(payload) is bytes and payload[0] == 0x7B
        if text and m <= WIDEST:
            try:
                t = _scan(<bytes>payload, encoded, kinds, row, &reading)
            except UnicodeDecodeError:
                t = 0
        doc = None
        if t == 0:  # not the plain shape as we read it: the columnar form, or decoded
            _clear(row, &reading, m)
            columnar = None
            if text:
                try:
                    columnar = _scan_columns(<bytes>payload, encoded, kinds, shape.names, &latest)
                except UnicodeDecodeError:
                    columnar = None
            if columnar is None:
                try:
                    doc = loads(payload) if codec == 0 else unpack(payload)
                except Exception:
                    slow.append(i)
                    i += 1
                    run = rows = None
                    continue
                if type(doc) is list:  # a list of updates: each in the plain shape, or slow
                    if not _plain_list(<list>doc, shape, row, &reading, m, has_horizon, limit):
                        slow.append(i)
                        run = rows = None
                    else:
                        if run is None:
                            current = _Run(shape, kinds, m)
                            run = current.part
                            parts.append(run)
                            starts.append(i)
                            rows = None
                        for doc in <list>doc:
                            t = _plain(doc, shape, row, &reading)
                            current.add((<tuple>route)[0], t, row, &reading, m)
                            origins.append(message)
                    i += 1
                    continue
                if m <= WIDEST:
                    t = _plain(doc, shape, row, &reading)
                if t == 0:
                    columnar = _columns_of(doc, shape)
                    if columnar is not None:
                        latest = max((<tuple>columnar)[0])

            if columnar is not None:
                if has_horizon and latest > limit:  # read row by row
                    slow.append(i)
                else:  # a columnar message: a column run of its own
                    parts.append(_ColumnRun((<tuple>route)[0], *columnar))
                    starts.append(i)
                    origins.extend([message] * len((<tuple>columnar)[0]))
                i += 1
                run = rows = None
                continue
        if t != 0:
            if has_horizon and t > limit:
                slow.append(i)
                run = rows = None
                _clear(row, &reading, m)
            else:
                if run is None:
                    current = _Run(shape, kinds, m)
                    run = current.part
                    parts.append(run)
                    starts.append(i)
                    rows = None
                current.add((<tuple>route)[0], t, row, &reading, m)
                origins.append(message)
            i += 1
            continue
        for j in range(m):
            row[j] = None
        update = _row(doc, <dict>shape.kind_of, make)
        if update is None or (has_horizon and update.last_update > limit):
            slow.append(i)
            i += 1
            run = rows = None
            continue
        if rows is None:
            rows = []
            parts.append(rows)
            starts.append(i)
            run = None
        rows.append(((<tuple>route)[0], update))
        origins.append(message)
        i += 1
    return parts, origins, slow, starts


cdef array.array _LONGS = array.array("q"), _DOUBLES = array.array("d")


cdef inline bint _seen(PyObject** slots, PyObject* key) noexcept:
    """Whether `key` (the object) is in the open-addressing table `slots`; added if not."""
    cdef size_t at = (<size_t>key >> 4) & (DISTINCT_SLOTS - 1)
    while slots[at] != NULL:
        if slots[at] == key:
            return True
        at = (at + 1) & (DISTINCT_SLOTS - 1)
    slots[at] = key
    return False


cdef inline int _cell(list columns, Py_ssize_t j, list row, Reading* reading) except -1:
    """The reading's value of channel `j` (absent: state 0) onto a message run's column `j`: a
    number column is doubles (NaN where absent: no JSON value is NaN) until an int comes, and
    a list (None where absent) from then on."""
    cdef object column = columns[j], v
    cdef array.array typed
    cdef list cells
    cdef Py_ssize_t k, size
    cdef double x = 0.0
    cdef char state = reading.state[j]
    if type(column) is list:
        (<list>column).append(None if state == 0 else row[j] if state == 1 else
                              reading.reals[j])
        return 0
    typed = <array.array>column
    if state == 0:
        _push_double(typed, NAN)
        return 0
    if state == 2:
        _push_double(typed, reading.reals[j])
        return 0
    v = row[j]
    if type(v) is float:
        _push_double(typed, PyFloat_AS_DOUBLE(v))
        return 0
    size = Py_SIZE(typed)
    cells = [None] * size
    for k in range(size):
        x = typed.data.as_doubles[k]
        if x == x:
            cells[k] = x
    cells.append(v)
    columns[j] = cells
    return 0


include "_scan.pxi"
