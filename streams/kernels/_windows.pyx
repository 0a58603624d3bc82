# cython: language_level=3, boundscheck=False, wraparound=False
"""The window kernel, compiled: the same as `_windows_py.py` (its specification, which calls
`WindowOperator.process` per update), with that method's tumbling/hopping path in C: a window
key's state (`KeyState`) and the folder of one operator's batch (`_Folder`, declared in
`_windows.pxd` for `_inputs.pyx`, which reads a flow's inputs from a batch and folds them)."""

from cpython cimport array
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_ITEM
from cpython.ref cimport PyObject
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset
from cpython.object cimport Py_GE, Py_GT, Py_LE, Py_LT, PyObject_RichCompareBool
from libc.math cimport fabs, isfinite

from streams.kernels._accumulate cimport (
    AVG, COUNT, EXACT, GENERIC, MAX, MIN, SUM, _add, _flush, _loadable,
)

from streams.kernels._windows_py import fold_windows as _twin

cdef object _WindowResult = None, _LateUpdate = None, _heappush = None, _loaded = None
cdef object _heappop = None
cdef list _NONES = [None] * 32
cdef Py_ssize_t _MAX_CLOCKS = 0
cdef dict _CODES = {}


cdef void _load():
    """What the kernel reads of the modules that import it, read once (on first use)."""
    global _WindowResult, _LateUpdate, _heappush, _MAX_CLOCKS, _loaded, _heappop
    if _loaded is not None:
        return
    import heapq
    from streams.windows import aggregates, model
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


cdef class _Folder:
    """One operator's batch: the per-update work of `WindowOperator.process` for tumbling and
    hopping windows, what fired and what was late collected with each update's position."""

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

    cdef int _advance(self, object key, KeyState state, object py_t, long long t,
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
