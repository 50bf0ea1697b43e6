"""Choosing between the Triton kernels and their pure-PyTorch references.

Every public function in `sae_kernels/` with a Triton path calls `use_triton(...)` at call time, so the choice can
change between calls (the tests switch it). The environment variable E2ESAE_BACKEND selects:

    auto    (default) Triton for CUDA tensors, the PyTorch reference for anything else
    triton  always Triton; on a CPU through Triton's interpreter, which TRITON_INTERPRET=1 selects (see INTERPRET)
    torch   always the PyTorch reference

Triton is optional: without it `import sae_kernels` still works and only the reference is available. The stub
below lets the kernel files define their @triton.jit functions unconditionally; they are never launched.
"""

import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs without triton: reference path only
    HAS_TRITON = False
    triton = tl = SimpleNamespace(jit=lambda fn: fn, autotune=lambda **kwargs: (lambda fn: fn),
                                  Config=lambda *args, **kwargs: None, constexpr=None)

# @triton.jit picks the interpreter when a function is defined: Triton's own library (tl.sum, ...) when triton
# is first imported, our kernels when sae_kernels is. Both must have seen TRITON_INTERPRET=1.
INTERPRET = (HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"
             and type(tl.sum).__name__ == "InterpretedFunction")

# Autotuning benchmarks every config on first use of a shape: on a GPU it is on unless E2ESAE_AUTOTUNE=0,
# which leaves each kernel its first config. The interpreter cannot benchmark; it gets one config of small
# blocks, so that the tests' small, odd shapes still run every loop over several blocks and a ragged last one.
AUTOTUNE = HAS_TRITON and not INTERPRET and os.environ.get("E2ESAE_AUTOTUNE", "1") != "0"

BACKENDS = ("auto", "triton", "torch")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernels'; PyTorch's primitives add float64


def tuning_configs(configs: list, interpreter_config) -> list:
    """The configs @triton.autotune may try: all, the first (autotuning off), or the interpreter's one."""
    if INTERPRET:
        return [interpreter_config]
    return configs if AUTOTUNE else configs[:1]


def use_triton(*tensors: torch.Tensor) -> bool:
    """True if this call should run the Triton kernels (see the module docstring); raises if it cannot."""
    backend = os.environ.get("E2ESAE_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"E2ESAE_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend != "triton":
        return backend == "auto" and HAS_TRITON and on_cuda
    if not HAS_TRITON:
        raise RuntimeError("E2ESAE_BACKEND=triton but triton is not installed: `pip install triton`, "
                           "or set E2ESAE_BACKEND=torch (or auto) to use the PyTorch reference")
    if not on_cuda and not INTERPRET:
        raise RuntimeError("E2ESAE_BACKEND=triton with CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before triton is first imported, or use E2ESAE_BACKEND=torch or auto")
    return True


def autocast_inputs(device: torch.device, *tensors):
    """The tensors (None stays None) in the dtype autocast would run matmuls in on `device`, where autocast is on:
    a fused path casts its inputs once, as autocast would, then runs with autocast off."""
    if not torch.is_autocast_enabled(device.type):
        return tensors
    return tuple(t.to(torch.get_autocast_dtype(device.type)) if t is not None else None for t in tensors)
