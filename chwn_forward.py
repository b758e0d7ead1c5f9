"""The model's forward pass rewritten for the compiled CPU step (compiled_step.py), layer for layer, batch innermost.

Plan(model) walks the model's layers and turns each into an op on CHWN tensors (channels, height, width, batch);
Plan.forward(P, Bf, xt, eps), with (xt, tt) = Plan.inputs(x, target), then computes what model(x, eps=eps) computes,
from the parameter and buffer dicts P and Bf (views of the module's own tensors, so torch.func can differentiate it
and BatchNorm's running statistics are updated in place). A layer or setting it does not reproduce raises Unsupported with the reason, and the training step
then uses the module's own layers (and says so in one log line).

Why batch innermost (measured side by side with channels innermost, in one process: the compiled step 1.4x faster):
  * every 3x3 stride-2 convolution is an explicit GEMM whose long side is pixels x batch: Conv2d is
    W (Co, 9C) @ cols (9C, Ho·Wo·B), ConvTranspose2d is W' (9Co, C) @ x (C, H·W·B) followed by col2im. MKL writes
    these long (channels, pixels) rows fast, and the first and last layers, with one channel, need no special case;
  * im2col (strided slices) and col2im (a gather per output phase, never a scatter) move whole rows of B floats, so
    inductor vectorises every one of them; channels innermost left the one-channel layers' gathers scalar. Im2col
    and Col2im are an adjoint autograd.Function pair, the backward of one being the forward of the other;
  * BatchNorm reduces contiguous (H·W·B) rows, and the linear layers run as W @ h on (features, batch).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import vae

# ------------------------------------------------------------------------------------------ CHWN convolutions

_SHIFT = {0: 0, 1: 0, 2: 1}     # kernel tap -> how far back (in input pixels) it lands for stride 2
_TAPS = {0: (0, 2), 1: (1,)}    # output parity -> kernel taps that reach it


def _im2col(xp, Ho, Wo):
    """xp (C,Hp,Wp,B) -> (C,9,Ho,Wo,B): the 3x3 windows at stride 2 (tap index 3*ky+kx)."""
    taps = [xp[:, ky:ky + 2 * (Ho - 1) + 1:2, kx:kx + 2 * (Wo - 1) + 1:2] for ky in range(3) for kx in range(3)]
    return torch.stack(taps, dim=1)


def _col2im(cols, Hp, Wp):
    """Adjoint of _im2col: cols (C,9,H,W,B) -> (C,Hp,Wp,B) with out[2i+ky, 2j+kx] += cols[3ky+kx, i, j], Hp <= 2H+2.

    Written as a gather per output phase (row parity a, column parity c), never as a scatter."""
    C, _, H, W, B = cols.shape
    rows = []
    for a in (0, 1):
        phases = []
        for c in (0, 1):
            acc = None
            for ky in _TAPS[a]:
                for kx in _TAPS[c]:
                    dy, dx = _SHIFT[ky], _SHIFT[kx]
                    t = F.pad(cols[:, 3 * ky + kx], (0, 0, dx, 1 - dx, dy, 1 - dy))   # (C, H+1, W+1, B)
                    acc = t if acc is None else acc + t
            phases.append(acc)
        rows.append(torch.stack(phases, dim=3).reshape(C, H + 1, 2 * W + 2, B))   # columns 2n+c
    return torch.stack(rows, dim=2).reshape(C, 2 * H + 2, 2 * W + 2, B)[:, :Hp, :Wp]   # rows 2m+a


class _Im2col(torch.autograd.Function):
    @staticmethod
    def forward(xp, Ho, Wo):
        return _im2col(xp, Ho, Wo)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.hw = tuple(inputs[0].shape[1:3])

    @staticmethod
    def backward(ctx, g):
        return _col2im(g, *ctx.hw), None, None


class _Col2im(torch.autograd.Function):
    @staticmethod
    def forward(cols, Hp, Wp):
        return _col2im(cols, Hp, Wp)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.hw = tuple(inputs[0].shape[2:4])

    @staticmethod
    def backward(ctx, g):
        return _im2col(g, *ctx.hw), None, None


def _conv_s2(x, w, b, p):
    """nn.Conv2d(k=3, stride=2, padding=p) on CHWN x; w (Co,C,3,3) as stored by the module."""
    C, H, W, B = x.shape
    Ho, Wo = (H + 2 * p - 3) // 2 + 1, (W + 2 * p - 3) // 2 + 1
    xp = F.pad(x, (0, 0, p, p, p, p)) if p else x
    cols = _Im2col.apply(xp, Ho, Wo)                                     # (C,9,Ho,Wo,B)
    y = torch.addmm(b[:, None], w.reshape(w.shape[0], 9 * C), cols.reshape(9 * C, Ho * Wo * B))
    return y.view(-1, Ho, Wo, B)


def _convt_s2(x, w, b, p, op):
    """nn.ConvTranspose2d(k=3, stride=2, padding=p, output_padding=op) on CHWN x; w (C,Co,3,3)."""
    C, H, W, B = x.shape
    Co = w.shape[1]
    cols = (w.permute(1, 2, 3, 0).reshape(9 * Co, C) @ x.reshape(C, H * W * B)).view(Co, 9, H, W, B)
    z = _Col2im.apply(cols, 2 * H + 2, 2 * W + 2)                        # (Co, 2H+2, 2W+2, B)
    Ho, Wo = 2 * H + 1 - 2 * p + op, 2 * W + 1 - 2 * p + op
    return z[:, p:p + Ho, p:p + Wo] + b[:, None, None, None]


def _batch_norm(h, w, b, rm, rv, nbt, momentum, eps, training):
    """nn.BatchNorm2d on CHWN h, written out so that it stays pointwise in h's layout (F.batch_norm on a permuted view
    made inductor copy the map into NCHW and back): batch statistics when training, with the running ones updated
    in place as the module does (momentum, unbiased variance), else the running ones."""
    per_channel = (-1, 1, 1, 1)
    if training:
        n = h[0].numel()
        mean = h.mean(dim=(1, 2, 3))
        var = (h - mean.view(per_channel)).pow(2).mean(dim=(1, 2, 3))      # biased: what the batch is normalised by
        rm.lerp_(mean.detach(), momentum)
        rv.lerp_(var.detach() * (n / (n - 1)), momentum)
        nbt.add_(1)
    else:
        mean, var = rm, rv
    return (h - mean.view(per_channel)) * (torch.rsqrt(var + eps) * w).view(per_channel) + b.view(per_channel)


# ------------------------------------------------------------------------------------------- the model, derived

class Unsupported(Exception):
    """The model has a layer or setting this formulation does not reproduce; the message says which."""


def _check_conv(m, name):
    if not (m.kernel_size == (3, 3) and m.stride == (2, 2) and m.dilation == (1, 1) and m.groups == 1
            and m.padding[0] == m.padding[1] and m.bias is not None and m.padding_mode == "zeros"):
        raise Unsupported(f"{name} is not a 3x3, stride-2, zero-padded convolution with a bias")
    if isinstance(m, nn.ConvTranspose2d) and (m.output_padding[0] != m.output_padding[1] or m.output_padding[0] > 1):
        raise Unsupported(f"{name} has an output padding other than (0, 0) or (1, 1)")


def _layer_ops(seq, prefix, flat):
    """Ops for the layers of one nn.Sequential; each maps (h, P, Bf, training) -> h, with h CHWN (C,H,W,B) or, once
    flat, (features, B). `flat`: whether the input is flat. Returns (ops, whether the output is flat)."""
    ops = []
    for i, m in enumerate(seq):
        name = f"{prefix}.{i}"
        w, b = name + ".weight", name + ".bias"
        spatial = isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.Flatten))
        if spatial and flat:
            raise Unsupported(f"{name} is a {type(m).__name__} after the features were flattened")
        if isinstance(m, nn.Linear) and not flat:
            raise Unsupported(f"{name} is a Linear on a feature map that was not flattened")
        if isinstance(m, nn.Conv2d):
            _check_conv(m, name)
            ops.append(lambda h, P, Bf, t, w=w, b=b, p=m.padding[0]: _conv_s2(h, P[w], P[b], p))
        elif isinstance(m, nn.ConvTranspose2d):
            _check_conv(m, name)
            ops.append(lambda h, P, Bf, t, w=w, b=b, p=m.padding[0], op=m.output_padding[0]:
                       _convt_s2(h, P[w], P[b], p, op))
        elif isinstance(m, nn.BatchNorm2d):
            if not (m.affine and m.track_running_stats and m.momentum is not None):
                raise Unsupported(f"{name} is a BatchNorm2d without affine weights, running statistics or momentum")
            ops.append(lambda h, P, Bf, t, n=name, mo=float(m.momentum), e=float(m.eps):
                       _batch_norm(h, P[n + ".weight"], P[n + ".bias"], Bf[n + ".running_mean"], Bf[n + ".running_var"],
                                   Bf[n + ".num_batches_tracked"], mo, e, t))
        elif isinstance(m, nn.ReLU):
            ops.append(lambda h, P, Bf, t: torch.relu(h))
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            ops.append(lambda h, P, Bf, t: h.reshape(-1, h.shape[-1]))   # nn.Flatten's (C,H,W) order, per image
            flat = True
        elif isinstance(m, nn.Linear) and m.bias is not None:
            ops.append(lambda h, P, Bf, t, w=w, b=b: torch.addmm(P[b][:, None], P[w], h))
        else:
            raise Unsupported(f"{name} is a {type(m).__name__}, which chwn_forward.py does not reproduce")
    return ops, flat


class Plan:
    """model.forward(x, eps=eps) as CHWN ops derived from the model's layers: a snapshot of their settings (sizes,
    paddings, BatchNorm's momentum and eps) taken here; the weights and buffers come with each call. Raises
    Unsupported(reason)."""

    def __init__(self, model):
        enc, dec = model.encoder, model.decoder
        try:
            parts = (enc.features, enc.fc_mu, enc.fc_logvar, dec.fc, dec.unflat, dec.deconv)
        except AttributeError as e:
            raise Unsupported(f"the model is not vae.BetaVAE's layout ({e})") from None
        if not all(isinstance(s, nn.Sequential) and len(s) for s in (enc.features, dec.fc, dec.deconv)) or \
                not all(isinstance(m, nn.Linear) and m.bias is not None for m in parts[1:3]):
            raise Unsupported("the model is not vae.BetaVAE's layout")
        if not isinstance(enc.features[0], nn.Conv2d) or not isinstance(dec.deconv[len(dec.deconv) - 1],
                                                                         nn.ConvTranspose2d):
            raise Unsupported("the encoder must start with a Conv2d and the decoder end with a ConvTranspose2d")
        self.encoder, flat = _layer_ops(enc.features, "encoder.features", flat=False)
        if not flat:
            raise Unsupported("the encoder's features must end flat (nn.Flatten, then Linear layers)")
        self.decoder_fc, flat = _layer_ops(dec.fc, "decoder.fc", flat=True)
        self.decoder, _ = _layer_ops(dec.deconv, "decoder.deconv", flat=False)
        self.unflat = tuple(dec.unflat)
        # What a plan takes from the layers besides their tensors and may change after it was built: which layers
        # there are (a replaced ReLU brings no new tensor for FlatState.intact to notice), each convolution's
        # settings, each BatchNorm's momentum and eps, and whether it is in the model's mode (train or eval).
        self.layers = tuple(model.modules())
        self.norms = [m for m in self.layers if isinstance(m, nn.BatchNorm2d)]
        self.convs = [m for m in self.layers if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        self.settings = self._settings(model)
        if not all(same_mode for _, _, same_mode in self.settings[0]):
            raise Unsupported("a BatchNorm2d is in another mode (train or eval) than the model")

    def _settings(self, model):
        return (tuple((m.momentum, m.eps, m.training == model.training) for m in self.norms),
                tuple((m.kernel_size, m.stride, m.padding, m.dilation, m.groups, m.padding_mode,
                       getattr(m, "output_padding", None)) for m in self.convs))

    def matches(self, model):
        """Whether the model still has the layers this plan was built from, with the same settings (~15 µs a step)."""
        return tuple(model.modules()) == self.layers and self._settings(model) == self.settings   # Modules: by identity

    @staticmethod
    def inputs(x, target):
        """(x, target) as the batch arrives, (B, 1, H, W) each, -> (pixels, B) contiguous tensors for forward() and
        target(): views when the batch is laid out that way already (DeviceData.batches(batch_innermost=True)), else
        copies. Done outside the compiled graph: fused into its first gather or into the loss, a transposed read is
        scalar (the loss kernel alone took 5 µs an image)."""
        B = x.shape[0]
        return x.reshape(B, -1).t().contiguous(), target.reshape(B, -1).t().contiguous()

    def forward(self, P, Bf, x, eps, training=True):
        """(logits (B, pixels), mu, logvar) as model(x, eps=eps) in train mode (eval mode: training=False), for x
        from inputs(). The three are transposed views of batch-innermost tensors, as is target(t)."""
        B = x.shape[-1]
        h = x.view(*vae.IMAGE_SHAPE, B)                                   # (1, 28, 28, B)
        for op in self.encoder:
            h = op(h, P, Bf, training)
        w = torch.cat([P["encoder.fc_mu.weight"], P["encoder.fc_logvar.weight"]], 0)   # both heads: one GEMM
        ml = torch.addmm(torch.cat([P["encoder.fc_mu.bias"], P["encoder.fc_logvar.bias"]], 0)[:, None], w, h)
        mu, logvar = (t.t() for t in ml.chunk(2, dim=0))                  # (B, latent) views
        h = vae.reparameterize(mu, logvar, eps).t()                       # (latent, B)
        for op in self.decoder_fc:
            h = op(h, P, Bf, training)
        h = h.view(*self.unflat, B)                                       # (C, H, W) per image, as the module views it
        for op in self.decoder:
            h = op(h, P, Bf, training)
        return h.reshape(-1, B).t(), mu, logvar

    @staticmethod
    def target(target):
        """The BCE target from inputs() in the logits' shape (B, pixels)."""
        return target.t()
