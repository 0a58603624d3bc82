# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The column-expression kernel, compiled: the same as `_vector_py.py` (its specification),
evaluated a whole column per operation: each node of the program makes a column of doubles and
a state per reading (absent, a value, an error), its children first. `and`, `or` and `?` pick,
per reading, the state of the side the row-by-row expressions would have evaluated, so what
the other side did there (a division by zero, say) does not count. Built with
`-ffp-contract=off`: no fused multiply-add, so `t * 1.8 + 32` rounds as Python's floats do."""

from cpython cimport array
from libc.math cimport NAN, fabs, fmod, isnan, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memset

import array as _array

cdef enum:  # the operations, numbered as in the twin
    REF = 0
    NUM = 1
    NEG = 2
    NOT = 3
    ABS = 4
    SQRT = 5
    AVAILABLE = 6
    ADD = 7
    SUB = 8
    MUL = 9
    DIV = 10
    MOD = 11
    LT = 12
    LE = 13
    GT = 14
    GE = 15
    EQ = 16
    NE = 17
    AND = 18
    OR = 19
    MIN = 20
    MAX = 21
    COND = 22

cdef enum:  # a reading's state
    ABSENT = 0
    VALUE = 1
    ERROR = 2

cdef array.array _DOUBLES = _array.array("d")


cdef int _eval(tuple node, list inputs, Py_ssize_t n, double* out, char* state) except -1:
    cdef int op = node[0]
    cdef Py_ssize_t i
    cdef double a, b, c
    cdef double* x = NULL
    cdef double* y = NULL
    cdef char* xs = NULL
    cdef char* ys = NULL
    cdef const double* column
    cdef object got
    if op == REF:
        got = inputs[<Py_ssize_t>node[1]]
        if got is None:
            memset(state, ABSENT, n)
            return 0
        column = (<array.array>got).data.as_doubles
        for i in range(n):
            out[i] = column[i]
            state[i] = ABSENT if isnan(column[i]) else VALUE
        return 0
    if op == NUM:
        c = node[1]
        for i in range(n):
            out[i] = c
        memset(state, VALUE, n)
        return 0
    _eval(node[1], inputs, n, out, state)
    if op == NEG or op == NOT or op == ABS or op == SQRT or op == AVAILABLE:
        for i in range(n):
            if op == AVAILABLE:
                if state[i] != ERROR:
                    out[i] = state[i] == VALUE
                    state[i] = VALUE
                continue
            if state[i] != VALUE:
                continue
            a = out[i]
            if op == NEG:
                out[i] = -a
            elif op == NOT:
                out[i] = a == 0.0
            elif op == ABS:
                out[i] = fabs(a)
            elif a < 0:
                state[i] = ERROR
            else:
                out[i] = sqrt(a)
        return 0
    x = <double*>malloc(n * sizeof(double) * (2 if op == COND else 1))
    xs = <char*>malloc(n * (2 if op == COND else 1))
    if x == NULL or xs == NULL:
        free(x)
        free(xs)
        raise MemoryError()
    try:
        _eval(node[2], inputs, n, x, xs)
        if op == COND:
            y, ys = x + n, xs + n
            _eval(node[3], inputs, n, y, ys)
            for i in range(n):
                if state[i] == VALUE:
                    if out[i] != 0.0:
                        out[i], state[i] = x[i], xs[i]
                    else:
                        out[i], state[i] = y[i], ys[i]
            return 0
        if op == AND or op == OR:  # the right side where the left does not decide
            for i in range(n):
                if state[i] == VALUE and (out[i] != 0.0) == (op == AND):
                    out[i], state[i] = x[i], xs[i]
            return 0
        for i in range(n):
            if state[i] != VALUE:
                continue
            if xs[i] != VALUE:
                state[i] = xs[i]
                continue
            a, b = out[i], x[i]
            if op == ADD:
                out[i] = a + b
            elif op == SUB:
                out[i] = a - b
            elif op == MUL:
                out[i] = a * b
            elif op == DIV:
                if b == 0.0:
                    state[i] = ERROR
                else:
                    out[i] = a / b
            elif op == MOD:
                if b == 0.0:
                    state[i] = ERROR
                else:
                    out[i] = fmod(a, b)
            elif op == LT:
                out[i] = a < b
            elif op == LE:
                out[i] = a <= b
            elif op == GT:
                out[i] = a > b
            elif op == GE:
                out[i] = a >= b
            elif op == EQ:
                out[i] = a == b
            elif op == NE:
                out[i] = a != b
            elif op == MIN:
                out[i] = b if b < a else a
            elif op == MAX:
                out[i] = b if b > a else a
            else:
                raise ValueError(f"unknown column operation {op}")
    finally:
        free(x)
        free(xs)
    return 0


cdef inline bint _doubles(object column):
    return column is None or (
        type(column) is array.array and (<array.array>column).ob_descr.typecode == b"d")


def derive_columns(object where, object values, object inputs, Py_ssize_t n):
    cdef list columns = list(inputs), out = [], programs = list(values)
    cdef array.array mask = None, result
    cdef double* buffer = NULL
    cdef char* state = NULL
    cdef char* kept = NULL
    cdef Py_ssize_t i, j
    cdef object program
    for program in columns:
        if not _doubles(program):
            return None
    buffer = <double*>malloc(max(n, 1) * sizeof(double))
    state = <char*>malloc(max(n, 1) * 2)
    if buffer == NULL or state == NULL:
        free(buffer)
        free(state)
        raise MemoryError()
    kept = state + n
    try:
        memset(kept, 1, n)
        if where is not None:
            _eval(<tuple>where, columns, n, buffer, state)
            mask = array.clone(_DOUBLES, n, zero=False)
            for i in range(n):
                if state[i] == ERROR:
                    return None
                kept[i] = state[i] == VALUE and buffer[i] != 0.0
                mask.data.as_doubles[i] = 1.0 if kept[i] else NAN
        for j in range(len(programs)):
            program = programs[j]
            if program is None:
                out.append(None)
                continue
            _eval(<tuple>program, columns, n, buffer, state)
            result = array.clone(_DOUBLES, n, zero=False)
            for i in range(n):
                if not kept[i] or state[i] == ABSENT:
                    result.data.as_doubles[i] = NAN
                elif state[i] == ERROR or isnan(buffer[i]):
                    return None  # the row-by-row way says what failed
                else:
                    result.data.as_doubles[i] = buffer[i]
            out.append(result)
    finally:
        free(buffer)
        free(state)
    return mask, out
