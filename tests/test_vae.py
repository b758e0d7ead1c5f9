"""The model matches the seed's architecture; the loss matches a hand computation; checkpoints round-trip."""

import math

import pytest
import torch
import torch.nn as nn

import vae


def shapes_through(seq, x):
    out = []
    for layer in seq:
        x = layer(x)
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Flatten, nn.Linear)):
            out.append((type(layer).__name__, tuple(x.shape[1:])))
    return out, x


def test_encoder_layers_match_seed_table():
    enc = vae.Encoder(10)
    shapes, h = shapes_through(enc.features, torch.zeros(5, 1, 28, 28))
    assert shapes == [
        ("Conv2d", (8, 14, 14)),
        ("Conv2d", (16, 7, 7)),
        ("Conv2d", (32, 3, 3)),
        ("Flatten", (288,)),
        ("Linear", (128,)),
    ]
    mu, logvar = enc(torch.zeros(5, 1, 28, 28))
    assert mu.shape == logvar.shape == (5, 10)
    assert [type(m).__name__ for m in enc.features].count("BatchNorm2d") == 1


def test_decoder_layers_match_seed_table():
    dec = vae.Decoder(10)
    shapes, h = shapes_through(dec.fc, torch.zeros(5, 10))
    assert shapes == [("Linear", (128,)), ("Linear", (288,))]
    shapes, out = shapes_through(dec.deconv, h.view(-1, 32, 3, 3))
    assert shapes == [
        ("ConvTranspose2d", (16, 7, 7)),
        ("ConvTranspose2d", (8, 14, 14)),
        ("ConvTranspose2d", (1, 28, 28)),
    ]
    img = dec(torch.randn(5, 10) * 10)
    assert img.shape == (5, 1, 28, 28) and img.min() >= 0 and img.max() <= 1


def test_parameter_count_matches_seed():
    # By hand from SEED.md's table, latent 10. Encoder: convs 80 + 1,168 + 4,640, BN 32, Linear 288->128 36,992,
    # mu and logvar 1,290 each = 45,492. Decoder: Linear 1,408 + 37,152, deconvs 4,624 + 1,160 + 73, BN 32 = 44,449.
    model = vae.BetaVAE(vae.VAEConfig())
    assert vae.param_count(model.encoder) == 45_492
    assert vae.param_count(model.decoder) == 44_449
    assert vae.param_count(model) == 89_941


def test_loss_matches_hand_computation():
    cfg = vae.VAEConfig(latent_dim=2, beta=3.0)
    logits = torch.tensor([[0.5, -1.0, 2.0]]).view(1, 1, 1, 3)
    target = torch.tensor([[1.0, 0.0, 0.25]]).view(1, 1, 1, 3)
    mu, logvar = torch.tensor([[0.3, -1.2]]), torch.tensor([[0.1, -0.5]])
    t = vae.vae_loss(logits, target, mu, logvar, cfg)
    recon = 0.0
    for l, x in zip([0.5, -1.0, 2.0], [1.0, 0.0, 0.25]):
        p = 1 / (1 + math.exp(-l))
        recon -= x * math.log(p) + (1 - x) * math.log(1 - p)
    kl_dims = [0.5 * (m * m + math.exp(lv) - 1 - lv) for m, lv in zip([0.3, -1.2], [0.1, -0.5])]
    assert t.recon.item() == pytest.approx(recon, rel=1e-6)
    assert t.kl_per_dim[0].tolist() == pytest.approx(kl_dims, rel=1e-6)
    assert t.kl.item() == pytest.approx(sum(kl_dims), rel=1e-6)
    assert t.total.item() == pytest.approx(recon + 3.0 * sum(kl_dims), rel=1e-6)


def test_bce_with_logits_is_the_seeds_bce_on_probabilities():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, dtype=torch.float64, generator=g) * 5
    t = torch.rand(x.shape, dtype=torch.float64, generator=g)
    want = torch.nn.functional.binary_cross_entropy(torch.sigmoid(x), t, reduction="none")
    assert torch.allclose(vae.bce_with_logits(x, t), want, rtol=1e-6, atol=1e-9)


def test_kl_is_zero_at_the_prior():
    cfg = vae.VAEConfig(latent_dim=4)
    z = torch.zeros(3, 4)
    t = vae.vae_loss(torch.zeros(3, 1, 28, 28), torch.full((3, 1, 28, 28), 0.5), z, z, cfg)
    assert torch.all(t.kl == 0) and torch.all(t.kl_per_dim == 0)
    assert t.recon[0].item() == pytest.approx(784 * math.log(2), rel=1e-6)


def test_gradients_reach_encoder_through_reparameterization():
    torch.manual_seed(0)
    model = vae.BetaVAE(vae.VAEConfig(latent_dim=3, beta=0.0))  # β=0: only the reconstruction path is left
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    logits, mu, logvar = model(x)
    vae.vae_loss(logits, (x + 1) / 2, mu, logvar, model.config).total.sum().backward()
    for name in ("fc_mu", "fc_logvar"):
        g = getattr(model.encoder, name).weight.grad
        assert g is not None and g.abs().sum() > 0, name
    assert model.encoder.features[0].weight.grad.abs().sum() > 0


def test_capacity_objective_follows_its_schedule():
    cfg = vae.VAEConfig(latent_dim=2, objective="capacity", gamma=10.0, capacity_max=20.0, capacity_steps=100)
    assert [vae.capacity_at(s, cfg) for s in (0, 25, 50, 100, 500)] == [0.0, 5.0, 10.0, 20.0, 20.0]
    mu, logvar = torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2)  # KL = 2 nats
    logits, target = torch.zeros(1, 1, 28, 28), torch.zeros(1, 1, 28, 28)
    for step, c in ((0, 0.0), (50, 10.0), (1000, 20.0)):
        t = vae.vae_loss(logits, target, mu, logvar, cfg, step=step)
        assert t.total.item() == pytest.approx(t.recon.item() + 10.0 * abs(2.0 - c), rel=1e-6)


def test_config_rejects_bad_values():
    for bad in (dict(latent_dim=0), dict(beta=-1.0), dict(objective="nope")):
        with pytest.raises(ValueError):
            vae.VAEConfig(**bad)


def test_checkpoint_round_trip_rebuilds_same_model(tmp_path):
    torch.manual_seed(1)
    model = vae.BetaVAE(vae.VAEConfig(latent_dim=6, beta=2.5))
    model.encoder.features[4].running_mean.fill_(0.7)  # buffers travel too
    opt = torch.optim.Adam(model.parameters())
    path = tmp_path / "c.pt"
    record = {"recon": 250.0, "kl": 6.0, "total": 274.0, "kl_per_dim": [1.0] * 6}
    history = [{"epoch": 3, "step": 30, "train": record, "test": record, "img_per_s": 1000.0}]
    vae.save_checkpoint(path, model, opt, epoch=3, seed=7, train_args={"lr": 1e-3}, metrics=history)
    loaded, ckpt = vae.load_checkpoint(path)
    assert loaded.config == model.config and ckpt["epoch"] == 3 and ckpt["seed"] == 7
    assert ckpt["metrics"] == history
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    z = torch.randn(5, 6)
    assert torch.equal(model.eval().decode(z), loaded.decode(z))
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"
