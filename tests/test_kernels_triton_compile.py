"""The Triton kernels compile for a GPU: the launches the backend makes, built for sm_90.

The interpreter (``test_kernels_triton.py``) runs the kernels' Python, so code that interprets
but does not compile (types that change in a loop, unsupported constructs, compiler crashes)
passes there. This test records the launches the backend makes on meta tensors (no memory, no
device) for every path, both layouts, float32/bfloat16/float64 and every epilogue, and
compiles each distinct one with Triton's CUDA compiler, which needs no GPU. It runs in a fresh
interpreter so that ``TRITON_INTERPRET`` (set by the interpreter tests) is not in effect.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: the GPU kernels are optional")

# Runs in a fresh interpreter without TRITON_INTERPRET: records the launches the backend makes
# for meta tensors (no memory, no device) and compiles each distinct one for sm_90, with the
# argument specialization Triton applies at launch (ints equal to 1 become constants, multiples
# of 16 are marked divisible, pointers aligned). Exit code 3: no CUDA compiler in this Triton.
_COMPILE_SCRIPT = """
import sys, torch
try:
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    assert "nvidia" in backends
except Exception as error:
    print(error); sys.exit(3)
from batchnorm.kernels import triton_backend as bt, triton_plan as tp
from batchnorm.kernels import triton_backward as tbk, triton_forward as tk

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
         torch.float64: "fp64", torch.int64: "i64"}
tp._device_info = lambda device: (132, 50 << 20)
done = set()

def compiler(kernel):
    def launch(*args, num_warps=4, **constexprs):
        values = dict(zip(kernel.arg_names, args), **constexprs)
        signature, constants, attrs = {}, {}, {}
        for i, param in enumerate(kernel.params):
            value = values[param.name]
            if param.is_constexpr or (type(value) is int and value == 1):
                signature[param.name], constants[param.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + TYPES[value.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[param.name] = "fp32"
            else:
                signature[param.name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        key = (kernel.__name__, str(sorted(signature.items())), str(sorted(constants.items())),
               str(sorted(attrs)), num_warps)
        if key not in done:
            done.add(key)
            source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
            triton.compile(source, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps})
    return type("Grid", (), {"__getitem__": lambda self, grid: launch})()

for module in (tk, tbk):
    for name in dir(module):
        if name.endswith("_kernel"):
            setattr(module, name, compiler(getattr(module, name)))
# Every path in both layouts in float32; the split and resident paths in bfloat16.
for dtype, paths in ((torch.float32, ("resident", "looped", "split")),
                     (torch.bfloat16, ("resident", "split"))):
    for shape, channels_last in (((16, 32, 64), False), ((8, 32, 7), True)):
        x = torch.empty(shape, dtype=dtype, device="meta")
        if channels_last:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        w = torch.empty(shape[1], dtype=dtype, device="meta")
        for path in paths:
            config = tp.Config(path=path)
            y, mean, rstd, var = bt.forward_train(x, w, w, 1e-5, x, True, config=config)
            bt.backward(x, x, y, mean, rstd, w, True, need_dres=True, config=config)
        bt.forward_eval(x, mean, mean, x, True)
        bt.forward_eval(x, mean, mean, None, False, mean)  # the training apply, with a pivot
        bt.stats(x)
        bt.grad_sums(x, x, y, mean, rstd)
        bt.grad_input(x, x, y, mean, rstd, w, mean, mean, True)
    bt.backward(x, x, None, mean, rstd, None, False, config=tp.Config(path="split"))
x = torch.empty(8, 3, 5, dtype=torch.float64, device="meta")
y, mean, rstd, var = bt.forward_train(x, None, None, 1e-5, config=tp.Config(path="split"))
bt.backward(x, x, None, mean, rstd, None, True, config=tp.Config(path="split"))
stats = torch.empty(3, device="meta")
bt.update_running_stats(stats, stats, torch.empty((), dtype=torch.int64, device="meta"), stats,
                        stats, 10, None)
bt.update_running_stats(stats, stats, None, stats, stats, 10, 0.1)
print(len(done), "kernels compiled")
"""


def test_kernels_compile_for_a_gpu():
    """The interpreter runs Python; this compiles the same launches for an sm_90 GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default of the Triton versions we target
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root,
                            capture_output=True, text=True, timeout=600)
    if result.returncode == 3:
        pytest.skip(f"this Triton cannot compile for CUDA here: {result.stdout.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert "kernels compiled" in result.stdout
