"""ResNet-50 training steps with torch's batch norm and with this package's (``convert``).

Part ``resnet`` of ``benchmarks/gpu.py``: batch 128 of synthetic 224x224 images, SGD, in
bfloat16 channels_last (autocast) and float32 NCHW. For each: images/s over timed steps, the
losses of the first 20 steps from the same initial weights and data (their largest relative
difference), and the share of CUDA kernel time spent in batch-norm kernels. The network is
torchvision's ``resnet50``, or, without torchvision, the same architecture defined here.
"""

from __future__ import annotations

import copy
import re
import time

import torch
import torch.nn.functional as F
from torch import nn

import batchnorm

# Kernel names counted as batch norm in the ResNet-50 CUDA-time split: torch's, cuDNN's, ours.
BN_KERNELS = re.compile(r"batch_?norm|bn_|welford|^(forward_channel|stats_partial|normalize|eval"
                        r"|grad_partial|grad_input|backward_channel|update_running)_kernel$", re.I)


class _Bottleneck(nn.Module):
    """ResNet-50's bottleneck block (1x1, 3x3 with the stride, 1x1 to 4x width)."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        out = 4 * width
        self.convs = nn.ModuleList([nn.Conv2d(cin, width, 1, bias=False),
                                    nn.Conv2d(width, width, 3, stride, 1, bias=False),
                                    nn.Conv2d(width, out, 1, bias=False)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(width), nn.BatchNorm2d(width),
                                  nn.BatchNorm2d(out)])
        self.down = None if stride == 1 and cin == out else nn.Sequential(
            nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            y = bn(conv(y))
            y = F.relu(y) if i < 2 else y
        return F.relu(y + (x if self.down is None else self.down(x)))


def resnet50() -> nn.Module:
    try:
        import torchvision

        return torchvision.models.resnet50()
    except ImportError:  # the same network, defined here
        layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                  nn.MaxPool2d(3, 2, 1)]
        cin = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(_Bottleneck(cin, width, stride if i == 0 else 1))
                cin = 4 * width
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000))


def train(model, data, steps, amp, device):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for i in range(steps):
        images, labels = data[i % len(data)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach().float())
    return torch.stack(losses)


def bn_share(model, data, amp, device) -> float:
    """Fraction of one training step's CUDA kernel time spent in batch-norm kernels."""
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return float("nan")
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            train(model, data, 2, amp, device)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total = sum(e.time_range.elapsed_us() for e in kernels) or 1
        return sum(e.time_range.elapsed_us() for e in kernels if BN_KERNELS.search(e.name)) / total
    except Exception as error:  # the profiler's event API moves between torch versions
        print(f"no CUDA-time breakdown: {type(error).__name__}: {error}")
        return float("nan")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run(args, device, rows, save):
    """Append one row per (precision, implementation) to ``rows``; ``save()`` after each."""
    torch.backends.cudnn.benchmark = True
    batch, side = (args.resnet_batch, 224) if device == "cuda" else (2, 32)
    for precision, amp, layout in (("bfloat16 autocast", True, torch.channels_last),
                                   ("float32", False, torch.contiguous_format)):
        torch.manual_seed(0)
        base = resnet50().to(device).to(memory_format=layout)
        g = torch.Generator(device=device).manual_seed(1)
        data = [(torch.randn(batch, 3, side, side, device=device, generator=g)
                 .contiguous(memory_format=layout),
                 torch.randint(0, 1000, (batch,), device=device, generator=g)) for _ in range(4)]
        result = {}
        for impl in ("torch", "ours"):
            model = copy.deepcopy(base)
            if impl == "ours":
                model = batchnorm.convert(model)
            losses = train(model, data, 20 if device == "cuda" else 2, amp, device).cpu()
            _sync(device)
            t0 = time.perf_counter()
            train(model, data, args.resnet_steps, amp, device)
            _sync(device)
            seconds = (time.perf_counter() - t0) / args.resnet_steps
            result[impl] = (losses, batch / seconds, bn_share(model, data, amp, device))
            del model
        drift = ((result["ours"][0] - result["torch"][0]).abs() / result["torch"][0].abs()).max()
        for impl, (losses, ips, share) in result.items():
            rows.append({"precision": precision, "impl": impl, "images_per_s": round(ips, 1),
                         "bn_share_of_cuda_time": round(share, 3),
                         "max_rel_loss_diff_20_steps": round(float(drift), 5),
                         "first_losses": " ".join(f"{v:.4f}" for v in losses[:5].tolist())})
        print(f"resnet50 {precision}: done", flush=True)
        save()
