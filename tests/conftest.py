"""Shared test setup.

Without CUDA the Triton kernels run through Triton's CPU interpreter, which must be switched on
before triton is first imported — so it is set here, at collection time.
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CPU routes are timed only where a test asks for it (test_cpu_routes.py): elsewhere a model on the
# CPU takes the reference route, and no test reads or writes the user's tuning cache.
os.environ.setdefault("BLOOM_KERNELS_CPU_ROUTE", "default")
os.environ.setdefault("BLOOM_KERNELS_CACHE_DIR",
                      os.path.join(tempfile.mkdtemp(prefix="bloom_kernels_test_cache_"), "bk"))

import pytest  # noqa: E402

from helpers import HAS_CUDA, triton_importable  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def force_triton(monkeypatch):
    """Run bloom_kernels ops on their Triton kernels (interpreter on CPU, compiled on a GPU)."""
    if not triton_importable():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "triton")


@pytest.fixture
def poisoned():
    """Every buffer the kernel launchers allocate (outputs and scratch) starts as NaN (integers: -1),
    so an element a kernel fails to write fails the comparison."""
    from bloom_kernels.triton._launch import poisoned_outputs  # imports neither triton nor the kernels

    with poisoned_outputs():
        yield


@pytest.fixture
def force_reference(monkeypatch):
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "reference")


def pytest_addoption(parser):
    parser.addoption("--compile-full", action="store_true", default=False,
                     help="test_compile_targets: compile the full sweep (every BLOOM model, bf16 and fp16)")
