"""A reader of protobuf's wire format for the fields of onnx.proto that export_onnx.py writes (torch-free, onnx-free).

It must see exactly what onnxruntime will run, so it accepts a whitelist and nothing else. Each message it walks
(SCHEMA, field numbers as in onnx.proto) may hold only the fields the exporter writes at opsets 17 to 20, each with its
own wire type; an unknown field is refused rather than skipped, and so is a singular field that appears twice:
protobuf's parser (onnxruntime's) merges repeated copies of a singular message, so a second `graph` record would
add nodes, initializers and outputs that a reader keeping only the last copy never saw. Nothing outside the file is
ever named (no external data), counts, lengths and integers are bounded as they are read, and the whole parse reads
at most MAX_FIELDS fields, so a file of a few megabytes is refused in milliseconds. About 200 lines, so the sampler
needs no onnx package (whose wheel also brings protobuf) beside onnxruntime.
"""
import math
import struct

FLOAT, INT64 = 1, 7                                  # TensorProto data types the exporter writes
A_FLOAT, A_INT, A_TENSOR, A_INTS = 1, 2, 4, 7        # AttributeProto types the exporter writes
MAX_FIELDS = 4096          # fields in a whole file: the exporter writes about 340
MAX_NAME, MAX_TEXT = 256, 2**17  # bytes of a name; of a metadata value (kl_per_dim of 4096 dims: about 40 KB)
MAX_INT = 2**31 - 1        # every integer in the file: shapes, attributes, versions, types

# {message: {field number: (name, kind, most)}}: most is None for a singular field, else the most entries a repeated
# field may hold. kind: "int" (varint), "f32" (fixed32), "name" or "text" (UTF-8), "bytes", "ints" (int64s, packed
# or not), or the message it holds.
SCHEMA = {
    "ModelProto": {1: ("ir_version", "int", None), 2: ("producer_name", "name", None),
                   3: ("producer_version", "name", None), 7: ("graph", "GraphProto", None),
                   8: ("opset_import", "OperatorSetIdProto", 4), 14: ("metadata_props", "StringStringEntryProto", 32)},
    "OperatorSetIdProto": {1: ("domain", "name", None), 2: ("version", "int", None)},
    "StringStringEntryProto": {1: ("key", "name", None), 2: ("value", "text", None)},
    "GraphProto": {1: ("node", "NodeProto", 64), 2: ("name", "name", None), 5: ("initializer", "TensorProto", 64),
                   11: ("input", "ValueInfoProto", 4), 12: ("output", "ValueInfoProto", 4)},
    "NodeProto": {1: ("input", "name", 4), 2: ("output", "name", 4), 3: ("name", "name", None),
                  4: ("op_type", "name", None), 5: ("attribute", "AttributeProto", 8), 7: ("domain", "name", None)},
    "AttributeProto": {1: ("name", "name", None), 2: ("f", "f32", None), 3: ("i", "int", None),
                       5: ("t", "TensorProto", None), 8: ("ints", "ints", 8), 20: ("type", "int", None)},
    "TensorProto": {1: ("dims", "ints", 8), 2: ("data_type", "int", None), 8: ("name", "name", None),
                    9: ("raw_data", "bytes", None)},
    "ValueInfoProto": {1: ("name", "name", None), 2: ("type", "TypeProto", None)},
    "TypeProto": {1: ("tensor_type", "TypeProto.Tensor", None)},
    "TypeProto.Tensor": {1: ("elem_type", "int", None), 2: ("shape", "TensorShapeProto", None)},
    "TensorShapeProto": {1: ("dim", "Dimension", 8)},
    "Dimension": {1: ("dim_value", "int", None), 2: ("dim_param", "name", None)},
}
WIRE = {"int": 0, "f32": 5, "ints": 0}  # everything else is length-delimited (2); "ints" may also be packed (2)
WHY = {("ModelProto", 20): "training information", ("ModelProto", 25): "local functions",
       ("GraphProto", 13): "value_info entries", ("GraphProto", 15): "sparse initializers",
       ("AttributeProto", 4): "a text value", ("AttributeProto", 6): "a subgraph", ("AttributeProto", 11): "subgraphs",
       ("AttributeProto", 21): "a reference",
       ("TensorProto", 13): "a tensor stored outside the file", ("TensorProto", 14): "a tensor stored outside the file",
       ("TensorProto", 3): "a tensor in segments"}


class Malformed(Exception):
    """The bytes are not a model of the shape this project writes; the message says what was found."""


def _varint(buf, i):
    value = shift = 0
    while True:
        if i >= len(buf):
            raise Malformed("a number runs past the end of its message")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise Malformed("a varint longer than 10 bytes")


def _int(v):
    """An int64 as protobuf reads it (the low 64 bits, two's complement), within +-MAX_INT."""
    v &= (1 << 64) - 1
    v = v - (1 << 64) if v >= 1 << 63 else v
    if abs(v) > MAX_INT:
        raise Malformed(f"the integer {v}, out of range")
    return v


def _values(value, kind, wire, budget):
    """The decoded values of one field record, as a list (a packed record holds several)."""
    if kind == "int" or (kind == "ints" and wire == 0):
        return [_int(value)]
    if kind == "f32":
        return [struct.unpack("<f", value)[0]]
    if kind == "ints":
        out, i = [], 0
        while i < len(value):
            x, i = _varint(value, i)
            out.append(_int(x))
            budget[0] -= 1
            if len(out) > 8:
                raise Malformed("a list of more than 8 integers")
        return out
    if kind in ("name", "text"):
        if len(value) > (MAX_NAME if kind == "name" else MAX_TEXT):
            raise Malformed(f"a text of {len(value):,} bytes")
        try:
            return [bytes(value).decode("utf-8")]
        except UnicodeDecodeError:
            raise Malformed("a text that is not UTF-8") from None
    return [value] if kind == "bytes" else [message(value, kind, budget)]


def message(buf, kind, budget):
    """{name: value} of one message of `kind` (repeated fields as lists), or Malformed for anything not in SCHEMA."""
    schema, out, i, n = SCHEMA[kind], {}, 0, len(buf)
    while i < n:
        budget[0] -= 1
        if budget[0] < 0:
            raise Malformed(f"more than {MAX_FIELDS:,} fields")
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if number not in schema:
            article = "an" if kind[0] in "AEIOU" else "a"
            raise Malformed(f"{WHY.get((kind, number), f'field {number}')} in {article} {kind}, which the exporter "
                            "never writes")
        name, sub, most = schema[number]
        if wire != WIRE.get(sub, 2) and not (sub == "ints" and wire == 2):
            raise Malformed(f"{kind}.{name} with wire type {wire}")
        if wire == 0:
            value, i = _varint(buf, i)
        else:
            size, i = (4, i) if wire == 5 else _varint(buf, i)
            value, i = buf[i:i + size], i + size
        if i > n:
            raise Malformed("a field runs past the end of its message")
        if most is None and name in out:  # protobuf would merge or overwrite the copies: not what was checked
            raise Malformed(f"{kind}.{name} more than once")
        values = _values(value, sub, wire, budget)
        if most is None:
            out[name] = values[0]
        else:
            out.setdefault(name, []).extend(values)
            if len(out[name]) > most:
                raise Malformed(f"more than {most} entries in {kind}.{name}")
    return out


# ------------------------------------------------------------------------------------------- onnx.proto, in part

def _tensor(t):
    """(dims, data type, int64 values or None) of a TensorProto whose data is all in its raw_data, as exported."""
    dims, dtype = tuple(t.get("dims", ())), t.get("data_type", 0)
    if dtype not in (FLOAT, INT64) or any(d < 0 for d in dims):
        raise Malformed(f"a tensor of type {dtype} and shape {list(dims)}")
    raw, count = t.get("raw_data", b""), math.prod(dims)  # at most 8 dims below 2**31 each: a cheap product
    if len(raw) != count * (4 if dtype == FLOAT else 8):
        raise Malformed(f"a tensor of shape {list(dims)} holding {len(raw)} bytes")
    values = list(struct.unpack(f"<{count}q", raw)) if dtype == INT64 and len(dims) == 1 and count <= 8 else None
    return dims, dtype, values


def _attribute(a):
    """(name, (type, value)) of an AttributeProto holding exactly the one value its type names."""
    name, kind = a.get("name", ""), a.get("type", 0)
    field = {A_FLOAT: "f", A_INT: "i", A_TENSOR: "t", A_INTS: "ints"}.get(kind)
    if field is None or set(a) - {"name", "type", field} or (field not in a and kind != A_INTS):
        raise Malformed(f"attribute {name} of type {kind} holding {', '.join(sorted(set(a) - {'name', 'type'}))}")
    value = a.get(field, [])
    return name, (kind, _tensor(value) if kind == A_TENSOR else tuple(value) if kind == A_INTS else value)


def _value_info(v):
    """(name, element type, dims: ints or names) of a ValueInfoProto holding a tensor type."""
    tensor = v.get("type", {}).get("tensor_type")
    if tensor is None:
        raise Malformed("an input or output that is not a tensor")
    dims = tensor.get("shape", {}).get("dim", [])
    if any(len(d) != 1 for d in dims):
        raise Malformed(f"input or output {v.get('name', '')} with a dimension of no single size or name")
    return v.get("name", ""), tensor.get("elem_type", 0), [d.get("dim_value", d.get("dim_param")) for d in dims]


def _unique(pairs, what):
    out = {}
    for key, value in pairs:
        if key in out:
            raise Malformed(f"{what} {key} twice")
        out[key] = value
    return out


def parse(data):
    """The parts of a ModelProto that the checks need, as plain Python values."""
    m = message(memoryview(data), "ModelProto", [MAX_FIELDS])
    if "graph" not in m:
        raise Malformed("no graph")
    g = m["graph"]
    nodes = [{"op": n.get("op_type", ""), "domain": n.get("domain", ""), "inputs": n.get("input", []),
              "outputs": n.get("output", []), "attrs": _unique(map(_attribute, n.get("attribute", [])), "attribute")}
             for n in g.get("node", [])]
    return {"ir_version": m.get("ir_version", 0), "nodes": nodes,
            "opsets": [(o.get("domain", ""), o.get("version", 0)) for o in m.get("opset_import", [])],
            "meta": _unique(((p.get("key", ""), p.get("value", "")) for p in m.get("metadata_props", [])),
                            "metadata key"),
            "initializers": [(t.get("name", ""), _tensor(t)) for t in g.get("initializer", [])],
            "inputs": [_value_info(v) for v in g.get("input", [])],
            "outputs": [_value_info(v) for v in g.get("output", [])]}
