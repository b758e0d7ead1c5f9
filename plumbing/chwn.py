"""The model's layers with the batch innermost: the compiled CPU training step (training.py) and the IWAE bound's
decoding (metrics.py) run on them.

Activations are (channels, height, width, batch). Every 3x3 stride-2 convolution is then one GEMM whose long side is
pixels x batch, which MKL writes fast, and every im2col and col2im gather moves whole rows of batch floats, which
inductor vectorises (with channels innermost the one-channel layers' gathers stayed scalar). docs/speed.md measures it.

forward(P, B, x, eps) computes what vae.BetaVAE.forward(x, eps=eps) computes in train mode, from the model's parameter
and buffer dicts (so torch.func can differentiate it, and BatchNorm's running statistics are updated in place);
decoder_logits(model, z) what the decoder computes in eval mode. They are written for vae.py's layers; training.py
compares forward with the model's own before using it, and tests/test_train_step.py both.
"""

import torch
import torch.nn.functional as F

import vae

_SHIFT = {0: 0, 1: 0, 2: 1}  # kernel tap -> how far back (in input pixels) it lands at stride 2
_TAPS = {0: (0, 2), 1: (1,)}  # output parity -> the kernel taps that reach it


def _im2col(xp, ho, wo):
    """xp (C, Hp, Wp, B) -> (C, 9, Ho, Wo, B): the 3x3 windows at stride 2."""
    taps = [xp[:, ky : ky + 2 * ho - 1 : 2, kx : kx + 2 * wo - 1 : 2] for ky in range(3) for kx in range(3)]
    return torch.stack(taps, dim=1)


def _col2im(cols, hp, wp):
    """The adjoint of _im2col, (C, 9, H, W, B) -> (C, Hp, Wp, B): a gather per output phase, never a scatter."""
    c, _, h, w, b = cols.shape
    rows = []
    for a in (0, 1):
        phases = []
        for p in (0, 1):
            parts = []
            for ky in _TAPS[a]:
                for kx in _TAPS[p]:
                    dy, dx = _SHIFT[ky], _SHIFT[kx]
                    parts.append(F.pad(cols[:, 3 * ky + kx], (0, 0, dx, 1 - dx, dy, 1 - dy)))  # (C, H+1, W+1, B)
            phases.append(sum(parts))
        rows.append(torch.stack(phases, dim=3).reshape(c, h + 1, 2 * w + 2, b))  # columns 2n + p
    return torch.stack(rows, dim=2).reshape(c, 2 * h + 2, 2 * w + 2, b)[:, :hp, :wp]  # rows 2m + a


class _Im2col(torch.autograd.Function):  # each one's backward is the other's forward
    forward = staticmethod(_im2col)
    setup_context = staticmethod(lambda ctx, inputs, output: setattr(ctx, "hw", tuple(inputs[0].shape[1:3])))
    backward = staticmethod(lambda ctx, g: (_col2im(g, *ctx.hw), None, None))


class _Col2im(torch.autograd.Function):
    forward = staticmethod(_col2im)
    setup_context = staticmethod(lambda ctx, inputs, output: setattr(ctx, "hw", tuple(inputs[0].shape[2:4])))
    backward = staticmethod(lambda ctx, g: (_im2col(g, *ctx.hw), None, None))


def conv(x, w, b, pad):
    """nn.Conv2d(k=3, stride=2, padding=pad) on CHWN x; w (Co, C, 3, 3) as the module stores it."""
    c, h, wd, n = x.shape
    ho, wo = (h + 2 * pad - 3) // 2 + 1, (wd + 2 * pad - 3) // 2 + 1
    xp = F.pad(x, (0, 0, pad, pad, pad, pad)) if pad else x
    cols = _Im2col.apply(xp, ho, wo)
    return torch.addmm(b[:, None], w.reshape(w.shape[0], 9 * c), cols.reshape(9 * c, ho * wo * n)).view(-1, ho, wo, n)


def conv_transpose(x, w, b, pad, out_pad):
    """nn.ConvTranspose2d(k=3, stride=2, padding=pad, output_padding=out_pad) on CHWN x; w (C, Co, 3, 3)."""
    c, h, wd, n = x.shape
    co = w.shape[1]
    cols = (w.permute(1, 2, 3, 0).reshape(9 * co, c) @ x.reshape(c, h * wd * n)).view(co, 9, h, wd, n)
    full = _Col2im.apply(cols, 2 * h + 2, 2 * wd + 2)
    ho, wo = 2 * h + 1 - 2 * pad + out_pad, 2 * wd + 1 - 2 * pad + out_pad
    return full[:, pad : pad + ho, pad : pad + wo] + b[:, None, None, None]


def batch_norm(h, P, B, name, train, momentum=0.1, eps=1e-5):
    """nn.BatchNorm2d, written pointwise in h's layout (F.batch_norm on a permuted view made inductor copy the map into
    NCHW and back). In train mode the running statistics are updated in place, as the module does."""
    per_channel, n, (mean, var) = (-1, 1, 1, 1), h[0].numel(), (B[name + ".running_mean"], B[name + ".running_var"])
    if train:
        mean = h.mean(dim=(1, 2, 3))
        var = (h - mean.view(per_channel)).pow(2).mean(dim=(1, 2, 3))
        B[name + ".running_mean"].lerp_(mean.detach(), momentum)
        B[name + ".running_var"].lerp_(var.detach() * (n / (n - 1)), momentum)
        B[name + ".num_batches_tracked"].add_(1)
    scale = torch.rsqrt(var + eps) * P[name + ".weight"]
    return (h - mean.view(per_channel)) * scale.view(per_channel) + P[name + ".bias"].view(per_channel)


def encode(P, B, x, train=True):
    """(mu, logvar), each (latent, N), of x (784, N) in [-1, 1]."""
    n = x.shape[-1]
    layer = lambda name, *pads: (P[name + ".weight"], P[name + ".bias"], *pads)
    h = torch.relu(conv(x.reshape(*vae.IMAGE_SHAPE, n), *layer("encoder.features.0", 1)))  # (8, 14, 14, N)
    h = torch.relu(conv(h, *layer("encoder.features.2", 1)))  # (16, 7, 7, N)
    h = batch_norm(h, P, B, "encoder.features.4", train)
    h = torch.relu(conv(h, *layer("encoder.features.5", 0))).reshape(-1, n)  # (288, N)
    h = torch.addmm(P["encoder.features.8.bias"][:, None], P["encoder.features.8.weight"], h)  # (128, N)
    (wm, bm), (wl, bl) = layer("encoder.fc_mu"), layer("encoder.fc_logvar")
    return torch.addmm(torch.cat([bm, bl])[:, None], torch.cat([wm, wl]), h).chunk(2)  # both heads: one GEMM


def decode(P, B, z, train=True):
    """The decoder's logits (784, N) of z (latent, N)."""
    n = z.shape[-1]
    for name in ("decoder.fc.0", "decoder.fc.2"):
        z = torch.relu(torch.addmm(P[name + ".bias"][:, None], P[name + ".weight"], z))
    layer = lambda name, *pads: (P[name + ".weight"], P[name + ".bias"], *pads)
    h = torch.relu(conv_transpose(z.view(*vae.Decoder.unflat, n), *layer("decoder.deconv.0", 0, 0)))  # (16, 7, 7, N)
    h = batch_norm(h, P, B, "decoder.deconv.2", train)
    h = torch.relu(conv_transpose(h, *layer("decoder.deconv.3", 1, 1)))  # (8, 14, 14, N)
    return conv_transpose(h, *layer("decoder.deconv.5", 1, 1)).reshape(-1, n)  # (1, 28, 28, N) as (784, N)


def forward(P, B, x, eps):
    """(logits (N, 784), mu, logvar) of vae.BetaVAE in train mode for x (784, N) in [-1, 1], as transposed views."""
    mu, logvar = (t.t() for t in encode(P, B, x))
    return decode(P, B, vae.reparameterize(mu, logvar, eps).t()).t(), mu, logvar


def decoder_logits(model, z, chunk=512):
    """model.decoder.logits(z), z (N, latent) -> (N, 1, 28, 28): for an eval-mode decoder on a CPU with gradients off,
    through the layers above, in chunks whose activations stay in cache (docs/speed.md); otherwise the module's."""
    if z.device.type != "cpu" or model.decoder.training or torch.is_grad_enabled() or not len(z):
        return model.decoder.logits(z)
    P, B = dict(model.named_parameters()), dict(model.named_buffers())
    parts = [decode(P, B, z[i : i + chunk].t(), train=False).t() for i in range(0, len(z), chunk)]
    return torch.cat(parts).view(len(z), *vae.IMAGE_SHAPE)
