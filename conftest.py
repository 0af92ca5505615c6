"""pytest configuration shared by the tests and the doctests of ``batchnorm/``.

The Triton kernel modules import ``triton`` when they are imported, which ``--doctest-modules``
does for every module: without Triton (macOS, Windows, or a CPU-only install) they are not
collected, and the tests of the Triton backend skip themselves with the reason.
"""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("triton") is None:
    collect_ignore += ["batchnorm/kernels/triton_forward.py",
                       "batchnorm/kernels/triton_backward.py"]
