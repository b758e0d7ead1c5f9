"""A sweep's summary (torch-free): sweep.csv, summary.md and figures from the run folders under an out-dir.

Reads each <run>/eval/report.json (and eval/traversals.png), nothing else, so the summary depends only on what the runs
measured: the same runs give the same summary wherever and however they were run. Every file is written atomically.
"""
import csv
import io
import json
import math
import os
import sys
import statistics

from plumbing.cli import UsageError
from plumbing.files import atomic_write_all, clean_stale_temps

NAMES = {"beta": "β-VAE", "tc": "β-TCVAE"}
MARKERS = {"beta": "o", "tc": "^"}
# (column, report key): the flags a run was made with; seed is what varies within a group
FLAGS = (("objective", "model_args.objective"), ("beta", "model_args.beta"), ("seed", "train_args.seed"),
         ("epochs", "epoch"), ("latent_dim", "model_args.latent_dim"), ("alpha", "model_args.alpha"),
         ("gamma", "model_args.gamma"), ("batch_size", "train_args.batch_size"), ("lr", "train_args.lr"))
# (heading, report key, decimals): the table's numbers, mean ± std over seeds
COLUMNS = (("recon", "test.recon", 1), ("KL", "test.kl", 2), ("−ELBO", "test.neg_elbo", 1),
           ("IWAE", "test.iwae_nll", 1), ("active units", "active_units", 1), ("probe acc.", "linear_probe_acc", 3),
           ("FID cls rec", "fid.classifier.reconstruction", 2), ("FID cls gen", "fid.classifier.generation", 2),
           ("FID px rec", "fid.pixels.reconstruction", 1), ("FID px gen", "fid.pixels.generation", 1),
           ("MI", "decomposition.mutual_info", 2), ("TC", "decomposition.total_correlation", 2),
           ("dim-wise KL", "decomposition.dimwise_kl", 2))
FIGURES = ("rate_distortion.png", "decomposition.png", "units_probe.png", "traversals.png")
OUTPUTS = ("sweep.csv", "summary.md", *FIGURES)


def flatten(d, prefix=""):
    """{"a": {"b": 1}, "c": [..]} -> {"a.b": 1}: every scalar, dotted; lists are left out."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[prefix + k] = v
    return out


def collect(out_dir):
    """One flat row per run folder with a complete report.json, sorted by objective, β, seed."""
    rows = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        try:
            with open(os.path.join(out_dir, name, "eval", "report.json"), encoding="utf-8") as f:
                flat = flatten(json.load(f))
        except (OSError, ValueError, AttributeError):
            continue
        if all(isinstance(flat.get(key), (int, float)) for _, key, _ in COLUMNS) and all(
                key in flat for _, key in FLAGS):
            row = {"run": name, **{col: flat.pop(key) for col, key in FLAGS}}
            row.update({(f"eval_{k}" if k in row else k): v for k, v in flat.items()})  # report's "seed": evaluate's
            rows.append(row)
    order = list(NAMES)
    return sorted(rows, key=lambda r: (order.index(r["objective"]) if r["objective"] in order else len(order),
                                       str(r["objective"]), r["beta"], r["seed"]))


def model_name(key):
    """β-VAE, or β-TCVAE with its other two weights: α and γ weigh nothing in the other objectives."""
    if key["objective"] == "tc":
        return f"β-TCVAE (α {key['alpha']:g}, γ {key['gamma']:g})"
    return NAMES.get(key["objective"], key["objective"])


def groups(rows):
    """[(key dict, rows)]: runs that differ only in their seed (and in α, γ where the objective has none)."""
    out = {}
    for r in rows:
        unused = {"seed"} | (set() if r["objective"] == "tc" else {"alpha", "gamma"})
        out.setdefault(tuple((col, r[col]) for col, _ in FLAGS if col not in unused), []).append(r)
    return [(dict(key), members) for key, members in out.items()]


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def describe_data(rows):
    sizes = sorted({(r["data.n_train"], r["data.n_test"]) for r in rows if "data.n_train" in r})
    if len(sizes) != 1:
        return "Fashion-MNIST (runs on different data)"
    n_train, n_test = sizes[0]
    what = "Fashion-MNIST" if (n_train, n_test) == (60_000, 10_000) else "Fashion-MNIST subset"
    return f"{what} ({n_train:,} train / {n_test:,} test images)"


def csv_text(rows):
    columns = ["run"] + [col for col, _ in FLAGS]
    columns += sorted({k for r in rows for k in r} - set(columns))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def summary_text(rows, grouped, figure_names=FIGURES):
    shown = [col for col, _ in FLAGS if col not in ("objective", "beta", "seed", "alpha", "gamma")]
    varying = [col for col in shown if len({r[col] for r in rows}) > 1]
    fixed = {col: rows[0][col] for col in shown if col not in varying}
    setting = ", ".join(f"{col.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{col.replace('_', ' ')} {v}"
                        for col, v in fixed.items())
    lines = [f"# β sweep: {describe_data(rows)}", "",
             f"{len(rows)} runs ({setting}). Each cell: mean ± standard deviation over the seeds listed, on the test "
             "split. Nats per image except active units (of the latent size) and probe accuracy (a linear classifier "
             "on the posterior means). MI, TC and dim-wise KL are the three parts of the KL (they add up to it, "
             "within sampling noise). FID: classifier features (cls) or raw pixels (px), of reconstructions (rec) "
             "and of samples from the prior (gen).", ""]
    head = ["model", "β"] + varying + ["seeds"] + [name for name, _, _ in COLUMNS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, members in grouped:
        cells = [model_name(key), f"{key['beta']:g}"]
        cells += [f"{key[col]:g}" if isinstance(key[col], float) else str(key[col]) for col in varying]
        cells.append(",".join(str(r["seed"]) for r in members))
        for _, col, decimals in COLUMNS:
            mean, std = mean_std([r[col] for r in members])
            cells.append(f"{mean:.{decimals}f}" + ("" if math.isnan(std) else f" ± {std:.{decimals}f}"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Figures: " + ", ".join(figure_names), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def _colours(rows):
    import matplotlib
    betas = sorted({r["beta"] for r in rows})
    cmap = matplotlib.colormaps["viridis"]
    return {b: cmap(0.9 * i / max(1, len(betas) - 1)) for i, b in enumerate(betas)}


def _beta_axis(ax, rows):
    betas = sorted({r["beta"] for r in rows})
    if betas[0] > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(betas, [f"{b:g}" for b in betas])
    ax.minorticks_off()
    ax.set_xlabel("β")
    ax.grid(alpha=0.3)


def _versus_beta(ax, grouped, col, title, ylabel):
    """Mean ± std against β, one line per objective, every seed a small dot."""
    for objective in NAMES:
        sel = [(k["beta"], [r[col] for r in m]) for k, m in grouped if k["objective"] == objective]
        if not sel:
            continue
        style = dict(marker=MARKERS[objective], color="C0" if objective == "beta" else "C3")
        shift = 1.0 if objective == "beta" else 1.07  # side by side where both objectives share a β
        betas = [b * shift for b, _ in sel]
        stats = [mean_std(v) for _, v in sel]
        ax.errorbar(betas, [m for m, _ in stats], yerr=[0 if math.isnan(s) else s for _, s in stats], capsize=3,
                    label=NAMES[objective], linestyle="-" if len(sel) > 1 else "none", **style)
        for b, values in sel:
            ax.scatter([b * shift] * len(values), values, s=10, color=style["color"], alpha=0.5, zorder=3)
    ax.set(title=title, ylabel=ylabel)


def _below_caption(image):
    """evaluate.py's traversals.png without its caption (it would be unreadable at this size; each panel gets a
    title instead): everything from just above the first strip's frame, the first row that is mostly dark."""
    gray = image[..., :3].mean(-1) if image.ndim == 3 else image
    framed = ((gray < 0.3).mean(1) > 0.5).nonzero()[0]
    return image[max(0, framed[0] - 24):] if len(framed) else image


def figures(out_dir, rows, grouped):
    """The sweep's figures as {file name: PNG bytes}; traversals.png only where a run's own traversals.png reads."""
    plt = _plt()
    out = {}
    data, colours = describe_data(rows), _colours(rows)
    epochs = ", ".join(sorted({str(r["epochs"]) for r in rows}))

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for r in rows:
        ax.scatter(r["test.kl"], r["test.recon"], color=colours[r["beta"]], marker=MARKERS.get(r["objective"], "s"),
                   s=40, edgecolor="black", linewidth=0.5, zorder=3)
    for key, members in grouped:
        (kl, kl_sd), (rec, rec_sd) = mean_std([r["test.kl"] for r in members]), mean_std([r["test.recon"]
                                                                                         for r in members])
        ax.errorbar(kl, rec, xerr=0 if math.isnan(kl_sd) else kl_sd, yerr=0 if math.isnan(rec_sd) else rec_sd,
                    color=colours[key["beta"]], capsize=3, linewidth=1, zorder=2)
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="none", label=f"β = {b:g}")
               for b, c in colours.items()]
    handles += [plt.Line2D([], [], color="grey", marker=MARKERS[o], linestyle="none", label=NAMES[o])
                for o in NAMES if any(r["objective"] == o for r in rows)]
    ax.legend(handles=handles, fontsize=8)
    ax.set(xlabel="rate: KL(q(z|x) ‖ p(z)), nats per image", ylabel="distortion: reconstruction −log p(x|z), nats "
           "per image", title=f"Rate–distortion: every run a point, bars ±1 s.d. over seeds\n{data}, test split, "
           f"{epochs} epochs")
    ax.grid(alpha=0.3)
    ax.ticklabel_format(useOffset=False)
    fig.tight_layout()
    out[FIGURES[0]] = _png(fig)

    for name, panels in ((FIGURES[1], [("decomposition.mutual_info", "index-code mutual information I(x; z)"),
                                       ("decomposition.total_correlation", "total correlation TC(z)"),
                                       ("decomposition.dimwise_kl", "dimension-wise KL Σ KL(q(z_j) ‖ p(z_j))")]),
                         (FIGURES[2], [("active_units", "active units (Var of posterior mean > 0.01)"),
                                       ("linear_probe_acc", "linear probe accuracy on posterior means")])):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.2), squeeze=False)
        for ax, (col, title) in zip(axes[0], panels):
            ylabel = "nats per image" if col.startswith("decomposition") else title.split(" (")[0].split(" on")[0]
            _versus_beta(ax, grouped, col, title, ylabel)
            _beta_axis(ax, rows)
        axes[0, 0].legend(fontsize=8)
        what = "The KL's three parts" if name == FIGURES[1] else "Active units and class information"
        fig.suptitle(f"{what} against β: mean ± s.d. over seeds, dots are runs\n{data}, test split, {epochs} epochs",
                     fontsize=10)
        fig.tight_layout()
        out[name] = _png(fig)

    firsts, images = [], []
    for key, m in grouped:   # a panel that cannot be read is left out, with a warning: the summary still gets written
        r = min(m, key=lambda r: r["seed"])
        path = os.path.join(out_dir, r["run"], "eval", "traversals.png")
        try:
            images.append(_below_caption(plt.imread(path)))
            firsts.append((key, r))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, SyntaxError) as e:   # PIL reports a damaged PNG as a SyntaxError
            print(f"warning: {path} cannot be read ({type(e).__name__}: {e}); left out of traversals.png",
                  file=sys.stderr)
    if firsts:
        ncol = min(3, len(images))
        nrow = -(-len(images) // ncol)
        width = 5.0  # inches per panel: the row labels stay readable
        aspect = max(im.shape[0] / im.shape[1] for im in images)
        fig, axes = plt.subplots(nrow, ncol, figsize=(width * ncol, nrow * (aspect * width + 0.4) + 0.7),
                                 squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, (key, r), im in zip(axes.flat, firsts, images):
            ax.imshow(im, interpolation="lanczos")
            ax.set_title(f"{model_name(key)}, β = {key['beta']:g} (seed {r['seed']})", fontsize=11)
        fig.suptitle(f"Latent traversals, one run per β — {data}, {epochs} epochs\neach row sets one dimension "
                     "from −3 to 3, the rest at a test image's posterior mean; rows sorted by KL", fontsize=11)
        fig.tight_layout()
        out[FIGURES[3]] = _png(fig)
    return out


def write(out_dir, require=False):
    """Write sweep.csv, summary.md and the figures from the finished runs under out_dir; returns the names written.

    require: no finished run is an error (--aggregate) rather than nothing to write.
    """
    rows = collect(out_dir)
    if not rows:
        if require:
            raise UsageError(f"no finished run under {out_dir} (none has eval/report.json): run the sweep first, "
                             "or pass the --out-dir it wrote to")
        return []
    grouped = groups(rows)
    clean_stale_temps(out_dir, OUTPUTS)  # half-written files of a sweep that was killed
    # a path or run name whose bytes are not UTF-8 is written escaped (\udcff), as the scripts print and log it
    pngs = figures(out_dir, rows, grouped)
    files = {"sweep.csv": csv_text(rows).encode("utf-8", "backslashreplace"),
             "summary.md": summary_text(rows, grouped, list(pngs)).encode("utf-8", "backslashreplace"), **pngs}
    # as one: a full disk leaves every file as it was, never a summary beside figures of another one
    atomic_write_all([(os.path.join(out_dir, name), lambda f, b=b: f.write(b)) for name, b in files.items()])
    for name in set(FIGURES) - set(pngs):   # an earlier summary's traversals.png, when no run's could be read now
        try:
            os.remove(os.path.join(out_dir, name))
        except FileNotFoundError:
            pass
        except OSError as e:   # summary.md no longer lists it, but it stays: say so
            print(f"warning: the earlier {name} in {out_dir} could not be removed ({e.strerror or e}); it is not "
                  "this summary's", file=sys.stderr)
    return list(files)
