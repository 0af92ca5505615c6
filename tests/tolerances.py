"""One tolerance per dtype for comparing against a float64 truth: (rtol, atol)."""

import torch

TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def assert_close(actual, expected, dtype=None, msg=""):
    """``actual`` within the tolerance of ``dtype`` (default: actual's) of ``expected``."""
    rtol, atol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=msg)
