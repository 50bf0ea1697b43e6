"""Fused kernels for end-to-end SAE training: Triton on a GPU, with a pure-PyTorch reference for each.

Reading order: sparse.py (the SAE over its selected pairs: the math, one autograd Function, PyTorch's primitives,
sae_forward_sparse), sae.py (the dense reference, Triton's primitives, and sae_forward, which returns c dense),
kl.py (kl_div, and linear_kl_div through the lm_head in chunks), backend.py (which set runs, E2ESAE_BACKEND: by
default Triton for CUDA tensors, PyTorch's elsewhere).
"""

from .kl import kl_div, linear_kl_div
from .sae import sae_forward, topk_relu
from .sparse import SparseCode, check_k, sae_forward_sparse

__all__ = ["sae_forward", "sae_forward_sparse", "SparseCode", "kl_div", "linear_kl_div", "topk_relu", "check_k"]
