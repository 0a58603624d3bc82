# The window kernel's types and helpers, shared by its modules: `_windows.pyx` (a window key's
# state, the folder of one operator's batch) and `_inputs.pyx` (a flow's inputs read from a
# batch's rows and runs, and folded).
from cpython.float cimport PyFloat_AS_DOUBLE



cdef class KeyState:
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


cdef class _Folder:
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

    cdef int fire(self, object key, KeyState state, long long watermark,
                  Py_ssize_t position) except -1
    cdef dict values(self, list accs, object start, object end)
    cdef int add(self, object key, object py_t, object args, Py_ssize_t i) except -1
    cdef int _advance(self, object key, KeyState state, object py_t, long long t,
                      bint has_max, long long max_time, Py_ssize_t i) except -1
    cdef KeyState _state(self, object key)
    cdef Py_ssize_t run(self, object key, const long long* times, Py_ssize_t n,
                        const Py_ssize_t* index, const double** cols, const double* test,
                        int cmp_op, double bound, Py_ssize_t at, object part_times,
                        tuple channels, list arg_columns, list row) except -2
    cdef int _sync(self, object key, KeyState state, bint moved, long long max_time) except -1
    cdef tuple done(self)


cdef void _load()


cdef inline object _cell(object column, Py_ssize_t i):
    """A cell of a column as the value it stands for: None where a message run's doubles hold
    NaN (the message lacks the channel)."""
    cdef object v = column[i]
    if type(v) is float and PyFloat_AS_DOUBLE(v) != PyFloat_AS_DOUBLE(v):
        return None
    return v


cdef inline bint _foldable(object operator):
    return operator.indexed and not operator.spec.processing_time and len(operator.aggregates) <= 32
