"""Accept an ONNX file only if it is what export_onnx.py makes, checked before onnxruntime runs it (torch-free).

onnxruntime runs any graph it is given: a Loop with an enormous trip count hangs, one node with a huge output
allocates gigabytes, and a file of a few kilobytes can declare either. So sample.py and explore.py read the file here
first (with protowire.py, which accepts only the protobuf fields the exporter writes, so what is checked is what runs)
and refuse anything but the exporter's chain of layers: its operators, attributes and attribute types, weights in the
file, each tensor name defined once and used, bounded metadata whose numbers are numbers, a static image shape that
agrees with it. One image is then followed node by node, which bounds every tensor, scratch buffer and the arithmetic,
and sets the images per onnxruntime call so memory stays within MEMORY_BUDGET. Any failure is one UsageError line.
"""
import collections
import math
import os
import re

import numpy as np

from plumbing.cli import UsageError, shown
from protowire import A_FLOAT, A_INT, A_INTS, A_TENSOR, FLOAT, INT64, Malformed, parse

MAX_BYTES = 8 * 2**20            # the largest file the exporter writes (the encoder at latent 4096) is 4.2 MiB
FORMAT_VERSION = 1               # newest format these readers understand (export_onnx.FORMAT_VERSION)
OPSETS = range(17, 21)           # the opsets export_onnx.py writes
MAX_LATENT, MAX_SIDE = 4096, 512
MAX_ELEMENTS = 2**20             # floats in any tensor or scratch buffer per image (the decoder's largest: 3,528)
MAX_MACS = 2**24                 # multiply-adds per image (the decoder: ~0.15 M)
MEMORY_BUDGET = 256 * 2**20      # bytes of tensors onnxruntime may hold for one call
MAX_CHUNK = 1024                 # images per call; more gains nothing on a CPU
MAX_VALUE, MAX_KL_TEXT = 4096, 24 * MAX_LATENT  # characters of a metadata value; of kl_per_dim (~10 per dimension)
QUIET = 4                        # onnxruntime log severity: fatal only (3, "error", still prints failed runs)
UNUSED_KL = 0.05                 # nats: below this a dimension carries (almost) nothing, a β-VAE switched it off
HINT = {"decoder": "pass the decoder.onnx that export_onnx.py wrote",
        "encoder": "pass the encoder.onnx that export_onnx.py --encoder wrote"}
SIGNATURE = {"decoder": ("z", ("images",)), "encoder": ("images", ("mu", "logvar"))}
RANK = {"z": 2, "images": 4, "mu": 2, "logvar": 2}
_CONV = {"kernel_shape": A_INTS, "strides": A_INTS, "pads": A_INTS, "dilations": A_INTS, "group": A_INT}
ATTRIBUTES = {"Gemm": {"alpha": A_FLOAT, "beta": A_FLOAT, "transA": A_INT, "transB": A_INT}, "Relu": {}, "Sigmoid": {},
              "Add": {}, "Constant": {"value": A_TENSOR}, "Reshape": {"allowzero": A_INT}, "Flatten": {"axis": A_INT},
              "Conv": _CONV, "ConvTranspose": {**_CONV, "output_padding": A_INTS}}
NUMBER = re.compile(r"-?[0-9]{1,20}(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?")  # as Python and JSON write floats
KEYS = {"format", "format_version", "latent_dim", "image_shape", "pixel_range", "beta", "objective", "epochs", "seed",
        "model_args", "source_checkpoint", "checkpoint_sha256", "torch_version", "batchnorm", "kl_per_dim", "kl_epoch"}
FORMS = {"beta": NUMBER, "checkpoint_sha256": re.compile("[0-9a-f]{64}"),  # metadata values of a known form
         **dict.fromkeys(("format_version", "epochs", "seed", "kl_epoch"), re.compile("[0-9]{1,20}"))}


# ------------------------------------------------------------------------------------------------------ the checks

def _conv(op, a, shape, w):
    """Per-image output shape, multiply-adds and scratch floats of Conv / ConvTranspose. onnxruntime runs both through
    a column buffer: Conv's holds cin·k² values per output position, ConvTranspose's cout·k² per input position, all
    computed before pads crop the output; so ConvTranspose is counted on its input, not its (maybe tiny) output."""
    if len(shape) != 3 or len(w) != 4:
        raise Malformed(f"{op} on a tensor of shape {shape} with weights {w}")
    k = a.get("kernel_shape", w[2:])
    strides, pads, extra = a.get("strides", (1, 1)), a.get("pads", (0, 0, 0, 0)), a.get("output_padding", (0, 0))
    cin, cout = (w[1], w[0]) if op == "Conv" else (w[0], w[1])
    if (k != w[2:] or not all(1 <= x <= 7 for x in k) or a.get("group", 1) != 1
            or a.get("dilations", (1, 1)) != (1, 1) or len(strides) != 2 or not all(1 <= s <= 4 for s in strides)
            or len(pads) != 4 or not all(0 <= p < k[i % 2] for i, p in enumerate(pads)) or cin != shape[0]
            or len(extra) != 2 or not all(0 <= e < s for e, s in zip(extra, strides))):
        raise Malformed(f"{op} with attributes {a} and weights {w} on a tensor of shape {shape}")
    if op == "Conv":
        hw = [(shape[1 + i] + pads[i] + pads[i + 2] - k[i]) // strides[i] + 1 for i in range(2)]
        positions, per = math.prod(hw), cin
    else:
        hw = [strides[i] * (shape[1 + i] - 1) + extra[i] + k[i] - pads[i] - pads[i + 2] for i in range(2)]
        positions, per = shape[1] * shape[2], cout
    scratch = positions * per * k[0] * k[1]
    return (cout, *hw), scratch * (cout if op == "Conv" else cin), scratch


def _node(node, a, shape, params):
    """(per-image output shape, multiply-adds, scratch floats) of one node, given its input's shape and constants."""
    op = node["op"]
    want = {"Gemm": (1, 2), "Conv": (1, 2), "ConvTranspose": (1, 2), "Add": (1,), "Reshape": (1,)}.get(op, (0,))
    if len(params) not in want or any(t[1] != (INT64 if op == "Reshape" else FLOAT) for t in params):
        raise Malformed(f"{op} with {len(params)} constant inputs")
    if op in ("Relu", "Sigmoid"):
        return shape, math.prod(shape), 0
    if op == "Add":  # a constant that broadcasts into the input, never beyond it
        dims = params[0][0]
        if len(dims) > len(shape) or any(d not in (1, s) for d, s in zip(reversed(dims), reversed(shape))):
            raise Malformed(f"Add of shape {dims} to {shape}")
        return shape, math.prod(shape), 0
    if op == "Flatten":
        if a.get("axis", 1) != 1:
            raise Malformed(f"Flatten with axis {a['axis']}")
        return (math.prod(shape),), 0, 0
    if op == "Reshape":
        v = params[0][2]
        if a.get("allowzero", 0) != 0 or len(v or ()) < 2 or v[0] != -1 or not all(x > 0 for x in v[1:]) \
                or math.prod(v[1:]) != math.prod(shape):
            raise Malformed(f"Reshape of {shape} to {v}")
        return tuple(v[1:]), 0, 0
    if op == "Gemm":
        w = params[0][0]
        n, k = (w if a.get("transB", 0) else w[::-1]) if len(w) == 2 else (0, 0)
        if (a.get("alpha", 1.0), a.get("beta", 1.0), a.get("transA", 0)) != (1.0, 1.0, 0) or a.get("transB", 0) \
                not in (0, 1) or len(shape) != 1 or k != shape[0] or (len(params) > 1 and params[1][0] != (n,)):
            raise Malformed(f"Gemm with attributes {a} and weights {w} on a tensor of shape {shape}")
        return (n,), n * k, 0
    out, macs, scratch = _conv(op, a, shape, params[0][0])
    if len(params) > 1 and params[1][0] != (out[0],):
        raise Malformed(f"{op} with a bias of shape {params[1][0]}")
    return out, macs, scratch


def _walk(model, kind):
    """Follow one image through the graph: {output name: per-image shape}, floats held per image, multiply-adds."""
    in_name, out_names = SIGNATURE[kind]
    defined = collections.Counter([in_name] + [name for name, _ in model["initializers"]]
                                  + [o for node in model["nodes"] for o in node["outputs"]])
    twice = [name for name, count in defined.items() if count > 1]
    if twice:  # onnxruntime would feed or compute the real tensor where the checks assumed a constant
        raise Malformed(f"the name {twice[0]!r} given to more than one tensor")
    consts, shapes = dict(model["initializers"]), {in_name: tuple(model["inputs"][0][2][1:])}
    floats, macs, used = math.prod(shapes[in_name]), 0, set()
    for node in model["nodes"]:
        op = node["op"]
        if node["domain"] not in ("", "ai.onnx") or op not in ATTRIBUTES:
            raise Malformed(f"operator {node['domain'] + '.' if node['domain'] else ''}{op}, which the exporter never "
                            "writes")
        odd = [f"{n} of type {k}" for n, (k, _) in node["attrs"].items() if ATTRIBUTES[op].get(n, -1) != k]
        if odd:  # an attribute this operator never gets from the exporter, or one of another type
            raise Malformed(f"{op} with attribute(s) {', '.join(odd)}")
        a, outs, ins = {n: v for n, (_, v) in node["attrs"].items()}, node["outputs"], node["inputs"]
        used.update(ins)
        if len(outs) != 1 or outs[0] == "":
            raise Malformed(f"{op} with outputs {outs}")
        if op == "Constant":
            if ins or "value" not in a:
                raise Malformed("a Constant that is not a tensor")
            consts[outs[0]] = a["value"]
            continue
        if not ins or ins[0] not in shapes or any(p not in consts for p in ins[1:]):
            raise Malformed(f"{op} whose inputs {ins} are not one computed tensor followed by constants")
        out, work, scratch = _node(node, a, shapes[ins[0]], [consts[p] for p in ins[1:]])
        if not all(isinstance(d, int) and d >= 1 for d in out) or math.prod(out) > MAX_ELEMENTS:
            raise Malformed(f"{op} making a tensor of shape {out} per image (at most {MAX_ELEMENTS:,} values allowed)")
        if scratch > MAX_ELEMENTS:
            raise Malformed(f"{op} needing {scratch:,} scratch values per image (at most {MAX_ELEMENTS:,})")
        shapes[outs[0]] = out
        floats, macs = floats + math.prod(out) + scratch, macs + work
    if macs > MAX_MACS:
        raise Malformed(f"{macs:,} multiply-adds per image (at most {MAX_MACS:,})")
    missing = [name for name in out_names if name not in shapes]
    unused = [name for name in [*consts, *shapes] if name not in used and name not in out_names]
    if missing or unused:
        raise Malformed(f"no node computes {', '.join(missing)}" if missing else f"{unused[0]!r}, which no node uses")
    return {name: shapes[name] for name in out_names}, floats, macs


class Model:
    """A checked file: its bytes (what gets run), metadata, latent size, image shape and safe images per call."""

    def __init__(self, path, kind, data, meta, latent, image_shape, floats, macs, kl=None, beta=None):
        self.path, self.kind, self.data, self.meta = shown(path, 300), kind, data, meta
        self.latent, self.image_shape, self.macs = latent, image_shape, macs
        self.input, self.outputs = SIGNATURE[kind]
        self.chunk = max(1, min(MAX_CHUNK, MEMORY_BUDGET // (4 * floats)))
        self.kl, self.beta = kl, beta  # per-dimension KL (a list of floats) and β, or None where the file has none


def _signature(model, kind):
    """(latent size, image shape) from the declared inputs and outputs, which must be the exporter's."""
    in_name, out_names = SIGNATURE[kind]
    ins, outs = model["inputs"], model["outputs"]
    if [v[0] for v in ins] != [in_name] or [v[0] for v in outs] != list(out_names) \
            or any(v[1] != FLOAT for v in ins + outs):
        found = ", ".join(v[0] for v in ins) + " -> " + ", ".join(v[0] for v in outs)
        raise Malformed(f"it maps {found}; a {kind} maps float {in_name} -> {', '.join(out_names)}")
    for name, _, dims in ins + outs:
        if len(dims) != RANK[name] or not isinstance(dims[0], str) or not all(isinstance(d, int) for d in dims[1:]):
            raise Malformed(f"{name} has shape {dims}, not [batch, ...] with a named batch axis and fixed other axes")
    shapes = {v[0]: tuple(v[2][1:]) for v in ins + outs}
    latent, image = shapes["z" if kind == "decoder" else "mu"][0], shapes["images"]
    if kind == "encoder" and shapes["mu"] != shapes["logvar"]:
        raise Malformed(f"mu {shapes['mu']} and logvar {shapes['logvar']} differ")
    if not 1 <= latent <= MAX_LATENT or image[0] != 1 or not all(1 <= s <= MAX_SIDE for s in image[1:]):
        raise Malformed(f"latent size {latent} (1-{MAX_LATENT}) or image shape {image} (1, H, W up to {MAX_SIDE}) "
                        "out of bounds")
    return latent, image


def _metadata(meta, kind):
    """β (or None), once every metadata value is of bounded length and every number in it is a number."""
    if meta.get("format") != f"beta-vae-{kind}":
        raise Malformed(f"its metadata says format '{shown(meta.get('format'), 40)}'")
    for key, value in meta.items():
        if key not in KEYS:  # onnxruntime reads some keys itself ("ort_config": session options, with an env var)
            raise Malformed(f"metadata key '{shown(key, 40)}', which the exporter never writes")
        too_long = len(value) > (MAX_KL_TEXT if key == "kl_per_dim" else MAX_VALUE)
        if too_long or (key in FORMS and not FORMS[key].fullmatch(value)):
            raise Malformed(f"metadata {shown(key, 40)} '{shown(value, 40)}'" + (
                f" of {len(value):,} characters" if too_long else ", not what the exporter writes"))
    beta = float(meta["beta"]) if "beta" in meta else None
    if beta is not None and not math.isfinite(beta):
        raise Malformed(f"metadata beta {beta}")
    return beta


def _kl(text, latent):
    """kl_per_dim as `latent` finite numbers >= 0, or None. Read without json: no recursion, no huge integers."""
    text = text.strip()
    items = text[1:-1].split(",") if text[:1] == "[" and text[-1:] == "]" else []
    if len(items) != latent or not all(NUMBER.fullmatch(x.strip()) for x in items):
        return None
    kl = [float(x) for x in items]
    return kl if all(math.isfinite(v) and v >= 0 for v in kl) else None


def _check(data, kind, path):
    what = "an ONNX model this project can read"
    try:
        model = parse(data)
        what, meta = f"{'an' if kind == 'encoder' else 'a'} {kind} that export_onnx.py wrote", model["meta"]
        if not 7 <= model["ir_version"] <= 10 or len(model["opsets"]) != 1 or \
                model["opsets"][0][0] not in ("", "ai.onnx") or model["opsets"][0][1] not in OPSETS:
            raise Malformed(f"IR version {model['ir_version']}, opsets {model['opsets']}")
        beta = _metadata(meta, kind)
        latent, image_shape = _signature(model, kind)
        shapes, floats, macs = _walk(model, kind)
    except Malformed as e:
        raise UsageError(f"{path} is not {what} ({shown(e)}): {HINT[kind]}") from None
    declared = {v[0]: tuple(v[2][1:]) for v in model["outputs"]}
    disagree = [f"{k} {declared[k]} computed as {v}" for k, v in shapes.items() if declared[k] != v]
    if meta.get("latent_dim") != str(latent):
        disagree.append(f"latent_dim {meta.get('latent_dim')!r} but the graph takes {latent}")
    if meta.get("image_shape") != ",".join(map(str, image_shape)):
        disagree.append(f"image_shape {meta.get('image_shape')!r} but the graph makes {image_shape}")
    kl = _kl(meta["kl_per_dim"], latent) if "kl_per_dim" in meta else None
    if kl is None and "kl_per_dim" in meta:
        disagree.append(f"kl_per_dim is not a list of {latent} numbers >= 0")
    if disagree:
        raise UsageError(f"{path} has metadata or declared shapes that disagree with its graph "
                         f"({shown('; '.join(disagree), 300)}): export it again with export_onnx.py")
    version = int(meta.get("format_version", -1))  # digits only when present (FORMS)
    if version < 0:
        raise UsageError(f"{path} has no format_version in its metadata: {HINT[kind]}")
    if version > FORMAT_VERSION:
        raise UsageError(f"{path} has {kind} format {version}; this code reads up to {FORMAT_VERSION}: update it")
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
    """Read and check `path` as this project's decoder or encoder; UsageError before anything runs."""
    name = shown(path, 300)
    if not os.path.isfile(path):
        raise UsageError(f"no file at {name}: {HINT[kind]}")
    try:
        with open(path, "rb") as f:
            # Bytes, not a path, go to onnxruntime; that alone would not stop external data (onnxruntime resolves
            # it against the working directory even then): protowire refuses every field that could name it.
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read {name} ({e.strerror}): {HINT[kind]}") from None
    if len(data) > MAX_BYTES:
        raise UsageError(f"{name} is larger than {MAX_BYTES >> 20} MiB, far too big for a {kind}: {HINT[kind]}")
    return check(data, kind, path)


def kl_order(kl, latent):
    """Dimensions by KL, largest first (index order when the file has no KL), and which of them are unused."""
    if kl is None:
        return list(range(latent)), []
    order = sorted(range(latent), key=lambda d: (-kl[d], d))
    return order, [d for d in order if kl[d] < UNUSED_KL]


# --------------------------------------------------------------------------------------------------- running it

def session(model):
    """An onnxruntime session for a checked Model, quiet: its own log lines would break the one-line errors."""
    import onnxruntime as ort
    ort.set_default_logger_severity(QUIET)
    opts = ort.SessionOptions()
    opts.log_severity_level = QUIET
    # Idle worker threads otherwise spin waiting for work: on a busy 2-core CPU that halved throughput at batch 1024.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model.data, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises several types; all mean "this is not a model we can load"
        reason = shown((str(e).strip().splitlines() or [type(e).__name__])[0], 150)
        raise UsageError(f"{model.path} is not an ONNX model onnxruntime can load ({reason}): "
                         f"{HINT[model.kind]}") from None


def run(model, sess, x):
    """Every output of the model for the float32 batch x, model.chunk images per call, checked for shape and NaN."""
    import onnxruntime as ort
    opts = ort.RunOptions()
    opts.log_severity_level = QUIET
    parts = []
    try:
        for i in range(0, len(x), model.chunk):
            parts.append(sess.run(list(model.outputs), {model.input: x[i:i + model.chunk]}, opts))
    except Exception as e:  # loads, but fails on its own input shape: not a working model
        reason = shown((str(e).strip().splitlines() or [type(e).__name__])[0], 150)
        raise UsageError(f"{model.path} loads but fails to run ({reason}): {HINT[model.kind]}") from None
    outs = [np.concatenate([p[k] for p in parts]) for k in range(len(model.outputs))]
    want = [(len(x), *model.image_shape)] if model.kind == "decoder" else [(len(x), model.latent)] * 2
    if [o.shape for o in outs] != want:
        raise UsageError(f"{model.path} returned shapes {[o.shape for o in outs]}, not {want}: export it again")
    if not all(np.isfinite(o).all() for o in outs):
        raise UsageError(f"{model.path} returned NaN or infinite values: export it again from a healthy checkpoint")
    return outs

