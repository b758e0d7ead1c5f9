"""The compiled training step keeps the eager step's results and leaves plain, loadable checkpoints."""
import shutil

import pytest
import torch

import data
import nhwc_forward
import train_step
import vae

needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="torch.compile on the CPU needs a C++ compiler")


def run(config, compile, batches, seed=0):
    torch.manual_seed(seed)
    model = vae.BetaVAE(config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = train_step.make_train_step(model, opt, config, compile=compile)
    torch.manual_seed(seed + 1)
    out = [step(x, t, i) for i, (x, t) in enumerate(batches)]
    return torch.stack(out), model, opt


def batches(tiny_data, sizes):
    d = data.load(tiny_data, "train", "cpu")
    out, start = [], 0
    for n in sizes:
        x, t = data.DeviceData.scale(d.images[start:start + n])
        out.append((x, t))
        start += n
    return out


def test_eager_step_returns_the_loss_terms(tiny_data):
    config = vae.VAEConfig(latent_dim=3, beta=2.0)
    stats, _, _ = run(config, False, batches(tiny_data, [16]))
    recon, kl, total, per_dim = stats[0, 0], stats[0, 1], stats[0, 2], stats[0, 3:]
    assert per_dim.shape == (3,) and torch.allclose(per_dim.sum(), kl, rtol=1e-5)
    assert torch.allclose(recon + 2.0 * kl, total, rtol=1e-5)


@needs_compiler
@pytest.mark.parametrize("objective", ["beta", "capacity"])
def test_compiled_step_matches_eager(tiny_data, objective):
    # 6 full batches then a short one (the eager fallback inside the compiled step); capacity C changes every step.
    config = vae.VAEConfig(latent_dim=4, objective=objective, gamma=10.0, capacity_max=5.0, capacity_steps=4)
    bs = batches(tiny_data, [32] * 6 + [7])
    eager, m_eager, o_eager = run(config, False, bs)
    compiled, m_comp, o_comp = run(config, True, bs)
    # recon and the objective agree to float rounding; KL terms are a few nats, where Adam's first, sign-like steps
    # amplify rounding differences a little more
    assert torch.allclose(compiled[:, [0, 2]], eager[:, [0, 2]], rtol=1e-4), (compiled[:, 2], eager[:, 2])
    assert torch.allclose(compiled[:, [1]], eager[:, [1]], rtol=0.05, atol=0.02), (compiled[:, 1], eager[:, 1])
    assert m_comp.state_dict().keys() == m_eager.state_dict().keys()
    torch.manual_seed(0)
    init = vae.BetaVAE(config).state_dict()
    for k, v in m_eager.state_dict().items():
        if v.is_floating_point():  # the two runs end far closer to each other than to where they started
            apart = (m_comp.state_dict()[k] - v).abs().mean()
            moved = (v - init[k]).abs().mean()
            assert moved > 0 and apart < 0.1 * moved, (k, apart.item(), moved.item())
        else:
            assert torch.equal(m_comp.state_dict()[k], v), k
    assert o_comp.state_dict()["state"].keys() == o_eager.state_dict()["state"].keys()



@needs_compiler
def test_compiled_step_follows_replaced_tensors(tiny_data):
    # After its first call the graph is called without dynamo's guards. Replaced optimizer state (as --resume does)
    # must be updated in place; a weight stored with other strides, or a changed β, must be computed as such (through
    # dynamo, which recompiles or reuses an older graph), never with what the latest graph was compiled for.
    import copy
    config = vae.VAEConfig(latent_dim=4)
    bs = batches(tiny_data, [32] * 8)
    torch.manual_seed(0)
    model = vae.BetaVAE(config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = train_step.make_train_step(model, opt, config, compile=True)
    for x, t in bs[:2]:
        step(x, t, 0)
    direct_calls = []
    fn = step.direct["fn"]
    step.direct["fn"] = lambda *a: direct_calls.append(1) or fn(*a)
    step(*bs[2], 0)
    assert direct_calls == [1]                                       # the guard-free path is the one taken
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))          # new state tensors
    first = next(iter(model.parameters()))
    old_m = opt.state[first]["exp_avg"].clone()
    step(*bs[3], 0)
    assert all(opt.state[p]["step"].item() == 4 for p in model.parameters())
    assert not torch.equal(opt.state[first]["exp_avg"], old_m)
    config.beta = 2.0                                                # a constant baked into the graph changes
    stats = step(*bs[7], 0)
    assert torch.allclose(stats[2], stats[0] + 2.0 * stats[1], rtol=1e-5)

    def matches_eager(batch):
        twin = copy.deepcopy(model)
        twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
        twin_opt.load_state_dict(opt.state_dict())
        eager = train_step.make_train_step(twin, twin_opt, copy.copy(config), compile=False)
        torch.manual_seed(5)
        got = step(*batch, 0)
        torch.manual_seed(5)
        want = eager(*batch, 0)
        return torch.allclose(got[:3], want[:3], rtol=1e-4)

    w = model.decoder.fc[2].weight                                   # (288, 128): store it column-major
    with torch.no_grad():
        w.data = w.detach().t().contiguous().t()
    assert matches_eager(bs[4])                                      # a new graph for this layout
    with torch.no_grad():
        w.data = w.detach().contiguous()                             # row-major again: dynamo reuses the first graph
    assert matches_eager(bs[5]) and matches_eager(bs[6])


def test_nhwc_forward_is_the_module_forward():
    torch.manual_seed(0)
    model = vae.BetaVAE(vae.VAEConfig(latent_dim=6))
    assert nhwc_forward.layers_as_expected(model)
    x, eps = torch.rand(16, 1, 28, 28) * 2 - 1, torch.randn(16, 6)
    P = dict(model.named_parameters())
    B = {k: v.clone() for k, v in model.named_buffers()}
    logits, mu, logvar = nhwc_forward.forward(P, B, model, x, eps)
    mu0, logvar0 = model.encoder(x)                       # train mode: batch statistics, running stats updated
    ref = model.decoder.logits(mu0 + eps * torch.exp(0.5 * logvar0))
    assert torch.allclose(mu, mu0, atol=1e-5) and torch.allclose(logvar, logvar0, atol=1e-5)
    assert torch.allclose(logits, nhwc_forward.to_phases(ref), atol=1e-4)
    for k, v in model.named_buffers():
        assert torch.allclose(B[k], v, atol=1e-6), k
    img = torch.arange(2 * 784.0).view(2, 1, 28, 28)      # to_phases only reorders pixels, image by image
    assert torch.equal(nhwc_forward.to_phases(img).flatten(1).sort(1).values, img.flatten(1))
    assert nhwc_forward.to_phases(img)[0, 1, 0, 0] == img[0, 0, 0, 1]   # phase 2a+c holds pixel (2m+a, 2n+c)


def test_pixel_linear_gradients():
    a = torch.randn(64, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(nhwc_forward._PixelLinear.apply, (a, w))
    assert torch.allclose(nhwc_forward._PixelLinear.apply(a, w), a @ w)
