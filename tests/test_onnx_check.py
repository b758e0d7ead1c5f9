"""onnx_check.py: what export_onnx.py writes passes at every opset; hostile files are refused before anything runs."""
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import export_onnx
import onnx_check
import vae
from cli import UsageError


@pytest.fixture(scope="module")
def exports(tiny_checkpoint):
    """{(kind, opset): ONNX bytes} straight from the exporter, without the parity run."""
    model, ckpt = vae.load_checkpoint(tiny_checkpoint["path"])
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
     "attribute auto_pad of type 3"),
    (lambda m: node(m, "Relu").attribute.append(helper.make_attribute("alpha", 0.1)), "Relu with attribute(s) alpha"),
    (lambda m: node(m, "Sigmoid").__setattr__("op_type", "Tile"), "operator Tile, which the exporter never writes"),
    (lambda m: node(m, "Sigmoid").__setattr__("domain", "com.evil"), "operator com.evil.Sigmoid"),
    (lambda m: m.graph.initializer[0].__setattr__("data_location", TensorProto.EXTERNAL), "outside the file"),
    (lambda m: m.graph.initializer[0].dims.__setitem__(0, 129), "a tensor of shape [129, 4] holding 2048 bytes"),
    (lambda m: m.functions.add(name="f", domain="x"), "local functions"),
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
    refused(upsampler(mid_channels=64), "71,303,424 multiply-adds per image")


def test_a_wide_model_runs_in_chunks_that_keep_memory_within_the_budget():
    model = onnx_check.check(upsampler(mid_channels=4), "decoder", "wide.onnx")
    per_image = 4 * (1 + 256 + 256 + 4 * 64 * 64 + 256 * 256)  # bytes of every tensor of one image
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
    refused(mutated(exports["encoder", 17], lambda m: node(m, "Conv").attribute.extend(
        [helper.make_attribute("group", 2)])), "Conv with attributes", "encoder")
