"""onnx_check.py: what export_onnx.py writes passes at every opset; hostile files are refused before anything runs."""
import struct
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import checkpoint
import export_onnx
import onnx_check
import protowire
from plumbing.cli import UsageError


@pytest.fixture(scope="module")
def exports(tiny_checkpoint):
    """{(kind, opset): ONNX bytes} straight from the exporter, without the parity run."""
    model, ckpt = checkpoint.load_checkpoint(tiny_checkpoint["path"])
    kl = ([0.5, 0.0, 1.0, 2.0], 3)
    out = {}
    for opset in export_onnx.OPSETS:
        for kind, module, example, names, pixel_range in (
                ("decoder", model.decoder, torch.zeros(2, 4), ("z", ("images",)), "0,1"),
                ("encoder", model.encoder, torch.zeros(2, 1, 28, 28), ("images", ("mu", "logvar")), "-1,1")):
            meta = export_onnx.metadata(kind, ckpt, tiny_checkpoint["path"], pixel_range, kl)
            out[kind, opset] = export_onnx.export(module, example, *names, opset, meta)
    return out


@pytest.mark.parametrize("opset", list(export_onnx.OPSETS))
def test_every_opset_the_exporter_writes_passes(exports, opset):
    for kind in ("decoder", "encoder"):
        m = onnx_check.check(exports[kind, opset], kind, f"{kind}.onnx")
        assert m.latent == 4 and m.image_shape == (1, 28, 28) and m.kl == [0.5, 0.0, 1.0, 2.0]
        assert m.chunk == onnx_check.MAX_CHUNK and 0 < m.macs < onnx_check.MAX_MACS


def test_the_exporter_folds_batchnorm_into_an_add_that_passes(exports):
    ops = [n.op_type for n in onnx.load_from_string(exports["decoder", 17]).graph.node]
    assert "Add" in ops and "Constant" in ops and "Reshape" in ops  # the tiny checkpoint has trained BN statistics


def mutated(data, change):
    model = onnx.load_from_string(data)
    change(model)
    return model.SerializeToString()


def refused(data, needle, kind="decoder"):
    t = time.perf_counter()
    with pytest.raises(UsageError) as e:
        onnx_check.check(data, kind, "model.onnx")
    assert time.perf_counter() - t < 2  # nothing ran, nothing big was read
    assert needle in str(e.value), str(e.value)
    assert str(e.value).startswith("model.onnx ") and "\n" not in str(e.value)
    return str(e.value)


def set_meta(model, key, value):
    entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add(key=key)
    entry.value = value


def node(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


def replace_attribute(n, name, value):
    n.attribute.remove(next(a for a in n.attribute if a.name == name))
    n.attribute.append(helper.make_attribute(name, value))


@pytest.mark.parametrize("change, needle", [
    (lambda m: set_meta(m, "latent_dim", "5"), "latent_dim '5' but the graph takes 4"),
    (lambda m: set_meta(m, "image_shape", "1,32,32"), "image_shape '1,32,32' but the graph makes (1, 28, 28)"),
    (lambda m: set_meta(m, "kl_per_dim", "[1.0, 2.0]"), "kl_per_dim is not a list of 4 numbers"),
    (lambda m: set_meta(m, "kl_per_dim", "[1, 2, NaN, 3]"), "kl_per_dim is not a list of 4 numbers"),
    (lambda m: set_meta(m, "format", "beta-vae-encoder"), "is not a decoder that export_onnx.py wrote"),
    (lambda m: set_meta(m, "format_version", "2"), "decoder format 2; this code reads up to 1"),
    (lambda m: m.graph.output[0].type.tensor_type.shape.dim[3].__setattr__("dim_value", 27),
     "images (1, 28, 27) computed as (1, 28, 28)"),
])
def test_metadata_or_declared_shapes_that_disagree_with_the_graph(exports, change, needle):
    refused(mutated(exports["decoder", 17], change), needle)


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.opset_import[0].__setattr__("version", 16), "opsets [('', 16)]"),
    (lambda m: m.opset_import.append(helper.make_opsetid("com.microsoft", 1)), "opsets"),
    (lambda m: m.graph.input[0].type.tensor_type.shape.dim[0].__setattr__("dim_value", 1), "named batch axis"),
    (lambda m: m.graph.input[0].type.tensor_type.shape.dim[1].__setattr__("dim_value", 100000), "latent size 100000"),
    (lambda m: node(m, "Gemm").attribute.append(helper.make_attribute("transA", 1)), "Gemm with attributes"),
    (lambda m: node(m, "ConvTranspose").attribute.extend([helper.make_attribute("auto_pad", "SAME_UPPER")]),
     "a text value in an AttributeProto"),
    (lambda m: node(m, "Relu").attribute.append(helper.make_attribute("alpha", 0.1)), "Relu with attribute(s) alpha"),
    (lambda m: node(m, "Sigmoid").__setattr__("op_type", "Tile"), "operator Tile, which the exporter never writes"),
    (lambda m: node(m, "Sigmoid").__setattr__("domain", "com.evil"), "operator com.evil.Sigmoid"),
    (lambda m: m.graph.initializer[0].__setattr__("data_location", TensorProto.EXTERNAL), "outside the file"),
    (lambda m: m.graph.initializer[0].dims.__setitem__(0, 129), "a tensor of shape [129, 4] holding 2048 bytes"),
    (lambda m: m.functions.add(name="f", domain="x"), "local functions"),
    (lambda m: node(m, "Constant").attribute[0].t.CopyFrom(numpy_helper.from_array(np.zeros(0, np.int64))),
     "Reshape of (288,) to []"),
    (lambda m: replace_attribute(node(m, "ConvTranspose"), "kernel_shape", 3),
     "ConvTranspose with attribute(s) kernel_shape of type 2"),
    (lambda m: replace_attribute(node(m, "ConvTranspose"), "group", [1]), "ConvTranspose with attribute(s) group of "
     "type 7"),
    (lambda m: node(m, "Gemm").attribute.append(helper.make_attribute("transB", 1)), "attribute transB twice"),
    (lambda m: m.graph.initializer.append(m.graph.initializer[0]), "the name 'fc.0.weight' given to more than one"),
    (lambda m: m.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "spare")),
     "'spare', which no node uses"),
    (lambda m: m.graph.node.insert(0, helper.make_node("Relu", ["z"], ["side"])), "'side', which no node uses"),
    (lambda m: m.graph.value_info.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])),
     "value_info entries in a GraphProto"),
])
def test_files_the_exporter_never_writes_are_refused(exports, change, needle):
    refused(mutated(exports["decoder", 17], change), needle)


def build(nodes, inits, in_dims, out_dims, meta=None, kind="decoder", opset=17):
    """A model with the exporter's names and metadata around the given nodes."""
    names = onnx_check.SIGNATURE[kind]
    ins = [helper.make_tensor_value_info(names[0], TensorProto.FLOAT, ["batch", *in_dims])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *out_dims]) for n in names[1]]
    graph = helper.make_graph(nodes, "g", ins, outs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    latent, image = (in_dims[0], out_dims) if kind == "decoder" else (out_dims[0], in_dims)
    helper.set_model_props(model, {"format": f"beta-vae-{kind}", "format_version": "1", "latent_dim": str(latent),
                                   "image_shape": ",".join(map(str, image)), **(meta or {})})
    return model.SerializeToString()


def test_a_loop_with_an_enormous_trip_count_is_refused_before_it_runs():
    body = helper.make_graph([helper.make_node("Identity", ["cond"], ["cond_out"]),
                              helper.make_node("Identity", ["x"], ["x_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Loop", ["trips", "", "z"], ["images"], body=body)]
    refused(build(nodes, {"trips": np.array(2**62, np.int64)}, [784], [1, 28, 28]), "subgraph")


def test_a_node_whose_output_is_huge_is_refused():
    nodes = [helper.make_node("Gemm", ["z", "w"], ["images"], transB=1)]
    data = build(nodes, {"w": np.zeros((2**21, 1), np.float32)}, [1], [1, 28, 28])
    assert len(data) < 9 * 2**20  # a few megabytes of file ...
    refused(data, "making a tensor of shape (2097152,) per image")  # ... that would take 8 MiB per image


def upsampler(mid_channels, stride=4, base=16):
    """z (1) -> Gemm -> (1, base, base) -> ConvTranspose to (mid, ., .) -> ConvTranspose to (1, side, side)."""
    side = base * stride * stride
    nodes = [helper.make_node("Gemm", ["z", "w0"], ["h0"], transB=1),
             helper.make_node("Reshape", ["h0", "shape"], ["h1"]),
             helper.make_node("ConvTranspose", ["h1", "w1"], ["h2"], kernel_shape=[stride, stride],
                              strides=[stride, stride]),
             helper.make_node("ConvTranspose", ["h2", "w2"], ["images"], kernel_shape=[stride, stride],
                              strides=[stride, stride])]
    inits = {"w0": np.ones((base * base, 1), np.float32), "shape": np.array([-1, 1, base, base], np.int64),
             "w1": np.full((1, mid_channels, stride, stride), 0.1, np.float32),
             "w2": np.full((mid_channels, 1, stride, stride), 0.1, np.float32)}
    return build(nodes, inits, [1], [1, side, side])


def test_too_much_arithmetic_per_image_is_refused():
    # ConvTranspose work is counted as onnxruntime does it: cin * cout * k^2 per input position
    refused(upsampler(mid_channels=256), "17,826,048 multiply-adds per image")


def test_a_wide_model_runs_in_chunks_that_keep_memory_within_the_budget():
    model = onnx_check.check(upsampler(mid_channels=4), "decoder", "wide.onnx")
    scratch = 16 * 16 * 4 * 4 * 4 + 64 * 64 * 1 * 4 * 4  # the column buffers: input positions * cout * k^2
    per_image = 4 * (1 + 256 + 256 + 4 * 64 * 64 + 256 * 256 + scratch)  # bytes of every tensor of one image
    assert model.chunk == onnx_check.MEMORY_BUDGET // per_image < onnx_check.MAX_CHUNK
    sess = onnx_check.session(model)
    sizes = []

    class Recording:
        def run(self, names, feeds, opts):
            sizes.append(len(feeds["z"]))
            return sess.run(names, feeds, opts)

    images = onnx_check.run(model, Recording(), np.ones((model.chunk + 3, 1), np.float32))[0]
    assert sizes == [model.chunk, 3] and images.shape == (model.chunk + 3, 1, 256, 256)


def test_an_encoder_is_checked_too(exports):
    refused(exports["decoder", 17], "is not an encoder", kind="encoder")
    refused(mutated(exports["encoder", 17], lambda m: set_meta(m, "latent_dim", "3")), "latent_dim '3'", "encoder")
    refused(mutated(exports["encoder", 17], lambda m: next(a for a in node(m, "Conv").attribute
                                                            if a.name == "group").__setattr__("i", 2)),
            "Conv with attributes", "encoder")


def test_an_unforeseen_failure_inside_the_checks_is_still_one_line(exports, monkeypatch):
    monkeypatch.setattr(onnx_check, "_walk", lambda model, kind: [][0])
    refused(exports["decoder", 17], "could not be checked (IndexError)")
    monkeypatch.setattr(onnx_check, "parse", lambda data: onnx_check.parse(data))  # endless recursion
    refused(exports["decoder", 17], "could not be checked (RecursionError)")


def test_a_convtranspose_is_counted_on_its_input_not_on_its_cropped_output():
    """k = 7 with pads 6 crops a (1, 7, 7) input to (cout, 1, 1), but onnxruntime first fills a column buffer of
    cout * 49 values for each of the 49 input positions, and does the multiply-adds for all of them."""
    def cropped(cout):
        nodes = [helper.make_node("Gemm", ["z", "w0"], ["h0"], transB=1),
                 helper.make_node("Reshape", ["h0", "s0"], ["h1"]),
                 helper.make_node("ConvTranspose", ["h1", "w1"], ["h2"], kernel_shape=[7, 7], pads=[6, 6, 6, 6]),
                 helper.make_node("Flatten", ["h2"], ["h3"]),
                 helper.make_node("Gemm", ["h3", "w2"], ["h4"], transB=1),
                 helper.make_node("Reshape", ["h4", "s1"], ["images"])]
        inits = {"w0": np.ones((49, 1), np.float32), "s0": np.array([-1, 1, 7, 7], np.int64),
                 "w1": np.full((1, cout, 7, 7), 1e-3, np.float32), "w2": np.ones((784, cout), np.float32),
                 "s1": np.array([-1, 1, 28, 28], np.int64)}
        return build(nodes, inits, [1], [1, 28, 28])

    model = onnx_check.check(cropped(8), "decoder", "cropped.onnx")
    assert model.macs == 49 + 49 * 8 * 49 + 784 * 8  # the ConvTranspose: 49 input positions x cin 1 x cout 8 x 7 x 7
    refused(cropped(512), "ConvTranspose needing 1,229,312 scratch values per image")


# ------------------------------------------- bytes written by hand: what protobuf's own writer cannot produce

def varint(n):
    out = bytearray()
    while True:
        n, low = n >> 7, n & 0x7F
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(number, wire):
    return varint(number << 3 | wire)


def ld(number, payload):  # a length-delimited field: text, bytes or a message
    return key(number, 2) + varint(len(payload)) + payload


def vi(number, value):  # a varint field
    return key(number, 0) + varint(value & (2**64 - 1))


def encode(msg, extra, path=""):
    """msg's bytes written field by field as protobuf writes them, with extra[path] added to the end of the message at
    `path` (".graph.node[4].attribute[0]"); every path in extra must exist."""
    out = b""
    for fd, value in msg.ListFields():
        for i, v in enumerate(value if fd.is_repeated else [value]):
            if fd.type == fd.TYPE_MESSAGE:
                out += ld(fd.number, encode(v, extra, f"{path}.{fd.name}" + (f"[{i}]" if fd.is_repeated else "")))
            elif fd.type in (fd.TYPE_STRING, fd.TYPE_BYTES):
                out += ld(fd.number, v.encode() if isinstance(v, str) else v)
            elif fd.type == fd.TYPE_FLOAT:
                out += key(fd.number, 5) + struct.pack("<f", v)
            else:
                out += vi(fd.number, v)
    return out + extra.pop(path, b"")


def test_the_hand_writer_writes_what_protobuf_writes(exports):
    for kind in ("decoder", "encoder"):
        assert encode(onnx.load_from_string(exports[kind, 17]), {}) == exports[kind, 17]


def hidden_graph(case):
    """A GraphProto to put beside the exporter's: onnxruntime merges the two, the checks must not see only one."""
    if case == "loop":  # spins 2**40 times, its output used by nobody
        body = helper.make_graph([helper.make_node("Identity", ["cond"], ["cond_out"]),
                                  helper.make_node("Identity", ["x"], ["x_out"])], "body",
                                 [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                                  helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                  helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                                 [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                                  helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [])])
        return helper.make_graph([helper.make_node("Loop", ["trips", "", "x0"], ["spin"], body=body)], "", [], [],
                                 [numpy_helper.from_array(np.array(2**40, np.int64), "trips"),
                                  numpy_helper.from_array(np.array(0.0, np.float32), "x0")])
    if case == "expand":  # 1e8 floats from z
        return helper.make_graph([helper.make_node("Expand", ["z", "shape"], ["big"])], "", [],
                                 [helper.make_tensor_value_info("big", TensorProto.FLOAT, None)],
                                 [numpy_helper.from_array(np.array([10**8, 1, 4], np.int64), "shape")])
    if case == "external":  # the bytes of secret.txt in the working folder, read as a weight
        leak = TensorProto(name="leak", data_type=TensorProto.UINT8, dims=[6], data_location=TensorProto.EXTERNAL)
        leak.external_data.add(key="location", value="secret.txt")
        return helper.make_graph([helper.make_node("Identity", ["leak"], ["leak2"])], "", [],
                                 [helper.make_tensor_value_info("leak2", TensorProto.UINT8, None)], [leak])
    value = numpy_helper.from_array(np.array([-1000.0], np.float32))  # a checked weight replaced: black images
    return helper.make_graph([helper.make_node("Constant", [], ["deconv.5.bias"], value=value)], "", [], [])


@pytest.mark.parametrize("case", ["loop", "expand", "external", "override"])
@pytest.mark.parametrize("first", [True, False])
def test_a_second_graph_record_is_refused_where_onnxruntime_would_merge_it(exports, case, first):
    good, hidden = exports["decoder", 17], ld(7, hidden_graph(case).SerializeToString())
    evil = hidden + good if first else good + hidden
    merged = onnx.load_from_string(evil).graph  # what protobuf's parser (onnxruntime's) makes of these bytes
    assert len(merged.node) + len(merged.initializer) > len(onnx.load_from_string(good).graph.node) + len(
        onnx.load_from_string(good).graph.initializer)
    first_refusal = {"loop": "a subgraph", "external": "a tensor stored outside the file"}  # within the hidden graph
    refused(evil, first_refusal.get(case, "ModelProto.graph more than once") if first else "graph more than once")


@pytest.mark.parametrize("path, extra, needle", [
    ("", vi(1, 8), "ModelProto.ir_version more than once"),
    (".opset_import[0]", vi(2, 17), "OperatorSetIdProto.version more than once"),
    (".metadata_props[0]", ld(2, b"beta-vae-decoder"), "StringStringEntryProto.value more than once"),
    (".graph", ld(2, b"g"), "GraphProto.name more than once"),
    (".graph.input[0]", ld(2, b""), "ValueInfoProto.type more than once"),
    (".graph.input[0].type", ld(1, b""), "TypeProto.tensor_type more than once"),
    (".graph.input[0].type.tensor_type", vi(1, 1), "TypeProto.Tensor.elem_type more than once"),
    (".graph.input[0].type.tensor_type", ld(2, b""), "TypeProto.Tensor.shape more than once"),
    (".graph.input[0].type.tensor_type.shape.dim[1]", vi(1, 4), "Dimension.dim_value more than once"),
    (".graph.input[0].type.tensor_type.shape.dim[0]", vi(1, 4), "a dimension of no single size or name"),
    (".graph.node[0]", ld(4, b"Relu"), "NodeProto.op_type more than once"),
    (".graph.node[0].attribute[0]", key(2, 5) + struct.pack("<f", 2.0), "AttributeProto.f more than once"),
    (".graph.node[0].attribute[0]", vi(20, 2), "AttributeProto.type more than once"),
    (".graph.node[0].attribute[2]", vi(3, 0), "AttributeProto.i more than once"),
    (".graph.node[0].attribute[0]", vi(3, 1), "attribute alpha of type 1 holding f, i"),
    (".graph.node[4].attribute[0]", ld(5, b""), "AttributeProto.t more than once"),
    (".graph.node[4].attribute[0].t", vi(2, 1), "TensorProto.data_type more than once"),
    (".graph.initializer[0]", ld(9, b""), "TensorProto.raw_data more than once"),
    (".graph.initializer[0]", ld(8, b"fc.2.weight"), "TensorProto.name more than once"),
    # fields the exporter never writes, and fields of another wire type
    (".graph.node[0]", ld(6, b"doc"), "field 6 in a NodeProto"),
    (".graph.node[0].attribute[0]", ld(13, b"doc"), "field 13 in an AttributeProto"),
    (".graph.initializer[0]", ld(13, ld(1, b"location") + ld(2, b"secret.txt")), "a tensor stored outside the file"),
    (".graph.initializer[0]", vi(14, 0), "a tensor stored outside the file"),
    ("", ld(1, b"8"), "ModelProto.ir_version with wire type 2"),
    (".graph.node[0].attribute[0]", key(2, 1) + bytes(8), "AttributeProto.f with wire type 1"),
    (".graph.node[0].attribute[0]", key(2, 3), "AttributeProto.f with wire type 3"),
])
def test_any_field_twice_or_not_the_exporters_is_refused(exports, path, extra, needle):
    """onnxruntime's protobuf parser takes the last copy of a singular number or text, and merges the copies of a
    singular message: either way not what a reader keeping one copy checked."""
    extra = {path: extra}
    evil = encode(onnx.load_from_string(exports["decoder", 17]), extra)
    assert not extra  # the path exists
    refused(evil, needle)


def test_long_or_huge_dims_are_refused_before_any_arithmetic(exports):
    # 1 MiB holding 112,000 dims of 2**62: math.prod over them took the checker 59 s
    tensor = ld(1, varint(2**62) * 28) * 4000 + vi(2, 1) + ld(8, b"w")
    t = time.perf_counter()
    refused(vi(1, 8) + ld(7, ld(5, tensor)), "the integer 4611686018427387904, out of range")
    tensor = vi(1, 1) * 9 + vi(2, 1) + ld(8, b"w")
    refused(vi(1, 8) + ld(7, ld(5, tensor)), "more than 8 entries in TensorProto.dims")
    extra = {".graph.input[0].type.tensor_type.shape": ld(1, vi(1, 1)) * 7}
    refused(encode(onnx.load_from_string(exports["decoder", 17]), extra), "more than 8 entries in TensorShapeProto.dim")
    assert time.perf_counter() - t < 0.5


def test_big_files_padded_with_fields_are_refused_in_milliseconds():
    # the exporter's fields only, the most of each that is allowed: the whole-file budget ends the parse
    tensor = ld(1, varint(1) * 8) + vi(2, 1) + ld(8, b"w") + ld(9, bytes(4))
    attribute = ld(1, b"a") + vi(20, 4) + ld(5, tensor) + vi(8, 1) * 8
    nodes = ld(1, (ld(1, b"x") * 4 + ld(5, attribute) * 8)) * 64
    t = time.perf_counter()
    refused(vi(1, 8) + ld(7, nodes), f"more than {protowire.MAX_FIELDS:,} fields")
    # 8 MiB of fields the exporter never writes (the first one ends it), and of a field repeated past its limit
    refused(vi(1, 8) + ld(7, ld(1, ld(4, b"Relu") + vi(15, 0) * (4 * 2**20))), "field 15 in a NodeProto")
    refused(vi(1, 8) + ld(14, ld(1, b"k")) * (2**20), "more than 32 entries in ModelProto.metadata_props")
    assert time.perf_counter() - t < 0.5


@pytest.mark.parametrize("key_, value, needle", [
    ("beta", "\n" * 300_000, "a text of 300,000 bytes"),
    ("beta", "\n" * 3000, "metadata beta '\\n\\n"),
    ("model_args", "x" * 5000, "metadata model_args 'xxx"),
    ("beta", "nan", "metadata beta 'nan', not what the exporter writes"),
    ("beta", "4.0\n", "metadata beta '4.0\\n', not what the exporter writes"),
    ("beta", "1e999", "metadata beta inf"),
    ("seed", "-1", "metadata seed '-1'"),
    ("epochs", "1" * 21, "metadata epochs '1111"),
    ("checkpoint_sha256", "<img src=x onerror=alert(1)>", "metadata checkpoint_sha256 '<img"),
    ("kl_per_dim", "[1" + "0" * 400 + ", 1, 1, 1]", "kl_per_dim is not a list of 4 numbers >= 0"),
    ("kl_per_dim", "[" * 90_000, "kl_per_dim is not a list of 4 numbers >= 0"),  # json: RecursionError
    ("kl_per_dim", "[1, 2, 3, 4" + ", 5" * 33_000 + "]", "metadata kl_per_dim '[1, 2, 3, 4, 5, 5"),
    ("ort_config", '{"session_options": {"enable_profiling": true}}', "metadata key 'ort_config', which the exporter"),
], ids=lambda value: repr(value)[:24])
def test_metadata_of_any_length_or_form_is_refused_in_one_line(exports, key_, value, needle):
    message = refused(mutated(exports["decoder", 17], lambda m: set_meta(m, key_, value)), needle)
    assert len(message) < 500
