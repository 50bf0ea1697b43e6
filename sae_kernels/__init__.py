"""Fused kernels for end-to-end SAE training: Triton on a GPU, with a pure-PyTorch reference for each.

    sae_forward(x, enc_weight, enc_bias, dec_weight, dec_bias, k=None, batch_topk=False) -> (x_hat, c)
                                                       sae.py (k: TopK; batch_topk: BatchTopK)
    sae_forward_sparse(x, ..., k=None, batch_topk=False, dense=False) -> (x_hat, SparseCode)
                                                       sparse.py: the code as its selected pairs
    topk_relu(pre, k) -> each row's k largest pre-activations through relu      sae.py (TopK's code; check_k its k)
    kl_div(new_logits, orig_logits) -> KL(p_orig || p_new), averaged over rows     kl.py
    linear_kl_div(h_new, h_orig, weight, bias=None) -> kl_div(h_new @ weight.T + bias, h_orig @ weight.T + bias),
                                                       computed in chunks of tokens

The SAE runs over its selected pairs (sparse.py: the math, one autograd Function) with Triton's primitives or
PyTorch's. E2ESAE_BACKEND=auto|triton|torch picks at every call (sae_kernels/backend.py): by default Triton for
CUDA tensors, PyTorch's elsewhere.
Tests: `python -m pytest tests/test_kernels.py tests/test_sparse_sae.py`.
"""

from .kl import kl_div, linear_kl_div
from .sae import sae_forward, topk_relu
from .sparse import SparseCode, check_k, sae_forward_sparse

__all__ = ["sae_forward", "sae_forward_sparse", "SparseCode", "kl_div", "linear_kl_div", "topk_relu", "check_k"]
