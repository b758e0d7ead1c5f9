"""plumbing/onnx_check.py: what export_onnx.py writes passes at every opset; hostile files are refused in one line,
in milliseconds and megabytes, before onnxruntime sees them; what is accepted runs as it was checked."""

import gc
import os
import struct
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import export_onnx
import vae
from plumbing import onnx_check
from plumbing.cli import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def exports(tiny_checkpoint):
    """{(kind, opset): ONNX bytes} straight from the exporter, without the parity run."""
    model, ckpt = vae.load_checkpoint(tiny_checkpoint["path"])
    kl = ([0.5, 0.0, 1.0, 2.0], 3)
    out = {}
    for opset in export_onnx.OPSETS:
        for kind, module, example, names, pixel_range in (
            ("decoder", model.decoder, torch.zeros(2, 4), ("z", ("images",)), "0,1"),
            ("encoder", model.encoder, torch.zeros(2, 1, 28, 28), ("images", ("mu", "logvar")), "-1,1"),
        ):
            meta = export_onnx.metadata(kind, ckpt, tiny_checkpoint["path"], pixel_range, kl)
            out[kind, opset] = export_onnx.export(module, example, *names, opset, meta)
    return out


@pytest.fixture(scope="module")
def decoder(exports):
    return exports["decoder", 17]


Z = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)


@pytest.mark.parametrize("opset", list(export_onnx.OPSETS))
def test_every_opset_the_exporter_writes_passes(exports, opset):
    for kind in ("decoder", "encoder"):
        m = onnx_check.check(exports[kind, opset], kind, f"{kind}.onnx")
        assert m.latent == 4 and m.image_shape == (1, 28, 28) and m.kl == [0.5, 0.0, 1.0, 2.0] and m.beta == 1.0
        assert m.chunk == onnx_check.MAX_CHUNK and 0 < m.macs < onnx_check.MAX_MACS
        assert (m.input, m.outputs) == onnx_check.SIGNATURE[kind] and m.data == exports[kind, opset]
    m = onnx_check.check(exports["decoder", opset], "decoder", "d.onnx")
    images = onnx_check.run(m, onnx_check.session(m), Z)[0]
    assert images.shape == (5, 1, 28, 28) and images.min() >= 0 and images.max() <= 1


def test_the_exporter_folds_batchnorm_into_an_add_that_passes(decoder):
    ops = [n.op_type for n in onnx.load_from_string(decoder).graph.node]
    assert "Add" in ops and "Constant" in ops and "Reshape" in ops  # the tiny checkpoint has trained BN statistics


def mutated(data, change):
    model = onnx.load_from_string(data)
    change(model)
    return model.SerializeToString()


def refused(data, needle, kind="decoder"):
    t = time.process_time()  # CPU time: other processes on the cores do not count
    with pytest.raises(UsageError) as e:
        onnx_check.check(data, kind, "model.onnx")
    assert time.process_time() - t < 1  # nothing ran, nothing big was read
    assert needle in str(e.value), str(e.value)
    assert str(e.value).startswith("model.onnx ") and "\n" not in str(e.value)
    return str(e.value)


def same_as_checked(data, kind="decoder"):
    """Passes the check, and onnxruntime, given these bytes, computes what it computes from the model as protobuf
    parsed it for the check (written back canonically): the bytes mean the same to both."""
    m = onnx_check.check(data, kind, "model.onnx")
    x = Z if kind == "decoder" else np.random.default_rng(1).uniform(-1, 1, (5, 1, 28, 28)).astype(np.float32)
    got = onnx_check.run(m, onnx_check.session(m), x)
    canonical = onnx.load_from_string(data).SerializeToString()
    want = ort.InferenceSession(canonical, providers=["CPUExecutionProvider"]).run(list(m.outputs), {m.input: x})
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    return m


def set_meta(model, key, value):
    entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add(key=key)
    entry.value = value


def node(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


def attribute(n, name):
    return next(a for a in n.attribute if a.name == name)


def replace_attribute(n, name, value):
    n.attribute.remove(attribute(n, name))
    n.attribute.append(helper.make_attribute(name, value))


def weight(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda m: set_meta(m, "latent_dim", "5"), "latent_dim '5' but the graph takes 4"),
        (lambda m: set_meta(m, "image_shape", "1,32,32"), "image_shape '1,32,32' but the graph makes (1, 28, 28)"),
        (lambda m: set_meta(m, "kl_per_dim", "[1.0, 2.0]"), "kl_per_dim is not a list of 4 numbers"),
        (lambda m: set_meta(m, "kl_per_dim", "[1, 2, NaN, 3]"), "kl_per_dim is not a list of 4 numbers"),
        (lambda m: set_meta(m, "format", "beta-vae-encoder"), "its metadata says format 'beta-vae-encoder'"),
        (lambda m: set_meta(m, "format_version", "2"), "decoder format 2; this code reads up to 1"),
        (
            lambda m: m.metadata_props.remove(next(p for p in m.metadata_props if p.key == "format_version")),
            "has no format_version in its metadata",
        ),
        (
            lambda m: m.graph.output[0].type.tensor_type.shape.dim[3].__setattr__("dim_value", 27),
            "Inferred shape and existing shape differ in dimension 3: (28) vs (27)",
        ),
    ],
)
def test_metadata_or_declared_shapes_that_disagree_with_the_graph(decoder, change, needle):
    refused(mutated(decoder, change), needle)


def drop_sigmoid(m):
    last = node(m, "Sigmoid")
    m.graph.node.remove(last)
    next(n for n in m.graph.node if last.input[0] in n.output).output[0] = "images"


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda m: m.opset_import[0].__setattr__("version", 16), "opsets [('', 16)]"),
        (lambda m: m.opset_import.append(helper.make_opsetid("com.microsoft", 1)), "opsets [('', 17), ('com.microsoft"),
        (lambda m: m.opset_import.append(helper.make_opsetid("", 17)), "opsets [('', 17), ('', 17)]"),
        (lambda m: m.__setattr__("ir_version", 11), "IR version 11"),
        (lambda m: m.__setattr__("ir_version", 6), "IR version 6"),
        (lambda m: m.graph.input[0].type.tensor_type.shape.dim[0].__setattr__("dim_value", 1), "named batch axis"),
        (
            lambda m: m.graph.input[0].type.tensor_type.shape.dim[1].__setattr__("dim_value", 100000),
            "latent size 100000",
        ),
        (lambda m: m.graph.input[0].__setattr__("name", "x"), "it maps x -> images; a decoder maps float z -> images"),
        (lambda m: m.graph.output[0].__setattr__("name", "out"), "it maps z -> out"),
        (lambda m: m.graph.output[0].type.tensor_type.__setattr__("elem_type", TensorProto.FLOAT16), "maps float z"),
        (lambda m: node(m, "Gemm").attribute.append(helper.make_attribute("transA", 1)), "Dimension mismatch"),
        (
            lambda m: node(m, "ConvTranspose").attribute.extend([helper.make_attribute("auto_pad", "SAME_UPPER")]),
            "ConvTranspose with attribute(s) auto_pad of type 3",
        ),
        (
            lambda m: node(m, "Relu").attribute.append(helper.make_attribute("alpha", 0.1)),
            "Relu with attribute(s) alpha",
        ),
        (lambda m: node(m, "Sigmoid").__setattr__("op_type", "Tile"), "operator Tile, which the exporter never writes"),
        (lambda m: node(m, "Sigmoid").__setattr__("domain", "com.evil"), "operator com.evil.Sigmoid"),
        (
            lambda m: weight(m, "fc.0.weight").__setattr__("data_location", TensorProto.EXTERNAL),
            "weight fc.0.weight: a tensor stored outside the file",
        ),
        (lambda m: weight(m, "fc.0.weight").external_data.add(key="location", value="secret.txt"), "outside the file"),
        (lambda m: weight(m, "fc.0.weight").dims.__setitem__(0, 129), "a tensor of shape [129, 4] holding 2048"),
        (lambda m: weight(m, "fc.0.weight").dims.__setitem__(0, -128), "a tensor of type 1 and shape [-128, 4]"),
        (lambda m: weight(m, "fc.0.weight").dims.__setitem__(0, 2**31), "shape [2147483648, 4]"),
        (lambda m: weight(m, "fc.0.weight").dims.extend([1] * 7), "a tensor of type 1 and shape [128, 4, 1, 1, 1, 1"),
        (
            lambda m: weight(m, "fc.0.bias").CopyFrom(numpy_helper.from_array(np.zeros(128, np.int64), "fc.0.bias")),
            "C has inconsistent type tensor(int64)",
        ),
        (
            lambda m: weight(m, "fc.0.bias").CopyFrom(numpy_helper.from_array(np.zeros(128, np.float64), "fc.0.bias")),
            "a tensor of type 11",
        ),
        (
            lambda m: weight(m, "fc.0.bias").float_data.extend([5.0] * 128),
            "should contain one and only one value field",
        ),
        (lambda m: m.functions.add(name="f", domain="x"), "local functions"),
        (lambda m: m.training_info.add(), "training information"),
        (lambda m: m.graph.sparse_initializer.add(), "sparse initializers"),
        (
            lambda m: m.graph.value_info.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])),
            "value_info entries, which the exporter never writes",
        ),
        (
            lambda m: node(m, "Constant").attribute[0].t.CopyFrom(numpy_helper.from_array(np.zeros(0, np.int64))),
            "Input tensor must have at least 3 dimensions",
        ),
        (
            lambda m: node(m, "Constant").attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([-1, 2**40, 1, 1]))),
            "Incompatible dimensions",
        ),  # a Reshape to a huge shape: its -1 comes to nothing
        (
            lambda m: node(m, "Constant").attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([1, -1, 3, 3]))),
            "differ in dimension 0: (1) vs (2)",
        ),  # the batch moved into the channels
        (
            lambda m: node(m, "Constant").attribute.append(helper.make_attribute("value_float", 1.0)),
            "Constant with attribute(s) value_float of type 1",
        ),
        (
            lambda m: replace_attribute(node(m, "ConvTranspose"), "kernel_shape", 3),
            "ConvTranspose with attribute(s) kernel_shape of type 2",
        ),
        (
            lambda m: replace_attribute(node(m, "ConvTranspose"), "group", [1]),
            "ConvTranspose with attribute(s) group of type 7",
        ),
        (lambda m: replace_attribute(node(m, "ConvTranspose"), "strides", [8, 8]), "ConvTranspose with attributes"),
        (lambda m: replace_attribute(node(m, "ConvTranspose"), "pads", [65, 0, 0, 0]), "ConvTranspose with pads [65"),
        (lambda m: attribute(node(m, "Gemm"), "alpha").g.__setattr__("name", "sub"), "Gemm with attribute(s) alpha"),
        (
            lambda m: attribute(node(m, "Gemm"), "transB").__setattr__("ref_attr_name", "t"),
            "Gemm with attribute(s) transB",
        ),
        (
            lambda m: node(m, "Gemm").attribute.append(helper.make_attribute("transB", 1)),
            "Attribute 'transB' appeared multiple times",
        ),
        (lambda m: node(m, "Relu").output.append("extra"), "Relu node"),
        (lambda m: m.graph.initializer.append(m.graph.initializer[0]), "the name 'fc.0.weight' given to more than one"),
        (
            lambda m: m.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 4), np.float32), "z")),
            "the name 'z' given to more than one tensor",
        ),  # a weight named like the input: which would onnxruntime use?
        (
            lambda m: m.graph.initializer.append(
                numpy_helper.from_array(np.zeros(128, np.float32), "/fc/fc.0/Gemm_output_0")
            ),
            "'/fc/fc.0/Gemm_output_0' given to more than one tensor",
        ),  # a weight that shadows a node's output
        (
            lambda m: m.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "spare")),
            "'spare', which no node uses",
        ),
        (lambda m: m.graph.node.insert(0, helper.make_node("Relu", ["z"], ["side"])), "'side', which no node uses"),
        (lambda m: node(m, "Sigmoid").__setattr__("op_type", "Relu"), "images that do not come out of a Sigmoid"),
        (lambda m: node(m, "Sigmoid").__setattr__("op_type", "Identity"), "operator Identity"),
        (drop_sigmoid, "images that do not come out of a Sigmoid"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_files_the_exporter_never_writes_are_refused(decoder, change, needle):
    refused(mutated(decoder, change), needle)


def test_an_encoder_is_checked_too(exports):
    encoder = exports["encoder", 17]
    refused(exports["decoder", 17], "is not an encoder", kind="encoder")
    refused(mutated(encoder, lambda m: set_meta(m, "latent_dim", "3")), "latent_dim '3'", "encoder")
    refused(
        mutated(encoder, lambda m: attribute(node(m, "Conv"), "group").__setattr__("i", 2)),
        "Conv with attributes",
        "encoder",
    )
    refused(
        mutated(encoder, lambda m: m.graph.output[1].type.tensor_type.shape.dim[1].__setattr__("dim_value", 5)),
        "mu (4,) and logvar (5,) differ",
        "encoder",
    )

    def constant_logvar(m):  # a fixed (1, 4) whatever the batch: refused, not found out after running
        m.graph.node.remove(next(n for n in m.graph.node if n.output[0] == "logvar"))
        for t in [t for t in m.graph.initializer if t.name.startswith("fc_logvar")]:
            m.graph.initializer.remove(t)
        m.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 4), np.float32), "logvar"))

    refused(mutated(encoder, constant_logvar), "differ in dimension 0", "encoder")


def test_an_unforeseen_failure_inside_the_checks_is_still_one_line(decoder, monkeypatch):
    def broken(m, kind):
        raise IndexError("a bug")

    monkeypatch.setattr(onnx_check, "_structure", broken)
    refused(decoder, "could not be checked (IndexError)")
    monkeypatch.setattr(onnx_check, "_signature", lambda m, kind: onnx_check._signature(m, kind))  # endless
    refused(decoder, "could not be checked (RecursionError)")


# ------------------------------------------------------------ graphs built here: what each bound is about


def build(nodes, inits, in_dims, out_dims, meta=None, kind="decoder", opset=17):
    """A model with the exporter's names and metadata around the given nodes."""
    names = onnx_check.SIGNATURE[kind]
    ins = [helper.make_tensor_value_info(names[0], TensorProto.FLOAT, ["batch", *in_dims])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *out_dims]) for n in names[1]]
    graph = helper.make_graph(nodes, "g", ins, outs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    latent, image = (in_dims[0], out_dims) if kind == "decoder" else (out_dims[0], in_dims)
    helper.set_model_props(
        model,
        {
            "format": f"beta-vae-{kind}",
            "format_version": "1",
            "latent_dim": str(latent),
            "image_shape": ",".join(map(str, image)),
            **(meta or {}),
        },
    )
    return model.SerializeToString()


def loop_body(shape):
    return helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Identity", ["x"], ["x_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, shape),
        ],
    )


def test_a_loop_with_an_enormous_trip_count_is_refused_before_it_runs():
    nodes = [helper.make_node("Loop", ["trips", "", "z"], ["images"], body=loop_body(None))]
    refused(build(nodes, {"trips": np.array(2**62, np.int64)}, [784], [1, 28, 28]), "operator Loop")


def test_expand_is_refused():
    nodes = [helper.make_node("Expand", ["z", "shape"], ["big"]), helper.make_node("Sigmoid", ["big"], ["images"])]
    refused(build(nodes, {"shape": np.array([10**8, 1, 28, 28], np.int64)}, [1], [1, 28, 28]), "operator Expand")


def test_a_node_whose_output_is_huge_is_refused():
    nodes = [
        helper.make_node("Gemm", ["z", "w"], ["h0"], transB=1),
        helper.make_node("Reshape", ["h0", "s"], ["h1"]),
        helper.make_node("Conv", ["h1", "k"], ["h2"]),
        helper.make_node("Sigmoid", ["h2"], ["images"]),
    ]
    inits = {
        "w": np.zeros((5 * 2**18, 1), np.float32),
        "s": np.array([-1, 5, 512, 512], np.int64),
        "k": np.ones((1, 5, 1, 1), np.float32),
    }
    data = build(nodes, inits, [1], [1, 512, 512])
    assert len(data) < onnx_check.MAX_BYTES  # 5 MiB of file ...
    refused(data, "Gemm making a tensor of shape (1310720,) per image")  # ... that would take 5 MiB per image


def upsampler(mid_channels, stride=4, base=16):
    """z (1) -> Gemm -> (1, base, base) -> ConvTranspose to (mid, ., .) -> ConvTranspose to (1, side, side)."""
    side = base * stride * stride
    nodes = [
        helper.make_node("Gemm", ["z", "w0"], ["h0"], transB=1),
        helper.make_node("Reshape", ["h0", "shape"], ["h1"]),
        helper.make_node(
            "ConvTranspose", ["h1", "w1"], ["h2"], kernel_shape=[stride, stride], strides=[stride, stride]
        ),
        helper.make_node(
            "ConvTranspose", ["h2", "w2"], ["h3"], kernel_shape=[stride, stride], strides=[stride, stride]
        ),
        helper.make_node("Sigmoid", ["h3"], ["images"]),
    ]
    inits = {
        "w0": np.ones((base * base, 1), np.float32),
        "shape": np.array([-1, 1, base, base], np.int64),
        "w1": np.full((1, mid_channels, stride, stride), 0.1, np.float32),
        "w2": np.full((mid_channels, 1, stride, stride), 0.1, np.float32),
    }
    return build(nodes, inits, [1], [1, side, side])


def test_too_much_arithmetic_per_image_is_refused():
    # ConvTranspose work is counted as onnxruntime does it: cin * cout * k^2 per input position
    macs = 256 + 256 + 16 * 16 * 256 * 16 + 64 * 64 * 256 * 16 + 256 * 256  # Gemm, Reshape, 2 x ConvTr., Sigmoid
    refused(upsampler(mid_channels=256), f"{macs:,} multiply-adds per image")


def test_a_wide_model_runs_in_chunks_that_keep_memory_within_the_budget():
    """Per image: the input, every node's output (nothing reused) and each ConvTranspose's column buffer."""
    model = onnx_check.check(upsampler(mid_channels=4), "decoder", "wide.onnx")
    outputs = 256 + 256 + 4 * 64 * 64 + 256 * 256 + 256 * 256  # Gemm, Reshape, ConvTranspose x 2, Sigmoid
    scratch = 16 * 16 * 4 * 4 * 4 + 64 * 64 * 1 * 4 * 4  # the column buffers: input positions * cout * k^2
    per_image = 4 * (1 + outputs + scratch)  # bytes
    assert model.chunk == onnx_check.MEMORY_BUDGET // per_image < onnx_check.MAX_CHUNK
    sess = onnx_check.session(model)
    sizes = []

    class Recording:
        def run(self, names, feeds, opts):
            sizes.append(len(feeds["z"]))
            return sess.run(names, feeds, opts)

    images = onnx_check.run(model, Recording(), np.ones((model.chunk + 3, 1), np.float32))[0]
    assert sizes == [model.chunk, 3] and images.shape == (model.chunk + 3, 1, 256, 256)


def test_an_encoders_input_counts_as_an_image_not_as_its_latent():
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["h0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["h0"], ["h1"]),
        helper.make_node("Gemm", ["h1", "wm"], ["mu"], transB=1),
        helper.make_node("Gemm", ["h1", "wv"], ["logvar"], transB=1),
    ]
    inits = {
        "w": np.full((64, 1, 3, 3), 0.01, np.float32),
        "wm": np.zeros((4, 64 * 784), np.float32),
        "wv": np.zeros((4, 64 * 784), np.float32),
    }
    model = onnx_check.check(build(nodes, inits, [1, 28, 28], [4], kind="encoder"), "encoder", "e.onnx")
    per_image = 784 + 64 * 784 + 784 * 9 + 64 * 784 + 4 + 4  # image, Conv, its buffer (cin k^2 a pixel), Flatten, out
    assert model.chunk == onnx_check.MEMORY_BUDGET // (4 * per_image)


def test_a_convtranspose_is_counted_on_its_input_not_on_its_cropped_output():
    """k = 7 with pads 6 crops a (1, 7, 7) input to (cout, 1, 1), but onnxruntime first fills a column buffer of
    cout * 49 values for each of the 49 input positions, and does the multiply-adds for all of them."""

    def cropped(cout):
        nodes = [
            helper.make_node("Gemm", ["z", "w0"], ["h0"], transB=1),
            helper.make_node("Reshape", ["h0", "s0"], ["h1"]),
            helper.make_node("ConvTranspose", ["h1", "w1"], ["h2"], kernel_shape=[7, 7], pads=[6, 6, 6, 6]),
            helper.make_node("Flatten", ["h2"], ["h3"]),
            helper.make_node("Gemm", ["h3", "w2"], ["h4"], transB=1),
            helper.make_node("Reshape", ["h4", "s1"], ["h5"]),
            helper.make_node("Sigmoid", ["h5"], ["images"]),
        ]
        inits = {
            "w0": np.ones((49, 1), np.float32),
            "s0": np.array([-1, 1, 7, 7], np.int64),
            "w1": np.full((1, cout, 7, 7), 1e-3, np.float32),
            "w2": np.ones((784, cout), np.float32),
            "s1": np.array([-1, 1, 28, 28], np.int64),
        }
        return build(nodes, inits, [1], [1, 28, 28])

    model = onnx_check.check(cropped(8), "decoder", "cropped.onnx")
    conv = 49 * 8 * 49  # 49 input positions x cin 1 x cout 8 x 7 x 7
    assert model.macs == 49 + 49 + conv + 8 + 784 * 8 + 784 + 784  # Gemm, Reshape, that, Flatten, Gemm, Reshape, Sig.
    refused(cropped(512), "ConvTranspose needing 1,229,312 scratch values per image")


def test_a_convolution_of_any_rank_is_counted_with_its_whole_kernel():
    """A 3-D kernel of 7 x 7 x 7: counting k_h * k_w only would let 7 times the arithmetic through."""
    nodes = [
        helper.make_node("Reshape", ["z", "s0"], ["h0"]),
        helper.make_node("Conv", ["h0", "w"], ["h1"], kernel_shape=[7, 7, 7], pads=[3] * 6),
        helper.make_node("Flatten", ["h1"], ["h2"]),
        helper.make_node("Gemm", ["h2", "w2"], ["h3"], transB=1),
        helper.make_node("Reshape", ["h3", "s1"], ["h4"]),
        helper.make_node("Sigmoid", ["h4"], ["images"]),
    ]
    inits = {
        "s0": np.array([-1, 1, 4, 4, 4], np.int64),
        "w": np.ones((8, 1, 7, 7, 7), np.float32),
        "w2": np.ones((784, 512), np.float32),
        "s1": np.array([-1, 1, 28, 28], np.int64),
    }
    model = onnx_check.check(build(nodes, inits, [64], [1, 28, 28]), "decoder", "3d.onnx")
    assert model.macs == 64 + 64 * 8 * 343 + 512 + 784 * 512 + 784 + 784


def hidden_batch(case):
    """Graphs that move the batch axis into a fixed one and back: with the batch left symbolic, shape inference
    calls those axes unk__0 and the checks counted only the fixed part, so onnxruntime held 4x (or with latent
    4096 and a wide Gemm, 16 GiB) more per image than counted."""
    back = [
        helper.make_node("Gemm", ["h2", "w2"], ["h3"], transB=1),
        helper.make_node("Reshape", ["h3", "s1"], ["h4"]),
        helper.make_node("Sigmoid", ["h4"], ["images"]),
    ]
    tail = {"w2": np.ones((784, 4 * 8), np.float32), "s1": np.array([-1, 1, 28, 28], np.int64)}
    if case == "reshape":  # (b, 4) -> (4b, 1) -> Gemm -> (4b, 8) -> (b, 32)
        nodes = [
            helper.make_node("Reshape", ["z", "s0"], ["h0"]),
            helper.make_node("Gemm", ["h0", "w"], ["h1"], transB=1),
            helper.make_node("Reshape", ["h1", "s2"], ["h2"]),
        ]
        return build(
            nodes + back,
            {
                "s0": np.array([-1, 1], np.int64),
                "w": np.ones((8, 1), np.float32),
                "s2": np.array([-1, 32], np.int64),
                **tail,
            },
            [4],
            [1, 28, 28],
        )
    if case == "broadcast":  # (b, 32) + (3, 32): 3 rows at batch 1
        nodes = [helper.make_node("Gemm", ["z", "w"], ["h1"], transB=1), helper.make_node("Add", ["h1", "c"], ["h2"])]
        return build(
            nodes + back,
            {"w": np.ones((32, 4), np.float32), "c": np.ones((3, 32), np.float32), **tail},
            [4],
            [1, 28, 28],
        )
    # Flatten at axis 2 of (b, 4, 8): (4b, 8)
    nodes = [
        helper.make_node("Reshape", ["z", "s0"], ["h0"]),
        helper.make_node("Flatten", ["h0"], ["h1"], axis=2),
        helper.make_node("Reshape", ["h1", "s2"], ["h2"]),
    ]
    return build(
        nodes + back,
        {"s0": np.array([-1, 4, 8], np.int64), "s2": np.array([-1, 32], np.int64), **tail},
        [32],
        [1, 28, 28],
    )


@pytest.mark.parametrize(
    "case, needle",
    [
        ("reshape", "Reshape making 'h0' of shape [4, 1] at batch 1, [8, 1] at batch 2"),
        ("broadcast", "Inferred shape and existing shape differ in dimension 0: (3) vs (1)"),
        ("flatten", "Flatten making 'h1' of shape [4, 8] at batch 1, [8, 8] at batch 2"),
    ],
)
def test_the_batch_axis_hidden_inside_another_is_refused(case, needle):
    data = hidden_batch(case)
    refused(data, needle)
    if case == "reshape":  # what onnxruntime would have done with it: 4 x the rows
        out = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"z": Z})[0]
        assert out.shape == (5, 1, 28, 28)  # the size it declares at the end, yet (20, 8) inside


def test_a_node_fed_only_by_constants_is_refused(decoder):
    """onnxruntime would compute it once, at load time, whatever its size: every node must depend on the input."""

    def constant_fed(m):
        value = numpy_helper.from_array(np.zeros((1, 4), np.float32))
        m.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=value))
        node(m, "Gemm").input[0] = "c"

    refused(mutated(decoder, constant_fed), "differ in dimension 0: (1) vs (2)")


def test_typed_float_data_of_the_right_count_passes_and_runs_the_same(decoder):
    def typed(count):
        def change(m):
            t = weight(m, "fc.0.bias")
            values = numpy_helper.to_array(t).tolist()
            t.ClearField("raw_data")
            t.float_data.extend(values[:count])

        return change

    m = same_as_checked(mutated(decoder, typed(128)))
    original = onnx_check.check(decoder, "decoder", "d.onnx")
    want = onnx_check.run(original, onnx_check.session(original), Z)[0]
    assert np.array_equal(onnx_check.run(m, onnx_check.session(m), Z)[0], want)  # the same numbers, typed
    refused(mutated(decoder, typed(127)), "weight fc.0.bias: a tensor of shape [128] holding 127")
    dims, values = onnx_check._tensor(TensorProto(dims=[2, 2], data_type=TensorProto.INT64, int64_data=range(4)), "")
    assert dims == [2, 2] and values.tolist() == [[0, 1], [2, 3]]
    with pytest.raises(onnx_check.Malformed, match="holding 3"):
        onnx_check._tensor(TensorProto(dims=[2, 2], data_type=TensorProto.INT64, int64_data=range(3)), "t")


def test_run_refuses_images_outside_0_1_and_nan(decoder):
    model = onnx_check.check(decoder, "decoder", "d.onnx")

    class Fake:
        def __init__(self, value):
            self.value = value

        def run(self, names, feeds, opts):
            return [np.full((len(feeds["z"]), 1, 28, 28), self.value, np.float32)]

    assert onnx_check.run(model, Fake(1.0), Z)[0].max() == 1.0
    for value in (1.5, -0.1, np.nan, np.inf):
        with pytest.raises(UsageError, match="NaN, infinite or out-of-range values"):
            onnx_check.run(model, Fake(value), Z)
    cropped = Fake(0.5)
    cropped.run = lambda names, feeds, opts: [np.zeros((len(feeds["z"]), 1, 28, 27), np.float32)]
    with pytest.raises(UsageError, match=r"returned shapes \[\(5, 1, 28, 27\)\], not \[\(5, 1, 28, 28\)\]"):
        onnx_check.run(model, cropped, Z)


# ------------------------------------------------------------ files that are not regular files


def test_load_refuses_what_is_not_a_regular_file_at_once(tmp_path, decoder):
    (tmp_path / "good.onnx").write_bytes(decoder)
    assert onnx_check.load(str(tmp_path / "good.onnx"), "decoder").latent == 4
    os.mkfifo(tmp_path / "fifo.onnx")
    os.symlink("/dev/zero", tmp_path / "zero.onnx")
    (tmp_path / "big.onnx").write_bytes(decoder + bytes(onnx_check.MAX_BYTES))
    os.mkdir(tmp_path / "folder.onnx")
    for name, needles in (
        ("fifo.onnx", ["is not a regular file"]),
        ("zero.onnx", ["is not a regular file"]),
        ("folder.onnx", ["is not a regular file", "cannot be read (Is a directory)"]),
        ("big.onnx", ["is larger than 8,388,608 bytes"]),
        ("missing.onnx", ["no file at"]),
    ):
        path = str(tmp_path / name)
        t = time.perf_counter()
        with pytest.raises(UsageError) as e:
            onnx_check.load(path, "decoder")
        assert time.perf_counter() - t < 2  # wall time: a blocking open would hang
        message = str(e.value)
        assert any(n in message for n in needles) and "\n" not in message, message
        assert message.startswith((path, f"no file at {path}: "))


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


def with_extra(data, path, payload):
    extra = {path: payload}
    out = encode(onnx.load_from_string(data), extra)
    assert not extra  # the path exists
    return out


def test_the_hand_writer_writes_what_protobuf_writes(exports):
    for kind in ("decoder", "encoder"):
        assert encode(onnx.load_from_string(exports[kind, 17]), {}) == exports[kind, 17]


def hidden_graph(case):
    """A GraphProto to put beside the exporter's: protobuf (the checks' and onnxruntime's) merges the two."""
    if case == "loop":  # spins 2**40 times, its output used by nobody
        return helper.make_graph(
            [helper.make_node("Loop", ["trips", "", "x0"], ["spin"], body=loop_body([]))],
            "",
            [],
            [],
            [
                numpy_helper.from_array(np.array(2**40, np.int64), "trips"),
                numpy_helper.from_array(np.array(0.0, np.float32), "x0"),
            ],
        )
    if case == "expand":  # 1e8 floats from z
        return helper.make_graph(
            [helper.make_node("Expand", ["z", "shape"], ["big"])],
            "",
            [],
            [],
            [numpy_helper.from_array(np.array([10**8, 1, 4], np.int64), "shape")],
        )
    if case == "external":  # the bytes of secret.txt in the working folder, read as a weight
        leak = TensorProto(name="leak", data_type=TensorProto.UINT8, dims=[6], data_location=TensorProto.EXTERNAL)
        leak.external_data.add(key="location", value="secret.txt")
        return helper.make_graph([helper.make_node("Identity", ["leak"], ["leak2"])], "", [], [], [leak])
    value = numpy_helper.from_array(np.array([-1000.0], np.float32))  # a checked weight replaced: black images
    return helper.make_graph([helper.make_node("Constant", [], ["deconv.5.bias"], value=value)], "", [], [])


@pytest.mark.parametrize(
    "case, needle",
    [
        ("loop", "operator Loop, which the exporter never writes"),
        ("expand", "operator Expand, which the exporter never writes"),
        ("external", "weight leak: a tensor stored outside the file"),
        ("override", "the name 'deconv.5.bias' given to more than one tensor"),
    ],
)
@pytest.mark.parametrize("first", [True, False])
def test_a_second_graph_record_is_merged_and_checked_as_onnxruntime_merges_it(decoder, case, needle, first):
    hidden = ld(7, hidden_graph(case).SerializeToString())
    evil = hidden + decoder if first else decoder + hidden
    merged, good = onnx.load_from_string(evil).graph, onnx.load_from_string(decoder).graph
    assert len(merged.node) + len(merged.initializer) > len(good.node) + len(good.initializer)  # both graphs' parts
    refused(evil, needle)


FLOAT_2 = key(2, 5) + struct.pack("<f", 2.0)


@pytest.mark.parametrize(
    "path, extra, needle",
    [
        # a singular number or text twice: the last copy, in both parsers
        ("", vi(1, 8), None),
        (".opset_import[0]", vi(2, 17), None),
        (".metadata_props[0]", ld(2, b"beta-vae-decoder"), None),
        (".graph", ld(2, b"g"), None),
        (".graph.input[0].type.tensor_type", vi(1, 1), None),
        (".graph.input[0].type.tensor_type.shape.dim[1]", vi(1, 4), None),
        (".graph.node[0].attribute[0]", FLOAT_2, None),  # Gemm's alpha is 2 for the checks and for onnxruntime
        (".graph.node[0]", ld(4, b"Relu"), "Relu with attribute(s) alpha"),
        (".graph.node[0].attribute[0]", vi(20, 2), "Gemm with attribute(s) alpha of type 2"),
        (".graph.node[0].attribute[2]", vi(3, 0), "Dimension mismatch"),  # transB 0
        (".graph.node[4].attribute[0].t", vi(2, 1), "Constant /Constant_output_0: a tensor of shape [4] holding 32"),
        (".graph.initializer[0]", ld(9, b""), "weight fc.0.weight: a tensor of shape [128, 4] holding 0"),
        (".graph.initializer[0]", ld(8, b"fc.2.weight"), "the name 'fc.2.weight' given to more than one tensor"),
        (".graph.input[0].type.tensor_type.shape.dim[0]", vi(1, 4), "named batch axis"),  # a oneof: the size wins
        # a singular message twice: merged, in both parsers
        (".graph.input[0]", ld(2, b""), None),
        (".graph.input[0].type", ld(1, b""), None),
        (".graph.input[0].type.tensor_type", ld(2, b""), None),
        (".graph.node[4].attribute[0]", ld(5, b""), None),
        # fields the exporter never writes, known to the schema
        (".graph.node[0]", ld(6, b"doc"), None),
        (".graph.node[0].attribute[0]", ld(13, b"doc"), None),
        (".graph.initializer[0]", vi(14, 0), None),
        (
            ".graph.initializer[0]",
            ld(13, ld(1, b"location") + ld(2, b"secret.txt")),
            "a tensor stored outside the file",
        ),
        (".graph.initializer[0]", vi(14, 1), "a tensor stored outside the file"),
        (".graph.node[0].attribute[0]", vi(3, 1), "type field and data field mismatch in attribute alpha"),
        # fields the schema does not know (a newer onnxruntime's might), of the wrong wire type, or no enum value
        ("", ld(1, b"8"), "fields the onnx schema does not know"),
        (".graph.node[0]", ld(99, b"x"), "fields the onnx schema does not know"),
        (".graph.initializer[0]", vi(14, 5), "fields the onnx schema does not know"),
        (".graph.node[0].attribute[0]", key(2, 1) + bytes(8), "fields the onnx schema does not know"),
        (".graph.node[0].attribute[0]", key(2, 3), "a field of wire type 3"),
    ],
    ids=lambda x: repr(x)[:30] if isinstance(x, bytes) else x,
)
def test_fields_twice_or_unusual_mean_the_same_to_the_checks_and_to_onnxruntime(decoder, path, extra, needle):
    """The old reader parsed protobuf by hand, so it refused every field written twice: its reading could differ from
    onnxruntime's. The checks now read the file with protobuf, as onnxruntime does, and protobuf resolves such bytes
    one way only (the last copy of a number, copies of a message merged, unknown fields kept aside). So a file is
    either refused for what it means, or passes and onnxruntime computes what was checked."""
    evil = with_extra(decoder, path, extra)
    if needle:
        refused(evil, needle)
    else:
        same_as_checked(evil)


def test_long_or_huge_dims_are_refused_before_any_arithmetic(decoder):
    """Declared tensors are never allocated: their dims are looked at first, and the fields are counted before the
    parse (1 MiB holding 112,000 dims of 2**62: math.prod over them took an old checker 59 s)."""
    t = time.process_time()
    huge = ld(1, varint(2**62) * 28) * 4000 + vi(2, 1) + ld(8, b"w")
    refused(with_extra(decoder, ".graph", ld(5, huge)), "more than 20,000 protobuf fields")
    refused(
        with_extra(decoder, ".graph", ld(5, ld(1, varint(2**62)) + vi(2, 1) + ld(8, b"w"))),
        "weight w: a tensor of type 1 and shape [4611686018427387904]",
    )
    refused(
        with_extra(decoder, ".graph", ld(5, ld(1, varint(2**30) * 8) + vi(2, 1) + ld(8, b"w"))),
        f"weight w: a tensor of shape {[2**30] * 8} holding 0",
    )
    refused(
        with_extra(decoder, ".graph", ld(5, vi(1, 1) * 9 + vi(2, 1) + ld(8, b"w"))),
        "weight w: a tensor of type 1 and shape [1, 1, 1, 1, 1, 1, 1, 1]",
    )
    refused(
        with_extra(decoder, ".graph.input[0].type.tensor_type.shape", ld(1, vi(1, 1)) * 7),
        "z has shape ['batch', 4, 1, 1, 1, 1, 1, 1]",
    )
    nested = ld(1, vi(1, 1))
    for _ in range(60):  # sequence of sequence of ...: protobuf's depth limit
        nested = ld(4, ld(1, nested))
    refused(with_extra(decoder, ".graph.input[0]", ld(2, nested)), "Exceeded upb_DecodeOptions_MaxDepth")
    assert time.process_time() - t < 1


PADDED = {  # 8 MiB files, each refused in milliseconds, before the parse that would take up to 100 bytes a byte
    "nodes": lambda: vi(1, 8) + ld(7, ld(1, b"") * (4 * 2**20 - 8)),
    "attributes": lambda: vi(1, 8) + ld(7, ld(1, ld(5, b"") * (4 * 2**20 - 16))),
    "metadata": lambda: vi(1, 8) + ld(14, b"") * (4 * 2**20 - 4),
    "packed dims": lambda: vi(1, 8) + ld(7, ld(5, ld(1, varint(1) * (8 * 2**20 - 64)))),
    "unknown fields": lambda: vi(1, 8) + ld(7, ld(1, ld(4, b"Relu") + vi(15, 0) * (4 * 2**20 - 16))),
}


def test_big_files_padded_with_fields_are_refused_in_milliseconds():
    for make in PADDED.values():
        data = make()
        assert 7 * 2**20 < len(data) <= onnx_check.MAX_BYTES
        gc.collect()  # a collection of this long-lived process's heap would otherwise land in the timed refusal
        t = time.process_time()  # this process's CPU time: another test's process on the same cores does not count
        refused(data, "more than 20,000 protobuf fields; the exporter writes about 350")
        assert time.process_time() - t < 0.5


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak resident size from /proc")
def test_big_files_padded_with_fields_are_refused_in_little_memory(tmp_path):
    """Measured in a fresh process, whose peak resident size (VmHWM) starts anew at exec; getrusage's would start
    from this process's. Parsed, 8 MiB of empty attributes took 800 MiB."""
    for name, make in PADDED.items():
        (tmp_path / name).write_bytes(make())
    script = (
        f"import sys; sys.path.insert(0, {ROOT!r})\n"
        "from plumbing import onnx_check\n"
        "def peak():\n"
        "    return int(next(x for x in open('/proc/self/status') if x.startswith('VmHWM')).split()[1])\n"
        "onnx_check._onnx('onnx_ml_pb2'); onnx_check._onnx('onnx_cpp2py_export')\n"
        "files = [open(p, 'rb').read() for p in sys.argv[1:]]\n"
        "before = peak()\n"
        "for data in files:\n"
        "    try:\n"
        "        onnx_check.check(data, 'decoder', 'x')\n"
        "    except onnx_check.UsageError:\n"
        "        pass\n"
        "print((peak() - before) // 1024)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *[str(tmp_path / n) for n in PADDED]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 64, f"{proc.stdout} MiB"


def test_a_node_with_thousands_of_outputs_is_refused_in_linear_time(decoder):
    """The names defined twice were once found with list.count in a loop: 19,000 outputs took 6.7 s."""
    evil = mutated(decoder, lambda m: node(m, "Relu").output.extend(f"o{i}" for i in range(19_000)))
    t = time.process_time()
    refused(evil, "Relu node")
    assert time.process_time() - t < 0.5


@pytest.mark.parametrize(
    "key_, value, needle",
    [
        ("beta", "\n" * 300_000, "metadata beta '\\n\\n"),
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
        (
            "ort_config",
            '{"session_options": {"enable_profiling": true}}',
            "metadata key 'ort_config', which the exporter",
        ),
    ],
    ids=lambda value: repr(value)[:24],
)
def test_metadata_of_any_length_or_form_is_refused_in_one_line(decoder, key_, value, needle):
    message = refused(mutated(decoder, lambda m: set_meta(m, key_, value)), needle)
    assert len(message) < 500


def test_metadata_written_twice_is_refused(decoder):
    refused(mutated(decoder, lambda m: m.metadata_props.add(key="beta", value="2.0")), "metadata beta '2.0'")
