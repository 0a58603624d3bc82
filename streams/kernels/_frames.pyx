# cython: language_level=3, boundscheck=False, wraparound=False
"""The MQTT v5 frame kernel, compiled: the same as `_frames_py.py` (its specification), reading
the broker's bytes through a C pointer and building each record without Python arithmetic."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcpy

from streams.kernels._frames_py import FrameError, MAX_REMAINING

cdef int PUBLISH = 3


cdef class Publish:
    """One PUBLISH from the broker (see the twin)."""

    cdef readonly str topic
    cdef readonly bytes payload
    cdef readonly int qos
    cdef readonly bint dup
    cdef readonly int packet_id
    cdef readonly object content_type
    cdef readonly long long received_at

    def __init__(self, str topic, bytes payload, int qos, bint dup, int packet_id,
                 object content_type, long long received_at):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.dup = dup
        self.packet_id = packet_id
        self.content_type = content_type
        self.received_at = received_at

    def __repr__(self):
        return (f"Publish({self.topic!r}, {len(self.payload)} bytes, qos={self.qos},"
                f" dup={self.dup}, packet_id={self.packet_id})")


cdef inline str _text(const unsigned char* p, Py_ssize_t start, Py_ssize_t stop, str what):
    cdef str text
    if memchr(p + start, 0, stop - start) != NULL:
        raise FrameError(f"PUBLISH {what} contains U+0000")
    try:
        text = (<const char*>p)[start:stop].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError(f"PUBLISH {what} is not UTF-8 ({exc.reason})") from None
    return text


cdef enum:
    TRUNCATED = -1  # _varint: the bytes end before the number does
    TOO_LONG = -2  # _varint: more than 4 bytes


cdef inline Py_ssize_t _varint(const unsigned char* p, Py_ssize_t i, Py_ssize_t end,
                               Py_ssize_t* value):
    """MQTT's variable byte integer at p[i:end] into value; the index after it, or an error."""
    cdef int b, shift = 0
    value[0] = 0
    while True:
        if i >= end:
            return TRUNCATED
        b = p[i]
        i += 1
        value[0] |= (<Py_ssize_t>(b & 0x7F)) << shift
        if not b & 0x80:
            return i
        shift += 7
        if shift > 21:
            return TOO_LONG


cdef Publish _publish(bytes buf, const unsigned char* p, int flags, Py_ssize_t i,
                      Py_ssize_t end, long long received_at):
    cdef int qos = (flags >> 1) & 3
    cdef Py_ssize_t size, length, stop
    cdef int prop, packet_id = 0
    cdef object content_type = None
    cdef Publish out
    if qos == 3:
        raise FrameError("PUBLISH with QoS 3")
    if i + 2 > end:
        raise FrameError("PUBLISH truncated in its topic")
    size = (p[i] << 8) | p[i + 1]
    i += 2
    if i + size > end:
        raise FrameError("PUBLISH truncated in its topic")
    if size == 0:
        raise FrameError("PUBLISH with an empty topic (topic aliases are not accepted)")
    topic = _text(p, i, i + size, "topic")
    i += size
    if qos:
        if i + 2 > end:
            raise FrameError("PUBLISH truncated in its packet id")
        packet_id = (p[i] << 8) | p[i + 1]
        i += 2
        if packet_id == 0:
            raise FrameError("PUBLISH with QoS > 0 and packet id 0")
    i = _varint(p, i, end, &length)
    if i == TRUNCATED:
        raise FrameError("PUBLISH truncated in its properties length")
    if i == TOO_LONG:
        raise FrameError("PUBLISH properties length longer than 4 bytes")
    stop = i + length
    if stop > end:
        raise FrameError("PUBLISH properties longer than the packet")
    while i < stop:
        prop = p[i]
        i += 1
        if prop == 0x01:
            i += 1
        elif prop == 0x02:
            i += 4
        elif prop == 0x0B:
            i = _varint(p, i, stop, &size)
            if i == TRUNCATED:
                raise FrameError("PUBLISH truncated in its subscription identifier")
            if i == TOO_LONG:
                raise FrameError("PUBLISH subscription identifier longer than 4 bytes")
        elif prop == 0x23:
            raise FrameError("PUBLISH with a topic alias (this client allows none)")
        elif prop == 0x03 or prop == 0x08 or prop == 0x09 or prop == 0x26:
            if i + 2 > stop:
                raise FrameError("PUBLISH truncated in its properties")
            size = (p[i] << 8) | p[i + 1]
            i += 2 + size
            if prop == 0x03 and i <= stop:
                content_type = _text(p, i - size, i, "content type")
            if prop == 0x26:
                if i + 2 > stop:
                    raise FrameError("PUBLISH truncated in its properties")
                size = (p[i] << 8) | p[i + 1]
                i += 2 + size
        else:
            raise FrameError(f"PUBLISH with unknown property 0x{prop:02x}")
        if i > stop:
            raise FrameError("PUBLISH properties longer than declared")
    out = Publish.__new__(Publish)
    out.topic = topic
    out.payload = PyBytes_FromStringAndSize(<const char*>p + stop, end - stop)
    out.qos = qos
    out.dup = (flags & 8) != 0
    out.packet_id = packet_id
    out.content_type = content_type
    out.received_at = received_at
    return out


def split_frames(bytes buf, long long received_at):
    cdef list publishes = []
    cdef list others = []
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf), pos = 0, i, length, end
    cdef int first, kind
    while pos < n:
        first = p[pos]
        i = _varint(p, pos + 1, n, &length)
        if i == TRUNCATED:
            return publishes, others, pos, 0
        if i == TOO_LONG:
            raise FrameError("remaining length longer than 4 bytes")
        end = i + length
        if end > n:
            return publishes, others, pos, end - pos
        kind = first >> 4
        if kind == PUBLISH:
            publishes.append(_publish(buf, p, first & 0x0F, i, end, received_at))
        elif kind == 0:
            raise FrameError("reserved packet type 0")
        else:
            others.append((kind, first & 0x0F, PyBytes_FromStringAndSize(<const char*>p + i,
                                                                          end - i)))
        pos = end
    return publishes, others, pos, 0


cdef inline Py_ssize_t _put_remaining(unsigned char* out, Py_ssize_t length):
    cdef Py_ssize_t k = 0
    cdef int b
    while True:
        b = length & 0x7F
        length >>= 7
        out[k] = (b | 0x80) if length else b
        k += 1
        if not length:
            return k


def publish_frames(list messages, int qos, list packet_ids, bytes properties):
    cdef list frames = []
    cdef Py_ssize_t k, size, plen = len(properties), tlen, dlen, at
    cdef unsigned char header[5]
    cdef unsigned char props_len[4]
    cdef Py_ssize_t hlen, plen_len = _put_remaining(props_len, plen)
    cdef bytes name, payload, frame
    cdef unsigned char* out
    cdef int pid
    cdef Py_ssize_t i
    for k in range(len(messages)):
        topic, payload = messages[k]
        name = (<str>topic).encode("utf-8")
        tlen = len(name)
        dlen = len(payload)
        size = 2 + tlen + (2 if qos else 0) + plen_len + plen + dlen
        if size > MAX_REMAINING:
            raise FrameError(f"message for {topic} is {size} bytes, over MQTT's limit")
        header[0] = 0x30 | (qos << 1)
        hlen = 1 + _put_remaining(header + 1, size)
        frame = PyBytes_FromStringAndSize(NULL, hlen + size)
        out = <unsigned char*>PyBytes_AS_STRING(frame)
        at = 0
        for i in range(hlen):
            out[at] = header[i]
            at += 1
        out[at] = tlen >> 8
        out[at + 1] = tlen & 0xFF
        at += 2
        memcpy(out + at, PyBytes_AS_STRING(name), tlen)
        at += tlen
        if qos:
            pid = packet_ids[k]
            out[at] = pid >> 8
            out[at + 1] = pid & 0xFF
            at += 2
        for i in range(plen_len):
            out[at] = props_len[i]
            at += 1
        if plen:
            memcpy(out + at, PyBytes_AS_STRING(properties), plen)
            at += plen
        if dlen:
            memcpy(out + at, PyBytes_AS_STRING(payload), dlen)
        frames.append(frame)
    return frames


def puback_frames(list packet_ids):
    cdef Py_ssize_t n = len(packet_ids), k
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 4 * n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    cdef int pid
    for k in range(n):
        pid = packet_ids[k]
        p[4 * k] = 0x40
        p[4 * k + 1] = 2
        p[4 * k + 2] = pid >> 8
        p[4 * k + 3] = pid & 0xFF
    return out
