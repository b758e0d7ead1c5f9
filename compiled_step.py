"""The compiled training step (training.make_train_step with compile=True), and its compiled test pass.

One graph per step (torch.compile, no private torch API): forward, backward (torch.func.grad_and_value) and the Adam
update. Why it is fast on a CPU (bench.py measures it, docs/speed.md explains it):
  * no autograd-engine, optimizer-loop or zero_grad overhead per step, and inductor fuses the many small ops;
  * the forward pass is chwn_forward.py's formulation of the model's layers as GEMMs and gathers with the batch
    innermost, which inductor and MKL run well at these sizes (on CUDA, or for a layer it does not reproduce, the
    module's own layers);
  * the parameters and Adam's moments live in three flat tensors, and the model's parameters and the optimizer's
    state are views of them (torch.nn.utils.vector_to_parameters). The graph takes ~15 tensors instead of ~115,
    and guards only on its arguments (_drop_static_guards), so dynamo's per-call check stays cheap; the Adam update
    is one fused elementwise kernel;
  * the test pass at an epoch's end is compiled too (step.test_sums, the plan in eval mode).
state_dict() and optimizer.state_dict() are those of plain training (same keys, shapes and values up to float
rounding), and eager steps (an epoch's short last batch) update the same tensors. State replaced from outside
(optimizer.load_state_dict on --resume, new parameter tensors, a swapped layer, a convolution's or BatchNorm's
settings) is noticed, copied into fresh flat tensors and compiled again; a frozen parameter (requires_grad False)
sends steps to the eager step, which leaves it as it is. A failure while compiling or in the first compiled call
restores the state and falls back to the eager step with one warning.
"""
import re
import types

import torch

import chwn_forward
import vae


def adam_supported(model, optimizer):
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    g = optimizer.param_groups[0]
    if g.get("amsgrad") or g.get("maximize") or g.get("differentiable") or g.get("capturable") \
            or g.get("fused") or g.get("decoupled_weight_decay"):
        return False
    if isinstance(g["lr"], torch.Tensor) or isinstance(g["betas"][0], torch.Tensor):
        return False
    return [id(p) for p in g["params"]] == [id(p) for p in model.parameters()]


def _same(live, kept):
    """Whether an iterable of tensors is exactly the list kept: the same objects, as many."""
    live = list(live)
    return len(live) == len(kept) and all(a is b for a, b in zip(live, kept))


class FlatState:
    """The model's parameters and Adam's state as views of flat tensors p, m, v (and per-parameter steps)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.adopt()

    def views(self, flat):
        return [flat[a:b].view(s) for a, b, s in zip(self.offsets, self.offsets[1:], self.shapes)]

    def adopt(self):
        """Copy the current parameters and Adam state into new flat tensors and point both at views of them."""
        self.params = list(self.model.parameters())   # the optimizer's own (adam_supported checks it first)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for p in self.params]
        self.offsets = [0]
        for p in self.params:
            self.offsets.append(self.offsets[-1] + p.numel())
        params, state = self.params, self.optimizer.state
        self.p = torch.cat([p.detach().reshape(-1) for p in params])
        torch.nn.utils.vector_to_parameters(self.p, params)   # each parameter's data: a view of self.p
        self.m, self.v = torch.zeros_like(self.p), torch.zeros_like(self.p)
        self.steps = torch.zeros(len(params), dtype=torch.float32)   # Adam keeps its step counts on the CPU
        for i, (p, m, v) in enumerate(zip(params, self.views(self.m), self.views(self.v))):
            st = state[p]
            if st:
                m.copy_(st["exp_avg"])
                v.copy_(st["exp_avg_sq"])
                self.steps[i] = float(st["step"])
            st.update(exp_avg=m, exp_avg_sq=v, step=self.steps[i])   # torch.optim.Adam's lazy init, as views
        # Plain training steps every parameter together; state of mixed ages is left to torch.optim.Adam
        self.uniform = bool((self.steps == self.steps[0]).all())
        self.buffers = list(self.model.buffers())
        self.state_ref, self.group = state, self.optimizer.param_groups[0]
        self.check = [(p, p.data_ptr(), state[p]["exp_avg"], state[p]["exp_avg_sq"], state[p]["step"])
                      for p in params]

    def intact(self):
        """Whether the model still has these parameters and buffers and everything is still a view of the flat
        tensors (load_state_dict replaces the optimizer's state, a replaced layer brings new parameters)."""
        state = self.optimizer.state
        return state is self.state_ref and self.optimizer.param_groups[0] is self.group and all(
            p.data_ptr() == ptr and state[p]["exp_avg"] is m and state[p]["exp_avg_sq"] is v and state[p]["step"] is s
            for p, ptr, m, v, s in self.check) and _same(self.model.parameters(), self.params) \
            and _same(self.model.buffers(), self.buffers)


def _loss_of(params, buffers, x, target, eps, C, config, static):   # -> (loss, sums): grad_and_value's has_aux form
    flat, plan, bnames, model = static
    P = dict(zip(flat.names, params))
    if plan is not None:
        logits, mu, logvar = plan.forward(P, dict(zip(bnames, buffers)), x, eps)
        target = plan.target(target)
    else:
        P.update(zip(bnames, buffers))
        logits, mu, logvar = torch.func.functional_call(model, P, (x,), {"eps": eps})
    terms = vae.vae_loss(logits, target, mu, logvar, config, capacity=C)
    return terms.total.mean(), terms.batch_sums().detach()


_grad_and_loss = torch.func.grad_and_value(_loss_of, has_aux=True)


def _step_graph(static, fp, fm, fv, steps, buffers, x, target, eps, C, lr, hp, config):
    """One training step: the gradient, then torch.optim.Adam's update (foreach, not capturable) in place on the flat
    tensors. Differentiated with respect to each parameter's view, then concatenated: with respect to fp itself, the
    gradient is a sum of one zero-padded slice per parameter, which inductor evaluates for every element of the 90k
    (masked loads from 26 sources): that kernel alone was 1/8 of the step."""
    grads, (_, sums) = _grad_and_loss(static[0].views(fp), buffers, x, target, eps, C, config, static)
    g = torch.cat([gi.reshape(-1) for gi in grads])
    beta1, beta2, adam_eps, weight_decay = hp   # Python floats: dynamo guards on each, a change recompiles
    with torch.no_grad():
        if weight_decay != 0:
            g = g + weight_decay * fp
        steps.add_(1)
        t = steps[0]
        fm.lerp_(g, 1 - beta1)
        fv.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (fv.sqrt() / (1 - beta2 ** t).sqrt()).add_(adam_eps)
        fp.sub_(lr / (1 - beta1 ** t) * fm / denom)
    return sums


def _test_graph(static, fp, buffers, x, target, eps, C, config):
    """The test pass's batch sums in eval mode, from the plan."""
    flat, plan, bnames, _ = static
    P, Bf = dict(zip(flat.names, flat.views(fp))), dict(zip(bnames, buffers))
    logits, mu, logvar = plan.forward(P, Bf, x, eps, training=False)
    return vae.vae_loss(logits, plan.target(target), mu, logvar, config, capacity=C).batch_sums()


def _compiled(fn, device, plan):
    """torch.compile of fn with a code object of its own. Dynamo keeps compiled graphs, their guards and its recompile
    limit on the code object, so without this every step built in a process would share one cache, and with the
    guards _drop_static_guards drops, a step could run a graph another step traced for another plan."""
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.compile(own, dynamic=False, fullgraph=True, options=_options(device, plan))


def make(model, optimizer, config, eager_step, formulation="auto", log=print):
    """The compiled step(x, target, step_idx), falling back to eager_step (a short batch, eval mode, state it does not
    reproduce, a failed compile). See training.make_train_step."""
    device = next(model.parameters()).device
    flat = FlatState(model, optimizer)
    built = {}   # the plan (a snapshot of the layers' settings), `static` and the compiled step: rebuilt on a change

    def build():
        plan = None
        if formulation == "chwn" or (formulation == "auto" and device.type == "cpu"):
            try:
                plan = chwn_forward.Plan(model)
            except chwn_forward.Unsupported as e:
                if formulation == "chwn":
                    raise
                log(f"note: the compiled step uses the module's own layers, slower on a CPU ({e})")
        static = (flat, plan, [n for n, _ in model.named_buffers()], model)   # see _drop_static_guards
        # ok: whether this compiled step has run once (until then a failure restores the state and goes eager)
        built.update(plan=plan, static=static, compiled=_compiled(_step_graph, device, plan), ok=False)

    build()
    state = {"batch": None, "off": False, "eager": False, "noted": set()}

    def eager(x, target, step_idx, why=None):
        """An eager step. Afterwards Adam's per-parameter step counts may differ (a parameter frozen meanwhile):
        checked again before the next compiled step."""
        if why and why not in state["noted"]:
            state["noted"].add(why)
            log(f"note: {why}: the eager step trains the model")
        state["eager"] = True
        return eager_step(x, target, step_idx)

    def step(x, target, step_idx):
        if state["batch"] is None:
            state["batch"] = x.shape[0]
        if state["off"] or x.shape[0] != state["batch"] or not model.training:
            return eager(x, target, step_idx)   # no recompiles for a short last batch
        if not flat.intact():   # replaced from outside (load_state_dict, new parameter tensors): copy it in again
            if not adam_supported(model, optimizer):
                return eager(x, target, step_idx)
            flat.adopt()
            build()
        elif built["plan"] is not None and not built["plan"].matches(model):   # a layer, its settings or mode
            build()
        if not all(p.requires_grad for p in flat.params):   # frozen: eager leaves it, and its Adam state, as it is
            return eager(x, target, step_idx, "a parameter is frozen (requires_grad False)")
        if state["eager"]:   # a parameter frozen during eager steps lags the others' Adam step count
            flat.uniform = bool((flat.steps == flat.steps[0]).all())
            state["eager"] = False
        if not flat.uniform:
            return eager(x, target, step_idx, "Adam's step counts differ between parameters")
        plan, static = built["plan"], built["static"]
        eps = torch.randn(x.shape[0], config.latent_dim, device=x.device, dtype=x.dtype)   # = randn_like(mu)
        C = _capacity(config, step_idx)
        group = optimizer.param_groups[0]   # read every step: a scheduler or load_state_dict may change it
        lr = torch.tensor(float(group["lr"]), dtype=torch.float64)
        hp = (*map(float, group["betas"]), float(group["eps"]), float(group["weight_decay"]))
        for p in flat.params:
            p.grad = None   # zero_grad(set_to_none=True): stale .grad must not survive
        saved = None if built["ok"] else [t.clone() for t in (flat.p, flat.m, flat.v, flat.steps, *flat.buffers)]
        try:
            xi, ti = plan.inputs(x, target) if plan is not None else (x, target)
            out = built["compiled"](static, flat.p, flat.m, flat.v, flat.steps, flat.buffers, xi, ti, eps, C, lr, hp,
                                    config)
        except Exception as e:   # a compiler or toolchain failure must not end the run
            if saved is None:
                raise
            for dst, src in zip((flat.p, flat.m, flat.v, flat.steps, *flat.buffers), saved):
                dst.copy_(src)
            log(f"warning: compiling the training step failed ({_reason(e)}); "
                "training goes on with the eager step (--compile off skips the attempt)")
            state["off"] = True
            return eager_step(x, target, step_idx, eps)   # the noise already drawn: the run stays the eager run
        built["ok"] = True
        return out

    step.eager_step = eager_step
    step.flat = flat
    step.built = built   # built["plan"]: None when the step uses the module's own layers
    # whether the step takes DeviceData.batches(batch_innermost=True) as it is (read per epoch: a rebuild may change it)
    step.batch_innermost = lambda: built["plan"] is not None
    if built["plan"] is not None:
        step.test_sums = _compiled_test_sums(built, flat, model, config, log, usable=lambda: not state["off"])
    return step


def _capacity(config, step_idx):
    """C(step) of the capacity objective as a tensor (a Python float would be a constant of the graph: a recompile
    every step); 0 for the others, which do not read it."""
    return torch.tensor(vae.capacity_at(step_idx, config) if config.objective == "capacity" else 0.0)


def _reason(e):
    """An exception in one short line, for the one warning a failed compile gives."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _options(device, plan):
    """torch.compile's options: inductor's C++ wrapper on a CPU (less Python per call); with a plan, drop the guards
    on the graph's `static` argument (_drop_static_guards)."""
    options = {"cpp_wrapper": True} if device.type == "cpu" else {}
    if plan is not None:
        options["guard_filter_fn"] = _drop_static_guards
    return options or None


_STATIC = re.compile(r"(\w+\()*static\b")   # a guard's source: static[0].shapes, dict(type(static[1]...), ...


def _drop_static_guards(entries):
    """A guard_filter_fn (torch.compile's documented control of guards, like torch.compiler.skip_guard_on_globals_unsafe):
    keep the guards on the call's own arguments and on global state (grad mode and the like), drop those on what
    does not change while a compiled function lives: its `static` argument (the flat state's offsets, shapes and
    names, and the plan, a snapshot of the layers' settings that step() compares with the model before every call,
    rebuilding plan and compiled function on a difference), and module globals (torch's and this project's functions
    and constants: rebinding one after the first call, as a test's monkeypatch would, is not seen). Dynamo would
    check each list entry, closure cell and default argument of those on every call: 679 guards, 37 kept; the step
    got 4-6% faster (measured). Every tensor, VAEConfig (β and the rest) and Adam's settings stay guarded, so a
    change to any of them still recompiles. The module formulation (functional_call over the model) keeps all its
    guards: a swapped layer must recompile."""
    return [not (entry.is_global or entry.name.startswith("__import__(") or _STATIC.match(entry.name))
            for entry in entries]


def _compiled_test_sums(built, flat, model, config, log, usable):
    """test_sums(x, target, eps, step_idx) -> the batch's sums (LossTerms.batch_sums) in eval mode, as the module
    gives them, from a compiled graph of the plan's forward pass (compiled again when the step rebuilds its plan);
    None for a batch of another size than the first (no recompiles for a split's short last batch), when the model
    no longer matches the plan, and once compiling it or the step (usable()) has failed."""
    state = {"batch": None, "off": False, "plan": None, "compiled": None}

    def test_sums(x, target, eps, step_idx):
        if state["batch"] is None:
            state["batch"] = x.shape[0]
        plan = built["plan"]
        if state["off"] or not usable() or x.shape[0] != state["batch"] or plan is None or not flat.intact() \
                or not plan.matches(model):
            return None
        if state["plan"] is not plan:
            state.update(plan=plan, compiled=_compiled(_test_graph, flat.p.device, plan))
        C = _capacity(config, step_idx)
        try:
            return state["compiled"](built["static"], flat.p, flat.buffers, *plan.inputs(x, target), eps, C, config)
        except Exception as e:   # a compiler or toolchain failure must not end the run
            log(f"warning: compiling the test pass failed ({_reason(e)}); it goes on uncompiled")
            state["off"] = True
            return None
    return test_sums
