"""Launch plans of the Triton backend: the path, tile and grid of each call, from its shape.

Each call of ``batchnorm.kernels.triton_backend`` takes one of three paths (``plan``):

* ``"resident"``: a channel block's whole slice fits one tile, so each program reads it once,
  keeps it in registers for the statistics and writes the output: 2 passes over memory forward
  (x in, y out), 3 backward (dy and x in, dx out), one launch each.
* ``"looped"``: one program per channel block (persistent over the blocks) sums the slice,
  then reads it again to normalize; with few enough programs in flight the second read comes
  from L2. Taken when there are enough channel blocks to fill the GPU without splitting.
* ``"split"``: the slice is split over a grid of programs that store partial sums in a small
  workspace; a second launch merges them in a fixed order (no atomics: bitwise deterministic)
  and normalizes. Small ``C`` with large ``N * L`` still fills the GPU.

Plans depend on shapes only and are cached, so they stay off the launch path.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

PATHS = ("resident", "looped", "split")
_MAX_SPLIT = 1024  # most programs sharing one channel block on the split path
_MERGE = 4096  # most partial sums (G * BC) each split program merges: a few KB read from L2
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension

@dataclass(frozen=True)
class Config:
    """Launch heuristics of the Triton backend (one commented default each).

    Args:
        tile_bytes: bytes of input a program loads per step. Default: ``16384`` (enough for a
            16-byte vector load per thread per tile row; small enough to leave registers free).
        row_bytes: width in bytes of a channel block in channels-last (rows) layout. Default:
            ``256`` (two 128-byte lines per row: coalesced, and many blocks for wide ``C``).
        resident_elems: most elements (padded to powers of two) of a channel block's slice
            that the resident path holds in registers. Default: ``16384`` (32 per thread at
            16 warps).
        programs_per_sm: programs per streaming multiprocessor that the split and looped
            paths aim for. Default: ``4`` (enough loads in flight to cover memory latency).
        path: force ``"resident"``, ``"looped"`` or ``"split"``; ``None`` chooses per call.
            Default: ``None``.

    Calls take ``config=``; without it they read the module's ``DEFAULT`` at call time, so
    assigning ``batchnorm.kernels.triton_plan.DEFAULT = Config(...)`` tunes every call
    (benchmarks).

    >>> Config(path="split").tile_bytes
    16384
    """

    tile_bytes: int = 16384
    row_bytes: int = 256
    resident_elems: int = 16384
    programs_per_sm: int = 4
    path: str | None = None

    def __post_init__(self):
        for name in ("tile_bytes", "row_bytes", "resident_elems", "programs_per_sm"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Config.{name} must be a positive int, got {value!r}")
        if self.path is not None and self.path not in PATHS:
            raise ValueError(f"Config.path must be one of {PATHS} or None, got {self.path!r}")


DEFAULT = Config()


@dataclass(frozen=True)
class View:
    """A tensor as the kernels address it: element ``(n, c, l)`` at ``n*s_n + c*s_c + l``.

    ``rows`` marks channels-last (or ``L == 1``) input seen as ``(N*L, C, 1)`` rows.
    """

    n: int
    c: int
    l: int  # noqa: E741
    s_n: int
    s_c: int
    rows: bool


def view_of(x3: Tensor) -> View | None:
    """The kernels' view of ``x3``, or ``None`` when it is in neither layout. Size-1 dims may
    have any stride and rows may have gaps, but no two elements may share memory: outputs
    are allocated with ``x3``'s strides."""
    (n, c, span), (s_n, s_c, s_l) = x3.shape, x3.stride()
    if span == 1 and (s_c == 1 or c == 1) and (s_n >= c or n == 1):
        return View(n, c, 1, s_n, 1, True)
    if s_l == 1 and (s_c == span or c == 1) and (s_n == c * span or n == 1):
        return View(n, c, span, s_n, s_c, False)
    if (s_c == 1 or c == 1) and s_l >= c and (s_n == span * s_l or n == 1):
        return View(n * span, c, 1, s_l, 1, True)
    return None



@functools.cache
def _device_info(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, L2 bytes) of a CUDA device; a small nominal GPU for the interpreter."""
    if device.type != "cuda":
        return 4, 4 << 20
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.L2_cache_size


def pow2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def _warps(elements: int) -> int:
    return max(1, min(16, pow2(elements) // 512))  # 8 warps for a 4096-element tile


@dataclass(frozen=True)
class Plan:
    path: str
    tile: tuple[int, int, int]  # BN, BC, BL
    blocks: int  # channel blocks: C / BC, rounded up
    units: int  # tiles per channel block
    programs: int  # the grid of the channel-per-program paths; G per block on the split path
    per: int  # units per program on the split path

    @property
    def merge_rows(self) -> int:
        """Partials per channel that a split program adds per step: 2048 values in all."""
        return min(pow2(self.programs), max(1, 2048 // self.tile[1]))

    @property
    def warps(self) -> int:
        return _warps(math.prod(self.tile))

    def consts(self) -> dict:
        return {"BN": self.tile[0], "BC": self.tile[1], "BL": self.tile[2],
                "num_warps": self.warps}


def _tile(view: View, elem: int, cfg: Config, bc: int | None = None) -> tuple[int, int, int]:
    tile = max(1, cfg.tile_bytes // elem)
    if view.rows:
        bc = bc or min(pow2(view.c), max(1, cfg.row_bytes // elem))
        return min(pow2(view.n), max(1, tile // bc)), bc, 1
    bl = min(pow2(view.l), max(2, tile))  # BL == 1 is the kernels' mark of rows
    return min(pow2(view.n), max(1, tile // bl)), 1, bl


def _units(view: View, tile: tuple[int, int, int]) -> int:
    return -(-view.n // tile[0]) * -(-view.l // tile[2])


@functools.lru_cache(maxsize=1024)  # plans depend on shapes only: keep them off the launch path
def plan(view: View, elem: int, streams: int, device: torch.device, cfg: Config) -> Plan:
    """The path, tile and grid of a reduction over ``view`` (``streams`` tensors read)."""
    sms, l2_bytes = _device_info(device)
    target = sms * cfg.programs_per_sm
    tile = _tile(view, elem, cfg)
    blocks = -(-view.c // tile[1])
    whole = (pow2(view.n), tile[1], pow2(view.l))
    fits = math.prod(whole) <= cfg.resident_elems
    # Between a program's two reads of its slice every program in flight reads its own; with
    # at most `cached` programs that stays within half of L2, so the second read hits it.
    cached = l2_bytes // (2 * view.n * view.l * tile[1] * elem * streams)
    looped = min(blocks, cached) >= 2 * sms
    path = cfg.path or ("resident" if fits else "looped" if looped else "split")
    if path == "resident":
        if not fits:
            raise ValueError(
                f"the resident path holds at most {cfg.resident_elems} elements per program, "
                f"but a channel block here pads to {whole}; raise Config.resident_elems or "
                "choose another path")
        return Plan(path, whole, blocks, 1, blocks, 1)
    if path == "looped":
        programs = max(1, min(blocks, target, cached))
        return Plan(path, tile, blocks, _units(view, tile), programs, _units(view, tile))
    if view.rows:
        # Every program merges G * BC partials: narrow the channel blocks (down to 64 bytes)
        # until C / BC blocks of G <= _MERGE / BC programs can reach the target together.
        widest = math.isqrt(max(1, view.c * _MERGE // target))
        bc = max(min(tile[1], max(1, 64 // elem)), min(tile[1], 1 << (widest.bit_length() - 1)))
        tile = _tile(view, elem, cfg, bc)
        blocks = -(-view.c // bc)
    units = _units(view, tile)
    split = min(units, _MAX_SPLIT, max(1, _MERGE // tile[1]), -(-target // blocks))
    per = -(-units // split)
    return Plan(path, tile, blocks, units, -(-units // per), per)


@functools.lru_cache(maxsize=1024)
def elementwise_plan(view: View, elem: int, cfg: Config) -> Plan:
    tile = _tile(view, elem, cfg)
    units = _units(view, tile)
    per = -(-units // _MAX_GRID_Y)
    return Plan("split", tile, -(-view.c // tile[1]), units, -(-units // per), per)
