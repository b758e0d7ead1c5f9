"""The training step: zero-grad, forward, loss, backward and Adam update, eager or as ONE compiled graph.

make_train_step(model, optimizer, config, compile=False) -> step(x, target, step_idx) -> per-batch sums
(recon, kl, total, kl per dim ...) as one detached tensor; nothing in it waits for the device.

Why the compiled step is fast on CPU (bench.py measures it against the eager step):
  * forward, backward (torch.func.grad_and_value) and the Adam update live in one torch.compile'd graph, so there is
    no autograd-engine, optimizer-loop or zero_grad overhead per step, and inductor fuses the many small ops;
  * activations are NHWC and every 3x3 stride-2 convolution is an explicit GEMM: im2col as 9 strided slices for
    Conv2d, GEMM then a phase ("sub-pixel") col2im gather for ConvTranspose2d. Im2col and Col2im are an adjoint
    autograd.Function pair, the backward of one being the forward of the other, so both directions are gathers that
    inductor vectorises (autograd's own slice_backward chains were ~10x slower); oneDNN's per-call cost dominates
    convolutions this small;
  * the one-input-channel conv and the one-output-channel deconv are multiply-sums, not skinny K=9 / N=9 GEMMs;
  * inductor's kernels run on one thread, leaving MKL's GEMMs their threads: with all threads, the compiled
    kernels' OpenMP barriers stalled whenever another process held a core.
The math is the module's, layer for layer, on the module's own tensors (parameters, BatchNorm buffers and
optimizer.state are updated in place), so state_dict() and optimizer.state_dict() are exactly those of plain
training; results differ by float rounding only.

Batches of another size than the first (an epoch's short last batch), eval mode, or an optimizer setup the graph does
not reproduce exactly (not plain single-group Adam) run the eager step on the same tensors: no recompiles.
On CUDA the graph uses the module's own layers (cuDNN) through functional_call instead of the im2col formulation.
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
    if C == 1:   # K = 9: a fused multiply-sum beats a skinny GEMM
        return (cols.reshape(B, Ho, Wo, 9 * C, 1) * wm).sum(3) + b
    return torch.addmm(b, cols.reshape(B * Ho * Wo, 9 * C), wm).view(B, Ho, Wo, -1)


def _convt_s2(x, w, b, p, op):
    """nn.ConvTranspose2d(k=3, stride=2, padding=p, output_padding=op) on NHWC x; w (C,Co,3,3)."""
    B, H, W, C = x.shape
    Co = w.shape[1]
    wm = w.permute(0, 2, 3, 1).reshape(C, 9 * Co)          # (C, 9Co)
    if Co == 1:  # N = 9: multiply-sum instead of GEMM
        P = (x.unsqueeze(-1) * wm).sum(3).view(B, H, W, 9, Co)
    else:
        P = (x.reshape(B * H * W, C) @ wm).view(B, H, W, 9, Co)
    z = _Col2im.apply(P, 2 * H + 2, 2 * W + 2)
    Ho, Wo = 2 * H + 1 - 2 * p + op, 2 * W + 1 - 2 * p + op
    return z[:, p:p + Ho, p:p + Wo, :] + b


def _bn_train(x_nhwc, w, b, rm, rv, nbt, bn):
    y = F.batch_norm(x_nhwc.permute(0, 3, 1, 2), rm, rv, w, b, True, bn.momentum, bn.eps).permute(0, 2, 3, 1)
    nbt.add_(1)
    return y


def _forward_nhwc(P, Bf, model, x, eps):
    """model.forward(x) with the given reparameterisation noise, layer for layer, in NHWC. Returns NCHW logits."""
    enc, dec = model.encoder.features, model.decoder.deconv
    B = x.shape[0]
    h = x.reshape(B, 28, 28, 1)  # one channel: NCHW and NHWC are the same memory
    h = torch.relu(_conv_s2(h, P['encoder.features.0.weight'], P['encoder.features.0.bias'], enc[0].padding[0]))
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
    h = _convt_s2(h, P['decoder.deconv.5.weight'], P['decoder.deconv.5.bias'], t2.padding[0], t2.output_padding[0])
    return h.reshape(B, 1, 28, 28), mu, logvar


def _layers_as_expected(model):
    """The im2col formulation hard-codes the project's architecture; check it before using it."""
    try:
        enc, dec = model.encoder.features, model.decoder.deconv
        convs = [enc[0], enc[2], enc[5], dec[0], dec[3], dec[5]]
        ok = all(c.kernel_size == (3, 3) and c.stride == (2, 2) and c.dilation == (1, 1) and c.groups == 1
                 and c.padding[0] == c.padding[1] and c.bias is not None for c in convs)
        ok = ok and [c.padding[0] for c in convs] == [1, 1, 0, 0, 1, 1]
        ok = ok and [c.output_padding[0] for c in convs[3:]] == [0, 1, 1]
        ok = ok and all(isinstance(b, nn.BatchNorm2d) and b.affine and b.track_running_stats
                        and b.momentum is not None for b in (enc[4], dec[2]))
        return ok
    except (AttributeError, IndexError, TypeError):
        return False


class _Core(nn.Module):
    """model.forward with the noise passed in (for the module-layer formulation used on CUDA)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, eps):
        mu, logvar = self.m.encoder(x)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.m.decoder.logits(z), mu, logvar


# ------------------------------------------------------------------------------------------------- the step

def _stats(terms):
    """Per-batch sums: recon, kl, total, then kl per dim; what train.py records every step."""
    return torch.cat([torch.stack([terms.recon.sum(), terms.kl.sum(), terms.total.sum()]), terms.kl_per_dim.sum(0)])


def _adam_supported(model, optimizer):
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    g = optimizer.param_groups[0]
    if g.get("amsgrad") or g.get("maximize") or g.get("differentiable") or g.get("capturable") \
            or g.get("fused") or g.get("decoupled_weight_decay"):
        return False
    if isinstance(g["lr"], torch.Tensor) or isinstance(g["betas"][0], torch.Tensor):
        return False
    return [id(p) for p in g["params"]] == [id(p) for p in model.parameters()]


def make_train_step(model, optimizer, config, compile=False):
    """Return step(x, target, step_idx) -> detached per-batch sums (see _stats); the loss minimised is their
    batch mean of the objective. x in [-1, 1] and target in [0, 1], (B, 1, 28, 28) on the model's device.
    The reparameterisation noise comes from the global RNG as model.forward draws it, so a seed gives the same run
    compiled or not (up to float rounding).
    """
    def eager_step(x, target, step_idx):
        optimizer.zero_grad(set_to_none=True)
        logits, mu, logvar = model(x)
        terms = vae.vae_loss(logits, target, mu, logvar, config, step=step_idx)
        terms.total.mean().backward()
        optimizer.step()
        return _stats(terms).detach()

    if not compile or not _adam_supported(model, optimizer):
        return eager_step

    device = next(model.parameters()).device
    use_nhwc = device.type == "cpu" and _layers_as_expected(model)
    names = [n for n, _ in model.named_parameters()]
    bnames = [n for n, _ in model.named_buffers()]
    core = _Core(model)
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    adam_eps, wd = group["eps"], group["weight_decay"]

    def loss_of(plist, blist, x, target, eps, C):  # -> (loss, stats): grad_and_value's has_aux form
        P, Bf = dict(zip(names, plist)), dict(zip(bnames, blist))
        if use_nhwc:
            logits, mu, logvar = _forward_nhwc(P, Bf, model, x, eps)
        else:
            params_and_buffers = {"m." + k: v for k, v in P.items()}
            params_and_buffers.update({"m." + k: v for k, v in Bf.items()})
            logits, mu, logvar = torch.func.functional_call(core, params_and_buffers, (x, eps))
        terms = vae.vae_loss(logits, target, mu, logvar, config, capacity=C)
        return terms.total.mean(), _stats(terms).detach()

    grad_and_loss = torch.func.grad_and_value(loss_of, has_aux=True)

    def graph(plist, blist, exp_avgs, exp_avg_sqs, steps, x, target, eps, C, lr):
        grads, (loss, stats) = grad_and_loss(plist, blist, x, target, eps, C)
        with torch.no_grad():     # torch.optim.Adam (foreach, not capturable), in place on the real tensors
            for p, g, m, v, s in zip(plist, grads, exp_avgs, exp_avg_sqs, steps):
                if wd != 0:
                    g = g + wd * p
                s.add_(1)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step_size = lr / (1 - beta1 ** s)
                denom = (v.sqrt() / (1 - beta2 ** s).sqrt()).add_(adam_eps)
                p.sub_(step_size * m / denom)
        return stats

    if device.type == "cpu":
        import torch._inductor.config as inductor_config
        inductor_config.cpp.threads = 1  # see the module docstring: MKL keeps its threads, kernels never stall
    options = {"cpp_wrapper": True} if device.type == "cpu" else {}
    compiled = torch.compile(graph, dynamic=False, fullgraph=True, options=options)
    main_batch = []   # the batch size the graph is compiled for (first one seen)

    def step(x, target, step_idx):
        B = x.shape[0]
        if not main_batch:
            main_batch.append(B)
        if B != main_batch[0] or not model.training:
            return eager_step(x, target, step_idx)
        params = list(model.parameters())
        state = optimizer.state
        for p in params:   # torch.optim.Adam's lazy state init, the same tensors it would create
            st = state[p]
            if len(st) == 0:
                st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        eps = torch.randn(B, config.latent_dim, device=x.device, dtype=x.dtype)  # = randn_like(mu) in forward
        C = torch.tensor(vae.capacity_at(step_idx, config) if config.objective != "beta" else 0.0)
        lr = torch.tensor(float(group["lr"]), dtype=torch.float64)
        for p in params:
            p.grad = None   # zero_grad(set_to_none=True): stale .grad must not survive
        return compiled(params, list(model.buffers()), [state[p]["exp_avg"] for p in params],
                        [state[p]["exp_avg_sq"] for p in params], [state[p]["step"] for p in params],
                        x, target, eps, C, lr)

    step.eager_step = eager_step
    step.compiled = compiled
    return step
