# The window kernel's accumulators (`_accumulate.pyx`), for `_windows.pyx` and `_inputs.pyx`.

cdef enum:  # the aggregates the C loop folds
    COUNT = 0
    SUM = 1
    AVG = 2
    MIN = 3
    MAX = 4
    GENERIC = -1

cdef extern from *:
    """
    #define CLOUDLET_EXACT 9007199254740992.0
    """
    double EXACT "CLOUDLET_EXACT"  # 2**53: ints below convert to float exactly


cdef void _add(list accs, list aggs, int* codes, object args, object t) except *
cdef bint _loadable(list accs, int* codes, Py_ssize_t m, double* sums, double* comps,
                    long long* counts, char* have, double* extremes, list objs) except -1
cdef int _flush(list accs, int* codes, Py_ssize_t m, double* sums, double* comps,
                long long* counts, char* have, double* extremes, list objs) except -1
