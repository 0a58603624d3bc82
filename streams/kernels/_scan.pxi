# The columnar kernel's JSON scanner, included in `_columnar.pyx` (one module, so that its
# calls are plain C calls): a device message's text read straight into a row of values
# (`_scan`) or typed columns (`_scan_columns`), exactly as orjson would read it (the twin,
# `_columnar_py.py`, calls orjson). It uses the kernel's kinds, `Reading`, `_push_long` and
# `_push_double`, `_LONGS` and `_DOUBLES`.

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
