"""The training step, the epoch and the test pass, which train.py and bench.py share.

make_train_step(model, optimizer, config, compile) returns step(x, target, step_idx) -> the batch's sums (recon, kl,
total, then each dimension's KL) as one detached tensor; nothing in it waits for the device. compile "off": the eager
step; "plain": torch.compile of the forward pass and the loss, then eager backward and optimizer step; "on": on a CPU
the fused step (FusedStep, one compiled graph per step, batch innermost), elsewhere or for a model or optimizer it does
not reproduce "plain", with one note saying why. If compiling fails, the eager step goes on after one warning."""

import copy
import math
import os
import shutil
import sys
import time

import torch
from tqdm import tqdm

import vae
from plumbing import chwn

COMPILE_AUTO_MIN_IMAGES = 300_000  # --compile auto: where compiling pays for itself on a CPU (docs/speed.md)
TEST_BATCH = 256  # the test pass's batch: its activations stay in a core's cache


def has_cxx():
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def want_compile(mode, device, images_to_train):
    """Whether to compile: 'on', 'off', or 'auto' (on a CPU with a compiler, for runs long enough to pay)."""
    auto = device.type == "cpu" and has_cxx() and images_to_train >= COMPILE_AUTO_MIN_IMAGES
    return mode == "on" or (mode == "auto" and auto)


def make_train_step(model, optimizer, config, compile="off", log=None):
    """The step (see above): x in [-1, 1], target in [0, 1], (B, 1, 28, 28); it minimises the batch mean. The noise
    comes from the global RNG as model.forward draws it, so a seed gives the same run compiled or not, up to rounding.
    log(line) gets the notes; default: stderr."""
    log = log or (lambda line: print(line, file=sys.stderr))

    def eager(x, target, step_idx, eps=None):
        optimizer.zero_grad(set_to_none=True)
        logits, mu, logvar, z = model.forward_with_z(x, eps=eps)
        terms = vae.vae_loss(logits, target, mu, logvar, config, step=step_idx, z=z)
        terms.total.mean().backward()
        optimizer.step()
        return terms.batch_sums().detach()

    if compile in ("off", False) or config.objective == "tc":  # β-TCVAE's batch estimators have run only eagerly
        return eager
    if compile == "on" and next(model.parameters()).device.type == "cpu":
        if (problem := fused_problem(model, optimizer)) is None:
            return FusedStep(model, optimizer, config, eager, log)
        log(f"note: {problem}: the plain compiled step trains it")
    return plain_step(model, optimizer, config, eager, log)


def _capacity(config, step_idx):
    """C(step): compiled steps take it as a tensor, as a float it would be a constant of the graph, compiled anew."""
    return vae.capacity_at(step_idx, config) if config.objective == "capacity" else 0.0


def _compile(fn, device):
    """torch.compile of fn under a code object of its own: dynamo keeps its graphs and its recompile limit per code
    object, so steps built in one process (the tests) would otherwise evict each other's graphs."""
    own = type(fn)(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    options = {"cpp_wrapper": True} if device.type == "cpu" else None  # less Python per call
    return torch.compile(own, dynamic=False, fullgraph=True, options=options)


def _failed(log, e):
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    said = f"warning: compiling the training step failed ({type(e).__name__}: {reason}); it goes on with the eager step"
    log(f"{said} (--compile off skips the attempt)")


def plain_step(model, optimizer, config, eager, log):
    """torch.compile of the forward pass and the loss; backward and the optimizer step as eager runs them."""

    def loss(x, target, eps, C):
        logits, mu, logvar, z = model.forward_with_z(x, eps=eps)
        terms = vae.vae_loss(logits, target, mu, logvar, config, capacity=C, z=z)
        return terms.total.mean(), terms.batch_sums().detach()

    compiled, state = _compile(loss, next(model.parameters()).device), {"batch": None, "failed": False}

    def step(x, target, step_idx):
        state["batch"] = state["batch"] or x.shape[0]
        if state["failed"] or x.shape[0] != state["batch"]:  # no recompiles for an epoch's short last batch
            return eager(x, target, step_idx)
        eps = torch.randn(x.shape[0], config.latent_dim, device=x.device, dtype=x.dtype)  # = randn_like(mu)
        optimizer.zero_grad(set_to_none=True)
        try:
            total, sums = compiled(x, target, eps, torch.tensor(_capacity(config, step_idx)))
        except Exception as e:  # a compiler or toolchain failure must not end the run
            _failed(log, e)
            state["failed"] = True
            return eager(x, target, step_idx, eps)
        total.backward()
        optimizer.step()
        return sums

    step.compiled = True
    return step


def fused_problem(model, optimizer):
    """Why FusedStep cannot train this model with this optimizer, or None. An optimizer that does not hold the
    model's parameters is no pair at all: ValueError."""
    if [id(p) for g in optimizer.param_groups for p in g["params"]] != [id(p) for p in model.parameters()]:
        raise ValueError("the optimizer does not hold this model's parameters, in order: build it from them")
    group, plain = optimizer.param_groups[0], type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1
    options = ("amsgrad", "maximize", "differentiable", "capturable", "decoupled_weight_decay")
    if not plain or any(map(group.get, options)) or isinstance(group["lr"], torch.Tensor):
        return "the fused step reproduces plain single-group Adam only"
    if not all(p.requires_grad for p in model.parameters()):
        return "a parameter is frozen (requires_grad False)"
    if len({float(optimizer.state[p].get("step", 0)) for p in model.parameters()}) > 1:
        return "Adam's step counts differ between parameters"
    twin = copy.deepcopy(model).double().train()  # the formulation against the model's own layers, once
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    eps = torch.randn(4, twin.config.latent_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    buffers, close = {k: v.clone() for k, v in twin.named_buffers()}, lambda a, b: torch.allclose(a, b, atol=1e-9)
    try:
        got = chwn.forward(dict(twin.named_parameters()), buffers, x.reshape(4, -1).t(), eps)
        same = all(close(a.reshape(b.shape), b) for a, b in zip(got, twin(x, eps=eps)))
        same = same and all(close(buffers[k], v) for k, v in twin.named_buffers())
    except (KeyError, RuntimeError, ValueError) as e:
        return f"the model is not vae.py's layout, which plumbing/chwn.py is written for ({type(e).__name__}: {e})"
    return None if same else "the model computes something else than plumbing/chwn.py's formulation of vae.py"


class FusedStep:
    """One compiled graph per step on a CPU: plumbing/chwn.py's forward pass, its gradient (torch.func) and
    torch.optim.Adam's update, on three flat tensors that the parameters and Adam's moments are views of, so the graph
    takes a dozen tensors and the update is one fused kernel. state_dict() and optimizer.state_dict() are those of
    plain training; a batch of another size (an epoch's short last one) takes the eager step, on the same tensors. Its
    contract, that nothing replaces those tensors after it is built, is checked by fused_problem() and check()."""

    def __init__(self, model, optimizer, config, eager, log):
        self.model, self.optimizer, self.config, self.eager, self.log = model, optimizer, config, eager, log
        self.params, self.buffers = list(model.parameters()), list(model.buffers())
        names, bnames = [n for n, _ in model.named_parameters()], [n for n, _ in model.named_buffers()]
        bounds = [0, *torch.tensor([p.numel() for p in self.params]).cumsum(0).tolist()]
        slices = [(a, b, p.shape) for a, b, p in zip(bounds, bounds[1:], self.params)]
        self.p = torch.cat([p.detach().reshape(-1) for p in self.params])
        torch.nn.utils.vector_to_parameters(self.p, self.params)  # each parameter's data: a view of self.p
        self.m, self.v, self.steps = torch.zeros_like(self.p), torch.zeros_like(self.p), torch.zeros(len(self.params))
        for i, (p, (a, b, shape)) in enumerate(zip(self.params, slices)):
            if st := optimizer.state[p]:
                self.m[a:b].copy_(st["exp_avg"].reshape(-1))
                self.v[a:b].copy_(st["exp_avg_sq"].reshape(-1))
                self.steps[i] = float(st["step"])  # Adam keeps its step counts on the CPU, one per parameter
            st.update(exp_avg=self.m[a:b].view(shape), exp_avg_sq=self.v[a:b].view(shape), step=self.steps[i])
        self.kept = [(p, p.data_ptr(), optimizer.state[p]["exp_avg"]) for p in self.params]
        self.batch, self.ok, self.failed = None, False, False

        def loss(params, buffers, x, target, eps, C, beta):
            logits, mu, logvar = chwn.forward(dict(zip(names, params)), dict(zip(bnames, buffers)), x.t(), eps)
            terms = vae.vae_loss(logits, target, mu, logvar, config, capacity=C, beta=beta)
            return terms.total.mean(), terms.batch_sums().detach()

        grad_and_loss = torch.func.grad_and_value(loss, has_aux=True)

        def graph(fp, fm, fv, steps, buffers, x, target, eps, scalars, hp):
            # the gradient with respect to each parameter's view, then concatenated: with respect to fp itself,
            # inductor built a masked sum over all 26 sources for every element (docs/speed.md)
            C, beta, lr = scalars.unbind()  # tensors, not constants: a sweep's β values and seeds share one graph
            grads, (_, sums) = grad_and_loss([fp[a:b].view(s) for a, b, s in slices], buffers, x, target, eps, C, beta)
            g = torch.cat([gi.reshape(-1) for gi in grads])
            beta1, beta2, adam_eps, weight_decay = hp  # floats: a change compiles again
            with torch.no_grad():  # torch.optim.Adam's update (foreach, not capturable)
                if weight_decay != 0:
                    g = g + weight_decay * fp
                steps.add_(1)
                t = steps[0]
                fm.lerp_(g, 1 - beta1)
                fv.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (fv.sqrt() / (1 - beta2**t).sqrt()).add_(adam_eps)
                fp.sub_(lr / (1 - beta1**t) * fm / denom)
            return sums

        self.compiled = _compile(graph, self.p.device)

    def check(self):
        """Refuse to go on if the model or optimizer no longer hold the step's tensors (replaced from outside)."""
        state, ids = self.optimizer.state, lambda tensors: [id(t) for t in tensors]
        same = ids(self.model.parameters()) == ids(self.params) and ids(self.model.buffers()) == ids(self.buffers)
        if not same or not all(p.data_ptr() == ptr and state[p].get("exp_avg") is m for p, ptr, m in self.kept):
            raise RuntimeError(
                "the model or its optimizer was given new tensors after the compiled step was built: build the step "
                "again (training.make_train_step) after changing them"
            )

    def __call__(self, x, target, step_idx):
        n = self.batch = self.batch or x.shape[0]
        if self.failed or x.shape[0] != n:  # no recompiles for an epoch's short last batch
            return self.eager(x, target, step_idx)
        eps = torch.randn(n, self.config.latent_dim, dtype=x.dtype)  # = randn_like(mu)
        group = self.optimizer.param_groups[0]  # read each step: a schedule may change lr
        scalars = [_capacity(self.config, step_idx), self.config.beta, group["lr"]]
        scalars, state = torch.tensor(scalars, dtype=torch.float64), (self.p, self.m, self.v, self.steps, *self.buffers)
        hp = (*map(float, group["betas"]), float(group["eps"]), float(group["weight_decay"]))
        saved = None if self.ok else [t.clone() for t in state]  # until it has run once, a failure is undone
        try:
            out = self.compiled(*state[:4], self.buffers, x.reshape(n, -1), target.reshape(n, -1), eps, scalars, hp)
        except Exception as e:  # a compiler or toolchain failure must not end the run
            if saved is None:
                raise
            for dst, src in zip(state, saved):
                dst.copy_(src)
            _failed(self.log, e)
            self.failed = True
            return self.eager(x, target, step_idx, eps)  # the noise already drawn: the run stays the eager run
        self.ok = True
        return out


def make_seed_step(model, opt, config):
    """The course project's step (--loop seed): BCE on sigmoid probabilities, the loss summed over the batch."""

    def step(x, target, step_idx):
        mu, logvar = model.encode(x)
        recon = model.decode(vae.reparameterize(mu, logvar, torch.randn_like(mu)))
        rec = torch.nn.functional.binary_cross_entropy(recon, target, reduction="none").flatten(1).sum(1)
        kl_per_dim = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
        terms = vae.LossTerms(rec, kl_per_dim.sum(1), rec + config.beta * kl_per_dim.sum(1), kl_per_dim)
        opt.zero_grad()
        loss = terms.total.sum()
        loss.backward()
        opt.step()
        loss.item(), loss.item()  # its loop reads the loss twice a step (its sum, its progress bar)
        return terms.batch_sums().detach()

    return step


def seed_batches(data_dir, batch_size, device):
    """Batches as the course project made them: per-image PIL transforms in DataLoader workers (half the cores)."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = datasets.FashionMNIST(data_dir, train=True, download=False, transform=tf)
    workers = (os.cpu_count() or 0) // 2
    for x, y in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers):
        x = x.to(device)
        yield x, (x + 1) / 2, y


class NonFinite(Exception):
    """The loss or the weights became NaN or infinite; the message says where."""


def epoch_loop(step, train, s, epoch, state, progress=True):
    """Train one epoch. s: the run's settings (seed, batch_size, epochs, latent_dim, loop, data_dir). Returns (mean
    sums per image, the objective per image of each step, images/s)."""
    getattr(step, "check", lambda: None)()  # FusedStep's contract
    g = torch.Generator(device=train.device).manual_seed(s["seed"] * 100_003 + epoch)
    torch.manual_seed(s["seed"] * 100_003 + epoch)  # the reparameterization noise: reproducible from the epoch
    n_steps = math.ceil(len(train) / s["batch_size"])
    hist = torch.zeros(n_steps, 3 + s["latent_dim"], device=train.device)
    sizes = torch.zeros(n_steps, device=train.device)
    desc, disable = f"epoch {epoch + 1}/{s['epochs']}", None if progress else True  # None: drawn on a terminal only
    bar = tqdm(total=n_steps, desc=desc, leave=False, disable=disable, file=sys.stderr)
    t0 = time.perf_counter()
    if s.get("loop", "fast") == "seed":
        batches = seed_batches(s["data_dir"], s["batch_size"], train.device)
    else:
        batches = train.batches(s["batch_size"], shuffle=True, generator=g)
    for i, (x, target, _) in enumerate(batches):
        hist[i] = step(x, target, state["step"])
        sizes[i] = len(x)
        state["step"] += 1
        if i % 25 == 24 or i == n_steps - 1:  # the only host syncs: every 25 steps
            if len(bad := (~torch.isfinite(hist[i - i % 25 : i + 1, 2])).nonzero()):
                where = i - i % 25 + bad[0, 0].item()
                raise NonFinite(f"the loss became {hist[where, 2].item()} at epoch {epoch + 1}, step {where + 1}")
            bar.set_postfix(loss=f"{hist[i, 2].item() / len(x):.2f}", refresh=False)
            bar.update(i + 1 - bar.n)
    if train.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    bar.close()
    return (hist.sum(0) / len(train)).tolist(), (hist[:, 2] / sizes).tolist(), len(train) / seconds


@torch.inference_mode()
def test_metrics(model, test, config, seed, step_idx, batch_size=64):
    """Single-sample ELBO terms on the test split (mean per image), with fixed noise so epochs compare fairly. The tc
    objective's estimators depend on the batch: its test pass uses the training batch size."""
    model.eval()
    g = torch.Generator(device=test.device).manual_seed(seed)
    sums = torch.zeros(3 + config.latent_dim, device=test.device)
    for x, target, _ in test.batches(batch_size if config.objective == "tc" else TEST_BATCH):
        eps = torch.randn((x.shape[0], config.latent_dim), device=x.device, dtype=x.dtype, generator=g)
        logits, mu, logvar, z = model.forward_with_z(x, eps=eps)
        sums += vae.vae_loss(logits, target, mu, logvar, config, step=step_idx, z=z).batch_sums()
    model.train()
    return (sums / len(test)).tolist()
