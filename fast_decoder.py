"""A faster copy of a trained model for evaluation: stride-2 transposed convolutions as conv + pixel shuffle.

The numbers are the model's (checked on fixed latents before the copy is used); only the speed differs. metrics.py
uses it for the IWAE pass, which decodes k samples per test image and is most of an evaluation's time.
"""
import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


class SubPixelConvTranspose(nn.Module):
    """A stride-2 ConvTranspose2d recomputed as Conv2d + pixel shuffle: the same numbers, faster on a CPU.

    An output pixel of a stride-2 transposed convolution sees the input through one of four sub-kernels, picked by
    the parity of its row and column. One ordinary convolution with 4x the output channels computes all four, and
    pixel_shuffle interleaves them (the "sub-pixel convolution"). oneDNN is slow at transposed convolutions with a
    handful of channels: this halves the decoder's last layer and cuts the whole IWAE pass by a quarter (measured),
    which matters because that pass decodes k times per test image and is most of an evaluation's time.
    """

    def __init__(self, convt):
        super().__init__()
        w = convt.weight.detach()                                   # (C_in, C_out, K, K)
        c_in, c_out, k, _ = w.shape
        self.k, self.p, self.op = k, convt.padding[0], convt.output_padding[0]
        # Output row 2m + a reads input row m − t through kernel row a + p + 2t; keep the t that hit the kernel.
        taps = [t for t in range(-k, k + 1) if any(0 <= a + self.p + 2 * t < k for a in (0, 1))]
        self.lo, self.size = max(taps), max(taps) - min(taps) + 1
        sub = w.new_zeros(c_out, 2, 2, c_in, self.size, self.size)
        for a in (0, 1):
            for b in (0, 1):
                for uy in range(self.size):
                    for ux in range(self.size):
                        ky, kx = a + self.p + 2 * (self.lo - uy), b + self.p + 2 * (self.lo - ux)
                        if 0 <= ky < k and 0 <= kx < k:
                            sub[:, a, b, :, uy, ux] = w[:, :, ky, kx].T
        self.weight = nn.Parameter(sub.reshape(4 * c_out, c_in, self.size, self.size), requires_grad=False)
        bias = convt.bias.detach() if convt.bias is not None else w.new_zeros(c_out)
        self.bias = nn.Parameter(bias.repeat_interleave(4), requires_grad=False)

    @staticmethod
    def supports(m):
        return (isinstance(m, nn.ConvTranspose2d) and m.stride == (2, 2) and m.dilation == (1, 1) and m.groups == 1
                and m.kernel_size[0] == m.kernel_size[1] and m.padding[0] == m.padding[1]
                and m.output_padding[0] == m.output_padding[1] and m.padding_mode == "zeros")

    def forward(self, x):
        h, w = x.shape[-2:]
        h_out, w_out = ((n - 1) * 2 - 2 * self.p + self.k + self.op for n in (h, w))
        pad_h, pad_w = (-(-n_out // 2) - n - self.lo + self.size - 1 for n, n_out in ((h, h_out), (w, w_out)))
        y = F.conv2d(F.pad(x, (self.lo, pad_w, self.lo, pad_h)), self.weight, self.bias)
        return F.pixel_shuffle(y, 2)[..., :h_out, :w_out]


@torch.no_grad()
def fast_copy(model):
    """A copy of the model in eval mode, with sub-pixel transposed convolutions (and NHWC on a CPU).

    Checked against the original decoder on fixed latents: a rewrite that does not reproduce it is never used.
    The caller's model is left as it was, training mode and batch-norm statistics included.
    """
    reference = copy.deepcopy(model).eval()
    fast = copy.deepcopy(model).eval()
    for parent in list(fast.modules()):
        for name, child in list(parent.named_children()):
            if SubPixelConvTranspose.supports(child):
                setattr(parent, name, SubPixelConvTranspose(child))
    device = next(model.parameters()).device
    if device.type == "cpu":  # NHWC runs these few-channel convolutions about 1.5x faster on a CPU
        fast = fast.to(memory_format=torch.channels_last)
    z = torch.randn(16, model.config.latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
    expected, got = reference.decoder.logits(z), fast.decoder.logits(z)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        warnings.warn("the fast decoder does not match the model's; evaluating with the original (slower)")
        return reference
    return fast
