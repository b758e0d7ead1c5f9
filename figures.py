"""The figures train.py and evaluate.py draw of a model: loss curves, samples, reconstructions, traversals,
interpolations. PNG files only (matplotlib's Agg backend and images.labelled_grid), each titled with what it shows.
"""
import math
import os

import numpy as np
import torch

import metrics
from plumbing.files import atomic_write
from images import labelled_grid, png_bytes, save_image

TRAVERSAL_VALUES = np.linspace(-3.0, 3.0, 11)


def training_figures(model, test, s, history, step_losses, first_epoch, steps_per_epoch, n_samples, n_recon):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out, tag = s["out_dir"], f"β={s['beta']:g}, latent {s['latent_dim']}, epoch {len(history)}"
    fig, ax = plt.subplots(figsize=(7, 4))
    if step_losses:  # per-step train loss of the epochs trained in this process, averaged in ~200 bins
        t = torch.tensor(step_losses)
        k = max(1, len(t) // 200)
        t = t[:len(t) // k * k].view(-1, k).mean(1)
        ax.plot(first_epoch + (torch.arange(len(t)) * k + k / 2) / steps_per_epoch, t, lw=1, alpha=0.7,
                label="train objective (per step)")
    epochs = [m["epoch"] for m in history]
    ax.plot([e - 0.5 for e in epochs], [m["train"]["total"] for m in history], "^:", label="train objective (per epoch)")
    ax.plot(epochs, [m["test"]["total"] for m in history], "o-", label="test objective")
    ax.plot(epochs, [m["test"]["recon"] for m in history], "s--", label="test reconstruction")
    ax.set(xlabel="epoch", ylabel="nats per image", title=f"Loss — {tag}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(os.path.join(out, "loss.png"), lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    model.eval()
    with torch.no_grad():
        g = torch.Generator(device=test.device).manual_seed(s["seed"])
        z = torch.randn(n_samples, s["latent_dim"], device=test.device, generator=g)
        images = model.decode(z).cpu().numpy()
        ncol = math.ceil(math.sqrt(n_samples))
        rows = [images[i:i + ncol] for i in range(0, len(images), ncol)]
        save_image(labelled_grid(rows, title=f"Samples from the prior: decoder means at z ~ N(0, I)\n{tag}"),
                   os.path.join(out, "samples.png"))
        x, _, _ = next(test.batches(min(n_recon, len(test))))
        recon = model.decode(model.encode(x)[0])  # the posterior mean, as the seed shows reconstructions
        save_image(labelled_grid([((x + 1) / 2).cpu().numpy(), recon.cpu().numpy()], ["test image", "reconstruction"],
                                 f"Test images and their reconstructions at z = posterior mean\n{tag}"),
                   os.path.join(out, "reconstructions.png"))
    model.train()


def _grid(rows, labels, title, col_labels=None):
    return png_bytes(labelled_grid([r.numpy() for r in rows], labels, title, col_labels))


def evaluation_figures(model, test, mu, recon_images, generated, kl_per_dim, fid, caption, n, generator):
    """evaluate.py's figures as {file name: PNG bytes}, drawn but not written: evaluate.py writes them together with
    report.json, all or none."""
    out = {}
    originals = test.images[:n].float().cpu() / 255.0
    fids = lambda part: "".join(f"FID {part} vs test, {fid[e]['features']}: {fid[e][part]:.2f}\n"  # noqa: E731
                                for e in fid)
    out["reconstructions.png"] = _grid(
        [originals, recon_images[:n]], ["test image", "reconstruction"],
        f"Test images and their reconstructions at z = posterior mean\n{fids('reconstruction')}{caption}")
    out["samples.png"] = _grid(
        [generated[i:i + n] for i in range(0, min(n * n, len(generated)), n)], None,
        f"Samples from the prior: decoder means at z ~ N(0, I)\n{fids('generation')}{caption}")

    order = sorted(range(len(kl_per_dim)), key=lambda d: -kl_per_dim[d])
    rows = []
    for d in order:
        z = mu[0].repeat(len(TRAVERSAL_VALUES), 1)
        z[:, d] = torch.as_tensor(TRAVERSAL_VALUES, dtype=z.dtype)
        rows.append(metrics.decode_batched(model, z))
    out["traversals.png"] = _grid(
        rows, [f"z{d}  KL {kl_per_dim[d]:.2f}" for d in order],
        "Latent traversals from the first test image's posterior mean: one dimension set to -3..3, the rest fixed\n"
        "rows sorted by KL (nats per image, test split); near-zero KL = an unused dimension\n" + caption,
        [f"{v:+.1f}" for v in TRAVERSAL_VALUES])

    pairs = torch.randperm(len(test), generator=generator)[:2 * max(1, n // 2)].view(-1, 2)
    weights = torch.linspace(0.0, 1.0, n).unsqueeze(1)
    rows = []
    for a, b in pairs.tolist():
        path = metrics.decode_batched(model, (1 - weights) * mu[a] + weights * mu[b])
        ends = test.images[[a, b]].float().cpu() / 255.0
        rows.append(torch.cat([ends[:1, 0], path[:, 0], ends[1:, 0]]))
    out["interpolations.png"] = _grid(
        rows, [f"#{a} -> #{b}" for a, b in pairs.tolist()],
        "Interpolations between posterior means of random test-image pairs\n"
        f"(first and last columns: the original images; between: decoder means)\n{caption}")
    return out
