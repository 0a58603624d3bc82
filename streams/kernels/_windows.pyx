# cython: language_level=3, boundscheck=False, wraparound=False
"""The window kernel, compiled: the same as `_windows_py.py` (its specification, which calls
`WindowOperator.process` per update), with that method's tumbling/hopping path in C."""

from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_ITEM
from cpython.object cimport Py_GE, Py_GT, Py_LE, Py_LT, PyObject_RichCompareBool
from libc.math cimport fabs

from streams.kernels._windows_py import fold_windows as _twin

cdef object _KeyState = None, _WindowResult = None, _LateUpdate = None, _heappush = None
cdef Py_ssize_t _MAX_CLOCKS = 0
cdef dict _CODES = {}
cdef double EXACT = 9007199254740992.0  # 2**53: ints below convert to float exactly
cdef int COUNT = 0, SUM = 1, AVG = 2, MIN = 3, MAX = 4, GENERIC = -1


cdef void _load():
    global _KeyState, _WindowResult, _LateUpdate, _heappush, _MAX_CLOCKS
    import heapq
    from streams.windows import aggregates, keys, model
    _KeyState, _WindowResult = keys.KeyState, model.WindowResult
    _MAX_CLOCKS = model.MAX_CLOCKS
    _LateUpdate = model.LateUpdate
    _heappush = heapq.heappush
    for name, code in (("count", COUNT), ("sum", SUM), ("avg", AVG), ("min", MIN), ("max", MAX)):
        _CODES[id(aggregates.AGGREGATES[name])] = code


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


def fold_windows(object operator, list groups, list times, list args):
    cdef object spec = operator.spec
    if not operator._indexed or spec.processing_time:
        return _twin(operator, groups, times, args)
    if _KeyState is None:
        _load()
    cdef list fired = [], late = []
    cdef Py_ssize_t i, n = len(groups), j, m = len(operator.aggregates)
    cdef long long step, t, size = spec.size, hop = spec.hop, delay = spec.delay
    cdef long long lateness = spec.allowed_lateness, watermark = 0, max_time = 0, start, r
    cdef bint tumbling = spec.kind == "tumbling", has_max, accepted
    cdef dict keys = operator.keys, clocks = operator.clocks, windows
    cdef list aggs = [agg for _, agg in operator.aggregates], accs, due, expiry, starts
    cdef int[32] codes
    cdef object key, state, window, accs_obj, py_t, clock
    cdef Py_ssize_t clocks_max = _MAX_CLOCKS
    cdef Py_ssize_t late_here
    if m > 32:
        return _twin(operator, groups, times, args)
    for j in range(m):
        codes[j] = _CODES.get(id(aggs[j]), GENERIC)
    for i in range(n):
        key = groups[i]
        py_t = times[i]
        t = py_t
        state = keys.get(key)
        if state is None:
            state = keys[key] = _KeyState()
        windows = state.windows
        due = state.due
        clock = clocks.get(key)  # each key's own clock: one device moves only its windows
        has_max = clock is not None
        if has_max:
            max_time = clock
            watermark = max_time - delay
        # the [start, end) windows holding t, oldest first (Python's floor modulo)
        step = size if tumbling else hop
        r = t % step
        if r < 0:
            r += step
        start = t - r
        starts = []
        while start + size > t:
            starts.append(start)
            if tumbling:
                break
            start -= hop
        accepted = False
        for j in range(len(starts) - 1, -1, -1):
            start = starts[j]
            if has_max and start + size + lateness <= watermark:
                continue
            window = (start, start + size)
            accs_obj = windows.get(window)
            if accs_obj is None:
                accs_obj = windows[window] = [agg.initial() for agg in aggs]
                _heappush(due, (start + size, start))
            _add(<list>accs_obj, aggs, codes, args[i], py_t)
            accepted = True
            if window in state.fired:  # a late update within allowed lateness
                fired.append((i, _WindowResult(key, start, start + size,
                                               operator._values(accs_obj, start, start + size),
                                               updated=True)))
        if not accepted:
            late.append((i, _LateUpdate(key, py_t, watermark if has_max else py_t)))
            operator.late_count += 1
        if state.next_empty is None:
            state.next_empty = starts[len(starts) - 1]
        if not has_max or t > max_time:  # operator._advance, inline: the key's clock moves
            if has_max:
                del clocks[key]  # re-inserted: the dict's order is by last advance
            clocks[key] = py_t
            if operator.max_time is None or py_t > operator.max_time:
                operator.max_time = py_t
            if len(clocks) > clocks_max:
                operator._forget_clocks()
            watermark = t - delay
            expiry = state.expiry
            if (due and (<tuple>due[0])[0] <= watermark) or (
                    expiry and (<tuple>expiry[0])[0] <= watermark):
                for result in operator.fire_key(key, state, watermark):
                    fired.append((i, result))
    return fired, late


def column_inputs(list updates, object where, object channel_names):
    cdef list kept = [], rows = [], slow = [], row
    cdef tuple channels = tuple(channel_names)
    cdef Py_ssize_t i, j, n = len(updates), m = len(channels)
    cdef dict values
    cdef object v, c = None, ch, wch = None
    cdef int op = 0, cmp_op = 0
    if where is not None:
        wch, op, c = where
        cmp_op = (Py_LT, Py_LE, Py_GT, Py_GE)[op]
    for i in range(n):
        values = updates[i].channels
        if wch is not None:
            v = values.get(wch)
            if v is None:
                continue
            if type(v) is not int and type(v) is not float:
                slow.append(i)
                continue
            if not PyObject_RichCompareBool(v, c, cmp_op):
                continue
        kept.append(i)
        row = []
        for j in range(m):
            ch = channels[j]
            row.append(True if ch is None else values.get(ch))
        rows.append(row)
    return kept, rows, slow


cdef object _MISSING = object()


def take_inputs(list batch, dict plans, object plan, object where, object channel_names,
                bint by_so):
    cdef list index = [], groups = [], times = [], rows = [], row
    cdef tuple channels = tuple(channel_names), item
    cdef Py_ssize_t i, j, n = len(batch), m = len(channels)
    cdef dict values
    cdef object key, update, found, v, c = None, ch, wch = None, last_key = None
    cdef object last_found = None
    cdef int op = 0, cmp_op = 0
    if where is not None:
        wch, op, c = where
        cmp_op = (Py_LT, Py_LE, Py_GT, Py_GE)[op]
    for i in range(n):
        item = <tuple>batch[i]
        key = item[0]
        if key is last_key:
            found = last_found
        else:
            found = plans.get(key, _MISSING)
            last_key, last_found = key, found
        if found is None:
            continue
        if found is not plan:
            return None
        update = item[1]
        values = update.channels
        if wch is not None:
            v = values.get(wch)
            if v is None:
                continue
            if type(v) is not int and type(v) is not float:
                return None
            if not PyObject_RichCompareBool(v, c, cmp_op):
                continue
        index.append(i)
        groups.append((<tuple>key)[0] if by_so else "")
        times.append(update.last_update)
        row = []
        for j in range(m):
            ch = channels[j]
            row.append(True if ch is None else values.get(ch))
        rows.append(row)
    return index, groups, times, rows


def take_parts(list parts, dict plans, object plan, object where, object channel_names,
               bint by_so):
    cdef list index = [], groups = [], times = [], rows = [], row, part_times, test = None
    cdef list args
    cdef tuple channels = tuple(channel_names), taken
    cdef Py_ssize_t at = 0, i, j, n, m = len(channels)
    cdef object part, found, v, c = None, ch, col, wch = None, group
    cdef int op = 0, cmp_op = 0
    cdef dict column_of
    if where is not None:
        wch, op, c = where
        cmp_op = (Py_LT, Py_LE, Py_GT, Py_GE)[op]
    for part in parts:
        if type(part) is list:
            found = take_inputs(<list>part, plans, plan, where, channel_names, by_so)
            if found is None:
                return None
            taken = <tuple>found
            for i in <list>taken[0]:
                index.append(at + i)
            groups += <list>taken[1]
            times += <list>taken[2]
            rows += <list>taken[3]
            at += len(<list>part)
            continue
        found = plans.get(part.key, _MISSING)
        if found is not None and found is not plan:
            return None
        part_times = part.times
        n = len(part_times)
        if found is None:
            at += n
            continue
        column_of = dict(zip(part.names, part.columns))
        args = [None if ch is None else column_of.get(ch) for ch in channels]
        if wch is not None:
            test = column_of.get(wch)
            if test is None:  # the channel is not in this message: never kept
                at += n
                continue
        group = (<tuple>part.key)[0] if by_so else ""
        for i in range(n):
            if wch is not None:
                v = test[i]
                if type(v) is not int and type(v) is not float:
                    return None
                if not PyObject_RichCompareBool(v, c, cmp_op):
                    continue
            index.append(at + i)
            groups.append(group)
            times.append(part_times[i])
            row = []
            for j in range(m):
                col = args[j]
                row.append(True if channels[j] is None else None if col is None
                           else (<list>col)[i])
            rows.append(row)
        at += n
    return index, groups, times, rows
