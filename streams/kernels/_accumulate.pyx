# cython: language_level=3, boundscheck=False, wraparound=False
"""The window kernel's accumulators in C: an update added to a window's accumulators as the
aggregates' `add` would (`_add`), and a window's accumulators read into C values and written
back (`_loadable`, `_flush`) around the loop that folds a run. Declared in `_accumulate.pxd`
for `_windows.pyx`; the specification is `streams/windows/aggregates.py`."""

from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_ITEM
from libc.math cimport fabs


cdef inline bint _as_double(object v, double* out):
    """v as a double when that is exactly what Python's float arithmetic would use."""
    if type(v) is float:
        out[0] = PyFloat_AS_DOUBLE(v)
        return True
    if type(v) is int and -EXACT < v < EXACT:
        out[0] = <double>(<long long>v)
        return True
    return False


cdef inline bint _neumaier(list s, double v, Py_ssize_t at):
    """s[at], s[at+1] += v, Neumaier-compensated, as `_sum_add`; False if s is not floats."""
    cdef object a = <object>PyList_GET_ITEM(s, at), b = <object>PyList_GET_ITEM(s, at + 1)
    cdef double total, c, t
    if type(a) is not float or type(b) is not float:
        return False
    total = PyFloat_AS_DOUBLE(a)
    c = PyFloat_AS_DOUBLE(b)
    t = total + v
    if fabs(total) >= fabs(v):
        c += (total - t) + v
    else:
        c += (v - t) + total
    s[at] = t
    s[at + 1] = c
    return True


cdef void _add(list accs, list aggs, int* codes, object args, object t) except *:
    cdef Py_ssize_t i, n = len(aggs)
    cdef object value, acc
    cdef double v
    cdef int code
    for i in range(n):
        value = args[i]
        agg = aggs[i]
        code = codes[i]
        if value is None and agg.needs_argument:
            continue
        acc = accs[i]
        if code == COUNT and type(acc) is int:
            accs[i] = acc + 1
            continue
        if code == SUM and type(acc) is list and len(<list>acc) == 2 and _as_double(value, &v):
            if _neumaier(<list>acc, v, 0):
                continue
        elif (code == AVG and type(acc) is list and len(<list>acc) == 3
              and type((<list>acc)[2]) is int and _as_double(value, &v)):
            if _neumaier(<list>acc, v, 0):
                (<list>acc)[2] = (<list>acc)[2] + 1
                continue
        elif code == MAX:
            accs[i] = value if acc is None else (value if value > acc else acc)
            continue
        elif code == MIN:
            accs[i] = value if acc is None else (value if value < acc else acc)
            continue
        accs[i] = agg.add(acc, value, t)


cdef bint _loadable(list accs, int* codes, Py_ssize_t m, double* sums, double* comps,
                    long long* counts, char* have, double* extremes, list objs) except -1:
    """A window's accumulators into C (False, having read nothing useful, when one is not of
    the type the C loop adds to as `_add` would)."""
    cdef Py_ssize_t j
    cdef object acc, a, b, k
    cdef int code
    for j in range(m):
        acc = accs[j]
        code = codes[j]
        if code == COUNT:
            if type(acc) is not int or not -EXACT < acc < EXACT:
                return False
            counts[j] = acc
        elif code == SUM or code == AVG:
            if type(acc) is not list or len(<list>acc) != (2 if code == SUM else 3):
                return False
            a, b = (<list>acc)[0], (<list>acc)[1]
            if type(a) is not float or type(b) is not float:
                return False
            sums[j], comps[j] = PyFloat_AS_DOUBLE(a), PyFloat_AS_DOUBLE(b)
            if code == AVG:
                k = (<list>acc)[2]
                if type(k) is not int or not 0 <= k < EXACT:
                    return False
                counts[j] = k
            else:
                counts[j] = 0
        elif code == MIN or code == MAX:
            objs[j] = acc
            if acc is None:
                have[j] = 0
            elif type(acc) is float:
                have[j], extremes[j] = 1, PyFloat_AS_DOUBLE(acc)
            elif type(acc) is int and -EXACT < acc < EXACT:
                have[j], extremes[j] = 1, <double>(<long long>acc)
            else:
                return False
        else:
            return False
    return True


cdef int _flush(list accs, int* codes, Py_ssize_t m, double* sums, double* comps,
                long long* counts, char* have, double* extremes, list objs) except -1:
    """The C accumulators written back into the window's (a min or max kept as the Python
    value it was, unless a reading replaced it)."""
    cdef Py_ssize_t j
    cdef int code
    cdef list acc
    for j in range(m):
        code = codes[j]
        if code == COUNT:
            accs[j] = counts[j]
        elif code == SUM:
            acc = <list>accs[j]
            acc[0], acc[1] = sums[j], comps[j]
        elif code == AVG:
            acc = <list>accs[j]
            acc[0], acc[1], acc[2] = sums[j], comps[j], counts[j]
        elif have[j] == 2:
            accs[j] = extremes[j]
            objs[j] = accs[j]
            have[j] = 1
    return 0
