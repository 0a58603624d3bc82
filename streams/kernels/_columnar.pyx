# cython: language_level=3, boundscheck=False, wraparound=False
"""The columnar kernel, compiled: the same as `_columnar_py.py` (its specification), with the
per-reading checks in C."""

from libc.math cimport isfinite

cdef int NUMBER = 0, STRING = 1, BOOLEAN = 2
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


def ingest_rows(object messages, dict routes, Py_ssize_t max_bytes, object horizon,
                object make, object loads):
    cdef list accepted = [], origins = [], slow = []
    cdef Py_ssize_t i = 0, size
    cdef object message, route, content_type, payload, doc, update
    cdef bint has_horizon = horizon is not None
    cdef long long limit = horizon if has_horizon else 0
    for message in messages:
        route = routes.get(message.topic)
        content_type = message.content_type
        payload = message.payload
        size = len(payload) if route is not None else 0
        if (route is None
                or (content_type is not None and content_type != "application/json")
                or size == 0 or size > max_bytes or payload[0] != 0x7B):
            slow.append(i)
            i += 1
            continue
        try:
            doc = loads(payload)
        except Exception:
            slow.append(i)
            i += 1
            continue
        update = _row(doc, <dict>(<tuple>route)[1], make)
        if update is None or (has_horizon and update.last_update > limit):
            slow.append(i)
            i += 1
            continue
        accepted.append(((<tuple>route)[0], update))
        origins.append(message)
        i += 1
    return accepted, origins, slow
