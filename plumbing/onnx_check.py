"""Accept an ONNX file only if it is what export_onnx.py makes, checked before onnxruntime runs it (torch-free).

onnxruntime runs any graph: a few kilobytes can hold a Loop that never ends or a node of gigabytes. So protobuf parses
the bytes, as for onnxruntime, once their fields are counted; only the exporter's operators, attributes, in-file
weights and metadata pass; the onnx checker and shape inference run at batch 1 and 2; every tensor, scratch buffer and
multiply-add per image is bounded (calls keep within MEMORY_BUDGET). A failure is one UsageError line.
"""

import collections
import math
import os
import re
import sys
from importlib import import_module, machinery, util

import numpy as np

from plumbing.cli import UsageError, shown
from plumbing.files import NotReadable, read_regular

FORMAT_VERSION, OPSETS = 1, range(17, 21)  # the newest format this code reads, and the opsets, export_onnx.py writes
MAX_BYTES, MAX_LATENT, MAX_SIDE, MAX_NODES = 8 * 2**20, 4096, 512, 64  # a file's bytes: above what the exporter writes
MAX_ELEMENTS, MAX_MACS = 2**20, 2**24  # per image: floats in any tensor or scratch buffer; multiply-adds
MEMORY_BUDGET, MAX_CHUNK, QUIET = 256 * 2**20, 1024, 4  # bytes in one onnxruntime call; images a call; log: fatal only
MAX_VALUE, MAX_FIELDS = 4096, 20_000  # characters of a metadata value; protobuf fields in a file, nested ones included
ACTIVE_KL = 0.01  # nats: a dimension whose test KL is at most this is not in use (Duan et al.'s UDR threshold)
HINT = {kind: f"pass the {kind}.onnx that export_onnx.py wrote" for kind in ("decoder", "encoder")}
SIGNATURE = {"decoder": ("z", ("images",)), "encoder": ("images", ("mu", "logvar"))}
FLOAT, INT64, A_FLOAT, A_INT, A_TENSOR, A_INTS = 1, 7, 1, 2, 4, 7  # the Tensor- and AttributeProto types it writes
_CONV = ("kernel_shape", "strides", "pads", "dilations", "group")
OPS = {"Gemm": ("alpha", "beta", "transA", "transB"), "Relu": (), "Sigmoid": (), "Add": (), "Constant": ("value",)}
OPS |= {"Reshape": ("allowzero",), "Flatten": ("axis",), "Conv": _CONV, "ConvTranspose": (*_CONV, "output_padding")}
A_TYPE = {"alpha": A_FLOAT, "beta": A_FLOAT, "value": A_TENSOR} | dict.fromkeys((*_CONV[:4], "output_padding"), A_INTS)
OPS = {op: {name: A_TYPE.get(name, A_INT) for name in names} for op, names in OPS.items()}  # {operator: {name: type}}
CONV_MAX = {"group": 1, "dilations": 1, "strides": 4, "kernel_shape": 7}  # each value from 1 to this
MESSAGE, NOT_VARINTS = 11, (None, 1, 2, 9, 12)  # FieldDescriptor types: message; double, float, string, bytes
EXTRAS = ("local functions", "training information", "sparse initializers", "value_info entries")
NUMBER = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?")  # as Python and JSON write floats
FORMS = dict.fromkeys(("format_version", "epochs", "seed", "kl_epoch"), re.compile("[0-9]{1,20}"))
FORMS |= {"beta": NUMBER, "checkpoint_sha256": re.compile("[0-9a-f]{64}")}  # metadata values of a fixed form
KEYS = {*FORMS, "format", "latent_dim", "image_shape", "pixel_range", "objective", "model_args", "source_checkpoint"}
KEYS |= {"torch_version", "batchnorm", "kl_per_dim", "trained_on"}  # every metadata key the exporter writes
_why = lambda e, limit: shown((str(e).strip().splitlines() or [type(e).__name__])[0], limit)  # an error's first line
_special = lambda a: a.ref_attr_name or a.graphs or a.HasField("g") or a.HasField("sparse_tensor")  # not the exporter's
_dims = lambda v: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]


class Malformed(Exception):
    """The bytes are not a model of the kind this project writes; the message says what was found."""


def _onnx(name):
    """A module of the onnx package, loaded without its slow __init__.py, as its own name (`import onnx` shares it)."""
    full = f"onnx.{name}"
    if full not in sys.modules:
        package = util.find_spec("onnx")  # finds the package without running it
        if package is None:
            raise UsageError("the onnx package is not installed: pip install -r requirements-sample.txt")
        spec = machinery.PathFinder.find_spec(full, package.submodule_search_locations)
        sys.modules[full] = module = util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[full]


class Model:
    """A checked file: its bytes (what runs), metadata, latent size, image shape, and images per onnxruntime call."""

    def __init__(self, path, kind, data, meta, latent, image_shape, floats, macs, kl, beta):
        self.path, self.kind, self.data, self.meta = shown(path, 300), kind, data, meta
        self.latent, self.image_shape, self.macs, self.kl, self.beta = latent, image_shape, macs, kl, beta
        (self.input, self.outputs), self.chunk = SIGNATURE[kind], max(1, min(MAX_CHUNK, MEMORY_BUDGET // (4 * floats)))


def _varint(data, pos):
    """(the protobuf varint at data[pos], the position after it); stops at the end of data."""
    value = shift = 0
    while pos < len(data) and shift < 70:
        value, pos, shift = value | (data[pos] & 0x7F) << shift, pos + 1, shift + 7
        if data[pos - 1] < 0x80:
            break
    return value, pos


def _count_fields(data, descriptor):
    """Refuse over MAX_FIELDS protobuf fields before protobuf parses them (memory by the field); this only counts."""
    stack, count = [(0, len(data), descriptor)], 0
    while stack:
        pos, end, message = stack.pop()
        while pos < end:
            key, pos = _varint(data, pos)
            count, wire, field = count + 1, key & 7, message.fields_by_number.get(key >> 3)
            if wire not in (0, 1, 2, 5):  # groups (onnx has none) and wire types protobuf refuses
                raise Malformed(f"a field of wire type {wire}, which the exporter never writes")
            if wire != 2:
                pos = _varint(data, pos)[1] if wire == 0 else pos + (8 if wire == 1 else 4)
            else:
                size, pos = _varint(data, pos)
                kind = getattr(field, "type", None)
                if kind == MESSAGE and pos + size <= end:
                    stack.append((pos, pos + size, field.message_type))
                elif kind not in NOT_VARINTS:
                    count += len(data[pos : pos + size].translate(None, bytes(range(128, 256))))  # packed varints
                pos += size
            if count > MAX_FIELDS:
                raise Malformed(f"more than {MAX_FIELDS:,} protobuf fields; the exporter writes about 350")


def _tensor(t, where):
    """(dims, values as numpy) of a TensorProto whose data are all in the file, in one field, of its declared size."""
    if t.data_location == 1 or len(t.external_data) or t.HasField("segment"):
        raise Malformed(f"{where}: a tensor stored outside the file")
    dims = list(t.dims)
    if len(dims) > 8 or not all(0 <= d < 2**31 for d in dims) or t.data_type not in (FLOAT, INT64):
        raise Malformed(f"{where}: a tensor of type {t.data_type} and shape {dims[:8]}")
    dtype, typed = (np.dtype("<f4"), t.float_data) if t.data_type == FLOAT else (np.dtype("<i8"), t.int64_data)
    if len(t.raw_data) != math.prod(dims) * dtype.itemsize and (t.raw_data or len(typed) != math.prod(dims)):
        raise Malformed(f"{where}: a tensor of shape {dims} holding {len(t.raw_data) or len(typed)} values' bytes")
    return dims, (np.frombuffer(t.raw_data, dtype) if t.raw_data else np.array(typed, dtype)).reshape(dims)


def _structure(m, kind):
    """The exporter's kind of graph, checked field by field before the checker or shape inference sees it."""
    g, (x, outputs) = m.graph, SIGNATURE[kind]
    opsets = [(o.domain, o.version) for o in m.opset_import]
    if not 7 <= m.ir_version <= 10 or [(d in ("", "ai.onnx"), v in OPSETS) for d, v in opsets] != [(True, True)]:
        raise Malformed(f"IR version {m.ir_version}, opsets {opsets[:4]}")
    extras = [w for w, v in zip(EXTRAS, (m.functions, m.training_info, g.sparse_initializer, g.value_info)) if v]
    if extras or max(len(g.node), len(g.initializer)) > MAX_NODES or len(m.metadata_props) > 32:
        raise Malformed(f"{(extras or ['more nodes, weights or metadata'])[0]}, which the exporter never writes")
    consts, computed = {t.name: _tensor(t, f"weight {shown(t.name, 40)}") for t in g.initializer}, {x}
    made, used = [o for n in g.node for o in n.output], {*outputs, *(i for n in g.node for i in n.input)}
    twice = sorted(k for k, c in collections.Counter([x, *(t.name for t in g.initializer), *made]).items() if c > 1)
    if twice:  # onnxruntime would feed or compute the real tensor where the checks assumed a constant
        raise Malformed(f"the name {shown(twice[0], 40)!r} given to more than one tensor")
    for n in g.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in OPS:
            op = shown(n.domain + "." if n.domain else "", 40) + shown(n.op_type, 40)
            raise Malformed(f"operator {op}, which the exporter never writes")
        if n.op_type != "Constant" and (not n.input or n.input[0] not in computed or not set(n.input[1:]) <= {*consts}):
            raise Malformed(f"{n.op_type} whose inputs are not one computed tensor followed by weights")
        computed.update(n.output)
        odd = [f"{a.name} of type {a.type}" for a in n.attribute if OPS[n.op_type].get(a.name) != a.type or _special(a)]
        if odd or len(n.attribute) > 8 or len(n.output) != 1:
            raise Malformed(f"{n.op_type} with attribute(s) {', '.join(odd)[:200]}" if odd else f"{n.op_type} node")
        for a in n.attribute:
            values = list(a.ints) if a.type == A_INTS else [a.i]
            if a.type == A_TENSOR:
                consts[n.output[0]] = _tensor(a.t, f"{n.op_type} {shown(n.output[0], 40)}")
            elif a.type == A_INTS and (len(values) > 8 or not all(0 <= v <= 64 for v in values)):
                raise Malformed(f"{n.op_type} with {a.name} {values[:8]}")
            elif a.name in CONV_MAX and not (values and all(1 <= v <= CONV_MAX[a.name] for v in values)):
                raise Malformed(f"{n.op_type} with attributes {a.name} {values}")
    unused = [k for k in [*consts, *made] if k not in used]
    if unused:
        raise Malformed(f"{shown(unused[0], 40)!r}, which no node uses")
    if kind == "decoder" and {n.output[0]: n.op_type for n in g.node}.get("images") != "Sigmoid":  # as the seed's
        raise Malformed("images that do not come out of a Sigmoid, so they need not be in [0, 1]")
    return consts


def _signature(m, kind):
    """(latent size, image shape) from the declared inputs and outputs, which must be the exporter's."""
    (x, outputs), ins, outs = SIGNATURE[kind], list(m.graph.input), list(m.graph.output)
    names = [v.name for v in ins], [v.name for v in outs]
    if names != ([x], list(outputs)) or any(v.type.tensor_type.elem_type != FLOAT for v in ins + outs):
        found = " -> ".join(", ".join(shown(name, 20) for name in side[:4]) for side in names)
        raise Malformed(f"it maps {found}; a {kind} maps float {x} -> {', '.join(outputs)}")
    shapes = {v.name: _dims(v) for v in ins + outs}
    for name, dims in shapes.items():
        if [type(d) for d in dims] != [str] + [int] * (3 if name == "images" else 1) or not dims[0]:
            raise Malformed(f"{name} has shape {dims[:8]}, not [batch, ...] with a named batch axis and fixed others")
    (latent,), image = shapes["z" if kind == "decoder" else "mu"][1:], tuple(shapes["images"][1:])
    if kind == "encoder" and shapes["mu"][1:] != shapes["logvar"][1:]:
        raise Malformed(f"mu {tuple(shapes['mu'][1:])} and logvar {tuple(shapes['logvar'][1:])} differ")
    if not 1 <= latent <= MAX_LATENT or image[0] != 1 or not all(1 <= s <= MAX_SIDE for s in image[1:]):
        raise Malformed(f"latent size {latent} (at most {MAX_LATENT}) or image shape {image} out of bounds")
    return latent, image


def _metadata(m, kind):
    meta = {}
    for p in m.metadata_props:
        if p.key not in KEYS:  # onnxruntime reads some keys itself ("ort_config": session options)
            raise Malformed(f"metadata key '{shown(p.key, 40)}', which the exporter never writes")
        too_long = len(p.value) > MAX_VALUE * (24 if p.key == "kl_per_dim" else 1)
        if too_long or p.key in meta or (p.key in FORMS and not FORMS[p.key].fullmatch(p.value)):
            what = f" of {len(p.value):,} characters" if len(p.value) > MAX_VALUE else ", not what the exporter writes"
            raise Malformed(f"metadata {p.key} '{shown(p.value, 40)}'{what}")
        meta[p.key] = p.value
    if meta.get("format") != f"beta-vae-{kind}":
        raise Malformed(f"its metadata says format '{shown(meta.get('format'), 40)}'")
    if not math.isfinite(float(meta.get("beta", 0))):
        raise Malformed(f"metadata beta {float(meta['beta'])}")
    return meta


def _shapes(m, batch):
    """{name: dims} of every tensor, from the package's shape inference with the batch axis set to `batch`."""
    fixed = type(m).FromString(m.SerializeToString())
    for v in [*fixed.graph.input, *fixed.graph.output]:
        v.type.tensor_type.shape.dim[0].dim_value = batch
    inferred = _onnx("onnx_cpp2py_export").shape_inference.infer_shapes(fixed.SerializeToString(), True, True, False)
    g = type(m).FromString(inferred).graph
    return {v.name: _dims(v) for v in [*g.input, *g.value_info, *g.output]}


def _bounds(m, data, consts):
    """(floats held, multiply-adds) per image, from shape inference at batch 1 and 2: every tensor must be (1, ...) and
    (2, ...), the rest fixed, or a Reshape to [-1, 1] could hide the batch in a fixed axis (far more per image)."""
    try:
        _onnx("onnx_cpp2py_export").checker.check_model(data, True, False, False)  # full_check: strict inference
        one, two = _shapes(m, 1), _shapes(m, 2)
    except Exception as e:  # the checker's ValidationError, shape inference's InferenceError
        raise Malformed(f"the onnx checker: {_why(e, 200)}") from None

    def per_image(name, what):
        a, b = one.get(name) or [None], two.get(name) or [None]
        if (a[0], b[0]) != (1, 2) or a[1:] != b[1:] or not all(isinstance(d, int) and d >= 1 for d in a[1:]):
            raise Malformed(f"{what} {shown(name, 40)!r} of shape {a} at batch 1, {b} at batch 2, not (batch, ...)")
        return a[1:]

    floats, macs = math.prod(per_image(m.graph.input[0].name, "the input")), 0
    for v in m.graph.output:
        per_image(v.name, "the output")
    for n in (n for n in m.graph.node if n.op_type != "Constant"):
        inp, out = per_image(n.input[0], f"{n.op_type} on"), per_image(n.output[0], f"{n.op_type} making")
        size, scratch = math.prod(out), 0
        work = consts[n.input[1]][1].size if n.op_type == "Gemm" else size
        if n.op_type in ("Conv", "ConvTranspose"):  # onnxruntime's column buffer, before any crop: cin k^d values
            w, conv = consts[n.input[1]][0], n.op_type == "Conv"  # a position out (Conv), cout k^d a position in
            scratch = math.prod(out[1:] if conv else inp[1:]) * w[1] * math.prod(w[2:])
            work = scratch * (w[0] if conv else inp[0])
        big = f"making a tensor of shape {tuple(out)}" if size > MAX_ELEMENTS else f"needing {scratch:,} scratch values"
        if max(size, scratch) > MAX_ELEMENTS:
            raise Malformed(f"{n.op_type} {big} per image (at most {MAX_ELEMENTS:,})")
        floats, macs = floats + size + scratch, macs + work
    if macs > MAX_MACS:
        raise Malformed(f"{macs:,} multiply-adds per image (at most {MAX_MACS:,})")
    return floats, macs


def check(data, kind, path):
    """A Model for the bytes of an ONNX file, or UsageError (one line) saying why it is not this project's `kind`."""
    path, what = shown(path, 300), "an ONNX model this project can read"
    try:
        m = _onnx("onnx_ml_pb2").ModelProto()
        _count_fields(data, m.DESCRIPTOR)
        try:
            m.ParseFromString(data)
        except Exception as e:  # protobuf's DecodeError, or its recursion limit
            raise Malformed(f"not a protobuf model: {_why(e, 100)}") from None
        size = m.ByteSize()
        m.DiscardUnknownFields()
        if m.ByteSize() != size:  # onnxruntime's copy of onnx.proto, of another version, may know what this one skips
            raise Malformed("fields the onnx schema does not know, or of the wrong wire type")
        what = f"{'an' if kind == 'encoder' else 'a'} {kind} that export_onnx.py wrote"
        meta, (latent, image) = _metadata(m, kind), _signature(m, kind)
        floats, macs = _bounds(m, data, _structure(m, kind))
    except Malformed as e:
        raise UsageError(f"{path} is not {what} ({shown(e, 300)}): {HINT[kind]}") from None
    except Exception as e:  # nothing foreseen: still one line, never a traceback (RecursionError, MemoryError, ...)
        raise UsageError(f"{path} could not be checked ({type(e).__name__}): {HINT[kind]}") from None
    text = meta.get("kl_per_dim", "").strip()  # read without json: no recursion, no huge integers
    items = text[1:-1].split(",") if text[:1] + text[-1:] == "[]" else []
    kl = [float(v) for v in items if NUMBER.fullmatch(v.strip())]
    kl = kl if len(kl) == len(items) == latent and all(math.isfinite(v) and v >= 0 for v in kl) else None
    shape = ",".join(map(str, image))
    graph = {"latent_dim": (str(latent), f"takes {latent}"), "image_shape": (shape, f"makes {image}")}
    disagree = [f"{k} {meta.get(k)!r} but the graph {does}" for k, (v, does) in graph.items() if meta.get(k) != v]
    if kl is None and "kl_per_dim" in meta:
        disagree.append(f"kl_per_dim is not a list of {latent} numbers >= 0")
    if disagree:
        why = f"({shown('; '.join(disagree), 300)}): export it again with export_onnx.py"
        raise UsageError(f"{path} has metadata that disagrees with its graph {why}")
    version = int(meta.get("format_version", -1))  # its form was checked
    if version < 0:
        raise UsageError(f"{path} has no format_version in its metadata: {HINT[kind]}")
    if version > FORMAT_VERSION:
        raise UsageError(f"{path} has {kind} format {version}; this code reads up to {FORMAT_VERSION}: update it")
    return Model(path, kind, data, meta, latent, image, floats, macs, kl, meta.get("beta") and float(meta["beta"]))


def load(path, kind):
    """Read (a regular file, at most MAX_BYTES) and check `path`; onnxruntime later gets these bytes, never the path."""
    try:
        data = read_regular(path, MAX_BYTES)
    except (NotReadable, OSError) as e:  # OSError: os.fdopen refuses a folder before read_regular's own check
        reason = e if isinstance(e, NotReadable) else f"cannot be read ({e.strerror or type(e).__name__})"
        said = f"{shown(path, 300)} {reason}" if os.path.lexists(path) else f"no file at {shown(path, 300)}"
        raise UsageError(f"{said}: {HINT[kind]}") from None
    return check(data, kind, path)


def kl_order(kl, latent):
    """Dimensions by KL, largest first (index order when the file has no KL), and those not in use."""
    order = list(range(latent)) if kl is None else sorted(range(latent), key=lambda d: (-kl[d], d))
    return order, [] if kl is None else [d for d in order if kl[d] <= ACTIVE_KL]


def session(model):
    """An onnxruntime session for a checked Model, quiet: its own log lines would break the one-line errors."""
    ort = import_module("onnxruntime")
    ort.set_default_logger_severity(QUIET)
    opts = ort.SessionOptions()
    opts.log_severity_level = QUIET
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads would spin on a busy CPU
    try:
        return ort.InferenceSession(model.data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises several types; each means "not a model we can load"
        why = f"({_why(e, 150)}): {HINT[model.kind]}"
        raise UsageError(f"{model.path} is not an ONNX model onnxruntime can load {why}") from None


def run(model, sess, x):
    """Every output of the model for the float32 batch x, model.chunk images a call, checked: shape, NaN, [0, 1]."""
    opts, c, path = import_module("onnxruntime").RunOptions(), model.chunk, model.path
    opts.log_severity_level = QUIET
    try:
        parts = [sess.run(list(model.outputs), {model.input: x[i : i + c]}, opts) for i in range(0, len(x), c)]
    except Exception as e:  # loads, but fails on its own input shape: not a working model
        raise UsageError(f"{path} loads but fails to run ({_why(e, 150)}): {HINT[model.kind]}") from None
    outs = [np.concatenate(part) for part in zip(*parts)]
    want = [(len(x), *model.image_shape)] if model.kind == "decoder" else [(len(x), model.latent)] * 2
    if [o.shape for o in outs] != want:
        raise UsageError(f"{path} returned shapes {[o.shape for o in outs]}, not {want}: export it again")
    low, high = (outs[0].min(), outs[0].max()) if model.kind == "decoder" else (0, 1)  # images: in [0, 1]
    if not (all(np.isfinite(o).all() for o in outs) and 0 <= low <= high <= 1):
        why = "NaN, infinite or out-of-range values"
        raise UsageError(f"{path} returned {why}: export it again from a healthy checkpoint")
    return outs
