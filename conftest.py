"""pytest configuration shared by the tests and the doctests of ``batchnorm/``.

* The Triton kernels run on CPU tensors under Triton's interpreter, which ``TRITON_INTERPRET=1``
  turns on only if it is set before Triton is first imported (here, before any test module).
  No test runs Triton on a GPU: the device scripts in ``benchmarks/`` do.
* The Triton kernel modules import ``triton`` when they are imported, which
  ``--doctest-modules`` does for every module: without Triton (macOS, Windows, or a CPU-only
  install) they are not collected, and the tests of the Triton backend skip themselves with
  the reason.
"""

import importlib.util
import os

os.environ["TRITON_INTERPRET"] = "1"

collect_ignore = []
if importlib.util.find_spec("triton") is None:
    collect_ignore += ["batchnorm/kernels/triton_forward.py",
                       "batchnorm/kernels/triton_backward.py"]
