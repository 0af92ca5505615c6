"""The numba backend under fork and under concurrent Python threads, in fresh processes.

GNU OpenMP (numba's ``omp`` threading layer) cannot run in a child forked after the parent ran
it, and numba's ``workqueue`` layer aborts the process when two threads launch at once. Each
case runs in a subprocess with a time limit, so a crash or a hang fails the test instead of
taking the suite with it.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba", reason="numba is not installed: the CPU kernels are optional")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="fork and GNU OpenMP: Linux")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})


def test_dataloader_workers_forked_after_the_parent_ran_numba_load_every_item():
    result = _run("""
        import torch, batchnorm
        from torch.utils.data import DataLoader, Dataset

        class Normalized(Dataset):
            layer = batchnorm.BatchNorm2d(8)
            def __len__(self):
                return 4
            def __getitem__(self, i):
                with torch.no_grad():  # 1M elements: numba's size in the parent
                    return self.layer(torch.randn(32, 8, 64, 64)).sum()

        data = Normalized()
        data[0]
        import numba
        print("layer", numba.threading_layer())
        items = list(DataLoader(data, batch_size=None, num_workers=2, timeout=120,
                                multiprocessing_context="fork"))
        print("loaded", len(items))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded 4" in result.stdout


def test_asking_for_numba_in_a_forked_child_names_the_problem():
    result = _run("""
        import os, torch
        from batchnorm.functional import batch_norm
        x = torch.randn(32, 8, 64, 64)
        batch_norm(x, None, None, training=True, backend="numba")
        import numba
        if numba.threading_layer() != "omp":
            print("not omp")
            raise SystemExit(0)
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)  # as a DataLoader worker does
            try:
                batch_norm(x, None, None, training=True, backend="numba")
            except RuntimeError as error:
                print("child:", error, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    if "not omp" not in result.stdout:
        assert "forked" in result.stdout and "spawn" in result.stdout, result.stdout


def test_concurrent_threads_on_the_workqueue_layer_do_not_abort():
    result = _run("""
        import threading, torch
        from batchnorm.functional import batch_norm
        x = torch.randn(16, 8, 32, 32)
        errors = []
        def work():
            try:
                for _ in range(10):
                    y = batch_norm(x, None, None, training=True, backend="numba")
                    assert abs(float(y.mean())) < 1e-4
            except Exception as error:
                errors.append(repr(error))
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        import numba
        print(numba.threading_layer(), "errors:", errors)
    """, NUMBA_THREADING_LAYER="workqueue")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "workqueue errors: []" in result.stdout, result.stdout
