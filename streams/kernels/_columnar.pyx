# cython: language_level=3, boundscheck=False, wraparound=False
"""The columnar kernel, compiled: the same as `_columnar_py.py` (its specification), with the
per-reading checks in C."""

from cpython cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.object cimport Py_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.float cimport PyFloat_AS_DOUBLE
from libc.math cimport NAN, isfinite
from libc.stdlib cimport strtod
from cpython.ref cimport PyObject
from libc.string cimport memcmp, memcpy, memset

cdef int NUMBER = 0, STRING = 1, BOOLEAN = 2
cdef enum:
    DISTINCT_SLOTS = 1024  # a message run's table of its key objects
    WIDEST = 64  # the most channels of a shape read into a message run


cdef struct Reading:
    # one message's values as they are read: per channel 0 (absent), 1 (a Python value in the
    # row list) or 2 (a double in `reals`: no object made for it)
    char state[WIDEST]
    double reals[WIDEST]
cdef Py_ssize_t DISTINCT_MAX = 512
cdef long long SECONDS_BELOW = 100_000_000_000
cdef long long MAX_LAST_UPDATE = 253_402_300_799_999


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


# A reader of the plain single-update JSON shape straight from the bytes: one dict per message
# (the channels), no decoded document. It reads only what orjson + `_row` would accept the same
# way (any escape, other key, nesting, duplicate, 19-digit integer or exotic number: None, and
# the caller takes orjson's way), so its result is always `_row(orjson.loads(payload))`.

cdef inline Py_ssize_t _ws(const char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    while i < n and (p[i] == 32 or p[i] == 10 or p[i] == 13 or p[i] == 9):
        i += 1
    return i


cdef inline Py_ssize_t _string_end(const char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """The index of the closing quote of the string whose first character is at `i`; -1 for
    an escape, a control character or the end of the input."""
    cdef unsigned char c
    while i < n:
        c = <unsigned char>p[i]
        if c == 34:
            return i
        if c == 92 or c < 32:
            return -1
        i += 1
    return -1


cdef inline bint _digit(char c) noexcept:
    return 48 <= c <= 57


cdef double[23] _POWERS = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12,
                           1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22]


cdef int NOT_A_NUMBER = 0, AN_INT = 1, A_FLOAT = 2


cdef int _read_number(const char* p, Py_ssize_t* at, Py_ssize_t n, long long* whole,
                      double* real) noexcept:
    """The JSON number at `at[0]` as orjson reads it, in one pass: AN_INT (up to 18 digits,
    in `whole`), A_FLOAT (finite, in `real`) or NOT_A_NUMBER (anything else), moving `at[0]`
    past it."""
    cdef Py_ssize_t i = at[0], start = at[0], digits = 0, decimals = 0
    cdef bint negative = False, exponent = False, fraction = False
    cdef unsigned long long value = 0
    cdef char[48] buffer
    cdef char* end
    cdef double d
    if i < n and p[i] == 45:
        negative = True
        i += 1
    if i >= n:
        return NOT_A_NUMBER
    if p[i] == 48:
        i += 1
        digits = 1
    elif 49 <= p[i] <= 57:
        while i < n and _digit(p[i]):
            if digits < 19:
                value = value * 10 + <unsigned long long>(p[i] - 48)
            digits += 1
            i += 1
    else:
        return NOT_A_NUMBER
    if i < n and p[i] == 46:
        i += 1
        if not (i < n and _digit(p[i])):
            return NOT_A_NUMBER
        while i < n and _digit(p[i]):
            if digits + decimals < 19:
                value = value * 10 + <unsigned long long>(p[i] - 48)
            decimals += 1
            i += 1
        fraction = True
    if i < n and (p[i] == 101 or p[i] == 69):
        exponent = True
        i += 1
        if i < n and (p[i] == 43 or p[i] == 45):
            i += 1
        if not (i < n and _digit(p[i])):
            return NOT_A_NUMBER
        while i < n and _digit(p[i]):
            i += 1
    at[0] = i
    if not fraction and not exponent:
        if digits > 18:
            return NOT_A_NUMBER
        whole[0] = -<long long>value if negative else <long long>value
        return AN_INT
    if not exponent and digits + decimals <= 15:
        # exact: an integer below 2**53 over a power of ten that is exact in a double, one
        # correctly rounded division (Clinger's fast path), so the same double as strtod's
        d = <double>value / _POWERS[decimals]
        real[0] = -d if negative else d
        return A_FLOAT
    if i - start >= 48:
        return NOT_A_NUMBER
    memcpy(buffer, p + start, i - start)
    buffer[i - start] = 0
    d = strtod(buffer, &end)
    if end != buffer + (i - start) or not isfinite(d):
        return NOT_A_NUMBER
    real[0] = d
    return A_FLOAT


cdef object _number(const char* p, Py_ssize_t* at, Py_ssize_t n):
    """`_read_number` as a Python int or float; None for anything else."""
    cdef long long whole
    cdef double real
    cdef int kind = _read_number(p, at, n, &whole, &real)
    if kind == AN_INT:
        return whole
    if kind == A_FLOAT:
        return real
    return None


cdef array.array _LONGS = array.array("q"), _DOUBLES = array.array("d")


cdef inline void _push_long(array.array a, long long v) except *:
    cdef Py_ssize_t k = Py_SIZE(a)
    array.resize_smart(a, k + 1)
    a.data.as_longlongs[k] = v


cdef inline void _push_double(array.array a, double v) except *:
    cdef Py_ssize_t k = Py_SIZE(a)
    array.resize_smart(a, k + 1)
    a.data.as_doubles[k] = v




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


cdef object _scan_columns(bytes payload, list encoded, list kinds, list names,
                          long long* latest):
    """`columns_of` straight from the bytes, into the same typed columns: (times, names,
    columns) of a payload in the columnar form with every reading good (its latest time in
    `latest`); None for anything else, and for what this reader does not read as orjson
    would (the caller takes orjson's way then)."""
    cdef const char* p = PyBytes_AS_STRING(payload)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload), i, end, members = 0, j, m = len(encoded)
    cdef Py_ssize_t length, count
    cdef list chosen = None, columns = None, cells
    cdef array.array times = None, typed
    cdef object v, column
    cdef bytes name
    cdef unsigned long long seen = 0
    cdef long long newest = 0, whole
    cdef double real
    cdef int code, number, first
    if m > 64:
        return None
    i = _ws(p, 0, n)
    if i >= n or p[i] != 123:
        return None
    i = _ws(p, i + 1, n)
    while members < 2:
        if i >= n or p[i] != 34:
            return None
        end = _string_end(p, i + 1, n)
        if end == i + 11 and memcmp(p + i + 1, b"lastUpdate", 10) == 0 and times is None:
            i = _ws(p, end + 1, n)
            if i >= n or p[i] != 58:
                return None
            i = _ws(p, i + 1, n)
            if i >= n or p[i] != 91:
                return None
            i = _ws(p, i + 1, n)
            times = array.clone(_LONGS, 0, False)
            while True:
                if _read_number(p, &i, n, &whole, &real) != AN_INT or not (
                        SECONDS_BELOW <= whole <= MAX_LAST_UPDATE):
                    return None
                if Py_SIZE(times) == 0 or whole > newest:
                    newest = whole
                _push_long(times, whole)
                i = _ws(p, i, n)
                if i < n and p[i] == 44:
                    i = _ws(p, i + 1, n)
                    continue
                if i < n and p[i] == 93:
                    i += 1
                    break
                return None
        elif end == i + 9 and memcmp(p + i + 1, b"channels", 8) == 0 and columns is None:
            i = _ws(p, end + 1, n)
            if i >= n or p[i] != 58:
                return None
            i = _ws(p, i + 1, n)
            if i >= n or p[i] != 123:
                return None
            i = _ws(p, i + 1, n)
            chosen, columns = [], []
            while True:
                if i >= n or p[i] != 34:
                    return None
                end = _string_end(p, i + 1, n)
                if end < 0:
                    return None
                length = end - i - 1
                for j in range(m):
                    name = <bytes>encoded[j]
                    if PyBytes_GET_SIZE(name) == length and memcmp(
                            PyBytes_AS_STRING(name), p + i + 1, length) == 0:
                        break
                else:
                    return None
                if seen & (1ULL << j):  # a repeated channel: orjson's way
                    return None
                seen |= 1ULL << j
                code = kinds[j]
                i = _ws(p, end + 1, n)
                if i >= n or p[i] != 58:
                    return None
                i = _ws(p, i + 1, n)
                if i >= n or p[i] != 91:
                    return None
                i = _ws(p, i + 1, n)
                # a number column: int64 or double while its values are all of one type,
                # a list of both past the first of the other; others: a list
                column = typed = None
                cells = None
                first = NOT_A_NUMBER
                while True:
                    if code == NUMBER:
                        number = _read_number(p, &i, n, &whole, &real)
                        if number == NOT_A_NUMBER:
                            return None
                        if first == NOT_A_NUMBER:
                            first = number
                            typed = array.clone(_LONGS if number == AN_INT else _DOUBLES, 0,
                                                False)
                            column = typed
                        if cells is None and number == first:
                            if number == AN_INT:
                                _push_long(typed, whole)
                            else:
                                _push_double(typed, real)
                        else:
                            if cells is None:
                                cells = list(typed)
                                column = cells
                            cells.append(whole if number == AN_INT else real)
                    else:
                        if cells is None:
                            cells = []
                            column = cells
                        if code == STRING:
                            if i >= n or p[i] != 34:
                                return None
                            end = _string_end(p, i + 1, n)
                            if end < 0:
                                return None
                            v = PyUnicode_DecodeUTF8(p + i + 1, end - i - 1, NULL)
                            i = end + 1
                        elif code == BOOLEAN:
                            if i + 4 <= n and memcmp(p + i, b"true", 4) == 0:
                                v = True
                                i += 4
                            elif i + 5 <= n and memcmp(p + i, b"false", 5) == 0:
                                v = False
                                i += 5
                            else:
                                return None
                        else:
                            return None
                        cells.append(v)
                    i = _ws(p, i, n)
                    if i < n and p[i] == 44:
                        i = _ws(p, i + 1, n)
                        continue
                    if i < n and p[i] == 93:
                        i += 1
                        break
                    return None
                chosen.append(names[j])
                columns.append(column)
                i = _ws(p, i, n)
                if i < n and p[i] == 44:
                    i = _ws(p, i + 1, n)
                    continue
                if i < n and p[i] == 125:
                    i += 1
                    break
                return None
        else:
            return None
        members += 1
        i = _ws(p, i, n)
        if i < n and p[i] == 44 and members < 2:
            i = _ws(p, i + 1, n)
        elif i < n and p[i] == 125 and members == 2:
            i = _ws(p, i + 1, n)
        else:
            return None
    if i != n:
        return None
    count = Py_SIZE(times)
    for column in columns:
        if len(column) != count:
            return None
    latest[0] = newest
    return times, chosen, columns


cdef long long _scan(bytes payload, list encoded, list kinds, list row,
                     Reading* reading) except -1:
    """The time of a payload in the plain shape whose channels come in the shape's order, its
    values written into `row` and `reading`; 0 for anything else (they then hold garbage)."""
    cdef const char* p = PyBytes_AS_STRING(payload)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload), i, end, members = 0
    cdef long long t = 0
    cdef double real
    cdef bint channels = False
    i = _ws(p, 0, n)
    if i >= n or p[i] != 123:
        return 0
    i = _ws(p, i + 1, n)
    while members < 2:
        if i >= n or p[i] != 34:
            return 0
        end = _string_end(p, i + 1, n)
        if end == i + 9 and memcmp(p + i + 1, b"channels", 8) == 0 and not channels:
            i = _ws(p, end + 1, n)
            if i >= n or p[i] != 58:
                return 0
            channels = True
            i = _channels(p, _ws(p, i + 1, n), n, encoded, kinds, row, reading)
            if i < 0:
                return 0
        elif end == i + 11 and memcmp(p + i + 1, b"lastUpdate", 10) == 0 and t == 0:
            i = _ws(p, end + 1, n)
            if i >= n or p[i] != 58:
                return 0
            i = _ws(p, i + 1, n)
            if _read_number(p, &i, n, &t, &real) != AN_INT or not (
                    SECONDS_BELOW <= t <= MAX_LAST_UPDATE):
                return 0
        else:
            return 0
        members += 1
        i = _ws(p, i, n)
        if i < n and p[i] == 44 and members < 2:
            i = _ws(p, i + 1, n)
        elif i < n and p[i] == 125 and members == 2:
            i = _ws(p, i + 1, n)
        else:
            return 0
    if i != n:
        return 0
    return t


cdef Py_ssize_t _channels(const char* p, Py_ssize_t i, Py_ssize_t n, list encoded, list kinds,
                          list row, Reading* reading) except? -2:
    """Reads `{"name": {"current-value": v}, ...}` at `i` into `row` (each name one of the
    shape's, after the one before it); the index after it, or -1 (not the plain shape, or a
    value `_fits` refuses)."""
    cdef Py_ssize_t end, j, last = -1, m = len(encoded), length
    cdef object v
    cdef bytes name
    cdef int code, number
    cdef long long whole
    cdef double real
    if i >= n or p[i] != 123:
        return -1
    i = _ws(p, i + 1, n)
    while True:
        if i >= n or p[i] != 34:
            return -1
        end = _string_end(p, i + 1, n)
        if end < 0:
            return -1
        length = end - i - 1
        j = last + 1
        while j < m:
            name = <bytes>encoded[j]
            if PyBytes_GET_SIZE(name) == length and memcmp(PyBytes_AS_STRING(name), p + i + 1,
                                                           length) == 0:
                break
            j += 1
        if j >= m:  # not a channel, a repeated one, or out of the shape's order
            return -1
        last = j
        code = kinds[j]
        i = _ws(p, end + 1, n)
        if i >= n or p[i] != 58:
            return -1
        i = _ws(p, i + 1, n)
        if i >= n or p[i] != 123:
            return -1
        i = _ws(p, i + 1, n)
        if not (i + 15 <= n and memcmp(p + i, b'"current-value"', 15) == 0):
            return -1
        i = _ws(p, i + 15, n)
        if i >= n or p[i] != 58:
            return -1
        i = _ws(p, i + 1, n)
        if code == NUMBER:
            number = _read_number(p, &i, n, &whole, &real)
            if number == A_FLOAT:  # no object: the column's doubles take it as it is
                reading.reals[j] = real
                reading.state[j] = 2
            elif number == AN_INT:
                row[j] = whole
                reading.state[j] = 1
            else:
                return -1
        elif code == STRING:
            if i >= n or p[i] != 34:
                return -1
            end = _string_end(p, i + 1, n)
            if end < 0:
                return -1
            v = PyUnicode_DecodeUTF8(p + i + 1, end - i - 1, NULL)
            i = end + 1
        elif code == BOOLEAN:
            if i + 4 <= n and memcmp(p + i, b"true", 4) == 0:
                v = True
                i += 4
            elif i + 5 <= n and memcmp(p + i, b"false", 5) == 0:
                v = False
                i += 5
            else:
                return -1
        else:
            return -1
        if code != NUMBER:
            row[j] = v
            reading.state[j] = 1
        i = _ws(p, i, n)
        if i >= n or p[i] != 125:
            return -1
        i = _ws(p, i + 1, n)
        if i < n and p[i] == 44:
            i = _ws(p, i + 1, n)
            continue
        if i < n and p[i] == 125:
            return i + 1
        return -1
