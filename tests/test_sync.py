"""SyncBatchNorm in spawned gloo process groups against one torch.nn layer over the whole batch.

Each spawned job runs every check of its world size (spawning costs seconds); a failing
assertion in any rank fails the test with that rank's traceback.
"""

import copy
import os
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tolerances import assert_close
from torch.nn.parallel import DistributedDataParallel

import batchnorm
from batchnorm.kernels import numba_backend
from batchnorm.sync import SyncBatchNorm

# Samples per rank at each training step: uneven, and one rank empty in some step.
SPLITS = {2: [[3, 4], [0, 6]], 3: [[2, 0, 5], [1, 3, 2]]}


@dataclass(frozen=True)
class Layer:
    name: str
    cls: str
    tail: tuple  # (C, *spatial)
    momentum: float | None = 0.1
    affine: bool = True
    channels_last: bool = False


LAYERS = [
    Layer("2d", "BatchNorm2d", (3, 4, 5)),
    Layer("2d-channels-last-momentum-0.3", "BatchNorm2d", (3, 3, 2), momentum=0.3,
          channels_last=True),
    Layer("1d-dense-cumulative-no-affine", "BatchNorm1d", (4,), momentum=None, affine=False),
    Layer("3d", "BatchNorm3d", (2, 2, 3, 2)),
]


def _spawn(fn, world: int, tmp_path) -> None:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed gloo backend")
    init = f"file://{tmp_path}/rendezvous"
    mp.spawn(fn, args=(world, init), nprocs=world, join=True)


def _init(rank: int, world: int, init: str) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)


def _slice(sizes, rank):
    lo = sum(sizes[:rank])
    return slice(lo, lo + sizes[rank])


def _batch(sizes, tail, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), *tail, generator=g, dtype=torch.float64) * 2.5 + 0.7
    return x, torch.randn(x.shape, generator=g, dtype=torch.float64)


def _reference_layer(layer: Layer):
    ref = getattr(torch.nn, layer.cls)(layer.tail[0], momentum=layer.momentum,
                                       affine=layer.affine, dtype=torch.float64)
    if layer.affine:  # non-trivial parameters: ones and zeros can hide a wrong backward
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            ref.weight.copy_(torch.rand(layer.tail[0], generator=g) + 0.5)
            ref.bias.copy_(torch.randn(layer.tail[0], generator=g))
    return ref


def _check_layer(rank: int, world: int, layer: Layer) -> None:
    ref = _reference_layer(layer)
    ours = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    for step, sizes in enumerate(SPLITS[world]):
        x_all, dy_all = _batch(sizes, layer.tail, seed=step)
        part = _slice(sizes, rank)
        x = x_all[part].clone()
        if layer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        y = ours(x)
        y.backward(dy_all[part])
        x_ref = x_all.clone().requires_grad_()
        y_ref = ref(x_ref)
        y_ref.backward(dy_all)
        where = f"{layer.name} rank {rank}/{world} step {step}"
        assert_close(y, y_ref.detach()[part], msg=f"output, {where}")
        assert_close(x.grad, x_ref.grad[part], msg=f"input gradient, {where}")
        assert x.grad.stride() == x.stride(), f"gradient layout, {where}"
        for name in ("running_mean", "running_var"):
            assert_close(getattr(ours, name), getattr(ref, name), msg=f"{name}, {where}")
        assert int(ours.num_batches_tracked) == step + 1
        if layer.affine:
            for name in ("weight", "bias"):
                total = getattr(ours, name).grad.clone()
                dist.all_reduce(total)
                assert_close(total, getattr(ref, name).grad, msg=f"{name} gradient, {where}")
        ours.zero_grad()
        ref.zero_grad()
    ours.eval()
    ref.eval()
    x_all, _ = _batch(SPLITS[world][0], layer.tail, seed=9)
    part = _slice(SPLITS[world][0], rank)
    with torch.no_grad():
        assert_close(ours(x_all[part]), ref(x_all)[part], msg=f"{layer.name} eval, rank {rank}")


def _layers_job(rank: int, world: int, init: str) -> None:
    _init(rank, world, init)
    try:
        for layer in LAYERS:
            _check_layer(rank, world, layer)
    finally:
        dist.destroy_process_group()


def _ddp_job(rank: int, world: int, init: str) -> None:
    _init(rank, world, init)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2, momentum=None)).double()
        ref = copy.deepcopy(model)
        ddp = DistributedDataParallel(
            SyncBatchNorm.convert_sync_batchnorm(batchnorm.convert(model)))
        # DDP averages gradients over the ranks: a learning rate divided by the world size
        # makes the single-process steps identical.
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1 / world)
        for step, sizes in enumerate(SPLITS[world]):
            x_all, _ = _batch(sizes, (3, 5, 6), seed=step)
            w_all = torch.randn(sum(sizes), 2, 3, 4, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(step + 5))
            part = _slice(sizes, rank)
            y = ddp(x_all[part])
            (y * w_all[part]).sum().backward()
            y_ref = ref(x_all)
            (y_ref * w_all).sum().backward()
            where = f"DDP rank {rank}/{world} step {step}"
            assert_close(y, y_ref.detach()[part], msg=f"output, {where}")
            for (name, p), p_ref in zip(ddp.module.named_parameters(), ref.parameters(),
                                        strict=True):
                assert_close(p.grad * world, p_ref.grad, msg=f"{name} gradient, {where}")
            opt.step()
            opt_ref.step()
            opt.zero_grad()
            opt_ref.zero_grad()
            for name, value in ref.state_dict().items():
                ours = ddp.module.state_dict()[name]
                if value.is_floating_point():
                    assert_close(ours, value, msg=f"{name}, {where}")
                else:
                    assert torch.equal(ours, value), f"{name}, {where}"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_match_one_process_over_the_whole_batch(world, tmp_path):
    _spawn(_layers_job, world, tmp_path)


def test_under_distributed_data_parallel(tmp_path):
    _spawn(_ddp_job, 2, tmp_path)


def test_without_a_process_group_it_is_batch_norm():
    ref = _reference_layer(LAYERS[0])
    ours = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref))
    x, dy = _batch([5], LAYERS[0].tail, seed=3)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    ours(x).backward(dy)
    ref(x_ref).backward(dy)
    assert_close(x.grad, x_ref.grad)
    assert_close(ours.running_var, ref.running_var)
    assert_close(ours.weight.grad, ref.weight.grad)


def test_convert_keeps_tensors_mode_and_hyperparameters():
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 1), torch.nn.BatchNorm1d(3, eps=1e-3),
                                batchnorm.BatchNorm2d(3, momentum=None),
                                torch.nn.SyncBatchNorm(3, momentum=0.2))
    model[2].eval()
    weight, running_var = model[1].weight, model[1].running_var
    out = SyncBatchNorm.convert_sync_batchnorm(model, process_group="group")
    assert out is model
    assert all(type(model[i]) is SyncBatchNorm for i in (1, 2, 3))
    assert model[3].momentum == 0.2 and model[3].process_group == "group"
    assert model[1].weight is weight and model[1].running_var is running_var
    assert model[1].eps == 1e-3 and model[2].momentum is None
    assert model[1].training and not model[2].training
    assert model[1].process_group == "group"
    assert type(model[0]) is torch.nn.Conv1d


def test_convert_refuses_virtual_batches_and_checks_rank():
    with pytest.raises(ValueError, match="virtual_batch_size"):
        SyncBatchNorm.convert_sync_batchnorm(batchnorm.BatchNorm2d(3, virtual_batch_size=4))
    with pytest.raises(ValueError, match="at least 2D"):
        SyncBatchNorm(3)(torch.randn(3))


def _init_with_timeout(rank: int, world: int, init: str) -> None:
    import datetime

    torch.set_num_threads(1)
    # A collective that a rank never joins fails after this long instead of hanging forever;
    # long enough for a rank that starts late on a loaded 2-core machine.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=180))


def _edges_job(rank: int, world: int, init: str) -> None:
    _init_with_timeout(rank, world, init)
    try:
        # One value per channel in the whole batch: rank 0 holds (1, C), rank 1 (0, C). The
        # unbiased variance does not exist; the running statistics stay as they were.
        layer = SyncBatchNorm(3)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        y = layer(torch.randn(1 - rank, 3))
        assert torch.isfinite(y).all()
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[key]), key
        # Ranks that disagree on the channels or the dtype all raise, naming each rank's.
        for channels, dtype in (((3, 4), (torch.float32,) * 2),
                                ((3, 3), (torch.float32, torch.float64))):
            layer = SyncBatchNorm(channels[rank], dtype=dtype[rank])
            counter = layer.num_batches_tracked.clone()
            with pytest.raises(ValueError, match="disagree on the input.*rank 0: 3 channels, "
                                                 "torch.float32.*rank 1: "):
                layer(torch.randn(4, channels[rank], 2, dtype=dtype[rank]))
            assert torch.equal(layer.num_batches_tracked, counter)
    finally:
        dist.destroy_process_group()


def test_global_single_value_and_mismatched_ranks(tmp_path):
    _spawn(_edges_job, 2, tmp_path)


def _backends_job(rank: int, world: int, init: str) -> None:
    import os

    _init(rank, world, init)
    try:
        for backend in os.environ["SYNC_TEST_BACKENDS"].split(","):
            os.environ["BATCHNORM_BACKEND"] = backend
            _check_layer(rank, world, LAYERS[1])  # channels-last, momentum 0.3
    finally:
        dist.destroy_process_group()


def test_ranks_match_on_every_backend(tmp_path, monkeypatch):
    import importlib.util

    backends = ["eager"] + [b for b in ("numba", "triton") if importlib.util.find_spec(b)]
    monkeypatch.setenv("SYNC_TEST_BACKENDS", ",".join(backends))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned ranks run Triton's interpreter
    _spawn(_backends_job, 2, tmp_path)


def _masked_job(rank: int, world: int, init: str) -> None:
    _init_with_timeout(rank, world, init)
    try:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
        mask = torch.rand(4, 6, generator=g) < 0.6
        mine = slice(2 * rank, 2 * rank + 2)
        layer = SyncBatchNorm(3).double()
        reference = torch.nn.BatchNorm1d(3).double()
        xr = x[mine].clone().requires_grad_()
        y = layer(xr, mask=mask[mine])
        # One process over the counted positions of every rank.
        counted = x.transpose(1, 2)[mask].requires_grad_()
        expected = reference(counted)
        start = int(mask[:2 * rank].sum())  # this rank's counted positions, in order
        assert_close(y.transpose(1, 2)[mask[mine]],
                     expected[start:start + int(mask[mine].sum())])
        for key, value in reference.state_dict().items():
            assert_close(layer.state_dict()[key].double(), value.double(), msg=key)
    finally:
        dist.destroy_process_group()


def test_masks_merge_their_counts_across_ranks(tmp_path):
    _spawn(_masked_job, 2, tmp_path)


def _inplace_abn_job(rank: int, world: int, init: str) -> None:
    _init_with_timeout(rank, world, init)
    try:
        backends = ["eager"] + (["numba"] if numba_backend.available() else [])
        for name in backends:  # the phases of each backend, merged over the group
            os.environ["BATCHNORM_BACKEND"] = name
            g = torch.Generator().manual_seed(5)
            x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1
            residual = torch.randn(x.shape, generator=g, dtype=torch.float64)
            dz = torch.randn(x.shape, generator=g, dtype=torch.float64)
            mine = slice(0, 2) if rank == 0 else slice(2, 5)  # uneven
            layer = batchnorm.SyncInPlaceABN(3, activation="elu", activation_param=1.0).double()
            reference = batchnorm.InPlaceABN2d(3, activation="elu",
                                               activation_param=1.0).double()
            xr, rr = x[mine].clone().requires_grad_(), residual[mine].clone().requires_grad_()
            z = layer(xr * 1.0, rr)
            whole, whole_r = x.clone().requires_grad_(), residual.clone().requires_grad_()
            os.environ["BATCHNORM_BACKEND"] = "eager"
            expected = reference(whole * 1.0, whole_r)
            dx_whole, dr_whole = torch.autograd.grad(expected, (whole, whole_r), dz)
            assert_close(z, expected[mine].detach(), msg=name)
            os.environ["BATCHNORM_BACKEND"] = name
            dx, dr = torch.autograd.grad(z, (xr, rr), dz[mine])
            assert_close(dx, dx_whole[mine], msg=name)
            assert_close(dr, dr_whole[mine], msg=name)
            for key, value in reference.state_dict().items():
                assert_close(layer.state_dict()[key].double(), value.double(), msg=key)
    finally:
        dist.destroy_process_group()


def test_sync_inplace_abn_is_in_place_abn_over_the_whole_batch(tmp_path):
    _spawn(_inplace_abn_job, 2, tmp_path)
