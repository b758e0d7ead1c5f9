"""The checks a checkpoint passes before use (vae.read_checkpoint): a damaged or hostile file ends in a CheckpointError
that says what to do, at no cost beyond its bytes. Tensors must hold their own elements before any value is read (an
expanded one is a few bytes on disk, any size in memory); other fields are kept only with a known name and type.
"""

import math
import reprlib

import torch

from plumbing.cli import shown
from plumbing.files import zip_problem

REQUIRED = ("format_version", "model_args", "model", "optimizer", "epoch", "seed", "train_args", "metrics")
HYPER = ("lr", "betas", "eps", "weight_decay")  # what a resumed run takes from the saved Adam state
DAMAGED = "retrain, or resume from a backup of the run folder"
MAX_LIST = 10_000  # entries of a list in a history record: kl_per_dim has at most 4,096, a curve 100
archive_problem = zip_problem  # bytes that could make torch.load allocate more than they hold, refused before it reads
is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
_numbers = lambda v: isinstance(v, list) and len(v) <= MAX_LIST and all(is_number(x) for x in v)
first_line = lambda e, limit=160: (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, foreign or inconsistent; the message says what to do."""


_REPR = reprlib.Repr()  # bounded in depth and length (Python 3.11's takes no arguments)
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 40, 40, 4, 4, 4


def brief(v):
    """repr(v) bounded in depth and length: safe for a list nested 20,000 deep or an integer past 4,300 digits."""
    if is_int(v) and abs(v) >= 10**30:
        return f"an integer of {v.bit_length()} bits"
    return shown(_REPR.repr(v), 60)


def load_error(e):
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:  # torch's own text suggests weights_only=False: never for a stranger's file
        detail = first_line(text.split("WeightsUnpickler error:", 1)[1], 120)
        return f"the safe loader refused it, it may hold code: {detail}"
    return first_line(e)


def tensor_problem(t, name):
    """Why a tensor does not hold its own elements (it is expanded, or a view past its storage), or None."""
    if not (t.is_contiguous() or t.numel() <= 1):
        return f"{name} is not a plain tensor"
    if (t.storage_offset() + t.numel()) * t.element_size() > t.untyped_storage().nbytes():
        return f"{name} declares more elements than it holds"
    return None


def _tensors(ckpt):
    """(name, tensor) of every tensor in the model's and the optimizer's state (dicts), whatever the nesting found."""
    found = [(f"model entry {shown(k, 80)}", t) for k, t in ckpt["model"].items()]  # all tensors, checked first
    state = ckpt["optimizer"].get("state")
    for key, st in state.items() if isinstance(state, dict) else ():
        for name, t in st.items() if isinstance(st, dict) else ():
            if isinstance(t, torch.Tensor):
                found.append((f"optimizer state {shown(name, 40)} of parameter {brief(key)}", t))
    return found


def _summary_problem(m):
    if not isinstance(m, dict) or not all(is_number(m.get(k)) for k in ("recon", "kl", "total")):
        return "recon, kl and total numbers"
    return None if _numbers(m.get("kl_per_dim")) else "a kl_per_dim list of numbers"


def clean_history(metrics, max_epochs):
    """(the epoch records with only their known fields, or None; what is wrong with them, or None)."""
    kept = []
    for i, m in enumerate(metrics):
        record = isinstance(m, dict) and is_int(m.get("epoch")) and 0 < m["epoch"] <= max_epochs
        if not (record and is_number(m.get("img_per_s", 0)) and is_int(m.get("step", 0)) and m.get("step", 0) >= 0):
            return None, f"metrics entry {i} is not an epoch record"
        for split in ("train", "test"):
            if problem := _summary_problem(m.get(split)):
                return None, f"metrics entry {i} has no {split} record with {problem}"
        if not _numbers(m.get("curve", [])):
            return None, f"metrics entry {i} has a curve that is not a list of numbers"
        summary = {s: {k: m[s][k] for k in ("recon", "kl", "total", "kl_per_dim")} for s in ("train", "test")}
        kept.append({k: summary.get(k, m[k]) for k in m if k in ("epoch", "step", *summary, "img_per_s", "curve")})
    return kept, None


# The train_args a checkpoint keeps, each with its check; others are dropped
_count = lambda low: lambda v: is_int(v) and v >= low
TRAIN_ARGS = {"batch_size": _count(1), "seed": _count(0), "epochs": _count(0), "lr": lambda v: is_number(v) and v > 0}
TRAIN_ARGS |= {"loop": lambda v: v in ("fast", "seed"), "data_dir": lambda v: isinstance(v, str) and len(v) < 4096}
TRAIN_ARGS["dataset"] = lambda v: v in ("fashion-mnist", "sprites")


def _fields_problem(ckpt, settings):
    for key in ("model_args", "model", "optimizer", "train_args", "metrics"):
        kind = list if key == "metrics" else dict
        if not isinstance(ckpt[key], kind):
            return f"{key} is a {type(ckpt[key]).__name__}, not a {kind.__name__}"
    max_epochs, seeds = settings["epochs"].high, settings["seed"]
    if not is_int(ckpt["epoch"]) or not 0 <= ckpt["epoch"] <= max_epochs:
        return f"epoch is {brief(ckpt['epoch'])}, not a count of epochs"
    if not is_int(ckpt["seed"]) or not seeds.low <= ckpt["seed"] <= seeds.high:
        return f"seed is {brief(ckpt['seed'])}, not a seed from {seeds.low} to {seeds.high}"
    if (size := ckpt["model_args"].get("dataset_size")) is not None and not (is_int(size) and 0 < size <= 10**9):
        return f"model_args dataset_size is {brief(size)}"
    if not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in ckpt["model"].items()):
        return "model holds entries that are not named tensors"
    for name, t in _tensors(ckpt):  # before any value is read
        if problem := tensor_problem(t, name):
            return problem
    for key, ok in TRAIN_ARGS.items():
        if key in ckpt["train_args"] and not ok(ckpt["train_args"][key]):
            return f"train_args[{key!r}] is {brief(ckpt['train_args'][key])}"
    ckpt["train_args"] = {k: v for k, v in ckpt["train_args"].items() if k in TRAIN_ARGS}
    if problem := _optimizer_problem(ckpt["optimizer"]):
        return problem
    ckpt["metrics"], problem = clean_history(ckpt["metrics"], max_epochs)
    return problem


def check_checkpoint(ckpt, path, version, settings):
    """Refuse a checkpoint dict whose fields are not what train.py writes; drop fields this code does not know."""
    if not isinstance(ckpt, dict):
        kind = type(ckpt).__name__
        raise CheckpointError(f"{path} holds a {kind}, not a checkpoint dict; pass a checkpoint.pt written by train.py")
    if missing := ", ".join(k for k in REQUIRED if k not in ckpt):
        problem = f"is not a checkpoint of this project's format (missing {missing}); retrain with train.py"
        raise CheckpointError(f"{path} {problem}")
    if ckpt["format_version"] != version:
        problem = f"has checkpoint format {brief(ckpt['format_version'])}, this code reads {version}"
        raise CheckpointError(f"{path} {problem}; use the matching version of the project or retrain")
    if problem := _fields_problem(ckpt, settings):
        raise CheckpointError(f"{path} is damaged: {problem}; {DAMAGED}")


def _hyper_problem(group):
    """What is wrong with an Adam group's numbers, or None: NaN would show only later, as a loss that "became nan"."""
    betas = group.get("betas")
    if not (is_number(group.get("lr")) and group["lr"] > 0):
        return f"lr {brief(group.get('lr'))}"
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
        return f"betas {brief(betas)}"
    for key in ("eps", "weight_decay"):
        if not (is_number(group.get(key)) and group[key] >= 0):
            return f"{key} {brief(group.get(key))}"
    if not (isinstance(group.get("params"), list) and all(is_int(i) for i in group["params"])):
        return "params that are not a list of parameter numbers"
    return None


def _optimizer_problem(opt):
    """What is wrong with saved Adam state, or None; {} is a checkpoint saved without an optimizer."""
    if not opt:
        return None
    if set(opt) != {"state", "param_groups"}:
        return "optimizer is not an optimizer's state (it needs exactly state and param_groups)"
    if not isinstance(opt["state"], dict) or not isinstance(opt["param_groups"], list):
        kinds = f"{type(opt['state']).__name__} and its param_groups a {type(opt['param_groups']).__name__}"
        return f"optimizer state is a {kinds}, not a dict and a list"
    for i, group in enumerate(opt["param_groups"]):
        if problem := (_hyper_problem(group) if isinstance(group, dict) else "not a dict"):
            return f"optimizer parameter group {i} has {problem}"
    for key, st in opt["state"].items():
        if not is_int(key) or not isinstance(st, dict) or not all(isinstance(k, str) for k in st):
            return f"optimizer state entry {brief(key)} is not a parameter's state"
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                # exp_avg_sq may be +inf: a squared gradient past float range (Adam then steps 0), saved by train.py
                ok = (~torch.isnan(v) & (v >= 0)).all() if name == "exp_avg_sq" else torch.isfinite(v).all()
                if not v.is_floating_point() or not ok:
                    return f"optimizer state {name} of parameter {brief(key)} is not finite real numbers"
            elif not is_number(v):
                return f"optimizer state {name} of parameter {key} is {brief(v)}"
    return None


def optimizer_fit_problem(optimizer, saved):
    """Why checked Adam state `saved` does not fit `optimizer`'s parameters, or None."""
    groups = saved.get("param_groups") if saved else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return f"it has {len(groups) if isinstance(groups, list) else 'no'} parameter groups"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    numbers = [i for g in groups for i in g["params"]]
    sizes, saved_sizes = ([len(g["params"]) for g in gs] for gs in (optimizer.param_groups, groups))
    if sorted(numbers) != list(range(len(params))) or sizes != saved_sizes:
        return "its parameter numbers do not match the model's"
    for i, st in saved["state"].items():
        if not 0 <= i < len(params):
            return f"it has state for parameter {i}, which the model does not have"
        p = params[numbers.index(i)]
        for key in ("exp_avg", "exp_avg_sq"):
            if not isinstance(t := st.get(key), torch.Tensor) or t.shape != p.shape:
                return f"its {key} does not match a parameter of shape {tuple(p.shape)}"
        step = st.get("step")
        step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
        if not is_number(step) or not 0 <= step < 2**53:
            return f"its step count is {brief(step)}"
    return None


def fit_problem(mine, theirs):
    """The first weight missing, unexpected or of another shape than the model's, or None."""
    for name in sorted(set(mine) | set(theirs)):
        if name not in theirs or name not in mine:
            return f"{'missing' if name not in theirs else 'unexpected'} {shown(name, 80)}"
        if theirs[name].shape != mine[name].shape:
            return f"{shown(name, 80)} has shape {tuple(theirs[name].shape)}, not {tuple(mine[name].shape)}"
    return None


def weights_problem(mine, theirs):
    """Saved weights of another dtype than the model's (load_state_dict would keep a complex one's real part) or
    BatchNorm variances below 0 (NaN in every pass), or None; fit_problem() checks shapes first."""
    for name, t in theirs.items():
        if t.dtype != mine[name].dtype:
            got, want = (str(d).replace("torch.", "") for d in (t.dtype, mine[name].dtype))
            return f"{shown(name, 80)} holds {got} values, not {want}"
        if name.endswith("running_var") and t.is_floating_point() and (t < 0).any():
            return f"{shown(name, 80)} holds negative variances"
    return None
