"""The training step: zero-grad, forward, loss, backward and Adam update, eager or as ONE compiled graph.

make_train_step(model, optimizer, config, compile=False) -> step(x, target, step_idx) -> per-batch sums
(recon, kl, total, kl per dim ...) as one detached tensor; nothing in it waits for the device.

Why the compiled step is fast on CPU (bench.py measures it against the eager step):
  * forward, backward (torch.func.grad_and_value) and the Adam update live in one torch.compile'd graph, so there is
    no autograd-engine, optimizer-loop or zero_grad overhead per step, and inductor fuses the many small ops;
  * the forward pass is nhwc_forward.py's rewrite of the model's layers as GEMMs and gathers that inductor and MKL
    run well at these small sizes;
  * after the first call the compiled graph is called directly, without dynamo's per-call guard evaluation over the
    ~115 tensors it takes. The step checks what matters itself: the per-call tensors' dtype, device, shape and
    strides; that parameters, buffers and optimizer state still live in the same storage with the same strides and
    sizes; the config and BatchNorm constants the graph bakes in; and that dynamo's last call ran the latest graph.
    Anything else goes back through dynamo (guards, recompilation if needed), so replaced state
    (optimizer.load_state_dict), re-laid-out weights or a changed β are never computed as before (tested).
    Hyperparameters of Adam other than lr are read once, when the step is made.
Inductor's kernels and MKL use torch's thread count (the cores). On a CPU shared with other busy processes, OpenMP
barriers stall whenever another process holds a core; OMP_NUM_THREADS=1 is then faster.
The math is the module's, layer for layer, on the module's own tensors (parameters, BatchNorm buffers and
optimizer.state are updated in place), so state_dict() and optimizer.state_dict() are exactly those of plain
training; results differ by float rounding only.

Batches of another size than the first (an epoch's short last batch), eval mode, or an optimizer setup the graph does
not reproduce exactly (not plain single-group Adam) run the eager step on the same tensors: no recompiles.
On CUDA the graph uses the module's own layers (cuDNN) through functional_call instead of the NHWC rewrite.
"""
import dataclasses

import torch
import torch.nn as nn

import nhwc_forward
import vae

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


def _feed_order(gm):
    """[(argument name, list index or None)] for each input of a dynamo-captured graph, in the graph's order;
    None when an input does not come straight from one of the step function's arguments."""
    import re
    feed = []
    try:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                name = node.meta["grapharg"].source.name
                m = re.fullmatch(r"L\['(\w+)'\](?:\[(\d+)\])?", name if isinstance(name, str) else name())
                if m is None:
                    return None
                feed.append((m.group(1), None if m.group(2) is None else int(m.group(2))))
    except (AttributeError, KeyError, TypeError):   # another torch's internals: always go through dynamo
        return None
    return feed


_PER_CALL = ("x", "target", "eps", "C", "lr")


def _meta(t):
    return t.dtype, t.device, t.shape, t.stride()


def _signature(inputs, feed):
    """What a direct call depends on, cheaply: per-call inputs of the same dtype, device, shape and strides, and the
    parameters, buffers and optimizer state in the same storage (so the same dtype and device) with the same strides
    and number of elements (t.shape would double the cost of this check)."""
    return [_meta(t) if name in _PER_CALL else (t.data_ptr(), t.stride(), t.numel())
            for t, (name, _) in zip(inputs, feed)]


def make_train_step(model, optimizer, config, compile=False):
    """Return step(x, target, step_idx) -> detached per-batch sums (see _stats); the loss minimised is their
    batch mean of the objective. x in [-1, 1] and target in [0, 1], (B, 1, 28, 28) on the model's device.
    The reparameterisation noise comes from the global RNG as model.forward draws it, so a seed gives the same run
    compiled or not (up to float rounding).
    """
    def eager_step(x, target, step_idx):
        optimizer.zero_grad(set_to_none=True)
        logits, mu, logvar, z = model.forward_with_z(x)
        terms = vae.vae_loss(logits, target, mu, logvar, config, step=step_idx, z=z)
        terms.total.mean().backward()
        optimizer.step()
        return _stats(terms).detach()

    # β-TCVAE (objective "tc") always takes the eager step: the compiled graph has no path for its batch estimators.
    if not compile or config.objective == "tc" or not _adam_supported(model, optimizer):
        return eager_step

    device = next(model.parameters()).device
    use_nhwc = device.type == "cpu" and nhwc_forward.layers_as_expected(model)
    names = [n for n, _ in model.named_parameters()]
    bnames = [n for n, _ in model.named_buffers()]
    core = _Core(model)
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    adam_eps, wd = group["eps"], group["weight_decay"]

    def loss_of(plist, blist, x, target, eps, C):  # -> (loss, stats): grad_and_value's has_aux form
        P, Bf = dict(zip(names, plist)), dict(zip(bnames, blist))
        if use_nhwc:
            logits, mu, logvar = nhwc_forward.forward(P, Bf, model, x, eps)
        else:
            params_and_buffers = {"m." + k: v for k, v in P.items()}
            params_and_buffers.update({"m." + k: v for k, v in Bf.items()})
            logits, mu, logvar = torch.func.functional_call(core, params_and_buffers, (x, eps))
        target = nhwc_forward.to_phases(target) if use_nhwc else target   # the logits' pixel order
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

    options = {"cpp_wrapper": True} if device.type == "cpu" else {}
    direct = {}   # the latest compiled graph, how to feed it, the inputs it was compiled for, a signature to reuse it
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def constants():   # Python values the graph bakes in: dynamo guards on them, so the direct path must too
        return dataclasses.astuple(config), [(m.momentum, m.eps) for m in bns]

    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        feed = _feed_order(gm)   # before compile_fx, which may change gm
        fn = compile_fx(gm, example_inputs, config_patches=options)
        direct.clear()
        direct.update(fn=fn, feed=feed, meta=[_meta(t) for t in example_inputs])
        return fn

    compiled = torch.compile(graph, backend=backend, dynamic=False, fullgraph=True)
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
        args = dict(plist=params, blist=list(model.buffers()), exp_avgs=[state[p]["exp_avg"] for p in params],
                    exp_avg_sqs=[state[p]["exp_avg_sq"] for p in params], steps=[state[p]["step"] for p in params],
                    x=x, target=target, eps=eps, C=C, lr=lr)
        if "signature" in direct:
            inputs = [args[k] if i is None else args[k][i] for k, i in direct["feed"]]
            if (constants(), _signature(inputs, direct["feed"])) == direct["signature"]:
                return direct["fn"](*inputs)[0]
        out = compiled(**args)   # dynamo evaluates its guards here, and recompiles if it must
        direct.pop("signature", None)
        if direct.get("feed"):
            inputs = [args[k] if i is None else args[k][i] for k, i in direct["feed"]]
            # dynamo may have run an older graph than direct["fn"]: reuse the latest only for inputs it was built for
            if [_meta(t) for t in inputs] == direct["meta"]:
                direct["signature"] = (constants(), _signature(inputs, direct["feed"]))
        return out

    step.eager_step = eager_step
    step.compiled = compiled
    step.direct = direct
    return step
