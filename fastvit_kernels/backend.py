"""The one place that decides which implementation a module runs.

  'torch'  : the eager PyTorch reference (the benchmarks' baseline).
  'triton' : our Triton kernels, always (a clear error for a CPU tensor without TRITON_INTERPRET=1).
  'auto'   : the kernels for CUDA tensors, and for CPU tensors when the Triton interpreter is on; else 'torch'.

The default for new modules is FASTVIT_BACKEND if set, else 'auto'. Nothing here is sticky: a failing kernel raises,
it never turns the kernels off behind the user's back.
"""

import os

import torch

BACKENDS = ("auto", "triton", "torch")
ATTN_IMPLS = ("math", "sdpa")
ENV_VAR = "FASTVIT_BACKEND"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def default_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto")
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend: expected one of {', '.join(BACKENDS)}")
    return value


def check_attn_impl(attn_impl: str) -> str:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl {attn_impl!r}: expected one of {', '.join(ATTN_IMPLS)}")
    return attn_impl


def use_triton(backend: str, device: torch.device) -> bool:
    """Whether `backend` runs the Triton kernels for tensors on `device`."""
    if backend == "torch":
        return False
    if backend == "triton":
        return True
    from .ops._common import interpreting

    return device.type == "cuda" or interpreting()
