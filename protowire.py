"""A reader of protobuf's wire format for the few fields of onnx.proto that onnx_check.py needs (torch-free, onnx-free).

ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto and ValueInfoProto, field numbers as in onnx.proto.
Anything the exporter never writes and that could make onnxruntime read or run more than the file shows (subgraphs,
functions, tensors stored outside the file or in segments) is refused here, as Malformed. About 150 lines, so the
sampler needs no onnx package (whose wheel also brings protobuf) beside onnxruntime.
"""
import math
import struct

MAX_NODES, MAX_FIELDS = 64, 100_000  # the exporter writes 13 nodes, 14 initializers, 16 metadata entries
FLOAT, INT64 = 1, 7


class Malformed(Exception):
    """The bytes are not a model of the shape this project writes; the message says what was found."""


def _varint(buf, i):
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise Malformed("a varint longer than 10 bytes")


def _fields(buf):
    """{field number: [values]} of one message: ints (varint), bytes (fixed32/64) or memoryviews (length-delimited)."""
    out, i, n, count = {}, 0, len(buf), 0
    while i < n:
        count += 1
        if count > MAX_FIELDS:
            raise Malformed("too many fields")
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = bytes(buf[i:i + size]), i + size
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise Malformed(f"wire type {wire}")
        if i > n:
            raise Malformed("a field runs past the end of its message")
        out.setdefault(key >> 3, []).append(value)
    return out


def _int(f, num, default=0):
    v = f.get(num, [default])[-1]
    if not isinstance(v, int):
        raise Malformed(f"field {num} is not an integer")
    return v - (1 << 64) if v >= 1 << 63 else v


def _strs(f, num):
    if not all(isinstance(v, memoryview) for v in f.get(num, [])):
        raise Malformed(f"field {num} is not text")
    return [bytes(v).decode("utf-8") for v in f.get(num, [])]  # UnicodeDecodeError is a ValueError: damaged


def _str(f, num):
    return (_strs(f, num) or [""])[-1]


def _bytes(f, num):
    v = f.get(num, [memoryview(b"")])[-1]
    if not isinstance(v, memoryview):
        raise Malformed(f"field {num} is not bytes")
    return v


def _ints(f, num):
    """A short repeated int64 (shapes, attribute lists), packed or not."""
    out = []
    for v in f.get(num, []):
        if isinstance(v, int):
            out.append(v)
        elif len(v) > 256:
            raise Malformed(f"a list of more than 256 bytes in field {num}")
        else:
            i, buf = 0, bytes(v)
            while i < len(buf):
                x, i = _varint(buf, i)
                out.append(x)
    return [x - (1 << 64) if x >= 1 << 63 else x for x in out]


def _msgs(f, num, most=MAX_NODES):
    values = f.get(num, [])
    if len(values) > most or not all(isinstance(v, memoryview) for v in values):
        raise Malformed(f"more than {most} entries, or entries that are not messages, in field {num}")
    return [_fields(v) for v in values]


# ------------------------------------------------------------------------------------------- onnx.proto, in part

def _tensor(f):
    """(dims, data type, int64 values or None) of a TensorProto whose data is all in its raw_data, as exported."""
    dims, dtype = _ints(f, 1), _int(f, 2)
    if any(k in f for k in (3, 4, 5, 6, 7, 10, 11, 13)) or _int(f, 14) != 0:
        raise Malformed("a tensor stored outside the file, in segments or in typed fields")
    if dtype not in (FLOAT, INT64) or any(d < 0 for d in dims):
        raise Malformed(f"a tensor of type {dtype} and shape {dims}")
    raw, count, size = _bytes(f, 9), math.prod(dims), 4 if dtype == FLOAT else 8
    if len(raw) != count * size:
        raise Malformed(f"a tensor of shape {dims} holding {len(raw)} bytes")
    values = list(struct.unpack(f"<{count}q", raw)) if dtype == INT64 and len(dims) == 1 and count <= 8 else None
    return tuple(dims), dtype, values


def _attribute(f):
    """(name, value) of an AttributeProto of the kinds the exporter writes: float, int, ints or a tensor."""
    name, kind = _str(f, 1), _int(f, 20)
    if 21 in f or any(k in f for k in (6, 11, 22, 23)):
        raise Malformed(f"attribute {name} holds a subgraph or a reference")
    raw_float = f.get(2, [bytes(4)])[-1]  # a fixed32
    if kind == 1 and isinstance(raw_float, bytes) and len(raw_float) == 4:
        return name, struct.unpack("<f", raw_float)[0]
    if kind == 2:
        return name, _int(f, 3)
    if kind == 7:
        return name, tuple(_ints(f, 8))
    if kind == 4 and 5 in f:
        return name, _tensor(_msgs(f, 5, most=1)[0])
    raise Malformed(f"attribute {name} of type {kind}")


def _value_info(f):
    """(name, element type, dims: ints or names) of a ValueInfoProto holding a tensor type."""
    types = _msgs(f, 2)
    tensor = _msgs(types[-1], 1) if types else []
    if not tensor:
        raise Malformed("an input or output that is not a tensor")
    shape = _msgs(tensor[-1], 2)
    dims = [_int(d, 1) if 1 in d else _str(d, 2) for d in (_msgs(shape[-1], 1) if shape else [])]
    return _str(f, 1), _int(tensor[-1], 1), dims


def parse(data):
    """The parts of a ModelProto that the checks need, as plain Python values."""
    m = _fields(memoryview(data))
    if 20 in m or 25 in m:
        raise Malformed("training information or local functions")
    graphs = _msgs(m, 7)
    if not graphs:
        raise Malformed("no graph")
    g = graphs[-1]
    if 15 in g:
        raise Malformed("sparse initializers")
    nodes = [{"op": _str(n, 4), "domain": _str(n, 7), "inputs": _strs(n, 1), "outputs": _strs(n, 2),
              "attrs": dict(_attribute(a) for a in _msgs(n, 5))} for n in _msgs(g, 1)]
    return {"ir_version": _int(m, 1), "opsets": [(_str(o, 1), _int(o, 2)) for o in _msgs(m, 8)],
            "meta": {_str(p, 1): _str(p, 2) for p in _msgs(m, 14)}, "nodes": nodes,
            "initializers": {_str(t, 8): _tensor(t) for t in _msgs(g, 5)},
            "inputs": [_value_info(v) for v in _msgs(g, 11)], "outputs": [_value_info(v) for v in _msgs(g, 12)]}
