"""fp32 linear layers through oneDNN on the CPU.

PyTorch sends fp32 matmuls on the CPU to MKL's sgemm, whose AVX-512 kernels serve Intel CPUs only:
on AMD ones (this project's CI machine, an AMD EPYC with AVX-512) it runs its AVX2 kernels, while
oneDNN, which PyTorch already uses for convolutions, runs AVX-512 there. Measured on that machine
with 2 threads: a [2048, 512] x [512, 2048] product takes 42 ms in MKL and 23 ms in oneDNN.

`use_onednn_linears(model)` is applied from outside the model, like `wan.fp8.quantize_fp8`: it turns
the model's plain `nn.Linear` modules into `OneDNNLinear`, with the same parameters and state dict,
whose forward runs the product as a 1x1 oneDNN convolution over a channels-last view of the rows (no
copies), forward and backward. Everything that is not fp32 on the CPU with enough rows goes to
`F.linear` as before.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# oneDNN re-lays out the weight on every call: that pays off from a few hundred rows (measured on the
# Wan shapes: break-even at ~100 rows for a 512 x 512 weight, ~400 for 5120 x 5120).
MIN_ROWS = 512


def onednn_available():
    return torch.backends.mkldnn.is_available()


def onednn_linear(x, weight, bias=None):
    """`F.linear(x, weight, bias)`: x [..., in], weight [out, in], bias [out] -> [..., out]."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or rows < MIN_ROWS \
            or not onednn_available():
        return F.linear(x, weight, bias)
    # [N, in] row-major is the channels-last layout of a [1, in, N, 1] image: the rows are its pixels.
    pixels = x.reshape(rows, x.shape[-1]).contiguous().view(1, rows, 1, -1).permute(0, 3, 1, 2)
    out = torch.ops.aten.mkldnn_convolution(pixels, weight[:, :, None, None], bias, [0, 0], [1, 1], [1, 1], 1)
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(nn.Linear):
    """`nn.Linear` computed by `onednn_linear`; same parameters, same state dict."""

    def forward(self, x):
        return onednn_linear(x, self.weight, self.bias)


def use_onednn_linears(model, enabled=True):
    """Turns every plain `nn.Linear` of `model` into a `OneDNNLinear` (enabled=False: back). Returns
    how many were switched; 0 where PyTorch was built without oneDNN."""
    if enabled and not onednn_available():
        return 0
    source, target = (nn.Linear, OneDNNLinear) if enabled else (OneDNNLinear, nn.Linear)
    switched = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            switched += 1
    return switched
