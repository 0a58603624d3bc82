# cython: language_level=3, boundscheck=False, wraparound=False
"""The echo kernel, compiled: the same as `_echo_py.py` (its specification), the documents
written from the runs' columns in C."""

from cpython cimport array
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.ref cimport PyObject
from libc.stdlib cimport atoi, free, malloc, realloc
from libc.string cimport memcpy, strlen

cdef object _MessageRun = None


# The echo: accepted updates encoded as ServIoTicy update documents, byte for byte what
# `streams.codec.encode_update` (orjson) makes of each row, without making the row.

cdef extern from "Python.h":
    char* PyOS_double_to_string(double val, char format_code, int precision, int flags,
                                int* ptype) except NULL
    int Py_DTSF_ADD_DOT_0
    const char* PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t* size) except NULL
    void PyMem_Free(void* p)


cdef struct Text:
    char* data
    Py_ssize_t size
    Py_ssize_t room


cdef int _grow(Text* out, Py_ssize_t more) except -1:
    cdef Py_ssize_t room = out.room * 2 if out.room else 256
    cdef char* data
    while room < out.size + more:
        room *= 2
    data = <char*>realloc(out.data, room)
    if data == NULL:
        raise MemoryError()
    out.data, out.room = data, room
    return 0


cdef inline int _put(Text* out, const char* text, Py_ssize_t n) except -1:
    if out.size + n > out.room:
        _grow(out, n)
    memcpy(out.data + out.size, text, n)
    out.size += n
    return 0


cdef struct _Formatted:
    unsigned long long bits
    char size  # 0: empty
    char[31] text


cdef _Formatted _FLOATS[256]  # doubles formatted lately: sensors repeat their values


cdef int _put_double(Text* out, double x) except -1:
    """x as orjson writes it (`_format_double`), from a small cache of the doubles formatted
    lately (readings repeat: a quantised sensor, a steady value)."""
    cdef unsigned long long bits
    memcpy(&bits, &x, 8)
    cdef _Formatted* slot = &_FLOATS[(bits ^ (bits >> 29) ^ (bits >> 47)) & 255]
    cdef Py_ssize_t start
    if slot.size and slot.bits == bits:
        _put(out, slot.text, slot.size)
        return 0
    start = out.size
    _format_double(out, x)
    if out.size - start <= 31:
        slot.bits = bits
        slot.size = <char>(out.size - start)
        memcpy(slot.text, out.data + start, out.size - start)
    return 0


cdef int _format_double(Text* out, double x) except -1:
    """x as orjson writes it: Python's shortest repr, but a negative exponent without zero
    padding (1e-07: 1e-7), and 1e-05 to 9.99e-05 written out (0.00001)."""
    cdef char* text = PyOS_double_to_string(x, b"r", 0, Py_DTSF_ADD_DOT_0, NULL)
    cdef Py_ssize_t n = strlen(text), e = -1, k, digits_end
    cdef int exponent
    try:
        for k in range(n):
            if text[k] == 101:  # e
                e = k
                break
        if e < 0 or text[e + 1] == 43:  # no exponent, or a positive one: as it is
            _put(out, text, n)
            return 0
        exponent = atoi(text + e + 1)  # negative
        if exponent == -5:  # 0.0000 then the digits
            k = 0
            if text[0] == 45:
                _put(out, b"-", 1)
                k = 1
            _put(out, b"0.0000", 6)
            while k < e:
                if text[k] != 46:
                    _put(out, text + k, 1)
                k += 1
            return 0
        _put(out, text, e + 2)  # the mantissa, "e-"
        k = e + 2
        while k < n - 1 and text[k] == 48:  # the exponent's leading zeros
            k += 1
        _put(out, text + k, n - k)
    finally:
        PyMem_Free(text)
    return 0


cdef char* _HEX = b"0123456789abcdef"


cdef int _put_string(Text* out, object value) except -1:
    """A JSON string as orjson writes it: quotes, backslash and control characters escaped
    (\\b \\t \\n \\f \\r, else \\u00xx), everything else as UTF-8."""
    cdef Py_ssize_t n, k, start = 0
    cdef const char* text = PyUnicode_AsUTF8AndSize(value, &n)
    cdef unsigned char c
    cdef char[6] escape
    _put(out, b'"', 1)
    for k in range(n):
        c = <unsigned char>text[k]
        if c >= 32 and c != 34 and c != 92:
            continue
        _put(out, text + start, k - start)
        start = k + 1
        if c == 34:
            _put(out, b'\\"', 2)
        elif c == 92:
            _put(out, b"\\\\", 2)
        elif c == 8:
            _put(out, b"\\b", 2)
        elif c == 9:
            _put(out, b"\\t", 2)
        elif c == 10:
            _put(out, b"\\n", 2)
        elif c == 12:
            _put(out, b"\\f", 2)
        elif c == 13:
            _put(out, b"\\r", 2)
        else:
            escape[0], escape[1], escape[2], escape[3] = 92, 117, 48, 48
            escape[4], escape[5] = _HEX[c >> 4], _HEX[c & 15]
            _put(out, escape, 6)
    _put(out, text + start, n - start)
    _put(out, b'"', 1)
    return 0


cdef int _put_value(Text* out, object v) except -1:
    cdef bytes digits
    if type(v) is float:
        _put_double(out, PyFloat_AS_DOUBLE(v))
    elif type(v) is bool:
        if v:
            _put(out, b"true", 4)
        else:
            _put(out, b"false", 5)
    elif type(v) is int:
        digits = str(v).encode()
        _put(out, PyBytes_AS_STRING(digits), PyBytes_GET_SIZE(digits))
    elif type(v) is str:
        _put_string(out, v)
    else:
        raise TypeError(f"no echo for a value of type {type(v).__name__}")
    return 0


cdef int _put_long(Text* out, long long v) except -1:
    """v in decimal (what snprintf's %lld writes, without its cost)."""
    cdef char[24] digits
    cdef int k = 24
    cdef unsigned long long u = <unsigned long long>(-(v + 1)) + 1 if v < 0 else <unsigned long long>v
    while True:
        k -= 1
        digits[k] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if v < 0:
        k -= 1
        digits[k] = 45
    _put(out, digits + k, 24 - k)
    return 0


cdef class _Echoes:
    """The echo being written: one message per row, or with `grouped` one per run of
    consecutive rows of one device message (a single update as itself, more as a list)."""
    cdef Text text  # the current message's documents, from offset 1 (0: room for "[")
    cdef list out
    cdef bint grouped, by_stream
    cdef Py_ssize_t limit  # a list is ended once it holds this many bytes (0: never)
    cdef object topic
    cdef PyObject* origin
    cdef Py_ssize_t count

    def __cinit__(self, bint grouped, bint by_stream, Py_ssize_t limit):
        self.text.data, self.text.size, self.text.room = NULL, 0, 0
        self.out = []
        self.grouped = grouped or by_stream
        self.by_stream = by_stream
        self.limit = limit
        self.topic = None
        self.origin = NULL
        self.count = 0

    def __dealloc__(self):
        free(self.text.data)

    cdef int row(self, object topic, object origin) except -1:
        """A row's document comes next (the caller writes it)."""
        if (self.count and self.grouped and (self.limit == 0 or self.text.size < self.limit)
                and (self.by_stream or <PyObject*>origin == self.origin)
                and (topic is self.topic or topic == self.topic)):
            _put(&self.text, b",", 1)
            self.count += 1
            return 0
        self.flush()
        self.topic, self.origin, self.count = topic, <PyObject*>origin, 1
        self.text.size = 0
        _put(&self.text, b"[", 1)
        return 0

    cdef int flush(self) except -1:
        if not self.count:
            return 0
        if self.count == 1:
            self.out.append((self.topic, PyBytes_FromStringAndSize(self.text.data + 1,
                                                                   self.text.size - 1)))
        else:
            _put(&self.text, b"]", 1)
            self.out.append((self.topic, PyBytes_FromStringAndSize(self.text.data,
                                                                   self.text.size)))
        self.count = 0
        return 0


def echo_updates(list parts, Py_ssize_t start, Py_ssize_t stop, dict topics, object topic_of,
                 object encode_row, object origins=None, bint by_stream=False,
                 Py_ssize_t max_list=0):
    """The (topic, body) echo of rows `start` to `stop` of `parts` (`streams.accepted`
    parts): the body of each `encode_row(update)` (`streams.codec.encode_update`), written
    from a run's columns without making its rows; `topics` caches `topic_of(key)`. With
    `origins` (the device message of each row), one message per device message: the rows
    of one message and stream that follow each other as one list (byte for byte
    `encode_batch` of them), a single row as itself; with `by_stream`, the rows of one stream
    that follow each other, whatever their message. A list is ended (the next row starts
    another) once it holds `max_list` bytes (0: no end): within the broker's packet size."""
    cdef list names, columns, keys = None, part_names, origin_list = None
    cdef Py_ssize_t at = 0, n, i, j, m, low, high
    cdef object part, key, topic, column, v, times, origin = None
    cdef _Echoes echoes = _Echoes(origins is not None, by_stream, max_list)
    cdef Text* text = &echoes.text
    cdef double x = 0.0
    cdef bint message_run, first
    cdef list encoded_names
    cdef bytes name, body
    # per run: its times as int64 when typed so, and each column's doubles when typed so (read
    # in C, not indexed through Python per cell); the last time written, reused while it
    # repeats (a columnar message's readings of one instant)
    cdef long long* typed_times
    cdef double** doubles = NULL
    cdef long long t, last_t = 0
    cdef char[24] t_digits
    cdef Py_ssize_t t_size = 0, t_at
    global _MessageRun
    if _MessageRun is None:
        from streams.accepted import MessageRun
        _MessageRun = MessageRun
    if origins is not None:
        origin_list = list(origins) if type(origins) is not list else origins
    for part in parts:
        n = len(part)
        low, high = max(start - at, 0), min(stop - at, n)
        at += n
        if low >= high:
            continue
        if type(part) is list:
            for i in range(low, high):
                key, v = (<list>part)[i]
                topic = _topic(topics, key, topic_of)
                if origin_list is not None:
                    origin = origin_list[at - n + i]
                echoes.row(topic, origin)
                body = encode_row(v)
                _put(text, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
            continue
        message_run = type(part) is _MessageRun
        if message_run:
            keys = part.keys
        else:
            topic = _topic(topics, part.key, topic_of)
        times = part.times
        columns = part.columns
        m = len(columns)
        encoded_names = []
        for j in range(m):
            encoded_names.append(b'"' + _json_name(part.names[j]) + b'":{"current-value":')
        typed_times = NULL
        if type(times) is array.array and (<array.array>times).ob_descr.typecode == b"q":
            typed_times = (<array.array>times).data.as_longlongs
        doubles = <double**>malloc((m + 1) * sizeof(double*))  # (+1: never malloc(0))
        if doubles == NULL:
            raise MemoryError()
        for j in range(m):
            column = columns[j]
            doubles[j] = NULL
            if type(column) is array.array and (<array.array>column).ob_descr.typecode == b"d":
                doubles[j] = (<array.array>column).data.as_doubles
        try:
            for i in range(low, high):
                if message_run:
                    topic = _topic(topics, keys[i], topic_of)
                if origin_list is not None:
                    origin = origin_list[at - n + i]
                echoes.row(topic, origin)
                _put(text, b'{"channels":{', 13)
                first = True
                for j in range(m):
                    if doubles[j] != NULL:
                        x = doubles[j][i]
                        if x != x:  # NaN: the message lacks it
                            continue
                        v = None
                    else:
                        v = columns[j][i]
                        if v is None:
                            continue
                    if not first:
                        _put(text, b",", 1)
                    first = False
                    name = <bytes>encoded_names[j]
                    _put(text, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
                    if v is None:
                        _put_double(text, x)
                    else:
                        _put_value(text, v)
                    _put(text, b"}", 1)
                _put(text, b'},"lastUpdate":', 15)
                t = typed_times[i] if typed_times != NULL else times[i]
                if t_size == 0 or t != last_t:
                    t_at = text.size
                    _put_long(text, t)
                    t_size = text.size - t_at
                    memcpy(t_digits, text.data + t_at, t_size)
                    last_t = t
                else:
                    _put(text, t_digits, t_size)
                _put(text, b"}", 1)
        finally:
            free(doubles)
            doubles = NULL
    echoes.flush()
    return echoes.out


cdef inline object _topic(dict topics, object key, object topic_of):
    """The echo topic of a stream key, from the caller's cache."""
    topic = topics.get(key)
    if topic is None:
        topic = topics[key] = topic_of(key)
    return topic


cdef bytes _json_name(str name):
    """A channel name as orjson writes a key, without its quotes."""
    cdef Text text
    text.data, text.size, text.room = NULL, 0, 0
    try:
        _put_string(&text, name)
        return PyBytes_FromStringAndSize(text.data + 1, text.size - 2)
    finally:
        free(text.data)
