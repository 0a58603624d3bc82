# cython: language_level=3, boundscheck=False, wraparound=False
"""A flow's inputs read from a batch and folded, compiled: the same as `_inputs_py.py` (its
specification). `fold_parts` takes a batch's rows, message runs and column runs and folds them
into a window operator with the window kernel's folder (`_windows.pxd`), a run by its columns
where they allow it; `take_inputs` and `column_inputs` read a flow's inputs from rows."""

from cpython cimport array
from cpython.list cimport PyList_GET_ITEM
from cpython.object cimport Py_GE, Py_GT, Py_LE, Py_LT, PyObject_RichCompareBool
from cpython.ref cimport PyObject
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset

from operator import itemgetter

from streams.kernels._accumulate cimport COUNT, EXACT, GENERIC
from streams.kernels._windows cimport KeyState, _Folder, _cell, _foldable, _load

cdef object _position = itemgetter(0)
cdef object _MessageRun = None
cdef enum:
    GROUP_SLOTS = 2048  # a message run's key objects, by identity, while it is grouped


cdef Py_ssize_t _fold_messages(_Folder folder, object part, dict plans, object wch, int cmp_op,
                               object c, tuple channels, bint by_so, list row,
                               Py_ssize_t at) except -1:
    """A message run into the folder (the batch checked ours: each key has the plan or none):
    by `_fold_grouped` where the run's columns allow, else reading by reading, the keys read
    one by one (whether each has the plan remembered by identity: the run repeats its keys'
    objects), their values by column. Returns its length."""
    cdef list keys = part.keys, args
    cdef object times = part.times, test = None
    cdef dict column_of = dict(zip(part.names, part.columns))
    cdef Py_ssize_t i, j, n = len(keys), m = len(channels), slot
    cdef object key, v, column
    cdef PyObject* seen[64]  # a direct-mapped cache: key object -> whether it has the plan
    cdef char[64] has_plan
    cdef bint ours
    if wch is not None:
        test = column_of.get(wch)
        if test is None:  # no message of the run carries it: none is kept
            return n
    args = [None if ch is None else column_of.get(ch) for ch in channels]
    if _fold_grouped(folder, part, plans, test, c, cmp_op, channels, args, row, at, by_so):
        return n
    for slot in range(64):
        seen[slot] = NULL
    for i in range(n):
        key = <object>PyList_GET_ITEM(keys, i)
        slot = (<size_t><PyObject*>key >> 4) & 63
        if seen[slot] == <PyObject*>key:
            ours = has_plan[slot]
        else:
            ours = plans.get(key) is not None
            seen[slot] = <PyObject*>key
            has_plan[slot] = ours
        if not ours:
            continue
        if test is not None:
            v = _cell(test, i)
            if v is None or not PyObject_RichCompareBool(v, c, cmp_op):
                continue
        for j in range(m):
            column = args[j]
            row[j] = True if channels[j] is None else None if column is None else _cell(column, i)
        folder.add((<tuple>key)[0] if by_so else "", times[i], row, at + i)
    return n


cdef bint _fold_grouped(_Folder folder, object part, dict plans, object test, object c,
                        int cmp_op, tuple channels, list args, list row, Py_ssize_t at,
                        bint by_so) except -1:
    """A message run folded by `_Folder.run`, one call per window key over its readings,
    when its columns and the flow allow it (as `_run_folds`); False, having folded nothing,
    otherwise. Results as reading by reading: what fired and what was late ordered by
    position, the keys' clocks re-inserted in the order of their last advance."""
    cdef const double* cols[32]
    cdef const double* where_column = NULL
    cdef double bound = 0.0
    cdef list keys = part.keys, groups = [], fired, late
    cdef object times = part.times, key, group, found
    cdef dict group_of = {}
    cdef Py_ssize_t i, j, g = -1, n = len(keys), m = len(channels), groups_n, fired_from
    cdef Py_ssize_t late_from
    cdef int code
    cdef Py_ssize_t* group_at = NULL
    cdef Py_ssize_t* counts = NULL
    cdef Py_ssize_t* index = NULL
    cdef list moved = []
    cdef PyObject* slot_keys[GROUP_SLOTS]
    cdef Py_ssize_t slot_groups[GROUP_SLOTS]
    cdef Py_ssize_t slot, distinct = 0
    if not _in_c(folder, times, args, test, c, m, cols, &where_column, &bound):
        return False
    group_at = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
    index = <Py_ssize_t*>malloc(n * sizeof(Py_ssize_t))
    if group_at == NULL or index == NULL:
        free(group_at)
        free(index)
        raise MemoryError()
    try:
        # each reading's window key (-1: not this flow's), the keys in order of appearance;
        # a key object's window key found once (a table by identity: the run repeats them)
        memset(slot_keys, 0, sizeof(slot_keys))
        for i in range(n):
            key = <object>PyList_GET_ITEM(keys, i)
            slot = (<size_t><PyObject*>key >> 4) & (GROUP_SLOTS - 1)
            while slot_keys[slot] != NULL and slot_keys[slot] != <PyObject*>key:
                slot = (slot + 1) & (GROUP_SLOTS - 1)
            if slot_keys[slot] != NULL:
                group_at[i] = slot_groups[slot]
                continue
            if distinct >= GROUP_SLOTS // 2:
                return False  # too many key objects for the table: reading by reading
            distinct += 1
            found = plans.get(key)
            if found is None:
                g = -1
            else:
                group = (<tuple>key)[0] if by_so else ""
                found = group_of.get(group)
                if found is None:
                    found = group_of[group] = len(groups)
                    groups.append(group)
                g = found
            slot_keys[slot] = <PyObject*>key
            slot_groups[slot] = g
            group_at[i] = g
        groups_n = len(groups)
        if len(folder.clocks) + groups_n > folder.clocks_max:
            return False  # forgetting clocks on the way: reading by reading
        counts = <Py_ssize_t*>calloc(groups_n + 1, sizeof(Py_ssize_t))
        if counts == NULL:
            raise MemoryError()
        for i in range(n):  # a counting sort of the positions by window key, stable
            if group_at[i] >= 0:
                counts[group_at[i] + 1] += 1
        for g in range(groups_n):
            counts[g + 1] += counts[g]
        for i in range(n):
            g = group_at[i]
            if g >= 0:
                index[counts[g]] = i
                counts[g] += 1
        fired_from, late_from = len(folder.fired), len(folder.late)
        j = 0
        for g in range(groups_n):  # counts[g] is now where group g ends
            i = folder.run(groups[g], (<array.array>times).data.as_longlongs, counts[g] - j,
                           index + j, cols, where_column, cmp_op, bound, at, times, channels,
                           args, row)
            if i >= 0:
                moved.append((i, groups[g]))
            j = counts[g]
    finally:
        free(group_at)
        free(index)
        free(counts)
    if len(moved) > 1 and not _ascending(moved):
        # the clocks' order: by last advance, as reading by reading (`run` left them in the
        # order of the keys' first appearance: the same when devices report in turn)
        moved.sort()
        for _, group in moved:
            folder.clocks[group] = folder.clocks.pop(group)
    fired = folder.fired
    if len(fired) - fired_from > 1:
        fired[fired_from:] = sorted(fired[fired_from:], key=_position)
    late = folder.late
    if len(late) - late_from > 1:
        late[late_from:] = sorted(late[late_from:], key=_position)
    return True


cdef bint _ascending(list moved):
    cdef Py_ssize_t k
    for k in range(1, len(moved)):
        if <Py_ssize_t>(<tuple>moved[k])[0] < <Py_ssize_t>(<tuple>moved[k - 1])[0]:
            return False
    return True


cdef inline bint _doubles(object column):
    return type(column) is array.array and (<array.array>column).ob_descr.typecode == b"d"


cdef bint _in_c(_Folder folder, object times, list args, object test, object c, Py_ssize_t m,
               const double** cols, const double** where_column, double* bound) except -1:
    """Whether `_Folder.run` folds a run with these columns: tumbling windows; count, sum,
    avg, min, max of double columns (`cols[j]`, NULL for count or a column the run lacks);
    a `where` on a double column (`where_column`) against an exact number (`bound`)."""
    cdef Py_ssize_t j
    cdef int code
    if not folder.tumbling or m != len(folder.aggs) or m > 32:
        return False
    if type(times) is not array.array or (<array.array>times).ob_descr.typecode != b"q":
        return False
    for j in range(m):
        code = folder.codes[j]
        if code == GENERIC:
            return False
        cols[j] = NULL
        if code == COUNT or args[j] is None:
            continue
        if not _doubles(args[j]):
            return False
        cols[j] = (<array.array>args[j]).data.as_doubles
    if test is not None:
        if not _doubles(test):
            return False
        if type(c) is float:
            bound[0] = c
        elif type(c) is int and -EXACT < c < EXACT:
            bound[0] = <double>(<long long>c)
        else:
            return False
        where_column[0] = (<array.array>test).data.as_doubles
    return True


cdef bint _run_folds(_Folder folder, object group, object times, object test, object c,
                     int cmp_op, tuple channels, list args, list row, Py_ssize_t at,
                     Py_ssize_t m) except -1:
    """A column run folded by `_Folder.run` when its columns and the flow allow it (tumbling
    windows; count, sum, avg, min, max of double columns; a `where` on a double column
    against an exact number); False, having folded nothing, otherwise."""
    cdef const double* cols[32]
    cdef const double* where_column = NULL
    cdef double bound = 0.0
    cdef Py_ssize_t j
    cdef int code
    if not _in_c(folder, times, args, test, c, m, cols, &where_column, &bound):
        return False
    folder.run(group, (<array.array>times).data.as_longlongs, len(times), NULL, cols,
               where_column, cmp_op, bound, at, times, channels, args, row)
    return True


def fold_parts(object operator, list parts, dict plans, object plan, object where,
               object channel_names, bint by_so):
    """`take_inputs` over rows and column runs, and `fold_windows` over what it takes, in one
    pass (the twin's `_take_parts` says what is taken): runs are folded straight from their
    columns, without an argument row per reading. None, having folded nothing, when a stream
    read has another plan or none yet, a `where` value is not a number, or the operator is not
    one `fold_windows` folds in C (the caller's general path)."""
    if not _foldable(operator):
        return None
    global _MessageRun
    _load()
    if _MessageRun is None:
        from streams.accepted import MessageRun
        _MessageRun = MessageRun
    cdef _Folder folder = _Folder(operator)
    cdef list row, args
    cdef object part_times, test = None, column
    cdef tuple channels = tuple(channel_names), item
    cdef Py_ssize_t at = 0, i, j, n, m = len(channels)
    cdef object part, found, v, c = None, ch, wch = None, group, key, update, last_key = None
    cdef object last_found = None
    cdef dict values, column_of
    cdef list keys
    cdef int op = 0, cmp_op = 0
    if where is not None:
        wch, op, c = where
        cmp_op = (Py_LT, Py_LE, Py_GT, Py_GE)[op]
    row = [None] * m  # one argument row, refilled: _add reads it and keeps nothing of it
    # First, whether this batch is ours at all: nothing is folded before that is known.
    for part in parts:
        if type(part) is list:
            for item in <list>part:
                found = plans.get(item[0], _MISSING)
                if found is None:
                    continue
                if found is not plan:
                    return None
                if wch is not None:
                    v = (<dict>item[1].channels).get(wch)
                    if v is not None and type(v) is not int and type(v) is not float:
                        return None
            continue
        if type(part) is _MessageRun:
            test = None if wch is None else dict(zip(part.names, part.columns)).get(wch)
            keys = part.keys
            for i in range(len(keys)):
                key = keys[i]
                if key is not last_key:
                    found = plans.get(key, _MISSING)
                    last_key, last_found = key, found
                else:
                    found = last_found
                if found is None:
                    continue
                if found is not plan:
                    return None
                if test is not None:
                    v = test[i]
                    if v is not None and type(v) is not int and type(v) is not float:
                        return None
            continue
        found = plans.get(part.key, _MISSING)
        if found is None:
            continue
        if found is not plan:
            return None
        if wch is not None:
            test = dict(zip(part.names, part.columns)).get(wch)
            if test is not None and type(test) is list:  # (a typed column holds numbers)
                for v in test:
                    if type(v) is not int and type(v) is not float:
                        return None
    for part in parts:
        if type(part) is list:
            n = len(<list>part)
            for i in range(n):
                item = <tuple>(<list>part)[i]
                key = item[0]
                if key is last_key:
                    found = last_found
                else:
                    found = plans.get(key, _MISSING)
                    last_key, last_found = key, found
                if found is None:
                    continue
                update = item[1]
                values = update.channels
                if wch is not None:
                    v = values.get(wch)
                    if v is None or not PyObject_RichCompareBool(v, c, cmp_op):
                        continue
                for j in range(m):
                    ch = channels[j]
                    row[j] = True if ch is None else values.get(ch)
                folder.add((<tuple>key)[0] if by_so else "", update.last_update, row, at + i)
            at += n
            continue
        if type(part) is _MessageRun:
            at += _fold_messages(folder, part, plans, wch, cmp_op, c, channels, by_so, row, at)
            continue
        found = plans.get(part.key, _MISSING)
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
        if _run_folds(folder, group, part_times, test, c, cmp_op, channels, args, row, at, m):
            at += n
            continue
        for i in range(n):
            if wch is not None and not PyObject_RichCompareBool(test[i], c, cmp_op):
                continue
            for j in range(m):
                column = args[j]
                row[j] = True if channels[j] is None else None if column is None else column[i]
            folder.add(group, part_times[i], row, at + i)
        at += n
    return folder.done()


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
