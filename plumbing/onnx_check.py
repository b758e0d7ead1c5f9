"""Accept an ONNX file only if it is what export_onnx.py makes, checked before onnxruntime runs it (torch-free).

onnxruntime runs any graph it is given: a Loop with an enormous trip count hangs, one node with a huge output
allocates gigabytes, and a file of a few kilobytes can declare either. So sample.py and explore.py read a file with
the onnx package's own protobuf schema (protobuf's parser, as onnxruntime's, so what is checked is what runs; fields
are counted first, since the parse takes memory by the field, and fields the schema does not know are refused),
refuse anything but the exporter's kind of graph (its operators and attribute types, weights inside the file, no
functions or subgraphs, known metadata), run the package's checker and shape inference (at batch 1 and 2: every
tensor must be (batch, fixed...)), and bound every tensor, scratch buffer and multiply-add per image; the images per
onnxruntime call then keep memory within MEMORY_BUDGET. onnxruntime gets the bytes that were checked. Any failure is
one UsageError line.
"""

import collections
import importlib.machinery
import importlib.util
import json
import math
import os
import re
import sys

import numpy as np

from plumbing.cli import UsageError, shown
from plumbing.files import NotReadable, read_regular

MAX_BYTES = 8 * 2**20  # the largest file the exporter writes (the encoder at latent 4096) is 4.2 MiB
FORMAT_VERSION = 1  # the newest format this code reads (export_onnx.FORMAT_VERSION)
OPSETS = range(17, 21)  # the opsets export_onnx.py writes
MAX_LATENT, MAX_SIDE, MAX_NODES = 4096, 512, 64
MAX_ELEMENTS = 2**20  # floats in any tensor or scratch buffer, per image (the decoder's largest: 3,528)
MAX_MACS = 2**24  # multiply-adds per image (the decoder: about 0.15 M)
MEMORY_BUDGET = 256 * 2**20  # bytes of tensors onnxruntime may hold in one call
MAX_CHUNK = 1024  # images per call; more gains nothing on a CPU
MAX_VALUE = 4096  # characters of a metadata value (kl_per_dim: 24 a dimension)
MAX_FIELDS = 20_000  # protobuf fields in a file, nested ones included (the exporter writes about 350)
QUIET = 4  # onnxruntime's log severity: fatal only
ACTIVE_KL = 0.01  # nats: a dimension whose test KL is at most this is not in use (Duan et al.'s UDR threshold)
HINT = {"decoder": "pass the decoder.onnx that export_onnx.py wrote",
        "encoder": "pass the encoder.onnx that export_onnx.py wrote"}  # fmt: skip
SIGNATURE = {"decoder": ("z", ("images",)), "encoder": ("images", ("mu", "logvar"))}
FLOAT, INT64 = 1, 7  # TensorProto data types the exporter writes
A_FLOAT, A_INT, A_TENSOR, A_INTS = 1, 2, 4, 7  # AttributeProto types the exporter writes
_CONV = {"kernel_shape": A_INTS, "strides": A_INTS, "pads": A_INTS, "dilations": A_INTS, "group": A_INT}
OPS = {"Gemm": {"alpha": A_FLOAT, "beta": A_FLOAT, "transA": A_INT, "transB": A_INT}, "Relu": {}, "Sigmoid": {},
       "Add": {}, "Constant": {"value": A_TENSOR}, "Reshape": {"allowzero": A_INT}, "Flatten": {"axis": A_INT},
       "Conv": _CONV, "ConvTranspose": {**_CONV, "output_padding": A_INTS}}  # fmt: skip
NUMBER = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?")  # as Python and JSON write floats
KEYS = {"format", "format_version", "latent_dim", "image_shape", "pixel_range", "beta", "objective", "epochs", "seed",
        "model_args", "source_checkpoint", "checkpoint_sha256", "torch_version", "batchnorm", "kl_per_dim",
        "kl_epoch", "trained_on"}  # fmt: skip
FORMS = {"beta": NUMBER, "checkpoint_sha256": re.compile("[0-9a-f]{64}"),
         **dict.fromkeys(("format_version", "epochs", "seed", "kl_epoch"), re.compile("[0-9]{1,20}"))}  # fmt: skip


class Malformed(Exception):
    """The bytes are not a model of the kind this project writes; the message says what was found."""


def _onnx(name):
    """A module of the installed onnx package, loaded without its __init__.py, whose imports (ml_dtypes among them)
    take over a second from a cold start; registered under its own name, so a later `import onnx` shares it."""
    full = f"onnx.{name}"
    if full not in sys.modules:
        package = importlib.util.find_spec("onnx")  # finds the package without running it
        if package is None:
            raise UsageError("the onnx package is not installed: pip install -r requirements-sample.txt")
        folder = package.submodule_search_locations[0]
        path = next(
            os.path.join(folder, f)
            for f in sorted(os.listdir(folder))
            if f.startswith(name) and f.endswith((".py", *importlib.machinery.EXTENSION_SUFFIXES))
        )
        spec = importlib.util.spec_from_file_location(full, path)
        sys.modules[full] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[full]


class Model:
    """A checked file: its bytes (what runs), metadata, latent size, image shape, and images per onnxruntime call."""

    def __init__(self, path, kind, data, meta, latent, image_shape, floats, macs, kl, beta):
        self.path, self.kind, self.data, self.meta = shown(path, 300), kind, data, meta
        self.latent, self.image_shape, self.macs, self.kl, self.beta = latent, image_shape, macs, kl, beta
        self.input, self.outputs = SIGNATURE[kind]
        self.chunk = max(1, min(MAX_CHUNK, MEMORY_BUDGET // (4 * floats)))


def _varint(data, pos):
    """(the protobuf varint at data[pos], the position after it); stops at the end of data."""
    value = shift = 0
    while pos < len(data) and shift < 70:
        value, pos, shift = value | (data[pos] & 0x7F) << shift, pos + 1, shift + 7
        if data[pos - 1] < 0x80:
            break
    return value, pos


def _count_fields(data, descriptor):
    """Refuse a file of more than MAX_FIELDS protobuf fields before protobuf parses it: the parse takes up to 200
    bytes of memory a field (8 MiB of empty records: 800 MiB). This only counts, following the fields that the
    schema says are messages; what the bytes mean is left to protobuf, whose parse is what gets checked."""
    stack, count = [(0, len(data), descriptor)], 0
    while stack:
        pos, end, message = stack.pop()
        while pos < end:
            key, pos = _varint(data, pos)
            count, wire, field = count + 1, key & 7, message.fields_by_number.get(key >> 3)
            if wire == 0:
                pos = _varint(data, pos)[1]
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                size, pos = _varint(data, pos)
                if field is not None and field.type == field.TYPE_MESSAGE and pos + size <= end:
                    stack.append((pos, pos + size, field.message_type))
                elif field is not None and field.type not in (field.TYPE_STRING, field.TYPE_BYTES, field.TYPE_FLOAT,
                                                              field.TYPE_DOUBLE):  # fmt: skip
                    count += len(data[pos : pos + size].translate(None, bytes(range(128, 256))))  # packed integers
                pos += size
            else:  # groups (onnx has none) and wire types protobuf refuses
                raise Malformed(f"a field of wire type {wire}, which the exporter never writes")
            if count > MAX_FIELDS:
                raise Malformed(f"more than {MAX_FIELDS:,} protobuf fields; the exporter writes about 350")


def _dims(value_info):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in
            value_info.type.tensor_type.shape.dim]  # fmt: skip


def _tensor(t, where):
    """(dims, values as numpy) of a TensorProto whose data are all in the file, in one field, of its declared size."""
    if t.data_location == 1 or len(t.external_data) or t.HasField("segment"):
        raise Malformed(f"{where}: a tensor stored outside the file")
    dims = list(t.dims)
    if len(dims) > 8 or not all(0 <= d < 2**31 for d in dims) or t.data_type not in (FLOAT, INT64):
        raise Malformed(f"{where}: a tensor of type {t.data_type} and shape {dims[:8]}")
    count, dtype = math.prod(dims), np.float32 if t.data_type == FLOAT else np.int64
    typed = t.float_data if t.data_type == FLOAT else t.int64_data
    if len(t.raw_data) != count * 4 * (1 + (t.data_type == INT64)) and not (not t.raw_data and len(typed) == count):
        raise Malformed(f"{where}: a tensor of shape {dims} holding {len(t.raw_data) or len(typed)} values' bytes")
    values = np.frombuffer(t.raw_data, dtype).reshape(dims) if t.raw_data else np.array(typed, dtype).reshape(dims)
    return dims, values


def _structure(m, kind):
    """The exporter's kind of graph, checked field by field before the checker or shape inference sees it."""
    g = m.graph
    if not 7 <= m.ir_version <= 10 or [(o.domain, o.version in OPSETS) for o in m.opset_import] not in (
        [("", True)],
        [("ai.onnx", True)],
    ):
        raise Malformed(f"IR version {m.ir_version}, opsets {[(o.domain, o.version) for o in m.opset_import][:4]}")
    extras = [
        what
        for what, there in (
            ("local functions", m.functions),
            ("training information", m.training_info),
            ("sparse initializers", g.sparse_initializer),
            ("value_info entries", g.value_info),
        )
        if there
    ]
    if extras or len(g.node) > MAX_NODES or len(g.initializer) > MAX_NODES or len(m.metadata_props) > 32:
        raise Malformed(
            f"{extras[0] if extras else 'more nodes, weights or metadata'}, which the exporter never writes"
        )
    consts = {t.name: _tensor(t, f"weight {shown(t.name, 40)}") for t in g.initializer}
    defined = [SIGNATURE[kind][0], *[t.name for t in g.initializer], *[o for n in g.node for o in n.output]]
    twice = sorted(name for name, count in collections.Counter(defined).items() if count > 1)
    if twice:  # onnxruntime would feed or compute the real tensor where the checks assumed a constant
        raise Malformed(f"the name {shown(twice[0], 40)!r} given to more than one tensor")
    used = {i for n in g.node for i in n.input}
    computed = {SIGNATURE[kind][0]}
    for n in g.node:
        if n.domain not in ("", "ai.onnx") or n.op_type not in OPS:
            raise Malformed(
                f"operator {shown(n.domain + '.' if n.domain else '', 40)}{shown(n.op_type, 40)}, which "
                "the exporter never writes"
            )
        if n.op_type != "Constant" and (not n.input or n.input[0] not in computed or any(
                i not in consts for i in n.input[1:])):  # fmt: skip
            raise Malformed(f"{n.op_type} whose inputs are not one computed tensor followed by weights")
        computed.update(n.output)
        odd = [f"{a.name} of type {a.type}" for a in n.attribute if OPS[n.op_type].get(a.name, -1) != a.type or any(
               (a.ref_attr_name, a.HasField("g"), a.graphs, a.HasField("sparse_tensor")))]  # fmt: skip
        if odd or len(n.attribute) > 8 or len(n.output) != 1:
            raise Malformed(f"{n.op_type} with attribute(s) {', '.join(odd)[:200]}" if odd else f"{n.op_type} node")
        for a in n.attribute:
            if a.type == A_TENSOR:
                consts[n.output[0]] = _tensor(a.t, f"{n.op_type} {shown(n.output[0], 40)}")
            elif a.type == A_INTS and (len(a.ints) > 8 or not all(0 <= v <= 64 for v in a.ints)):
                raise Malformed(f"{n.op_type} with {a.name} {list(a.ints)[:8]}")
        if n.op_type in ("Conv", "ConvTranspose"):
            at = {a.name: list(a.ints) if a.type == A_INTS else a.i for a in n.attribute}
            if at.get("group", 1) != 1 or set(at.get("dilations", [1])) != {1} or not all(
                    1 <= s <= 4 for s in at.get("strides", [1])) or not all(1 <= k <= 7 for k in at.get(
                    "kernel_shape", [1])):  # fmt: skip
                raise Malformed(f"{n.op_type} with attributes {at}")
    unused = [name for name in [*consts, *(o for n in g.node for o in n.output)] if name not in used
              and name not in SIGNATURE[kind][1]]  # fmt: skip
    if unused:
        raise Malformed(f"{shown(unused[0], 40)!r}, which no node uses")
    last = {n.output[0]: n.op_type for n in g.node}
    if kind == "decoder" and last.get("images") != "Sigmoid":  # the exporter's decoder ends in the seed's Sigmoid
        raise Malformed("images that do not come out of a Sigmoid, so they need not be in [0, 1]")
    return consts


def _signature(m, kind):
    """(latent size, image shape) from the declared inputs and outputs, which must be the exporter's."""
    in_name, out_names = SIGNATURE[kind]
    ins, outs = list(m.graph.input), list(m.graph.output)
    if [v.name for v in ins] != [in_name] or [v.name for v in outs] != list(out_names) or any(
            v.type.tensor_type.elem_type != FLOAT for v in ins + outs):  # fmt: skip
        found = ", ".join(shown(v.name, 20) for v in ins[:4]) + " -> " + ", ".join(shown(v.name, 20) for v in outs[:4])
        raise Malformed(f"it maps {found}; a {kind} maps float {in_name} -> {', '.join(out_names)}")
    shapes = {}
    for v in ins + outs:
        dims = _dims(v)
        if len(dims) != (4 if v.name == "images" else 2) or not isinstance(dims[0], str) or not all(
                isinstance(d, int) for d in dims[1:]):  # fmt: skip
            raise Malformed(f"{v.name} has shape {dims[:8]}, not [batch, ...] with a named batch axis and fixed others")
        shapes[v.name] = tuple(dims[1:])
    latent, image = shapes["z" if kind == "decoder" else "mu"][0], shapes["images"]
    if kind == "encoder" and shapes["mu"] != shapes["logvar"]:
        raise Malformed(f"mu {shapes['mu']} and logvar {shapes['logvar']} differ")
    if not 1 <= latent <= MAX_LATENT or image[0] != 1 or not all(1 <= s <= MAX_SIDE for s in image[1:]):
        raise Malformed(
            f"latent size {latent} (1-{MAX_LATENT}) or image shape {image} (1, H, W up to {MAX_SIDE}) out of bounds"
        )
    return latent, image


def _metadata(m, kind):
    meta = {}
    for p in m.metadata_props:
        if p.key not in KEYS:  # onnxruntime reads some keys itself ("ort_config": session options)
            raise Malformed(f"metadata key '{shown(p.key, 40)}', which the exporter never writes")
        if p.key in meta or len(p.value) > MAX_VALUE * (24 if p.key == "kl_per_dim" else 1) or (
                p.key in FORMS and not FORMS[p.key].fullmatch(p.value)):  # fmt: skip
            raise Malformed(
                f"metadata {p.key} '{shown(p.value, 40)}'"
                + (f" of {len(p.value):,} characters" if len(p.value) > MAX_VALUE else ", not what the exporter writes")
            )
        meta[p.key] = p.value
    if meta.get("format") != f"beta-vae-{kind}":
        raise Malformed(f"its metadata says format '{shown(meta.get('format'), 40)}'")
    if "beta" in meta and not math.isfinite(float(meta["beta"])):
        raise Malformed(f"metadata beta {float(meta['beta'])}")
    return meta


def _shapes(m, batch):
    """{name: dims} of every tensor, from the package's shape inference with the batch axis set to `batch`."""
    fixed = type(m)()
    fixed.CopyFrom(m)
    for v in [*fixed.graph.input, *fixed.graph.output]:
        v.type.tensor_type.shape.dim[0].dim_value = batch
    inferred = _onnx("onnx_cpp2py_export").shape_inference.infer_shapes(fixed.SerializeToString(), True, True, False)
    g = type(m).FromString(inferred).graph
    return {v.name: _dims(v) for v in [*g.input, *g.value_info, *g.output]}


def _bounds(m, data, consts):
    """(floats held per image, multiply-adds per image), every tensor's shape per image from shape inference.

    Inferred at batch 1 and 2, every tensor must be (1, ...) and (2, ...) with the same fixed rest: with the batch
    left symbolic, a Reshape to [-1, 1] or a Flatten at axis 2 would hide the batch inside a fixed axis (the
    inference names the first axis unk__0 after any Reshape), and onnxruntime would hold far more per image."""
    try:
        _onnx("onnx_cpp2py_export").checker.check_model(data, True, False, False)  # full_check: strict inference
        one, two = _shapes(m, 1), _shapes(m, 2)
    except Exception as e:  # the checker's ValidationError, shape inference's InferenceError
        raise Malformed(f"the onnx checker: {(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None

    def per_image(name, what):
        a, b = one.get(name), two.get(name)
        if not (a and b and a[0] == 1 and b[0] == 2 and a[1:] == b[1:] and all(
                isinstance(d, int) and d >= 1 for d in a[1:])):  # fmt: skip
            raise Malformed(
                f"{what} {shown(name, 40)!r} of shape {a} at batch 1, {b} at batch 2: not (batch, ...) "
                "with fixed other axes"
            )
        return a[1:]

    floats, macs = math.prod(per_image(m.graph.input[0].name, "the input")), 0
    for v in m.graph.output:
        per_image(v.name, "the output")
    for n in m.graph.node:
        if n.op_type == "Constant":
            continue
        inp, out = per_image(n.input[0], f"{n.op_type} on"), per_image(n.output[0], f"{n.op_type} making")
        if math.prod(out) > MAX_ELEMENTS:
            raise Malformed(f"{n.op_type} making a tensor of shape {tuple(out)} per image (at most {MAX_ELEMENTS:,})")
        scratch, work = 0, math.prod(out)
        if n.op_type == "Gemm":
            work = consts[n.input[1]][1].size
        elif n.op_type in ("Conv", "ConvTranspose"):  # onnxruntime's column buffer: for Conv cin k^d per output
            w = consts[n.input[1]][0]  # position, for ConvTranspose cout k^d per input position (before any crop)
            positions = math.prod(out[1:] if n.op_type == "Conv" else inp[1:])
            scratch = positions * w[1] * math.prod(w[2:])
            work = scratch * (w[0] if n.op_type == "Conv" else inp[0])
            if scratch > MAX_ELEMENTS:
                raise Malformed(f"{n.op_type} needing {scratch:,} scratch values per image (at most {MAX_ELEMENTS:,})")
        floats, macs = floats + math.prod(out) + scratch, macs + work
    if macs > MAX_MACS:
        raise Malformed(f"{macs:,} multiply-adds per image (at most {MAX_MACS:,})")
    return floats, macs


def _kl(text, latent):
    """kl_per_dim as `latent` finite numbers >= 0, or None; read without json (no recursion, no huge integers)."""
    items = text.strip()[1:-1].split(",") if text.strip()[:1] == "[" and text.strip()[-1:] == "]" else []
    if len(items) != latent or not all(NUMBER.fullmatch(x.strip()) for x in items):
        return None
    kl = [float(x) for x in items]
    return kl if all(math.isfinite(v) and v >= 0 for v in kl) else None


def _check(data, kind, path):
    what = "an ONNX model this project can read"
    try:
        m = _onnx("onnx_ml_pb2").ModelProto()
        _count_fields(data, m.DESCRIPTOR)
        try:
            m.ParseFromString(data)
        except Exception as e:  # protobuf's DecodeError, or its recursion limit
            raise Malformed(f"not a protobuf model: {(str(e).splitlines() or [type(e).__name__])[0][:100]}") from None
        size = m.ByteSize()
        m.DiscardUnknownFields()
        if m.ByteSize() != size:  # onnxruntime's copy of onnx.proto, of another version, may know what this one skips
            raise Malformed("fields the onnx schema does not know, or of the wrong wire type")
        what = f"{'an' if kind == 'encoder' else 'a'} {kind} that export_onnx.py wrote"
        meta = _metadata(m, kind)
        latent, image_shape = _signature(m, kind)
        floats, macs = _bounds(m, data, _structure(m, kind))
    except Malformed as e:
        raise UsageError(f"{path} is not {what} ({shown(e, 300)}): {HINT[kind]}") from None
    disagree = []
    if meta.get("latent_dim") != str(latent):
        disagree.append(f"latent_dim {meta.get('latent_dim')!r} but the graph takes {latent}")
    if meta.get("image_shape") != ",".join(map(str, image_shape)):
        disagree.append(f"image_shape {meta.get('image_shape')!r} but the graph makes {image_shape}")
    kl = _kl(meta["kl_per_dim"], latent) if "kl_per_dim" in meta else None
    if kl is None and "kl_per_dim" in meta:
        disagree.append(f"kl_per_dim is not a list of {latent} numbers >= 0")
    if disagree:
        raise UsageError(
            f"{path} has metadata that disagrees with its graph ({shown('; '.join(disagree), 300)}): "
            "export it again with export_onnx.py"
        )
    if "format_version" not in meta:
        raise UsageError(f"{path} has no format_version in its metadata: {HINT[kind]}")
    if int(meta["format_version"]) > FORMAT_VERSION:
        raise UsageError(
            f"{path} has {kind} format {int(meta['format_version'])}; this code reads up to {FORMAT_VERSION}: update it"
        )
    beta = float(meta["beta"]) if "beta" in meta else None
    return Model(path, kind, data, meta, latent, image_shape, floats, macs, kl, beta)


def check(data, kind, path):
    """A Model for the bytes of an ONNX file, or UsageError (one line) saying why it is not this project's `kind`."""
    try:
        return _check(data, kind, shown(path, 300))
    except UsageError:
        raise
    except Exception as e:  # nothing foreseen: still one line, never a traceback (RecursionError, MemoryError, ...)
        raise UsageError(f"{shown(path, 300)} could not be checked ({type(e).__name__}): {HINT[kind]}") from None


def load(path, kind):
    """Read (a regular file, at most MAX_BYTES) and check `path`; onnxruntime later gets these bytes, never the path."""
    try:
        data = read_regular(path, MAX_BYTES)
    except (NotReadable, OSError) as e:  # OSError: os.fdopen refuses a folder before read_regular's own check
        if not os.path.lexists(path):
            raise UsageError(f"no file at {shown(path, 300)}: {HINT[kind]}") from None
        reason = e if isinstance(e, NotReadable) else f"cannot be read ({e.strerror or type(e).__name__})"
        raise UsageError(f"{shown(path, 300)} {reason}: {HINT[kind]}") from None
    return check(data, kind, path)


def kl_order(kl, latent):
    """Dimensions by KL, largest first (index order when the file has no KL), and those not in use."""
    if kl is None:
        return list(range(latent)), []
    order = sorted(range(latent), key=lambda d: (-kl[d], d))
    return order, [d for d in order if kl[d] <= ACTIVE_KL]


def trained_to(path):
    """The last epoch in metrics.jsonl beside an exported file (its run folder), or None."""
    try:
        lines = read_regular(os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.jsonl"), 2**24).split(b"\n")
        return max(int(json.loads(line)["epoch"]) for line in lines if line.strip())
    except (NotReadable, ValueError, KeyError, TypeError, RecursionError):
        return None


def session(model):
    """An onnxruntime session for a checked Model, quiet: its own log lines would break the one-line errors."""
    import onnxruntime as ort

    ort.set_default_logger_severity(QUIET)
    opts = ort.SessionOptions()
    opts.log_severity_level = QUIET
    # idle worker threads otherwise spin waiting for work, which halved throughput on a busy 2-core CPU
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model.data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises several types; each means "not a model we can load"
        reason = shown((str(e).strip().splitlines() or [type(e).__name__])[0], 150)
        raise UsageError(f"{model.path} is not an ONNX model onnxruntime can load ({reason}): {HINT[model.kind]}")


def run(model, sess, x):
    """The list of every output of the model for the float32 batch x, model.chunk images per call, each checked for
    its shape, for NaN and (images) for [0, 1]."""
    import onnxruntime as ort

    opts = ort.RunOptions()
    opts.log_severity_level = QUIET
    try:
        parts = [sess.run(list(model.outputs), {model.input: x[i : i + model.chunk]}, opts)
                 for i in range(0, len(x), model.chunk)]  # fmt: skip
    except Exception as e:  # loads, but fails on its own input shape: not a working model
        reason = shown((str(e).strip().splitlines() or [type(e).__name__])[0], 150)
        raise UsageError(f"{model.path} loads but fails to run ({reason}): {HINT[model.kind]}") from None
    outs = [np.concatenate([p[k] for p in parts]) for k in range(len(model.outputs))]
    want = [(len(x), *model.image_shape)] if model.kind == "decoder" else [(len(x), model.latent)] * 2
    if [o.shape for o in outs] != want:
        raise UsageError(f"{model.path} returned shapes {[o.shape for o in outs]}, not {want}: export it again")
    if not all(np.isfinite(o).all() for o in outs) or (model.kind == "decoder" and not (
            outs[0].min() >= 0 and outs[0].max() <= 1)):  # fmt: skip
        raise UsageError(
            f"{model.path} returned NaN, infinite or out-of-range values: export it again from a healthy checkpoint"
        )
    return outs
