"""The training step: the compiled step keeps the eager step's results, follows replaced state and changed settings,
falls back to eager when compiling fails, and the CHWN formulation is the module's forward and backward."""
import copy

import pytest
import torch
import torch.nn as nn

import chwn_forward
import data
import training
import vae

needs_compiler = pytest.mark.skipif(not training.has_cxx(), reason="torch.compile on the CPU needs a C++ compiler")


def batches(tiny_data, sizes):
    d = data.load(tiny_data, "train", "cpu")
    out, start = [], 0
    for n in sizes:
        out.append(data.DeviceData.scale(d.images[start:start + n]))
        start += n
    return out


def fresh(config, seed=0):
    torch.manual_seed(seed)
    model = vae.BetaVAE(config)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def twin_of(model, opt, config):
    """An eager copy of (model, optimizer) in their current state."""
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))   # torch keeps the very tensors otherwise
    return twin, twin_opt, training.make_train_step(twin, twin_opt, config, compile=False)


def check_step(step, model, opt, config, batch, i=0, moments=True):
    """One step of `step` against one eager step from the same state with the same noise: the same loss terms and,
    up to float rounding, the same parameters, BatchNorm statistics and Adam state afterwards."""
    twin, twin_opt, eager = twin_of(model, opt, config)
    torch.manual_seed(i)
    got = step(*batch, i)
    torch.manual_seed(i)
    want = eager(*batch, i)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (i, got, want)
    for (k, v), w in zip(model.state_dict().items(), twin.state_dict().values()):
        # Adam's early steps are sign-like where a gradient is ~0, so a rounding difference can move one weight by up
        # to 2·lr; on average the two agree to float rounding
        assert v.shape == w.shape and (v.double() - w.double()).abs().mean() < 2e-6, k
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(opt.state[p]["step"], twin_opt.state[q]["step"])
        assert torch.allclose(opt.state[p]["exp_avg_sq"], twin_opt.state[q]["exp_avg_sq"], rtol=2e-2, atol=1e-8) \
            or not moments
        m, n = opt.state[p]["exp_avg"], twin_opt.state[q]["exp_avg"]
        assert (m - n).abs().mean() <= 1e-3 * n.abs().mean() + 1e-7 or not moments   # sums with cancellation
    return got


def test_eager_step_returns_the_loss_terms(tiny_data):
    config = vae.VAEConfig(latent_dim=3, beta=2.0)
    model, opt = fresh(config)
    stats = training.make_train_step(model, opt, config)(*batches(tiny_data, [16])[0], 0)
    recon, kl, total, per_dim = stats[0], stats[1], stats[2], stats[3:]
    assert per_dim.shape == (3,) and torch.allclose(per_dim.sum(), kl, rtol=1e-5)
    assert torch.allclose(recon + 2.0 * kl, total, rtol=1e-5)


@needs_compiler
def test_compiled_step_matches_eager_and_follows_changes(tiny_data):
    config = vae.VAEConfig(latent_dim=4)
    bs = batches(tiny_data, [32] * 7 + [7])
    model, opt = fresh(config)
    step = training.make_train_step(model, opt, config, compile=True)
    assert step.built["plan"] is not None                                     # the CHWN formulation on a CPU
    for i, b in enumerate(bs[:4] + bs[7:]):                           # 4 full batches, then a short one (eager)
        check_step(step, model, opt, config, b, i)
    assert all(opt.state[p]["step"].item() == 5 for p in model.parameters())
    fresh_model = vae.BetaVAE(config)                                 # a plain model loads what it trained
    fresh_model.load_state_dict(model.state_dict())

    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["lr"] = 1e-2
    opt.load_state_dict(saved)                                       # new state tensors and a new lr, as --resume
    check_step(step, model, opt, config, bs[4])
    assert all(opt.state[p]["step"].item() == 6 for p in model.parameters())
    opt.param_groups[0]["lr"] = 5e-3                                 # as a learning-rate schedule would
    check_step(step, model, opt, config, bs[3])

    # β 4 -> 2 -> 4: a constant of the graph changes and changes back; each step must use the β of that moment
    for beta, b in ((2.0, bs[5]), (4.0, bs[6])):
        config.beta = beta
        got = check_step(step, model, opt, config, b)
        assert torch.allclose(got[2], got[0] + beta * got[1], rtol=1e-5)


@needs_compiler
def test_a_step_never_runs_a_graph_traced_for_other_layer_settings(tiny_data):
    # dynamo caches graphs per code object, and the step drops its guards on the plan: two steps in one process, a
    # BatchNorm momentum changed after compiling, and a BatchNorm left in eval mode must each train as eager does
    config = vae.VAEConfig(latent_dim=4)
    bs = batches(tiny_data, [32] * 4)
    first, first_opt = fresh(config)
    check_step(training.make_train_step(first, first_opt, config, compile=True), first, first_opt, config, bs[0])
    model, opt = fresh(config)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.9
    notes = []
    step = training.make_train_step(model, opt, config, compile=True, log=notes.append)
    check_step(step, model, opt, config, bs[1], 1)
    # changed after the step was compiled: what follows must be what eager gives, loss terms, weights and running
    # statistics (Adam's moments not elementwise: a few entries of near-zero gradients round apart after 3 steps)
    model.encoder.features[4].momentum = 0.5
    check_step(step, model, opt, config, bs[2], 2, moments=False)
    model.decoder.deconv[2].eval()                                  # one BatchNorm on running statistics
    check_step(step, model, opt, config, bs[3], 3, moments=False)
    assert step.built["plan"] is None and "another mode" in notes[-1]   # the module formulation, said once
    assert len(notes) == 1


def test_the_plan_notices_a_swapped_layer_and_changed_convolution_settings():
    model = vae.BetaVAE(vae.VAEConfig(latent_dim=4))
    plan = chwn_forward.Plan(model)
    assert plan.matches(model)
    model.encoder.features[1] = nn.ReLU()            # the same kind of layer, but another one: rebuilt from it
    assert not plan.matches(model)
    plan = chwn_forward.Plan(model)
    model.encoder.features[0].padding_mode = "reflect"   # the same shapes, other numbers
    assert not plan.matches(model)
    model.encoder.features[0].padding_mode = "zeros"
    assert plan.matches(model)
    model.decoder.deconv[5].output_padding = (0, 0)
    assert not plan.matches(model)


@needs_compiler
def test_a_swapped_activation_and_a_frozen_parameter_are_trained_as_eager_trains_them(tiny_data):
    config = vae.VAEConfig(latent_dim=4)
    bs = batches(tiny_data, [32, 32, 7, 32, 32])
    model, opt = fresh(config)
    notes = []
    step = training.make_train_step(model, opt, config, compile=True, log=notes.append)
    check_step(step, model, opt, config, bs[0])
    model.encoder.features[1] = nn.Tanh()            # no tensor changes: only the plan's layer snapshot sees it
    check_step(step, model, opt, config, bs[1], 1, moments=False)
    assert step.built["plan"] is None and "Tanh" in notes[-1]
    frozen = model.decoder.fc[0].weight
    frozen.requires_grad_(False)                     # eager training leaves it, and its Adam state, as they are
    check_step(step, model, opt, config, bs[2], 2, moments=False)   # a short batch: eager whatever is frozen
    frozen.requires_grad_(True)                      # its Adam step count now lags the others': eager's own update
    check_step(step, model, opt, config, bs[3], 3, moments=False)
    assert "step counts differ" in notes[-1]
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    check_step(step, model, opt, config, bs[4], 4, moments=False)
    assert torch.equal(frozen, before) and "frozen" in notes[-1]


def test_a_replaced_layer_is_trained_as_eager_trains_it(tiny_data):
    config = vae.VAEConfig(latent_dim=4)
    model, opt = fresh(config)
    step = training.make_train_step(model, opt, config, compile=True)
    b = batches(tiny_data, [32])[0]
    step(*b, 0)
    model.decoder.fc[0] = nn.Linear(4, 128)        # new parameters the optimizer does not hold: the eager step
    twin, twin_opt, eager = twin_of(model, opt, config)
    torch.manual_seed(1)
    got = step(*b, 1)
    torch.manual_seed(1)
    assert torch.equal(got, eager(*b, 1))


@needs_compiler
def test_the_step_notices_a_tensor_assigned_to_its_model_and_only_that(tiny_data):
    config = vae.VAEConfig(latent_dim=4)
    bs = batches(tiny_data, [32] * 3)
    model, opt = fresh(config)
    step = training.make_train_step(model, opt, config, compile=True)
    check_step(step, model, opt, config, bs[0], 0)
    compiled = step.built["compiled"]
    vae.BetaVAE(config)                          # modules assigned elsewhere: this model is intact, nothing rebuilt
    assert step.flat.intact()
    check_step(step, model, opt, config, bs[1], 1)
    assert step.built["compiled"] is compiled
    bn = model.decoder.deconv[2]
    bn.running_mean = torch.full_like(bn.running_mean, 0.5)   # a new buffer: the step must update this one
    assert not step.flat.intact()
    check_step(step, model, opt, config, bs[2], 2)
    assert step.built["compiled"] is not compiled
    # removals too (none of them goes through torch.nn's registration hooks, so a shortcut on those would miss them)
    for remove in (lambda m: setattr(m.decoder.deconv[0], "bias", None), lambda m: m.decoder.deconv.pop(2),
                   lambda m: delattr(m.decoder.deconv[2], "running_var"), lambda m: delattr(m.encoder.fc_mu, "bias")):
        changed = copy.deepcopy(model)
        changed_step = training.make_train_step(changed, torch.optim.Adam(changed.parameters()), config, compile=True)
        assert changed_step.flat.intact()
        remove(changed)
        assert not changed_step.flat.intact()


@needs_compiler
def test_compiled_test_pass_is_the_modules(tiny_data):
    # capacity objective: C(step) enters the total; 2,300 images: full test batches and a short one (eager)
    config = vae.VAEConfig(latent_dim=4, objective="capacity", gamma=10.0, capacity_max=5.0, capacity_steps=4)
    model, opt = fresh(config)
    step = training.make_train_step(model, opt, config, compile=True)
    for i, b in enumerate(batches(tiny_data, [32] * 3)):             # BatchNorm's running statistics move off init
        step(*b, i)
    small = data.load(tiny_data, "test", "cpu")
    test = data.DeviceData(small.images.repeat(18, 1, 1, 1)[:2300], small.labels.repeat(18)[:2300], "cpu")
    sizes = []

    def fast(x, *rest):
        sizes.append((x.shape[0], step.test_sums(x, *rest) is not None))
        return step.test_sums(x, *rest)

    got = training.test_metrics(model, test, config, seed=5, step_idx=2, fast=fast)
    want = training.test_metrics(model, test, config, seed=5, step_idx=2)
    full, rest = divmod(2300, training.TEST_BATCH)
    assert rest and sizes == [(training.TEST_BATCH, True)] * full + [(rest, False)]
    assert model.training and torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-4)
    assert got != training.test_metrics(model, test, config, seed=6, step_idx=2, fast=fast)   # the noise is used


def test_a_failing_test_pass_compile_is_the_eager_pass_with_one_warning(tiny_data, monkeypatch):
    def broken(*args):
        raise RuntimeError("C++ compile error: no such header")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    config = vae.VAEConfig(latent_dim=3)
    model, opt = fresh(config)
    notes = []
    step = training.make_train_step(model, opt, config, compile=True, log=notes.append)
    test = data.load(tiny_data, "test", "cpu")
    want = training.test_metrics(model, test, config, seed=1, step_idx=0)
    for _ in range(2):   # no training step yet: the test pass fails on its own, warns once, then stays uncompiled
        assert training.test_metrics(model, test, config, seed=1, step_idx=0, fast=step.test_sums) == want
    assert len(notes) == 1 and notes[0].startswith("warning: compiling the test pass failed")


@needs_compiler
def test_module_formulation_matches_eager_with_the_capacity_objective(tiny_data):
    # the formulation CUDA uses (the module's own layers through functional_call), run here on the CPU
    config = vae.VAEConfig(latent_dim=4, objective="capacity", gamma=10.0, capacity_max=5.0, capacity_steps=4)
    model, opt = fresh(config)
    step = training.make_train_step(model, opt, config, compile=True, formulation="modules")
    assert step.built["plan"] is None
    for i, b in enumerate(batches(tiny_data, [32] * 4)):             # C changes every step
        check_step(step, model, opt, config, b, i)


def broken_compile(fn, **kwargs):
    def run(static, fp, fm, fv, steps, buffers, *rest):
        with torch.no_grad():
            fp.add_(1.0)   # fails after changing state, as a crash inside a compiled call could
            steps.add_(1)
            buffers[0].add_(1.0)
        raise RuntimeError("C++ compile error: no such header")
    return run


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(tiny_data, monkeypatch):
    monkeypatch.setattr(torch, "compile", broken_compile)
    config = vae.VAEConfig(latent_dim=3)
    bs = batches(tiny_data, [16] * 3)
    model, opt = fresh(config)
    notes = []
    step = training.make_train_step(model, opt, config, compile=True, log=notes.append)
    twin, twin_opt, eager = twin_of(model, opt, config)
    for i, b in enumerate(bs):
        torch.manual_seed(i)
        got = step(*b, i)
        torch.manual_seed(i)
        assert torch.equal(got, eager(*b, i))                       # exactly the eager step: state was restored
    assert len(notes) == 1 and notes[0].startswith("warning: compiling the training step failed") and \
        "eager step" in notes[0]
    for v, w in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(v, w)


def test_a_compiler_failing_after_a_rebuild_falls_back_too(tiny_data, monkeypatch):
    compilers = [lambda fn, **kwargs: fn]   # the first build: the step's own function, run uncompiled
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compilers[-1](fn, **kwargs))
    config = vae.VAEConfig(latent_dim=3)
    bs = batches(tiny_data, [16] * 2)
    model, opt = fresh(config)
    notes = []
    step = training.make_train_step(model, opt, config, compile=True, log=notes.append)
    step(*bs[0], 0)
    compilers.append(broken_compile)
    model.encoder.features[1] = nn.ReLU()   # another layer: the step rebuilds and compiles again
    twin, twin_opt, eager = twin_of(model, opt, config)
    torch.manual_seed(1)
    got = step(*bs[1], 1)
    torch.manual_seed(1)
    assert torch.equal(got, eager(*bs[1], 1))   # the state was restored, and the eager step took the batch
    assert len(notes) == 1 and notes[0].startswith("warning: compiling the training step failed")
    for v, w in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(v, w)


def test_chwn_forward_and_gradients_are_the_modules():
    torch.manual_seed(0)
    model = vae.BetaVAE(vae.VAEConfig(latent_dim=6)).double()
    other = copy.deepcopy(model)
    x = torch.rand(16, 1, 28, 28, dtype=torch.float64) * 2 - 1
    target, eps = (x + 1) / 2, torch.randn(16, 6, dtype=torch.float64)
    plan = chwn_forward.Plan(model)
    xt, tt = plan.inputs(x, (x + 1) / 2)
    logits, mu, logvar = plan.forward(dict(model.named_parameters()), dict(model.named_buffers()), xt, eps)
    ref, mu0, logvar0 = other(x, eps=eps)                   # train mode: batch statistics, running stats updated
    assert torch.allclose(mu, mu0, atol=1e-12) and torch.allclose(logvar, logvar0, atol=1e-12)
    assert torch.allclose(logits, ref.flatten(1), atol=1e-12)
    for (k, v), w in zip(model.named_buffers(), other.buffers()):
        assert torch.allclose(v, w, rtol=0, atol=1e-12), k
    config = model.config
    vae.vae_loss(logits, plan.target(tt), mu, logvar, config).total.mean().backward()
    vae.vae_loss(ref, target, mu0, logvar0, config).total.mean().backward()
    for (k, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10, rtol=1e-8), k


def test_an_architecture_the_rewrite_does_not_reproduce_is_named_and_trained_with_the_modules(tiny_data):
    config = vae.VAEConfig(latent_dim=3)
    model, opt = fresh(config)
    model.encoder.features[1] = nn.GELU()
    with pytest.raises(chwn_forward.Unsupported, match="encoder.features.1 is a GELU"):
        chwn_forward.Plan(model)
    model.encoder.features[1] = nn.ReLU()
    model.decoder.deconv.append(nn.ReLU())
    with pytest.raises(chwn_forward.Unsupported, match="end with a ConvTranspose2d"):
        chwn_forward.Plan(model)
    del model.decoder.deconv[len(model.decoder.deconv) - 1]
    model.decoder.deconv[3] = nn.ConvTranspose2d(16, 8, 5, stride=2, padding=2, output_padding=1)
    with pytest.raises(chwn_forward.Unsupported, match="decoder.deconv.3 is not a 3x3"):
        chwn_forward.Plan(model)
    notes = []
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = training.make_train_step(model, opt, config, compile=True, log=notes.append)
    assert step.built["plan"] is None and len(notes) == 1 and "module's own layers" in notes[0] and "deconv.3" in notes[0]


def test_auto_compiles_only_on_a_cpu():
    many = training.COMPILE_AUTO_MIN_IMAGES
    assert training.want_compile("auto", torch.device("cpu"), many) == training.has_cxx()
    assert not training.want_compile("auto", torch.device("cpu"), many - 1)
    for device in ("cuda", "mps"):   # the compiled step has not run on a GPU: never by default there
        assert not training.want_compile("auto", torch.device(device), 10 * many)
    assert training.want_compile("on", torch.device("cuda"), 1)
