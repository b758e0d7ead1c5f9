"""The model's forward pass rewritten for the compiled CPU training step (training.py), layer for layer.

Plan(model) walks the model's layers and turns each into an NHWC op; Plan.forward(P, Bf, x, eps) then computes what
model(x, eps=eps) computes, from the parameter and buffer dicts P and Bf (views of the module's own tensors, so
torch.func can differentiate it and BatchNorm's running statistics are updated in place). A layer or setting it does
not reproduce raises Unsupported with the reason, and the training step then uses the module's own layers.

Why it is written this way (bench.py measures the result):
  * activations are NHWC and every 3x3 stride-2 convolution is an explicit GEMM: im2col as 9 strided slices for
    Conv2d, GEMM then a phase ("sub-pixel") col2im gather for ConvTranspose2d. Im2col and Col2im are an adjoint
    autograd.Function pair, the backward of one being the forward of the other, so both directions are gathers that
    inductor vectorises (autograd's own slice_backward chains were ~10x slower); oneDNN's per-call cost dominates
    convolutions this small;
  * the one-input-channel conv and the one-output-channel deconv work on tap-major planes (9, pixels): the first
    layer's im2col is strided slices of the data, the last layer's col2im is four output phases made of shifted
    planes (the loss compares them with the target in the same phase order), so no gather runs over a channel axis
    of width 1 (that alone cost 1.7 ms of a 5 ms step); their GEMMs are oriented so that MKL writes (channels,
    pixels), 3-5x faster than (pixels, 8).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import vae

# ------------------------------------------------------------------------------------------- NHWC convolutions

_SHIFT = {0: 0, 1: 0, 2: 1}     # kernel tap -> how far back (in input pixels) it lands for stride 2
_TAPS = {0: (0, 2), 1: (1,)}    # output parity -> kernel taps that reach it


def _im2col(xp, Ho, Wo):
    """xp (B,Hp,Wp,C) -> (B,Ho,Wo,9,C): the 3x3 windows at stride 2 (tap index 3*ky+kx)."""
    taps = [xp[:, ky:ky + 2 * (Ho - 1) + 1:2, kx:kx + 2 * (Wo - 1) + 1:2, :] for ky in range(3) for kx in range(3)]
    return torch.stack(taps, dim=3)


def _col2im(cols, Hp, Wp):
    """Adjoint of _im2col: cols (B,H,W,9,C) -> (B,Hp,Wp,C) with out[2i+ky, 2j+kx] += cols[i,j,3ky+kx], Hp <= 2H+2.

    Written as a gather per output phase (row parity a, column parity c), never as a scatter."""
    B, H, W, _, C = cols.shape
    phase = {}
    for a in (0, 1):
        for c in (0, 1):
            acc = None
            for ky in _TAPS[a]:
                for kx in _TAPS[c]:
                    dy, dx = _SHIFT[ky], _SHIFT[kx]
                    t = F.pad(cols[:, :, :, 3 * ky + kx, :], (0, 0, dx, 1 - dx, dy, 1 - dy))
                    acc = t if acc is None else acc + t
            phase[a, c] = acc
    z = torch.stack([torch.stack([phase[0, 0], phase[0, 1]], dim=3),
                     torch.stack([phase[1, 0], phase[1, 1]], dim=3)], dim=2)
    return z.reshape(B, 2 * H + 2, 2 * W + 2, C)[:, :Hp, :Wp, :]


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
        ctx.hw = tuple(inputs[0].shape[1:3])

    @staticmethod
    def backward(ctx, g):
        return _im2col(g, *ctx.hw), None, None


def _conv_s2(x, w, b, p):
    """nn.Conv2d(k=3, stride=2, padding=p) on NHWC x; w (Co,C,3,3) as stored by the module."""
    B, H, W, C = x.shape
    Ho, Wo = (H + 2 * p - 3) // 2 + 1, (W + 2 * p - 3) // 2 + 1
    xp = F.pad(x, (0, 0, p, p, p, p)) if p else x
    cols = _Im2col.apply(xp, Ho, Wo)                       # (B,Ho,Wo,9,C)
    wm = w.permute(2, 3, 1, 0).reshape(9 * C, -1)          # (9C, Co)
    return torch.addmm(b, cols.reshape(B * Ho * Wo, 9 * C), wm).view(B, Ho, Wo, -1)


def _convt_s2(x, w, b, p, op):
    """nn.ConvTranspose2d(k=3, stride=2, padding=p, output_padding=op) on NHWC x; w (C,Co,3,3)."""
    B, H, W, C = x.shape
    Co = w.shape[1]
    wm = w.permute(0, 2, 3, 1).reshape(C, 9 * Co)          # (C, 9Co)
    P = (x.reshape(B * H * W, C) @ wm).view(B, H, W, 9, Co)
    z = _Col2im.apply(P, 2 * H + 2, 2 * W + 2)
    Ho, Wo = 2 * H + 1 - 2 * p + op, 2 * W + 1 - 2 * p + op
    return z[:, p:p + Ho, p:p + Wo, :] + b


def _long_k_mm(a, b, parts):
    """a (K,N) @ b (N,M) with tiny K, M and a long N, as `parts` GEMMs over slices of N, summed: about 2x faster in
    MKL than one GEMM of that shape."""
    return torch.bmm(a.reshape(a.shape[0], parts, -1).transpose(0, 1), b.reshape(parts, -1, b.shape[1])).sum(0)


class _PixelLinear(torch.autograd.Function):
    """a (N,K) @ w (K,M) over N pixels with few channels K, M (the one-channel layers' GEMMs). Every product is
    oriented so that MKL writes a long (., N) result: writing (N, M) with M < 16 was 3-5x slower."""
    @staticmethod
    def forward(a, w):
        return torch.mm(w.t(), a.t()).t()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        a, w = ctx.saved_tensors
        ga = torch.mm(w, g.t()).t().contiguous() if ctx.needs_input_grad[0] else None
        n = a.shape[0]
        return ga, _long_k_mm(a.t(), g, parts=next(k for k in (64, 32, 16, 8, 4, 2, 1) if n % k == 0))


def _conv_in1(x, w, b, p):
    """Conv2d(1->Co, k3, s2, padding p) on x (B,H,W) -> NHWC (B,Ho,Wo,Co): tap-major im2col of the data, one GEMM."""
    B, H, W = x.shape
    Ho, Wo = (H + 2 * p - 3) // 2 + 1, (W + 2 * p - 3) // 2 + 1
    xp = F.pad(x, (p, p, p, p)) if p else x
    colsT = torch.stack([xp[:, ky:ky + 2 * Ho - 1:2, kx:kx + 2 * Wo - 1:2] for ky in range(3) for kx in range(3)])
    y = _PixelLinear.apply(colsT.reshape(9, -1).t(), w.reshape(w.shape[0], 9).t()) + b   # colsT: (9,B,Ho,Wo)
    return y.view(B, Ho, Wo, -1)


def _shift(q, dy, dx):
    """q (..., H, W) read at (m+dy, n+dx), zero beyond the edge; dy, dx in {0, 1}."""
    if dy:
        q = F.pad(q[..., 1:, :], (0, 0, 0, 1))
    if dx:
        q = F.pad(q[..., 1:], (0, 1))
    return q


def _convt_out1(h, w, b):
    """ConvTranspose2d(C->1, k3, s2, p1, op1) on NHWC h (B,14,14,C) -> logits in phase layout (B,4,14,14):
    channel 2a+c holds output pixels (2m+a, 2n+c). One GEMM to tap-major planes, then shifted sums (no gathers)."""
    B, H, W, C = h.shape
    q = _PixelLinear.apply(h.reshape(-1, C), w.reshape(C, 9)).t().view(9, B, H, W)   # q[3ky+kx]
    R = {0: ((1, 0),), 1: ((0, 1), (2, 0))}   # output parity -> (tap, shift)
    phases = []
    for a in (0, 1):
        for c in (0, 1):
            acc = None
            for ky, sy in R[a]:
                for kx, sx in R[c]:
                    t = _shift(q[3 * ky + kx], sy, sx)
                    acc = t if acc is None else acc + t
            phases.append(acc)
    return torch.stack(phases, 1) + b


def to_phases(img):
    """(B,1,2H,2W) -> (B,4,H,W), the layout of _convt_out1's output."""
    B, _, H2, W2 = img.shape
    H, W = H2 // 2, W2 // 2
    return img.reshape(B, H, 2, W, 2).permute(0, 2, 4, 1, 3).reshape(B, 4, H, W)


def _bn_train(x_nhwc, w, b, rm, rv, nbt, bn):
    y = F.batch_norm(x_nhwc.permute(0, 3, 1, 2), rm, rv, w, b, True, bn.momentum, bn.eps).permute(0, 2, 3, 1)
    nbt.add_(1)
    return y


# ------------------------------------------------------------------------------------------- the model, derived

class Unsupported(Exception):
    """The model has a layer or setting this formulation does not reproduce; the message says which."""


def _check_conv(m, name):
    if not (m.kernel_size == (3, 3) and m.stride == (2, 2) and m.dilation == (1, 1) and m.groups == 1
            and m.padding[0] == m.padding[1] and m.bias is not None and m.padding_mode == "zeros"):
        raise Unsupported(f"{name} is not a 3x3, stride-2, zero-padded convolution with a bias")
    if isinstance(m, nn.ConvTranspose2d) and (m.output_padding[0] != m.output_padding[1] or m.output_padding[0] > 1):
        raise Unsupported(f"{name} has an output padding other than (0, 0) or (1, 1)")


def _phase_output(convt):
    """Whether the model's last layer is one _convt_out1 computes (its logits then come in phase order)."""
    return convt.out_channels == 1 and convt.padding[0] == 1 and convt.output_padding[0] == 1


def _layer_ops(seq, prefix, first, last):
    """Ops for the layers of one nn.Sequential; each op maps (h, P, Bf) -> h with h in NHWC (or (B, F) when flat)."""
    ops = []
    for i, m in enumerate(seq):
        name = f"{prefix}.{i}"
        w, b = name + ".weight", name + ".bias"
        if isinstance(m, nn.Conv2d):
            _check_conv(m, name)
            p = m.padding[0]
            if first and i == 0 and m.in_channels == 1:   # the image itself: (B,1,H,W) -> NHWC
                ops.append(lambda h, P, Bf, w=w, b=b, p=p: _conv_in1(h.reshape(h.shape[0], *h.shape[2:]), P[w], P[b], p))
            else:
                if first and i == 0:
                    ops.append(lambda h, P, Bf: h.permute(0, 2, 3, 1))
                ops.append(lambda h, P, Bf, w=w, b=b, p=p: _conv_s2(h, P[w], P[b], p))
        elif isinstance(m, nn.ConvTranspose2d):
            _check_conv(m, name)
            p, op = m.padding[0], m.output_padding[0]
            if last and i == len(seq) - 1 and _phase_output(m):
                ops.append(lambda h, P, Bf, w=w, b=b: _convt_out1(h, P[w], P[b]))   # phase layout, see to_phases
            else:
                ops.append(lambda h, P, Bf, w=w, b=b, p=p, op=op: _convt_s2(h, P[w], P[b], p, op))
                if last and i == len(seq) - 1:
                    ops.append(lambda h, P, Bf: h.permute(0, 3, 1, 2))
        elif isinstance(m, nn.BatchNorm2d):
            if not (m.affine and m.track_running_stats and m.momentum is not None):
                raise Unsupported(f"{name} is a BatchNorm2d without affine weights, running statistics or momentum")
            ops.append(lambda h, P, Bf, n=name, m=m: _bn_train(h, P[n + ".weight"], P[n + ".bias"],
                                                            Bf[n + ".running_mean"], Bf[n + ".running_var"],
                                                            Bf[n + ".num_batches_tracked"], m))
        elif isinstance(m, nn.ReLU):
            ops.append(lambda h, P, Bf: torch.relu(h))
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            ops.append(lambda h, P, Bf: h.permute(0, 3, 1, 2).reshape(h.shape[0], -1))  # nn.Flatten's (C,H,W) order
        elif isinstance(m, nn.Linear) and m.bias is not None:
            ops.append(lambda h, P, Bf, w=w, b=b: torch.addmm(P[b], h, P[w].t()))
        else:
            raise Unsupported(f"{name} is a {type(m).__name__}, which nhwc_forward.py does not reproduce")
    return ops


class Plan:
    """model.forward(x, eps=eps) as NHWC ops derived from the model's layers. Raises Unsupported(reason)."""

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
        self.encoder = _layer_ops(enc.features, "encoder.features", first=True, last=False)
        self.decoder_fc = _layer_ops(dec.fc, "decoder.fc", first=False, last=False)
        self.decoder = _layer_ops(dec.deconv, "decoder.deconv", first=False, last=True)
        self.unflat = tuple(dec.unflat)
        self.phase_output = _phase_output(dec.deconv[len(dec.deconv) - 1])

    def forward(self, P, Bf, x, eps):
        """(logits, mu, logvar) as model(x, eps=eps); logits in phase order (to_phases) when self.phase_output."""
        h = x
        for op in self.encoder:
            h = op(h, P, Bf)
        w = torch.cat([P["encoder.fc_mu.weight"], P["encoder.fc_logvar.weight"]], 0)   # both heads: one GEMM
        ml = torch.addmm(torch.cat([P["encoder.fc_mu.bias"], P["encoder.fc_logvar.bias"]], 0), h, w.t())
        mu, logvar = ml.chunk(2, dim=1)
        h = vae.reparameterize(mu, logvar, eps)
        for op in self.decoder_fc:
            h = op(h, P, Bf)
        h = h.view(h.shape[0], *self.unflat).permute(0, 2, 3, 1)        # (B, C, H, W) as the module views it -> NHWC
        for op in self.decoder:
            h = op(h, P, Bf)
        return h, mu, logvar

    def target(self, target):
        """The BCE target in the logits' pixel order."""
        return to_phases(target) if self.phase_output else target
