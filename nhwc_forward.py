"""The model's forward pass rewritten for the compiled CPU training step (train_step.py), layer for layer.

forward(P, Bf, model, x, eps) computes what model(x) computes with reparameterisation noise eps, from the parameter
and buffer dicts P and Bf (the module's own tensors, so torch.func can differentiate it and BatchNorm's running
statistics are updated in place). The logits come back in phase order (to_phases). layers_as_expected(model) says
whether the model has the architecture this rewrite hard-codes.

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


def _conv_in1(x, w, b):
    """Conv2d(1->Co, k3, s2, p1) on x (B,28,28) -> NHWC (B,14,14,Co): tap-major im2col of the data, one GEMM."""
    B = x.shape[0]
    xp = F.pad(x, (1, 1, 1, 1))
    colsT = torch.stack([xp[:, ky:ky + 27:2, kx:kx + 27:2] for ky in range(3) for kx in range(3)])  # (9,B,14,14)
    y = _PixelLinear.apply(colsT.reshape(9, -1).t(), w.reshape(w.shape[0], 9).t()) + b
    return y.view(B, 14, 14, -1)


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
    """(B,1,28,28) -> (B,4,14,14), the layout of _convt_out1's output."""
    B = img.shape[0]
    return img.reshape(B, 14, 2, 14, 2).permute(0, 2, 4, 1, 3).reshape(B, 4, 14, 14)


def _bn_train(x_nhwc, w, b, rm, rv, nbt, bn):
    y = F.batch_norm(x_nhwc.permute(0, 3, 1, 2), rm, rv, w, b, True, bn.momentum, bn.eps).permute(0, 2, 3, 1)
    nbt.add_(1)
    return y


def forward(P, Bf, model, x, eps):
    """model.forward(x) with the given reparameterisation noise, layer for layer, in NHWC. Returns the logits in
    phase order (see to_phases), mu and logvar."""
    enc, dec = model.encoder.features, model.decoder.deconv
    B = x.shape[0]
    h = torch.relu(_conv_in1(x.reshape(B, 28, 28), P['encoder.features.0.weight'], P['encoder.features.0.bias']))
    h = torch.relu(_conv_s2(h, P['encoder.features.2.weight'], P['encoder.features.2.bias'], enc[2].padding[0]))
    h = _bn_train(h, P['encoder.features.4.weight'], P['encoder.features.4.bias'],
                  Bf['encoder.features.4.running_mean'], Bf['encoder.features.4.running_var'],
                  Bf['encoder.features.4.num_batches_tracked'], enc[4])
    h = torch.relu(_conv_s2(h, P['encoder.features.5.weight'], P['encoder.features.5.bias'], enc[5].padding[0]))
    C3 = h.shape[3]
    w8 = P['encoder.features.8.weight']        # its columns follow nn.Flatten's (C,H,W) order: permute to (H,W,C)
    w8 = w8.view(w8.shape[0], C3, h.shape[1], h.shape[2]).permute(0, 2, 3, 1).reshape(w8.shape[0], -1)
    h = torch.addmm(P['encoder.features.8.bias'], h.reshape(B, -1), w8.t())
    wml = torch.cat([P['encoder.fc_mu.weight'], P['encoder.fc_logvar.weight']], 0)
    bml = torch.cat([P['encoder.fc_mu.bias'], P['encoder.fc_logvar.bias']], 0)
    ml = torch.addmm(bml, h, wml.t())
    L = ml.shape[1] // 2
    mu, logvar = ml[:, :L], ml[:, L:]
    z = mu + eps * torch.exp(0.5 * logvar)               # BetaVAE.reparameterize
    h = torch.relu(torch.addmm(P['decoder.fc.0.bias'], z, P['decoder.fc.0.weight'].t()))
    w2, b2 = P['decoder.fc.2.weight'], P['decoder.fc.2.bias']   # rows in .view(-1, 32, 3, 3) order: permute
    w2 = w2.view(32, 3, 3, -1).permute(1, 2, 0, 3).reshape(288, -1)
    b2 = b2.view(32, 3, 3).permute(1, 2, 0).reshape(288)
    h = torch.relu(torch.addmm(b2, h, w2.t())).view(B, 3, 3, 32)
    t0, t1, t2 = dec[0], dec[3], dec[5]
    h = torch.relu(_convt_s2(h, P['decoder.deconv.0.weight'], P['decoder.deconv.0.bias'],
                             t0.padding[0], t0.output_padding[0]))
    h = _bn_train(h, P['decoder.deconv.2.weight'], P['decoder.deconv.2.bias'],
                  Bf['decoder.deconv.2.running_mean'], Bf['decoder.deconv.2.running_var'],
                  Bf['decoder.deconv.2.num_batches_tracked'], dec[2])
    h = torch.relu(_convt_s2(h, P['decoder.deconv.3.weight'], P['decoder.deconv.3.bias'],
                             t1.padding[0], t1.output_padding[0]))
    return _convt_out1(h, P['decoder.deconv.5.weight'], P['decoder.deconv.5.bias']), mu, logvar


def layers_as_expected(model):
    """The im2col formulation hard-codes the project's architecture; check it before using it."""
    try:
        enc, dec = model.encoder.features, model.decoder.deconv
        convs = [enc[0], enc[2], enc[5], dec[0], dec[3], dec[5]]
        ok = all(c.kernel_size == (3, 3) and c.stride == (2, 2) and c.dilation == (1, 1) and c.groups == 1
                 and c.padding[0] == c.padding[1] and c.bias is not None for c in convs)
        ok = ok and [c.padding[0] for c in convs] == [1, 1, 0, 0, 1, 1]
        ok = ok and [c.output_padding[0] for c in convs[3:]] == [0, 1, 1]
        ok = ok and enc[0].in_channels == 1 and dec[5].out_channels == 1
        ok = ok and all(isinstance(b, nn.BatchNorm2d) and b.affine and b.track_running_stats
                        and b.momentum is not None for b in (enc[4], dec[2]))
        return ok
    except (AttributeError, IndexError, TypeError):
        return False
