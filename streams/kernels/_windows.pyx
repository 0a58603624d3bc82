# cython: language_level=3, boundscheck=False, wraparound=False
"""The window kernel, compiled: the same as `_windows_py.py` (its specification, which calls
`WindowOperator.process` per update), with that method's tumbling/hopping path in C."""

from cpython cimport array
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_ITEM
from cpython.ref cimport PyObject
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset
from cpython.object cimport Py_GE, Py_GT, Py_LE, Py_LT, PyObject_RichCompareBool
from libc.math cimport fabs, isfinite

from operator import itemgetter

from streams.kernels._windows_py import fold_windows as _twin

cdef object _position = itemgetter(0)

cdef object _WindowResult = None, _LateUpdate = None, _heappush = None, _loaded = None
cdef object _heappop = None
cdef object _MessageRun = None
cdef list _NONES = [None] * 32
cdef Py_ssize_t _MAX_CLOCKS = 0
cdef dict _CODES = {}
cdef double EXACT = 9007199254740992.0  # 2**53: ints below convert to float exactly
cdef int COUNT = 0, SUM = 1, AVG = 2, MIN = 3, MAX = 4, GENERIC = -1
cdef enum:
    GROUP_SLOTS = 2048  # a message run's key objects, by identity, while it is grouped


cdef void _load():
    global _WindowResult, _LateUpdate, _heappush, _MAX_CLOCKS, _loaded, _MessageRun, _heappop
    import heapq
    from streams.accepted import MessageRun
    from streams.windows import aggregates, model
    _MessageRun = MessageRun
    _loaded = True
    _WindowResult = model.WindowResult
    _MAX_CLOCKS = model.MAX_CLOCKS
    _LateUpdate = model.LateUpdate
    _heappush = heapq.heappush
    _heappop = heapq.heappop
    for name, code in (("count", COUNT), ("sum", SUM), ("avg", AVG), ("min", MIN), ("max", MAX)):
        _CODES[id(aggregates.AGGREGATES[name])] = code


cdef list _copied(list accs):
    return [a[:] if type(a) is list else a for a in accs]


cdef class KeyState:
    """The state of one key of a window operator, owned by the kernel: the same fields and
    methods as its twin, `streams.windows.keys.KeyState` (the specification), read by the
    kernel as a C structure rather than attribute by attribute."""
    cdef public dict windows  # (start, end) -> accumulators
    cdef public set fired
    cdef public object next_empty
    cdef public list buffer
    cdef public object arrivals
    cdef public list sessions
    cdef public list due
    cdef public list expiry
    # the window the kernel added to last, valid within the batch of `c_epoch` until a window
    # is fired (nothing else changes a key's windows during a kernel's batch)
    cdef unsigned long long c_epoch
    cdef long long c_start
    cdef object c_accs

    def __init__(self, windows=None, fired=None, next_empty=None, buffer=None, arrivals=0,
                 sessions=None, due=None, expiry=None):
        self.windows = {} if windows is None else windows
        self.fired = set() if fired is None else fired
        self.next_empty = next_empty
        self.buffer = [] if buffer is None else buffer
        self.arrivals = arrivals
        self.sessions = [] if sessions is None else sessions
        self.due = [] if due is None else due
        self.expiry = [] if expiry is None else expiry

    def idle(self):
        return not (self.windows or self.buffer or self.sessions or self.arrivals)

    def clone(self):
        return KeyState({w: _copied(accs) for w, accs in self.windows.items()},
                        set(self.fired), self.next_empty, list(self.buffer), self.arrivals,
                        [[st, last, _copied(accs)] for st, last, accs in self.sessions],
                        list(self.due), list(self.expiry))

    def dump(self):
        return {
            "windows": [[st, e, accs] for (st, e), accs in self.windows.items()],
            "fired": [[st, e] for st, e in sorted(self.fired)],
            "next_empty": self.next_empty,
            "buffer": [[t, a] for t, a in self.buffer],
            "arrivals": self.arrivals,
            "sessions": self.sessions,
        }

    @staticmethod
    def load(dict k):
        return KeyState({(st, e): accs for st, e, accs in k["windows"]},
                        {(st, e) for st, e in k["fired"]}, k["next_empty"],
                        [(t, a) for t, a in k["buffer"]], k["arrivals"],
                        [list(x) for x in k["sessions"]])

    @staticmethod
    def of(object other):
        """The same state, from the twin's type (an operator built before the kernels were
        swapped, say)."""
        return KeyState(other.windows, other.fired, other.next_empty, other.buffer,
                        other.arrivals, other.sessions, other.due, other.expiry)

    def __eq__(self, other):
        if not hasattr(other, "due"):
            return NotImplemented
        return (self.windows, self.fired, self.next_empty, self.buffer, self.arrivals,
                self.sessions, self.due, self.expiry) == (
                    other.windows, other.fired, other.next_empty, other.buffer, other.arrivals,
                    other.sessions, other.due, other.expiry)

    def __repr__(self):
        return (f"KeyState(windows={self.windows!r}, fired={self.fired!r},"
                f" next_empty={self.next_empty!r}, buffer={self.buffer!r},"
                f" arrivals={self.arrivals!r}, sessions={self.sessions!r}, due={self.due!r},"
                f" expiry={self.expiry!r})")


cdef unsigned long long _EPOCH = 0  # one per batch folded


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


cdef class _Folder:
    """One operator's batch: the per-update work of `WindowOperator.process` for tumbling and
    hopping windows, what fired and what was late collected with each update's position."""
    cdef object owner
    cdef dict keys, clocks
    cdef list aggs
    cdef list fired, late
    cdef int[32] codes
    cdef long long size, hop, delay, lateness
    cdef bint tumbling
    cdef Py_ssize_t clocks_max
    cdef object max_time  # the operator's, kept here during the batch (`done` writes it back)
    cdef Py_ssize_t late_count
    cdef unsigned long long epoch
    cdef list names  # the aggregates' output names
    cdef bint simple  # every aggregate one the C loop knows (its values made in C too)

    def __cinit__(self, object owner):
        global _EPOCH
        cdef object spec = owner.spec
        cdef Py_ssize_t j
        _EPOCH += 1
        self.epoch = _EPOCH
        self.owner = owner
        self.keys = owner.keys
        self.clocks = owner.clocks
        self.aggs = [agg for _, agg in owner.aggregates]
        self.fired = []
        self.late = []
        self.size, self.hop, self.delay = spec.size, spec.hop, spec.delay
        self.lateness = spec.allowed_lateness
        self.tumbling = spec.kind == "tumbling"
        self.clocks_max = _MAX_CLOCKS
        self.max_time = owner.max_time
        self.late_count = 0
        self.names = [name for name, _ in owner.aggregates]
        self.simple = len(self.aggs) <= 32
        for j in range(min(len(self.aggs), 32)):
            self.codes[j] = _CODES.get(id(self.aggs[j]), GENERIC)
            if self.codes[j] == GENERIC:
                self.simple = False

    cdef int fire(self, object key, KeyState state, long long watermark,
                  Py_ssize_t position) except -1:
        """`owner.fire_key` for tumbling and hopping windows (`_fire_indexed`), in C: the
        key's windows due at `watermark` fire, those past their lateness go, and a key left
        with nothing goes too."""
        cdef object owner = self.owner, undo = owner._undo, end, start, window, accs
        cdef list due = state.due, expiry = state.expiry
        cdef long long lateness = self.lateness
        if not self.simple:
            for result in owner.fire_key(key, state, watermark):
                self.fired.append((position, result))
            return 0
        if undo is not None and key not in undo:
            owner.touch((key,))
        state.c_epoch = 0  # windows go
        while due and (<tuple>due[0])[0] <= watermark:
            end, start = <tuple>_heappop(due)
            window = (start, end)
            accs = state.windows[window]
            self.fired.append((position, _WindowResult(key, start, end,
                                                       self.values(<list>accs, start, end))))
            state.fired.add(window)
            _heappush(expiry, (end + lateness, start, end))
        while expiry and (<tuple>expiry[0])[0] <= watermark:
            _, start, end = <tuple>_heappop(expiry)
            window = (start, end)
            state.fired.discard(window)
            del state.windows[window]
        if (not state.windows and not state.buffer and not state.sessions
                and not state.arrivals and self.keys.get(key) is state):
            del self.keys[key]
        return 0

    cdef dict values(self, list accs, object start, object end):
        """`owner.values` for count, sum, avg, min and max, in C: a value that is None or
        not finite is left out."""
        cdef dict out = {}
        cdef Py_ssize_t j
        cdef object acc, value
        cdef double total
        for j in range(len(accs)):
            acc = accs[j]
            code = self.codes[j]
            if code == COUNT or code == MIN or code == MAX:
                value = acc
            elif code == SUM:
                value = (<list>acc)[0] + (<list>acc)[1]
            else:  # AVG
                value = ((<list>acc)[0] + (<list>acc)[1]) / (<list>acc)[2] if (<list>acc)[2] else None
            if value is not None and (type(value) is not float or isfinite(
                    PyFloat_AS_DOUBLE(value))):
                out[self.names[j]] = value
        return out

    cdef int add(self, object key, object py_t, object args, Py_ssize_t i) except -1:
        cdef long long step, t = py_t, watermark = 0, max_time = 0, start, r
        cdef long long size = self.size, hop = self.hop, delay = self.delay
        cdef bint has_max, accepted
        cdef dict windows, clocks = self.clocks
        cdef list due, expiry, starts
        cdef KeyState state
        cdef object found, window, accs_obj, clock, result
        cdef object owner = self.owner
        cdef Py_ssize_t j
        found = self.keys.get(key)
        if type(found) is KeyState:
            state = <KeyState>found
        else:  # new, or the twin's type: the kernel's own from here on
            state = KeyState() if found is None else KeyState.of(found)
            self.keys[key] = state
        windows = state.windows
        due = state.due
        clock = clocks.get(key)  # each key's own clock: one device moves only its windows
        has_max = clock is not None
        if has_max:
            max_time = clock
            watermark = max_time - delay
        # the [start, end) windows holding t, oldest first (Python's floor modulo)
        step = size if self.tumbling else hop
        r = t % step
        if r < 0:
            r += step
        start = t - r
        if self.tumbling:  # one window: the one added to last, most often
            accepted = not (has_max and start + size + self.lateness <= watermark)
            if accepted:
                if state.c_epoch == self.epoch and state.c_start == start:
                    accs_obj = state.c_accs
                else:
                    window = (start, start + size)
                    accs_obj = windows.get(window)
                    if accs_obj is None:
                        accs_obj = windows[window] = [agg.initial() for agg in self.aggs]
                        _heappush(due, (start + size, start))
                    state.c_epoch, state.c_start, state.c_accs = self.epoch, start, accs_obj
                _add(<list>accs_obj, self.aggs, self.codes, args, py_t)
                if state.fired and (start, start + size) in state.fired:  # late, in lateness
                    self.fired.append((i, _WindowResult(
                        key, start, start + size, owner.values(accs_obj, start, start + size),
                        updated=True)))
            else:
                self.late.append((i, _LateUpdate(key, py_t, watermark)))
                self.late_count += 1
            if state.next_empty is None:
                state.next_empty = start
            return self._advance(key, state, py_t, t, has_max, max_time, i)
        starts = []
        while start + size > t:
            starts.append(start)
            if self.tumbling:
                break
            start -= hop
        accepted = False
        for j in range(len(starts) - 1, -1, -1):
            start = starts[j]
            if has_max and start + size + self.lateness <= watermark:
                continue
            window = (start, start + size)
            accs_obj = windows.get(window)
            if accs_obj is None:
                accs_obj = windows[window] = [agg.initial() for agg in self.aggs]
                _heappush(due, (start + size, start))
            _add(<list>accs_obj, self.aggs, self.codes, args, py_t)
            accepted = True
            if window in state.fired:  # a late update within allowed lateness
                self.fired.append((i, _WindowResult(key, start, start + size,
                                                    owner.values(accs_obj, start, start + size),
                                                    updated=True)))
        if not accepted:
            self.late.append((i, _LateUpdate(key, py_t, watermark if has_max else py_t)))
            self.late_count += 1
        if state.next_empty is None:
            state.next_empty = starts[len(starts) - 1]
        return self._advance(key, state, py_t, t, has_max, max_time, i)

    cdef inline int _advance(self, object key, KeyState state, object py_t, long long t,
                             bint has_max, long long max_time, Py_ssize_t i) except -1:
        """owner._advance, inline: the key's clock moves, and its due windows fire."""
        cdef dict clocks = self.clocks
        cdef long long watermark
        cdef list due, expiry
        cdef object result
        if not has_max or t > max_time:
            if has_max:
                del clocks[key]  # re-inserted: the dict's order is by last advance
            clocks[key] = py_t
            if self.max_time is None or py_t > self.max_time:
                self.max_time = py_t
            if len(clocks) > self.clocks_max:
                self.owner.forget_clocks()
            watermark = t - self.delay
            due, expiry = state.due, state.expiry
            if (due and (<tuple>due[0])[0] <= watermark) or (
                    expiry and (<tuple>expiry[0])[0] <= watermark):
                state.c_epoch = 0  # firing drops windows
                self.fire(key, state, watermark, i)
        return 0


    cdef KeyState _state(self, object key):
        """`key`'s state, made the kernel's own (new, or of the twin's type)."""
        found = self.keys.get(key)
        if type(found) is KeyState:
            return <KeyState>found
        state = KeyState() if found is None else KeyState.of(found)
        self.keys[key] = state
        return state

    cdef Py_ssize_t run(self, object key, const long long* times, Py_ssize_t n,
                        const Py_ssize_t* index, const double** cols, const double* test,
                        int cmp_op, double bound, Py_ssize_t at, object part_times,
                        tuple channels, list arg_columns, list row) except -2:
        """The readings of one key's column run (times ascending or not), tumbling windows, each
        aggregate count, sum, avg, min or max of a double column (`cols[j]`; NULL: count, or
        a column the message lacks): what `add` does for each, with the window's
        accumulators and the key's clock in C while the readings stay in one window. A
        reading the C loop does not handle as `add` would (a window already fired, an
        accumulator of another type) goes through `add` itself, everything written back
        first. `index`: the readings' positions in the run (NULL: 0 to n - 1). Returns the
        position of the last reading that moved the key's clock (-1: none)."""
        cdef Py_ssize_t i, k, j, m = len(self.aggs), moved_at = -1
        cdef long long t, start, r, size = self.size, cur = 0, max_time = 0, next_fire = 0
        cdef long long watermark
        cdef bint loaded = False, has_max, clock_moved = False, has_fire
        cdef double v, total, comp, x
        cdef double[32] sums, comps, extremes
        cdef long long[32] counts
        cdef char[32] have  # min/max: 0 none yet, 1 the Python value kept, 2 a double
        cdef object clock, accs = None, window, acc
        cdef list accs_list = None, extreme_objs = _NONES[:m] if m <= 32 else [None] * m
        cdef KeyState state = None
        cdef int code
        # the key's clock and when its next window fires, read once (`sync` writes back)
        clock = self.clocks.get(key)
        has_max = clock is not None
        if has_max:
            max_time = clock
        for k in range(n):
            i = k if index == NULL else index[k]
            t = times[i]
            if test != NULL:
                x = test[i]  # (NaN: the message lacks the channel, and is not kept)
                if not (x < bound if cmp_op == Py_LT else x <= bound if cmp_op == Py_LE
                        else x > bound if cmp_op == Py_GT else x >= bound):
                    continue
            if state is None:
                state = self._state(key)
                has_fire = _next_fire(state, &next_fire)
            r = t % size
            if r < 0:
                r += size
            start = t - r
            if has_max and start + size + self.lateness <= max_time - self.delay:
                watermark = max_time - self.delay
                self.late.append((at + i, _LateUpdate(key, t, watermark)))
                self.late_count += 1
            else:
                if not loaded or start != cur:
                    if loaded:
                        _flush(accs_list, self.codes, m, sums, comps, counts, have,
                               extremes, extreme_objs)
                        loaded = False
                    window = (start, start + size)
                    accs = state.windows.get(window)
                    if accs is not None and (window in state.fired or not _loadable(
                            <list>accs, self.codes, m, sums, comps, counts, have, extremes,
                            extreme_objs)):
                        # `add`'s way: a late update in a fired window, or another type
                        self._sync(key, state, clock_moved, max_time)
                        clock_moved = False
                        for j in range(m):
                            row[j] = (True if channels[j] is None else None
                                      if arg_columns[j] is None else _cell(arg_columns[j], i))
                        self.add(key, part_times[i], row, at + i)
                        if not has_max or t > max_time:
                            moved_at = at + i
                        state = None
                        clock = self.clocks.get(key)
                        has_max = clock is not None
                        if has_max:
                            max_time = clock
                        continue
                    if accs is None:
                        accs = state.windows[window] = [agg.initial() for agg in self.aggs]
                        _heappush(state.due, (start + size, start))
                        has_fire = _next_fire(state, &next_fire)
                        _loadable(<list>accs, self.codes, m, sums, comps, counts, have,
                                  extremes, extreme_objs)
                    accs_list = <list>accs
                    loaded = True
                    cur = start
                    state.c_epoch = 0  # the per-reading cache of `add` no longer holds
                for j in range(m):
                    code = self.codes[j]
                    if code == COUNT:
                        counts[j] += 1
                        continue
                    if cols[j] == NULL:  # the message lacks the channel: nothing to add
                        continue
                    v = cols[j][i]
                    if v != v:  # NaN: this message lacks it
                        continue
                    if code == SUM or code == AVG:
                        total = sums[j]
                        x = total + v
                        if fabs(total) >= fabs(v):
                            comps[j] += (total - x) + v
                        else:
                            comps[j] += (v - x) + total
                        sums[j] = x
                        counts[j] += 1
                    elif code == MIN:
                        if have[j] == 0 or v < extremes[j]:
                            extremes[j] = v
                            have[j] = 2
                    elif code == MAX:
                        if have[j] == 0 or v > extremes[j]:
                            extremes[j] = v
                            have[j] = 2
            if state.next_empty is None:
                state.next_empty = start
            if not has_max or t > max_time:  # the key's clock moves
                has_max = clock_moved = True
                max_time = t
                moved_at = at + i
                if has_fire and next_fire <= t - self.delay:  # windows fire: `add`'s way
                    if loaded:
                        _flush(accs_list, self.codes, m, sums, comps, counts, have,
                               extremes, extreme_objs)
                        loaded = False
                    self._sync(key, state, True, max_time)
                    clock_moved = False
                    state.c_epoch = 0
                    self.fire(key, state, t - self.delay, at + i)
                    state = None
        if loaded:
            _flush(accs_list, self.codes, m, sums, comps, counts, have, extremes, extreme_objs)
        self._sync(key, state, clock_moved, max_time)
        return moved_at

    cdef int _sync(self, object key, KeyState state, bint moved, long long max_time) except -1:
        """The key's clock written back, as `add` leaves it."""
        if not moved:
            return 0
        py_t = max_time
        self.clocks.pop(key, None)  # re-inserted: the dict's order is by last advance
        self.clocks[key] = py_t
        if self.max_time is None or py_t > self.max_time:
            self.max_time = py_t
        if len(self.clocks) > self.clocks_max:
            self.owner.forget_clocks()
        return 0

    cdef tuple done(self):
        """The batch's fired windows and late updates; the operator's scalars written back."""
        self.owner.max_time = self.max_time
        self.owner.late_count += self.late_count
        return self.fired, self.late


cdef inline object _cell(object column, Py_ssize_t i):
    """A cell of a column as the value it stands for: None where a message run's doubles hold
    NaN (the message lacks the channel)."""
    cdef object v = column[i]
    if type(v) is float and PyFloat_AS_DOUBLE(v) != PyFloat_AS_DOUBLE(v):
        return None
    return v


cdef bint _next_fire(KeyState state, long long* at) except -1:
    """When the key's next window fires or expires (its heaps' heads); False: none."""
    cdef list due = state.due, expiry = state.expiry
    cdef bint has = False
    cdef long long head
    if due:
        at[0] = (<tuple>due[0])[0]
        has = True
    if expiry:
        head = (<tuple>expiry[0])[0]
        if not has or head < at[0]:
            at[0] = head
        has = True
    return has


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


cdef inline bint _foldable(object operator):
    return operator.indexed and not operator.spec.processing_time and len(operator.aggregates) <= 32


def fold_windows(object operator, list groups, list times, list args):
    if not _foldable(operator):
        return _twin(operator, groups, times, args)
    if _loaded is None:
        _load()
    cdef _Folder folder = _Folder(operator)
    cdef Py_ssize_t i, n = len(groups)
    for i in range(n):
        folder.add(groups[i], times[i], args[i], i)
    return folder.done()


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
    if _loaded is None:
        _load()
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
