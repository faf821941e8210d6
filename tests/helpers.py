"""Small helpers shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

import torch

HAS_CUDA = torch.cuda.is_available()
# The device the Triton kernels run on in this session: the GPU, or the CPU through the interpreter.
KERNEL_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with NaN so an element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))
