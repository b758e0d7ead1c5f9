"""Checkpoints: one dict per run (weights, model_args, optimizer state, epoch, seed, train_args, metrics), saved
atomically and read back checked, so that `load_checkpoint(path)` rebuilds the model in one call and a damaged or
hostile file ends in one CheckpointError that says what to do. torch.load(weights_only=True): a checkpoint can
never run code when loaded.
"""
import dataclasses
import io
import math
import os
import warnings
import zipfile

import torch

from plumbing.cli import shown
from plumbing.files import atomic_write
from vae import BetaVAE, VAEConfig

CHECKPOINT_FORMAT = 1
MAX_EPOCHS, MAX_SEED = 1_000_000, 2**32 - 1  # train.py's ranges of --epochs and --seed
MAX_DATASET = 10**9  # images a run can have trained on (the data's readers stop far below)


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, foreign or inconsistent; the message says what to do."""


REQUIRED_KEYS = ("format_version", "model_args", "model", "optimizer", "epoch", "seed", "train_args", "metrics")


def save_checkpoint(path, model, optimizer, epoch, seed, train_args, metrics, extra=None):
    model = getattr(model, "_orig_mod", model)  # never a compiled wrapper's keys
    ckpt = {
        "format_version": CHECKPOINT_FORMAT,
        "model_args": dataclasses.asdict(model.config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "epoch": int(epoch),
        "seed": int(seed),
        "train_args": dict(train_args),
        "metrics": list(metrics),
        "torch_version": str(torch.__version__),
    }
    if extra:
        ckpt.update(extra)
    save_torch(path, ckpt)


def read_checkpoint(path, map_location="cpu"):
    """The checkpoint dict, checked. weights_only=True: a checkpoint can never run code when loaded."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: pass the checkpoint.pt that train.py wrote")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty: it is not a checkpoint; train again or pick another file")
    check_archive(path)
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before refusing them; our error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle/zip errors have many types; all mean the same thing to the user
        text = str(e).strip()
        if "WeightsUnpickler error:" in text:  # torch's own text suggests weights_only=False: never for a stranger's file
            detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0][:120]
            reason = f"the safe loader refused it, it may hold code: {detail}"
        else:
            reason = text.splitlines()[0][:160] if text else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason}); "
                              "pass a checkpoint.pt written by train.py") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict; "
                              "pass a checkpoint.pt written by train.py")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this project's format (missing {', '.join(missing)}); "
                              "retrain with train.py")
    if ckpt["format_version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {_brief(ckpt['format_version'])}, this code reads "
                              f"{CHECKPOINT_FORMAT}; use the matching version of the project or retrain")
    problem = _field_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}; retrain, or resume from a backup of the run folder")
    return ckpt


def check_archive(path):
    """Refuse, before torch.load reads it, a file that could make it allocate more than the file holds: one that is
    not a zip archive (torch's older formats allocate each tensor at the size the file declares), or whose records
    are compressed (torch.save stores them as they are, so a small compressed file can unpack to gigabytes) or
    declare more bytes than the file has. What torch.load unpacks is then bounded by the file's own size."""
    try:
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{path} is not a readable checkpoint (not a zip archive as torch.save writes: "
                              f"{reason}); pass a checkpoint.pt written by train.py") from None
    size = os.path.getsize(path)
    for info in records:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise CheckpointError(f"{path} is not a readable checkpoint (its record {shown(info.filename, 80)} is "
                                  "compressed, which torch.save never does, so its size says nothing of what it "
                                  "unpacks to); pass a checkpoint.pt written by train.py")
    declared = sum(info.file_size for info in records)
    if declared > size:
        raise CheckpointError(f"{path} is not a readable checkpoint (its records declare {declared:,} bytes, more "
                              f"than its {size:,}); pass a checkpoint.pt written by train.py")


def _brief(v):
    """repr(v) made safe to print: an integer of 5,000 digits is not printed (nor can it be, past 4,300)."""
    if _is_int(v) and abs(v) >= 10**30:
        return f"an integer of {v.bit_length()} bits"
    return shown(repr(v), 60)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v):
    return _is_number(v) and math.isfinite(v)


def _hyperparameter_problem(group):
    """What is wrong with one Adam parameter group's numbers, or None: NaN or inf there would only show later, as a
    loss that "became nan" and a hint to lower --lr."""
    betas = group.get("betas")
    if not (_is_finite(group.get("lr")) and group["lr"] > 0):
        return f"lr {_brief(group.get('lr'))}"
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is_finite(b) and 0 <= b < 1 for b in betas)):
        return f"betas {_brief(betas)}"
    for key in ("eps", "weight_decay"):
        if not (_is_finite(group.get(key)) and group[key] >= 0):
            return f"{key} {_brief(group.get(key))}"
    if not (isinstance(group.get("params"), list) and all(_is_int(i) for i in group["params"])):
        return "params that are not a list of parameter numbers"
    return None


def _optimizer_problem(opt):
    """What is wrong with the structure of saved Adam state (a dict of per-parameter dicts of tensors, a list of
    parameter-group dicts), or None. {} is a checkpoint saved without an optimizer."""
    if not opt:
        return None
    if set(opt) != {"state", "param_groups"}:
        return "optimizer is not an optimizer's state (it needs exactly state and param_groups)"
    if not isinstance(opt["state"], dict) or not isinstance(opt["param_groups"], list):
        return (f"optimizer state is a {type(opt['state']).__name__} and its param_groups a "
                f"{type(opt['param_groups']).__name__}, not a dict and a list")
    for i, group in enumerate(opt["param_groups"]):
        problem = _hyperparameter_problem(group) if isinstance(group, dict) else "not a dict"
        if problem:
            return f"optimizer parameter group {i} has {problem}"
    for key, st in opt["state"].items():
        if not _is_int(key) or not isinstance(st, dict) or not all(isinstance(k, str) for k in st):
            return f"optimizer state entry {_brief(key)} is not a parameter's state"
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                # a squared gradient beyond float range leaves exp_avg_sq at +inf and Adam's update at 0: a state
                # train.py can save with finite weights, so it is allowed there
                ok = (~torch.isnan(v) & (v >= 0)).all() if name == "exp_avg_sq" else torch.isfinite(v).all()
                if v.is_complex() or not v.is_floating_point() or not ok:
                    return f"optimizer state {name} of parameter {_brief(key)} is not finite real numbers"
            elif not _is_finite(v):
                return f"optimizer state {name} of parameter {key} is {_brief(v)}"
    return None


def _summary_problem(m):
    if not isinstance(m, dict) or not all(_is_number(m.get(k)) for k in ("recon", "kl", "total")):
        return "recon, kl and total numbers"
    if not isinstance(m.get("kl_per_dim"), list) or not all(_is_number(v) for v in m["kl_per_dim"]):
        return "a kl_per_dim list of numbers"
    return None


def _field_problem(ckpt):
    """What is wrong with the types of a checkpoint's fields (a file from elsewhere can hold anything), or None."""
    for key, kind in (("model_args", dict), ("model", dict), ("optimizer", dict), ("train_args", dict),
                      ("metrics", list)):
        if not isinstance(ckpt[key], kind):
            return f"{key} is a {type(ckpt[key]).__name__}, not a {kind.__name__}"
    # the ranges train.py accepts: export_onnx.py copies these into metadata that sample.py checks
    if not _is_int(ckpt["epoch"]) or not 0 <= ckpt["epoch"] <= MAX_EPOCHS:
        return f"epoch is {_brief(ckpt['epoch'])}, not a count of epochs"
    if not _is_int(ckpt["seed"]) or not 0 <= ckpt["seed"] <= MAX_SEED:
        return f"seed is {_brief(ckpt['seed'])}, not a seed from 0 to {MAX_SEED}"
    size = ckpt["model_args"].get("dataset_size")
    if size is not None and (not _is_int(size) or not 0 < size <= MAX_DATASET):
        return f"model_args dataset_size is {_brief(size)}"
    try:
        VAEConfig(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        return f"model_args do not describe a model ({(str(e).splitlines() or [''])[0][:120]})"
    args = ckpt["train_args"]
    for key, ok in (("batch_size", lambda v: _is_int(v) and v >= 1), ("seed", lambda v: _is_int(v) and v >= 0),
                    ("epochs", lambda v: _is_int(v) and 0 <= v <= MAX_EPOCHS),
                    ("lr", lambda v: _is_finite(v) and v > 0),
                    ("loop", lambda v: v in ("fast", "seed")), ("data_dir", lambda v: isinstance(v, str))):
        if key in args and not ok(args[key]):
            return f"train_args[{key!r}] is {_brief(args[key])}"
    if not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in ckpt["model"].items()):
        return "model holds entries that are not named tensors"
    problem = _optimizer_problem(ckpt["optimizer"])
    if problem:
        return problem
    for i, m in enumerate(ckpt["metrics"]):
        if not isinstance(m, dict) or not (_is_int(m.get("epoch")) and 0 < m["epoch"] <= MAX_EPOCHS) \
                or not _is_number(m.get("img_per_s", 0)) \
                or not (_is_int(m.get("step", 0)) and m.get("step", 0) >= 0):
            return f"metrics entry {i} is not an epoch record"
        for split in ("train", "test"):
            problem = _summary_problem(m.get(split))
            if problem:
                return f"metrics entry {i} has no {split} record with {problem}"
    return None


def load_optimizer_state(optimizer, ckpt, source):
    """optimizer.load_state_dict(ckpt["optimizer"]), refusing state that does not fit the parameters (torch only
    finds out at the first step, deep inside Adam). Only the hyperparameters lr, betas, eps and weight_decay come
    from the file; how the update runs (amsgrad, fused, capturable, ...) stays as the optimizer was built."""
    try:
        saved = ckpt["optimizer"]
        groups = saved["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
            raise ValueError(f"it has {len(groups) if isinstance(groups, list) else 'no'} parameter groups")
        merged = []
        for mine, theirs in zip(optimizer.param_groups, groups):
            lr, betas, eps, wd = (theirs[k] for k in ("lr", "betas", "eps", "weight_decay"))
            if not (_is_number(lr) and lr > 0 and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)
                    and _is_number(eps) and eps >= 0 and _is_number(wd) and wd >= 0):
                raise ValueError("its hyperparameters are not numbers in range")
            group = {k: v for k, v in mine.items() if k != "params"}
            merged.append(dict(group, lr=lr, betas=tuple(betas), eps=eps, weight_decay=wd, params=theirs["params"]))
        optimizer.load_state_dict({"state": saved["state"], "param_groups": merged})
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if not st:
                    continue
                for key in ("exp_avg", "exp_avg_sq"):
                    t = st.get(key)
                    if not isinstance(t, torch.Tensor) or t.shape != p.shape or not t.is_floating_point():
                        raise ValueError(f"its {key} does not match a parameter of shape {tuple(p.shape)}")
                step = st.get("step")
                step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
                if not _is_number(step) or not 0 <= step < 2**53:
                    raise ValueError(f"its step count is {step!r}")
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"the optimizer state in {source} does not fit this model ({reason}); start a new "
                              "--out-dir") from None


def save_torch(path, obj):
    """torch.save into memory, then an atomic write: a full disk is then an OSError, not an error inside torch's
    zip writer, and the old file stays whole."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def model_from_checkpoint(ckpt, source="the checkpoint"):
    """Build the model a checkpoint dict describes and load its weights (train mode)."""
    try:
        model = BetaVAE(VAEConfig(**ckpt["model_args"]))
        problem = _weights_problem(model.state_dict(), ckpt["model"])
        if problem:
            raise CheckpointError(f"{source} is damaged: {problem}; use an earlier checkpoint or retrain")
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{source} does not match this model ({reason}); retrain with train.py") from None
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # train.py never saves such weights; whatever made this file, nothing useful can come of it
        raise CheckpointError(f"{source} holds NaN or infinite weights ({bad[0]}); use an earlier checkpoint or "
                              "retrain")
    return model


def _weights_problem(mine, theirs):
    """Saved tensors of another dtype than the model's (load_state_dict would cast complex to float with a warning
    and keep the real part), or BatchNorm variances below 0 (their square root is NaN in every forward pass)."""
    for name, t in theirs.items():
        if name in mine and t.dtype != mine[name].dtype:
            got, want = (str(d).replace("torch.", "") for d in (t.dtype, mine[name].dtype))
            return f"{shown(name, 80)} holds {got} values, not {want}"
        if name.endswith("running_var") and t.is_floating_point() and (t < 0).any():
            return f"{shown(name, 80)} holds negative variances"
    return None


def load_checkpoint(path, device="cpu"):
    """Rebuild the trained model from a checkpoint in one call. Returns (model in eval mode, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, os.fspath(path)).to(device).eval(), ckpt
