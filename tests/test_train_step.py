"""The training steps: the fused CPU step and the plain compiled step keep the eager step's results; the fused step's
contract is checked when it is built and at each epoch; a failing compiler falls back to eager; the batch-innermost
formulation is the module's forward and backward."""

import copy

import pytest
import torch
import torch.nn as nn

import data
import training
import vae
from plumbing import chwn

needs_compiler = pytest.mark.skipif(not training.has_cxx(), reason="torch.compile on the CPU needs a C++ compiler")


def batches(tiny_data, sizes):
    d = data.load(tiny_data, "train", "cpu")
    out, start = [], 0
    for n in sizes:
        out.append(data.DeviceData.scale(d.images[start : start + n]))
        start += n
    return out


def fresh(config, seed=0, **adam):
    torch.manual_seed(seed)
    model = vae.BetaVAE(config)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, **adam)


def twin_of(model, opt, config):
    """An eager copy of (model, optimizer) in their current state."""
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch keeps the very tensors otherwise
    return twin, twin_opt, training.make_train_step(twin, twin_opt, config, "off")


def check_step(step, model, opt, config, batch, i=0):
    """One step of `step` against one eager step from the same state and noise: the same loss terms and, up to float
    rounding, the same parameters, BatchNorm statistics and Adam state afterwards."""
    twin, twin_opt, eager = twin_of(model, opt, config)
    torch.manual_seed(i)
    got = step(*batch, i)
    torch.manual_seed(i)
    want = eager(*batch, i)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (i, got, want)
    for (k, v), w in zip(model.state_dict().items(), twin.state_dict().values()):
        # Adam's early steps are sign-like where a gradient is ~0: a rounding difference can move one weight by up to
        # 2·lr, but on average the two agree to float rounding
        assert v.shape == w.shape and (v.double() - w.double()).abs().mean() < 2e-6, k
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(opt.state[p]["step"], twin_opt.state[q]["step"])
        m, n = opt.state[p]["exp_avg"], twin_opt.state[q]["exp_avg"]
        assert (m - n).abs().mean() <= 1e-3 * n.abs().mean() + 1e-7  # sums with cancellation
    return got


def test_eager_step_returns_the_loss_terms(tiny_data):
    config = vae.VAEConfig(latent_dim=3, beta=2.0)
    model, opt = fresh(config)
    stats = training.make_train_step(model, opt, config)(*batches(tiny_data, [16])[0], 0)
    recon, kl, total, per_dim = stats[0], stats[1], stats[2], stats[3:]
    assert per_dim.shape == (3,) and torch.allclose(per_dim.sum(), kl, rtol=1e-5)
    assert torch.allclose(recon + 2.0 * kl, total, rtol=1e-5)


@needs_compiler
def test_the_fused_step_trains_as_eager_does(tiny_data):
    config = vae.VAEConfig(latent_dim=4)
    bs = batches(tiny_data, [32] * 7 + [7])
    model, opt = fresh(config)
    step = training.make_train_step(model, opt, config, "on")
    assert isinstance(step, training.FusedStep)  # the batch-innermost formulation on a CPU
    for i, b in enumerate(bs[:4] + bs[7:]):  # 4 full batches, then a short one (the eager step)
        check_step(step, model, opt, config, b, i)
    assert all(opt.state[p]["step"].item() == 5 for p in model.parameters())
    with torch.compiler.set_stance("fail_on_recompile"):  # lr and β are inputs of the graph, read at every step
        opt.param_groups[0]["lr"] = 5e-3  # as a learning-rate schedule would
        check_step(step, model, opt, config, bs[4], 5)
        for beta, b in ((2.0, bs[5]), (4.0, bs[6])):  # β changes and changes back
            config.beta = beta
            got = check_step(step, model, opt, config, b, 6)
            assert torch.allclose(got[2], got[0] + beta * got[1], rtol=1e-5)
    step.check()  # nothing was replaced
    plain_model = vae.BetaVAE(config)  # a plain model loads what it trained
    plain_model.load_state_dict(model.state_dict())
    plain_opt = torch.optim.Adam(plain_model.parameters())
    plain_opt.load_state_dict(opt.state_dict())


@needs_compiler
def test_state_replaced_after_the_step_was_built_is_refused_at_the_next_epoch(tiny_data):
    config = vae.VAEConfig(latent_dim=4)
    model, opt = fresh(config)
    step = training.make_train_step(model, opt, config, "on")
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state tensors, as a late --resume would bring
    with pytest.raises(RuntimeError, match="build the step again"):
        step.check()
    model, opt = fresh(config)
    step = training.make_train_step(model, opt, config, "on")
    model.decoder.fc[0] = nn.Linear(4, 128)  # a new layer the step has never seen
    train = data.load(tiny_data, "train", "cpu")
    s = {"seed": 0, "batch_size": 64, "epochs": 1, "latent_dim": 4}
    with pytest.raises(RuntimeError, match="given new tensors"):
        training.epoch_loop(step, train, s, 0, {"step": 0}, progress=False)


@pytest.mark.parametrize(
    "change, note",
    [
        (lambda m, o: m.encoder.features.__setitem__(1, nn.GELU()), "computes something else"),
        (lambda m, o: m.decoder.deconv[5].__setattr__("output_padding", (0, 0)), "not vae.py's layout"),
        (lambda m, o: m.decoder.deconv[2].__setattr__("momentum", 0.5), "computes something else"),
        (lambda m, o: m.decoder.fc[0].weight.requires_grad_(False), "frozen"),
        (lambda m, o: o.param_groups[0].__setitem__("amsgrad", True), "plain single-group Adam"),
        (
            lambda m, o: o.state[m.decoder.fc[0].weight].update(
                step=torch.tensor(3.0), exp_avg=torch.zeros(128, 4), exp_avg_sq=torch.zeros(128, 4)
            ),
            "step counts differ",
        ),
    ],
)
def test_what_the_fused_step_does_not_reproduce_trains_with_the_plain_step_and_says_why(change, note):
    config = vae.VAEConfig(latent_dim=4)
    model, opt = fresh(config)
    change(model, opt)
    notes = []
    step = training.make_train_step(model, opt, config, "on", log=notes.append)
    assert not isinstance(step, training.FusedStep) and getattr(step, "compiled", False)
    assert len(notes) == 1 and note in notes[0] and "plain compiled step" in notes[0], notes


def test_an_optimizer_of_other_parameters_is_no_pair():
    config = vae.VAEConfig(latent_dim=3)
    model, _ = fresh(config)
    with pytest.raises(ValueError, match="does not hold this model's parameters"):
        training.make_train_step(model, torch.optim.Adam(vae.BetaVAE(config).parameters()), config, "on")


@needs_compiler
def test_the_plain_compiled_step_trains_as_eager_does_with_the_capacity_objective(tiny_data):
    config = vae.VAEConfig(latent_dim=4, objective="capacity", gamma=10.0, capacity_max=5.0, capacity_steps=4)
    model, opt = fresh(config)
    step = training.make_train_step(model, opt, config, "plain")
    for i, b in enumerate(batches(tiny_data, [32] * 4 + [7])):  # C changes every step; the last batch is short
        check_step(step, model, opt, config, b, i)


def broken_compile(fn, **kwargs):
    def run(fp, fm, fv, steps, buffers, *rest):
        with torch.no_grad():
            fp.add_(1.0)  # fails after changing state, as a crash inside a compiled call could
            steps.add_(1)
            buffers[0].add_(1.0)
        raise RuntimeError("C++ compile error: no such header")

    return run


@pytest.mark.parametrize("mode", ["on", "plain"])
def test_a_failing_compiler_falls_back_to_eager_with_one_warning(tiny_data, monkeypatch, mode):
    monkeypatch.setattr(torch, "compile", broken_compile)
    config = vae.VAEConfig(latent_dim=3)
    bs = batches(tiny_data, [16] * 3)
    model, opt = fresh(config)
    notes = []
    step = training.make_train_step(model, opt, config, mode, log=notes.append)
    twin, twin_opt, eager = twin_of(model, opt, config)
    for i, b in enumerate(bs):
        torch.manual_seed(i)
        got = step(*b, i)
        torch.manual_seed(i)
        assert torch.equal(got, eager(*b, i))  # exactly the eager step: the state was restored
    assert len(notes) == 1 and notes[0].startswith("warning: compiling the training step failed"), notes
    for v, w in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(v, w)


def test_the_batch_innermost_forward_and_gradients_are_the_modules():
    torch.manual_seed(0)
    model = vae.BetaVAE(vae.VAEConfig(latent_dim=6)).double()
    other = copy.deepcopy(model)
    x = torch.rand(16, 1, 28, 28, dtype=torch.float64) * 2 - 1
    target, eps = (x + 1) / 2, torch.randn(16, 6, dtype=torch.float64)
    logits, mu, logvar = chwn.forward(dict(model.named_parameters()), dict(model.named_buffers()),
                                      x.reshape(16, -1).t().contiguous(), eps)  # fmt: skip
    ref, mu0, logvar0 = other(x, eps=eps)  # train mode: batch statistics, running statistics updated
    assert torch.allclose(mu, mu0, atol=1e-12) and torch.allclose(logvar, logvar0, atol=1e-12)
    assert torch.allclose(logits, ref.flatten(1), atol=1e-12)
    for (k, v), w in zip(model.named_buffers(), other.buffers()):
        assert torch.allclose(v, w, rtol=0, atol=1e-12), k
    vae.vae_loss(logits, target.flatten(1), mu, logvar, model.config).total.mean().backward()
    vae.vae_loss(ref, target, mu0, logvar0, model.config).total.mean().backward()
    for (k, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10, rtol=1e-8), k


def test_auto_compiles_only_on_a_cpu():
    many = training.COMPILE_AUTO_MIN_IMAGES
    assert training.want_compile("auto", torch.device("cpu"), many) == training.has_cxx()
    assert not training.want_compile("auto", torch.device("cpu"), many - 1)
    for device in ("cuda", "mps"):  # never by default on a GPU
        assert not training.want_compile("auto", torch.device(device), 10 * many)
    assert training.want_compile("on", torch.device("cuda"), 1)


def test_the_batch_innermost_decoder_is_the_modules_in_eval_mode():
    torch.manual_seed(0)
    model = vae.BetaVAE(vae.VAEConfig(latent_dim=5)).double()
    bn = model.decoder.deconv[2]
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    z = torch.randn(1100, 5, dtype=torch.float64)  # three chunks of 512, the last short
    model.eval()
    with torch.no_grad():
        assert torch.allclose(chwn.decoder_logits(model, z), model.decoder.logits(z), atol=1e-12)
        assert [chwn.decoder_logits(model, z[:n]).shape for n in (0, 1)] == [(0, 1, 28, 28), (1, 1, 28, 28)]
        model.train()  # batch statistics: the module's own path, not running statistics
        assert torch.allclose(chwn.decoder_logits(model, z), model.decoder.logits(z), atol=1e-12)
    assert chwn.decoder_logits(model.eval(), z[:3].requires_grad_()).requires_grad  # with gradients: the module's
