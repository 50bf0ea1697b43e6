"""
Sparse autoencoders spliced into GPT-2's residual stream: the SAE, the spliced model, the losses and the metrics.

Follows Braun et al. (2024), "Identifying Functionally Important Features with End-to-End Sparse Dictionary
Learning", and computes every term exactly as its reference library (`e2e_sae`) does.

The SAE. For an activation x (d_in) and a dictionary of n_dict elements:

    pre   = W_enc x + b_enc                         the pre-activations, (n_dict,)
    c     = activation(pre)                         the code, mostly zeros once trained
    x_hat = D c + b_dec,   D[:, j] = W_dec[:, j] / ||W_dec[:, j]||    unit-norm dictionary elements

The activation is the paper's ReLU, or one of the SAEs trained since, whose sparsity is set directly:

    relu       c = ReLU(pre)                                  sparsity from the L_p penalty (the paper's SAE)
    topk       c = ReLU(the k largest pre of each token)      exactly k codes per token (Gao et al. 2024)
    batchtopk  training: the B k largest ReLU(pre) of a batch of B tokens, k per token on average; inference:
               c = pre [pre > theta], theta estimated in training (Bussmann, Leask and Nanda 2024)
    jumprelu   c = pre [pre > theta_j], a learned threshold per element, with an L0 penalty
               (Rajamanoharan et al. 2024)

The losses (B tokens per batch, the total is the sum of coefficient x term):

    sparsity     ||c||_p averaged over tokens, / d_in (JumpReLU: ||c||_0, through a straight-through estimator)
    kl           KL(p_orig || p_spliced) per token, averaged               (end-to-end)
    in_to_orig   MSE(spliced stream, original stream) at later positions,  (end-to-end + downstream)
                 the coefficient split evenly over those positions
    out_to_in    MSE(x_hat, x)                                             (local)
    out_to_orig  MSE(x_hat, original stream at the SAE)
    aux_k        MSE(e_hat, x - x_hat): the residual reconstructed from the dead elements alone (Gao et al.)

    local  = sparsity + out_to_in;   e2e = sparsity + kl;   e2e+ds = sparsity + kl + in_to_orig

"Spliced" means the SAE's output replaces the residual stream and the rest of the network runs on it. With
several SAEs and any end-to-end term they are chained: a later SAE reads the stream the earlier ones changed.
Purely local training feeds every SAE the clean stream and never runs the blocks after the last SAE.

Usage:
    gpt = GPT.from_pretrained("gpt2")
    model = SAETransformer(gpt, ["blocks.6.hook_resid_pre"], dict_size_to_input_ratio=60)
    loss, metrics = compute_loss(model, idx, sparsity_coeff=3.0, kl_coeff=1.0)
    model = SAETransformer(gpt, ["blocks.6.hook_resid_pre"], 60, activation="topk", k=32)

Checkpoints of other tools (SAELens, the reference library, wandb runs) are read and written by interop.py,
which also gives these classes the reference library's loaders: SAETransformer.from_local_path, .from_wandb.
"""

import contextlib
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import sae_kernels
from model import GPT

# ---- the activations: pre-activations (..., n_dict) -> the code c ----


class Activation(nn.Module):
    """What every activation shares: the L_p sparsity term, and no fused kernel unless it says so."""

    fused = None  # keyword arguments of sae_kernels.sae_forward when it computes this activation fused, else None

    def settings(self):
        """What rebuilds it besides its name (make_activation's arguments); saved with every checkpoint."""
        return {}

    def project_(self):
        """Put learned parameters back where they belong, after an optimiser step (nothing to do for most)."""

    def penalty(self, c, pre, p_norm):
        """The sparsity term of each token, before the mean over tokens and the division by d_in."""
        return torch.linalg.vector_norm(c, ord=p_norm, dim=-1, dtype=torch.float32)


class ReLU(Activation):
    """c = ReLU(pre): the paper's SAE, sparse only through the L_p penalty."""

    name, fused = "relu", {}

    def forward(self, pre):
        return F.relu(pre)


class TopK(Activation):
    """c = ReLU(TopK(pre)): the k largest pre-activations of each token, the others 0 (and any of the k that is
    negative). The sparsity is k itself: no penalty is needed, though an L_p one may be added."""

    name = "topk"

    def __init__(self, k):
        super().__init__()
        self.k, self.fused = k, {"k": k}

    def forward(self, pre):
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))

    def settings(self):
        return {"k": self.k}

    def extra_repr(self):
        return f"k={self.k}"


class BatchTopK(Activation):
    """Training: the B x k largest ReLU(pre) over a batch of B tokens, k per token on average but not for each.
    The threshold that inference uses instead, c = pre [pre > theta], is the running average of the smallest
    activation the batch selection kept: theta <- 0.99 theta + 0.01 min (as SAELens trains it). It is a buffer,
    saved with the weights."""

    name = "batchtopk"

    def __init__(self, k, momentum=0.01):
        super().__init__()
        self.k, self.momentum = k, momentum
        self.register_buffer("threshold", torch.zeros(()))

    def forward(self, pre):
        if not self.training:
            return pre * (pre > self.threshold)
        acts = F.relu(pre).flatten()
        top = acts.topk(min(self.k * (acts.numel() // pre.shape[-1]), acts.numel()))
        c = torch.zeros_like(acts).scatter(0, top.indices, top.values).view_as(pre)
        with torch.no_grad():
            kept = top.values[top.values > 0]
            if kept.numel():
                self.threshold.lerp_(kept.min().float(), self.momentum)
        return c

    def settings(self):
        return {"k": self.k}

    def extra_repr(self):
        return f"k={self.k}"


class _JumpReLUFunction(torch.autograd.Function):
    """c = pre H(pre - theta). Gradients: to pre, H(pre - theta); to theta, the straight-through estimate
    -(theta / eps) K((pre - theta) / eps) with the rectangle kernel K(u) = 1[|u| < 1/2]."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.eps / 2).to(grad.dtype)
        grad_theta = -(theta / ctx.eps) * near * grad
        return grad * (pre > theta), grad_theta.reshape(-1, theta.shape[0]).sum(0), None


class _StepFunction(torch.autograd.Function):
    """H(pre - theta), for the L0 penalty. Gradient to theta only: -(1 / eps) K((pre - theta) / eps); none to pre."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.eps / 2).to(grad.dtype)
        return None, (-(1 / ctx.eps) * near * grad).reshape(-1, theta.shape[0]).sum(0), None


class JumpReLU(Activation):
    """c = pre H(pre - theta_j): a learned threshold per element, kept >= 0. The penalty is the L0 norm, whose
    gradient (like the threshold's in c) comes from a straight-through estimator of bandwidth eps. theta is a
    parameter itself, not its logarithm (under Adam, log theta barely moves; SAELens found the same)."""

    name = "jumprelu"

    def __init__(self, n_dict, bandwidth=0.001, init_threshold=0.001):
        super().__init__()
        self.bandwidth = bandwidth
        self.threshold = nn.Parameter(torch.full((n_dict,), float(init_threshold)))

    def project_(self):
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)  # a projection after each Adam step, not a clamp in the graph

    def forward(self, pre):
        if self.training:
            self.project_()  # for training loops that do not call it after their step
        return _JumpReLUFunction.apply(pre, self.threshold.to(pre.dtype), self.bandwidth)

    def penalty(self, c, pre, p_norm):
        return _StepFunction.apply(pre, self.threshold.to(pre.dtype), self.bandwidth).sum(-1, dtype=torch.float32)

    def settings(self):
        return {"bandwidth": self.bandwidth}

    def extra_repr(self):
        return f"bandwidth={self.bandwidth:g}"


ACTIVATIONS = {"relu": ReLU, "topk": TopK, "batchtopk": BatchTopK, "jumprelu": JumpReLU}
NEEDS_K = ("topk", "batchtopk")


def make_activation(activation, n_dict, k=None, bandwidth=None, init_threshold=None):
    """An activation by name, its settings checked: k for topk and batchtopk only, the rest for jumprelu only."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if activation in NEEDS_K:
        if not isinstance(k, int) or not 1 <= k <= n_dict:
            raise ValueError(f"activation={activation!r} needs k, the active codes per token, between 1 and the "
                             f"dictionary's {n_dict:,} elements (e.g. k=32), got {k!r}")
    elif k is not None:
        raise ValueError(f"k is the active codes per token of topk and batchtopk; activation={activation!r} has no "
                         "k (its sparsity comes from the sparsity coefficient): drop k or choose topk")
    if activation != "jumprelu" and (bandwidth, init_threshold) != (None, None):
        raise ValueError(f"bandwidth and init_threshold are JumpReLU's; activation={activation!r} has neither")
    if activation == "jumprelu":
        return JumpReLU(n_dict, 0.001 if bandwidth is None else bandwidth,
                        0.001 if init_threshold is None else init_threshold)
    return ACTIVATIONS[activation](k) if activation in NEEDS_K else ReLU()


# ---- the SAE ----


class SAE(nn.Module):
    """A sparse autoencoder with a column-normalised decoder. `sae(x)` returns (x_hat, c)."""

    def __init__(self, d_in, n_dict, activation="relu", k=None, bandwidth=None, init_threshold=None):
        super().__init__()
        self.d_in, self.n_dict = d_in, n_dict
        self.encoder = nn.Linear(d_in, n_dict)  # weight (n_dict, d_in)
        self.decoder = nn.Linear(n_dict, d_in)  # weight (d_in, n_dict): column j is dictionary element j
        nn.init.orthogonal_(self.decoder.weight)
        self.activation = make_activation(activation, n_dict, k, bandwidth, init_threshold)

    @property
    def dict_elements(self):
        """The dictionary D, (d_in, n_dict), every column of unit L2 norm."""
        return self.decoder.weight / self.decoder.weight.norm(dim=0, keepdim=True)

    @property
    def settings(self):
        """What rebuilds this SAE's shape and activation: SAE(d_in, n_dict, **settings)."""
        return {"activation": self.activation.name, **self.activation.settings()}

    def encode(self, x):
        return self.activation(self.encoder(x))

    def decode(self, c):
        return F.linear(c, self.dict_elements, self.decoder.bias)

    def forward(self, x):
        return self.forward_with_pre(x)[:2]

    def forward_with_pre(self, x):
        """(x_hat, c, pre): pre for the sparsity terms that need it (JumpReLU's), None where a fused kernel
        computed the activation (sae_kernels.sae_forward: on a GPU, without ever writing pre and c separately)."""
        if self.activation.fused is not None:
            return *sae_kernels.sae_forward(x, self.encoder.weight, self.encoder.bias, self.decoder.weight,
                                        self.decoder.bias, **self.activation.fused), None
        pre = self.encoder(x)
        c = self.activation(pre)
        return self.decode(c), c, pre


# ---- losses and metrics, each a small function of tensors ----


def sparsity_loss(c, p_norm, d_in):
    """The p-norm of each token's code (not its p-th power), averaged over tokens, divided by d_in."""
    return torch.linalg.vector_norm(c, ord=p_norm, dim=-1, dtype=torch.float32).mean() / d_in


def aux_k_loss(sae, x, x_hat, dead):
    """Gao et al.'s auxiliary loss: MSE between the residual x - x_hat (detached) and its reconstruction from the
    k_aux = d_in // 2 largest pre-activations of the dead elements alone (no decoder bias), scaled by
    min(n_dead / k_aux, 1) so that a few dead elements weigh little. 0 when none is dead. `dead`: bool (n_dict,)."""
    k_aux = sae.d_in // 2
    dead_ids = dead.nonzero().squeeze(1)  # (n_dead,); the host sync sizes the selection
    if len(dead_ids) == 0 or k_aux == 0:
        return x_hat.new_zeros((), dtype=torch.float32)
    pre = F.linear(x, sae.encoder.weight[dead_ids], sae.encoder.bias[dead_ids])  # (..., n_dead)
    top = pre.topk(min(k_aux, len(dead_ids)), dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
    e_hat = F.linear(codes, sae.dict_elements[:, dead_ids])  # (..., d_in)
    return min(len(dead_ids) / k_aux, 1.0) * F.mse_loss(e_hat.float(), (x - x_hat).detach().float())


def cross_entropy(logits, idx):
    """Next-token cross-entropy: logits at t predict token t+1, averaged over positions."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())


def explained_variance(pred, target, layer_norm=False):
    """Per token: 1 - sum_d (pred - target)^2 / sum_d (target - mean_over_tokens(target))^2. Shape (tokens,).
    The "ln" variant first applies a layer norm without affine weights to both."""
    pred, target = pred.float().flatten(0, -2), target.float().flatten(0, -2)  # (tokens, d)
    if layer_norm:
        pred, target = F.layer_norm(pred, pred.shape[-1:]), F.layer_norm(target, target.shape[-1:])
    residual = (pred - target).pow(2).sum(-1)
    total = (target - target.mean(0)).pow(2).sum(-1)
    return 1 - residual / total


def output_metrics(logits_orig, logits_sae, idx, merged=None):
    """How the spliced model's next-token predictions compare with the original's. With `merged` (a
    MergedUnembedding) the logits are over its merged rows, and every figure is still the one over tokens."""
    if merged is None:
        ce_orig, ce_sae = cross_entropy(logits_orig, idx), cross_entropy(logits_sae, idx)
        top_orig, top_sae = logits_orig.argmax(-1), logits_sae.argmax(-1)
    else:  # -log p(token) = -log P(its row) + log n(its row); argmax over tokens = first token of the top row
        rows = merged.token_row[idx]  # (B, T)
        shared = merged.bias[rows[:, 1:]].float().mean()
        ce_orig, ce_sae = cross_entropy(logits_orig, rows) + shared, cross_entropy(logits_sae, rows) + shared
        top_orig, top_sae = (merged.row_token[(z - merged.bias).argmax(-1)] for z in (logits_orig, logits_sae))
    p_orig, p_sae = F.softmax(logits_orig.float(), -1), F.softmax(logits_sae.float(), -1)
    target = idx[:, 1:]
    return {
        "ce_orig": ce_orig, "ce_sae": ce_sae, "ce_increase": ce_sae - ce_orig,
        "top1_acc_orig": (top_orig[:, :-1] == target).float().mean(),
        "top1_acc_sae": (top_sae[:, :-1] == target).float().mean(),
        "top1_consistency": (top_orig == top_sae).float().mean(),
        "stat_distance": 0.5 * (p_orig - p_sae).abs().sum(-1).mean(),
    }


def reconstruction_metrics(prefix, pred, target):
    ev, ev_ln = explained_variance(pred, target), explained_variance(pred, target, layer_norm=True)
    return {f"{prefix}explained_variance": ev.mean(), f"{prefix}explained_variance_std": ev.std(),
            f"{prefix}explained_variance_ln": ev_ln.mean(), f"{prefix}explained_variance_ln_std": ev_ln.std()}


# ---- the spliced model ----


class MergedUnembedding(nn.Module):
    """GPT-2's tied lm_head with identical rows merged: exact for every figure compute_loss takes from logits.

    Tokens whose unembedding rows are equal always get equal logits. (The embedded default's small model gives
    the ~31,000 tokens that never occur in Shakespeare one shared row; see train_gpt.py.) If n_r tokens share
    row r, whose logit is z_r, a softmax over the V tokens is a softmax over the U distinct rows with log n_r
    added to each logit:

        P(row r) = n_r exp(z_r) / sum_s n_s exp(z_s),       p(token v) = P(row of v) / n_(row of v)

    p_orig(v) / p_new(v) is the same for every token of a row, so KL(p_orig || p_new) and the statistical
    distance over rows equal those over tokens, and a token's cross-entropy is its row's plus log n_(row).
    `F.linear(h, merged.weight, merged.bias)` gives the U logits with log n_r added. At 18,940 distinct rows of
    50,257 the head, most of a step's FLOPs in a narrow model, costs 38% as much. A model without identical rows
    (GPT-2 itself) gets no MergedUnembedding (`merge_identical_rows` returns None) and uses its lm_head as it is.
    """

    def __init__(self, rows, token_row, counts):
        super().__init__()
        V = len(token_row)
        first = torch.full((len(rows),), V, device=rows.device)
        first.scatter_reduce_(0, token_row, torch.arange(V, device=rows.device), "amin")
        self.register_buffer("weight", rows, persistent=False)  # (U, d) the distinct rows
        self.register_buffer("bias", counts.float().log(), persistent=False)  # (U,) log n_r
        self.register_buffer("token_row", token_row, persistent=False)  # (V,) the row of each token
        self.register_buffer("row_token", first, persistent=False)  # (U,) a row's first token: what argmax picks


def merge_identical_rows(weight):
    """A MergedUnembedding of `weight` (V, d), or None when all its rows differ."""
    rows, token_row, counts = torch.unique(weight.detach(), dim=0, return_inverse=True, return_counts=True)
    return MergedUnembedding(rows, token_row, counts) if len(rows) < len(weight) else None


def sae_key(position):
    """ModuleDict keys can't hold dots: blocks.6.hook_resid_pre -> blocks-6-hook_resid_pre (as the reference)."""
    return position.replace(".", "-")


class SAETransformer(nn.Module):
    """A frozen GPT with one SAE at each listed residual-stream position. `sae_kwargs` (activation, k, ...) go to
    every SAE."""

    def __init__(self, gpt, sae_positions, dict_size_to_input_ratio=60.0, **sae_kwargs):
        super().__init__()
        if isinstance(sae_positions, str) or not sae_positions:
            raise ValueError(f"sae_positions must be a non-empty list of position names, got {sae_positions!r}")
        indices = [gpt.resid_index(p) for p in sae_positions]  # raises for unknown names, listing the valid ones
        if len(set(indices)) != len(indices):
            raise ValueError(f"sae_positions {list(sae_positions)} name the same place in the residual stream twice "
                             "(blocks.i.hook_resid_post is blocks.{i+1}.hook_resid_pre)")
        if dict_size_to_input_ratio <= 0:
            raise ValueError(f"dict_size_to_input_ratio must be positive, got {dict_size_to_input_ratio}")
        self.gpt = gpt.requires_grad_(False).eval()  # frozen: only the SAEs train
        self.sae_positions = [p for _, p in sorted(zip(indices, sae_positions))]  # in order of depth
        self.dict_size_to_input_ratio = float(dict_size_to_input_ratio)
        d_in = gpt.config.n_embd
        self.saes = nn.ModuleDict({sae_key(p): SAE(d_in, int(d_in * dict_size_to_input_ratio), **sae_kwargs)
                                   for p in self.sae_positions})
        self.merged = merge_identical_rows(gpt.lm_head.weight)  # None unless some tokens share a row
        self.config = {}  # the training config, where a checkpoint records one

    def train(self, mode=True):
        super().train(mode)
        self.gpt.eval()  # the GPT stays in eval mode (it has no dropout, but be explicit)
        return self

    def sae(self, position):
        return self.saes[sae_key(position)]

    def later_positions(self):
        """Every hook_resid_pre after the last SAE: where the spliced stream can be compared with the original."""
        last = max(self.gpt.resid_index(p) for p in self.sae_positions)
        return [f"blocks.{i}.hook_resid_pre" for i in range(last + 1, self.gpt.config.n_layer)]

    def forward_raw(self, idx):
        """The original model's logits."""
        return self.gpt(idx)

    def forward(self, idx):
        """Logits with every SAE spliced in, chained."""
        return self.gpt(idx, edits={p: (lambda x, s=self.sae(p): s(x)[0]) for p in self.sae_positions})

    def run(self, x, start, stop, record=(), splice=False):
        """Run the residual x (at index `start`) to index `stop`. At each index in `record` keep the stream; at each
        SAE position replace the stream with its SAE's reconstruction if `splice`. The recorded stream at an SAE
        position is the SAE's input. Returns (x at stop, {index: stream}, {position: (x_hat, c, pre)})."""
        sae_at = {self.gpt.resid_index(p): p for p in self.sae_positions} if splice else {}
        kept, outs, at = {}, {}, start
        for r in sorted({*record, *sae_at} & set(range(start, stop + 1))):
            x, at = self.gpt.run_blocks(x, at, r), r
            if r in record:
                kept[r] = x
            if r in sae_at:
                outs[sae_at[r]] = self.sae(sae_at[r]).forward_with_pre(x)
                x = outs[sae_at[r]][0]
        return self.gpt.run_blocks(x, at, stop), kept, outs

    # ---- checkpoints: the SAE weights as safetensors, with positions, ratio, settings and config as metadata ----

    def save(self, f, config=None):
        """Write the SAEs to `f` (a path or a binary file). train.py writes them atomically (runs.write_atomic)."""
        from safetensors.torch import save
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.saes.state_dict().items()}
        saes = {p: dict(d_in=self.sae(p).d_in, n_dict=self.sae(p).n_dict, **self.sae(p).settings)
                for p in self.sae_positions}
        meta = {"sae_positions": json.dumps(self.sae_positions),
                "dict_size_to_input_ratio": json.dumps(self.dict_size_to_input_ratio),
                "saes": json.dumps(saes), "gpt": json.dumps(getattr(self.gpt, "name_or_path", "")),
                "config": json.dumps(config or {})}
        data = save(tensors, metadata=meta)
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(data)
        else:
            f.write(data)

    @classmethod
    def from_checkpoint(cls, path, gpt=None):
        """Rebuild from `save`'s file. Without `gpt`, load the model the checkpoint names: its config's `init_from`,
        or for the embedded default's small model ('shakespeare') the directory it was loaded from. (interop.py's
        load_checkpoint also finds or trains that model where this one is not on disk.)"""
        from safetensors.torch import load_file
        meta = checkpoint_metadata(path)
        config, positions = json.loads(meta["config"]), json.loads(meta["sae_positions"])
        if gpt is None:
            init_from, loaded_from = config.get("init_from", ""), json.loads(meta.get("gpt", '""'))
            if init_from == "shakespeare" and not os.path.isdir(loaded_from):
                raise FileNotFoundError(f"{path} was trained on the embedded default's small model, which is not at "
                                        f"{loaded_from or 'a recorded place'}: interop.load_checkpoint({path!r}) finds "
                                        "or trains it, or pass gpt=")
            gpt = GPT.from_pretrained(loaded_from if init_from == "shakespeare" else init_from)
        tensors = load_file(path)
        # checkpoints from before the SAE variants record no settings: they hold ReLU SAEs
        specs = json.loads(meta.get("saes", "{}")) or {
            p: dict(d_in=tensors[f"{sae_key(p)}.encoder.weight"].shape[1]) for p in positions}
        for p, spec in specs.items():
            if spec["d_in"] != gpt.config.n_embd:
                raise ValueError(f"{path} holds an SAE of width {spec['d_in']} at {p}, but the model is "
                                 f"{gpt.config.n_embd} wide: give the model it was trained on (init_from="
                                 f"{config.get('init_from', '?')!r} in its config)")
        settings = lambda p: {k: v for k, v in specs[p].items() if k not in ("d_in", "n_dict")}
        model = cls(gpt, positions, json.loads(meta["dict_size_to_input_ratio"]), **settings(positions[0]))
        for p in positions:  # an SAE that came from elsewhere (pretrained_sae_paths) may differ from the first
            own = (settings(p), specs[p].get("n_dict", model.sae(p).n_dict))
            if own != (settings(positions[0]), model.sae(p).n_dict):
                model.saes[sae_key(p)] = SAE(specs[p]["d_in"], own[1], **own[0])
        model.saes.load_state_dict(tensors)
        model.config = config
        return model.to(next(gpt.parameters()).device)


def checkpoint_metadata(path):
    """The metadata of SAETransformer.save's file (positions, ratio, the SAEs' settings, the config), checked."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SAE checkpoint at {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path} is not a safetensors file ({e}); train.py writes saes.safetensors") from None
    if "sae_positions" not in meta:
        raise ValueError(f"{path} is not an e2esae checkpoint (its metadata has no sae_positions)")
    return meta


# ---- the loss ----

COEFFICIENTS = ("sparsity_coeff", "kl_coeff", "in_to_orig_coeff", "out_to_in_coeff", "out_to_orig_coeff",
                "aux_k_coeff")


def _check_loss_args(model, coeffs, p_norm, in_to_orig_positions):
    for name, value in coeffs.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    reconstruction = {k: v for k, v in coeffs.items() if k not in ("sparsity_coeff", "aux_k_coeff")}
    if not any(reconstruction.values()):
        raise ValueError("kl_coeff, in_to_orig_coeff, out_to_in_coeff and out_to_orig_coeff are all 0, so nothing "
                         "asks the SAEs to reconstruct anything: set out_to_in_coeff (local) or kl_coeff (e2e)")
    if p_norm <= 0:
        raise ValueError(f"p_norm must be positive, got {p_norm}")
    if isinstance(in_to_orig_positions, str):
        raise ValueError(f"in_to_orig_positions must be a list of position names, got {in_to_orig_positions!r}")
    first = min(model.gpt.resid_index(p) for p in model.sae_positions)
    for p in in_to_orig_positions:
        if model.gpt.resid_index(p) <= first:  # resid_index raises for unknown names
            raise ValueError(f"in_to_orig position {p} is not after the first SAE ({model.sae_positions[0]}): the "
                             "spliced and original streams are identical there, so the term is always 0")
    if coeffs["in_to_orig_coeff"] > 0 and not in_to_orig_positions:
        raise ValueError("in_to_orig_coeff > 0 needs in_to_orig_positions (e.g. every later blocks.{i}.hook_resid_pre)")


def _forward_passes(model, idx, local, need_logits, ds_at):
    """The clean pass and the SAEs on it (local) or spliced into a second pass (end-to-end), sharing the prefix
    before the first SAE. Returns (h_orig, orig, h_new, new, outs, inputs): final streams (h_new None where the
    spliced model never runs), recorded streams by index, each SAE's (x_hat, c, pre) and input by position."""
    gpt, L = model.gpt, model.gpt.config.n_layer
    sae_at = {p: gpt.resid_index(p) for p in model.sae_positions}
    first, last = min(sae_at.values()), max(sae_at.values())
    deepest = max([last, *ds_at.values()])
    with torch.no_grad():
        shared = gpt.run_blocks(gpt.embed(idx), 0, first)
        clean_stop = L if need_logits else (last if local else deepest)
        h_orig, orig, _ = model.run(shared, first, clean_stop, record={*sae_at.values(), *ds_at.values()})
    h_new, new = None, {}
    if local:
        outs = {p: model.sae(p).forward_with_pre(orig[r]) for p, r in sae_at.items()}
        inputs = {p: orig[r] for p, r in sae_at.items()}
        if need_logits or ds_at:  # the spliced model, for the metrics only
            with torch.no_grad():
                h_new, new, _ = model.run(shared, first, L, record=ds_at.values(), splice=True)
    else:
        h_new, new, outs = model.run(shared, first, L if need_logits else deepest,
                                     record={*sae_at.values(), *ds_at.values()}, splice=True)
        inputs = {p: new[r] for p, r in sae_at.items()}
    return h_orig, orig, h_new, new, outs, inputs


def _sae_terms(model, outs, inputs, orig, coeffs, p_norm, dead, full_metrics, feature_counts):
    """Each SAE's terms (sparsity, out_to_in, out_to_orig, aux_k) with their weighted sum, and its metrics."""
    loss, metrics = 0.0, {}
    for p, (x_hat, c, pre) in outs.items():
        sae, x = model.sae(p), inputs[p]
        terms = {"sparsity": sae.activation.penalty(c, pre, p_norm).mean() / sae.d_in,
                 "out_to_in": F.mse_loss(x_hat.float(), x.float()),
                 "out_to_orig": F.mse_loss(x_hat.float(), orig[model.gpt.resid_index(p)].float())}
        if coeffs["aux_k_coeff"] > 0 and dead is not None:
            terms["aux_k"] = aux_k_loss(sae, x, x_hat, dead[p])
        loss = loss + sum(coeffs[f"{k}_coeff"] * v for k, v in terms.items())
        with torch.no_grad():
            active = c > 0
            terms["l0"] = active.sum(-1).float().mean()
            terms["frac_zeros"] = 1 - active.float().mean()
            metrics.update({f"{k}/{p}": v.detach() for k, v in terms.items()})
            if full_metrics:
                metrics.update({f"{k}/{p}": v for k, v in reconstruction_metrics("", x_hat, x).items()})
            if feature_counts is not None:
                feature_counts.update(p, active)
    return loss, metrics


def _output_terms(model, idx, h_orig, h_new, full_metrics):
    """KL(p_orig || p_spliced) and, with full_metrics, the output metrics; over the lm_head's distinct rows where
    some are identical (exact: MergedUnembedding)."""
    ln_f, merged = model.gpt.transformer.ln_f, model.merged
    weight, bias = (merged.weight, merged.bias) if merged is not None else (model.gpt.lm_head.weight, None)
    if not full_metrics:  # the fused path: neither model's (tokens, vocab) logits are ever held whole
        return sae_kernels.linear_kl_div(ln_f(h_new), ln_f(h_orig), weight, bias), {}
    logits_orig, logits_new = F.linear(ln_f(h_orig), weight, bias), F.linear(ln_f(h_new), weight, bias)
    kl = sae_kernels.kl_div(logits_new, logits_orig)
    with torch.no_grad():
        return kl, output_metrics(logits_orig, logits_new, idx, merged)


def compute_loss(model, idx, *, sparsity_coeff, p_norm=1.0, kl_coeff=0.0, in_to_orig_coeff=0.0,
                 in_to_orig_positions=(), out_to_in_coeff=0.0, out_to_orig_coeff=0.0, aux_k_coeff=0.0,
                 kl_rescale=False, full_metrics=True, feature_counts=None, dead=None):
    """The training loss of `model` (an SAETransformer) on token ids idx (B, T), and a flat dict of metrics.

    Returns (loss, metrics): loss a scalar to backpropagate; metrics detached 0-d tensors named as in the paper's
    logs (<pos> is the dotted position name): kl, ce_orig, ce_sae, ce_increase, top1_acc_orig, top1_acc_sae,
    top1_consistency, stat_distance; sparsity/<pos>, l0/<pos>, frac_zeros/<pos>, out_to_in/<pos>,
    out_to_orig/<pos>, explained_variance[_ln][_std]/<pos>; in_to_orig/<pos> and
    in_to_orig_explained_variance[_ln][_std]/<pos> at each downstream position; aux_k/<pos> with aux_k_coeff.
    full_metrics=False skips the work only metrics need (full logits, extra passes); the loss is the same.
    feature_counts, a FeatureCounts, counts which dictionary elements fired in this batch. dead, {position: bool
    (n_dict,)} (DeadElements.masks()), names the elements the auxiliary-k loss reconstructs the residual from.
    kl_rescale (Karvonen 2025's fine-tune): the KL term is scaled to the size of the local MSE, alpha = (sum of
    out_to_in terms / kl) detached, and the two are averaged: 0.5 (out_to_in_coeff mse + kl_coeff alpha kl).
    """
    coeffs = dict(sparsity_coeff=sparsity_coeff, kl_coeff=kl_coeff, in_to_orig_coeff=in_to_orig_coeff,
                  out_to_in_coeff=out_to_in_coeff, out_to_orig_coeff=out_to_orig_coeff, aux_k_coeff=aux_k_coeff)
    _check_loss_args(model, coeffs, p_norm, in_to_orig_positions)
    if kl_rescale and not (kl_coeff > 0 and out_to_in_coeff > 0):
        raise ValueError("kl_rescale scales the KL term to the local MSE's size: it needs kl_coeff > 0 and "
                         "out_to_in_coeff > 0")
    ds_at = {p: model.gpt.resid_index(p) for p in in_to_orig_positions}
    local = kl_coeff == 0 and in_to_orig_coeff == 0
    need_logits = kl_coeff > 0 or full_metrics
    if local and not full_metrics:
        ds_at = {}  # nothing downstream enters a local loss, and its metrics are not asked for
    h_orig, orig, h_new, new, outs, inputs = _forward_passes(model, idx, local, need_logits, ds_at)

    if kl_rescale:  # the local MSE enters through the rescaled combination below, not on its own
        coeffs["out_to_in_coeff"] = 0.0
    loss, metrics = _sae_terms(model, outs, inputs, orig, coeffs, p_norm, dead, full_metrics, feature_counts)
    for p, r in ds_at.items():
        term = F.mse_loss(new[r].float(), orig[r].float())
        loss = loss + in_to_orig_coeff / len(ds_at) * term
        metrics[f"in_to_orig/{p}"] = term.detach()
        if full_metrics:
            with torch.no_grad():
                ds = reconstruction_metrics("in_to_orig_", new[r], orig[r])
                metrics.update({f"{k}/{p}": v for k, v in ds.items()})
    if need_logits:
        kl, output = _output_terms(model, idx, h_orig, h_new, full_metrics)
        if kl_rescale:
            mse = sum(F.mse_loss(x_hat.float(), inputs[p].float()) for p, (x_hat, _, _) in outs.items())
            alpha = (mse / kl.clamp_min(1e-12)).detach()
            loss = loss + 0.5 * (out_to_in_coeff * mse + kl_coeff * alpha * kl)
            metrics["kl_alpha"] = alpha
        elif kl_coeff > 0:
            loss = loss + kl_coeff * kl
        metrics.update(output, kl=kl.detach())
    metrics["loss"] = loss.detach()
    return loss, metrics


def loss_kwargs(config, downstream=()):
    """compute_loss's arguments for measuring a trained model as its training config says: its coefficients decide
    how its SAEs are fed (chained with an end-to-end term, the clean stream for local ones); `downstream` lists
    where the spliced stream is compared with the original (in_to_orig_coeff is dropped without it)."""
    coeffs = {k: float(config.get(k) or 0.0) for k in COEFFICIENTS if k != "aux_k_coeff"}
    if not downstream:
        coeffs["in_to_orig_coeff"] = 0.0
    if not any(v for k, v in coeffs.items() if k != "sparsity_coeff"):
        coeffs["out_to_in_coeff"] = 1.0  # a checkpoint with no loss recorded (SAELens's): measure it as local
    return dict(coeffs, p_norm=float(config.get("p_norm") or 1.0), in_to_orig_positions=list(downstream))


def nonfinite_parameters(module):
    """The names of a module's parameters and buffers that hold a NaN or an infinity: a diverged run's."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, t in named if t.is_floating_point() and not torch.isfinite(t).all()]


def training_type(kl_coeff, in_to_orig_coeff):
    """The paper's name for a mix of coefficients: e2e+ds (KL and downstream), e2e (KL), else local."""
    if kl_coeff > 0 and in_to_orig_coeff > 0:
        return "e2e+ds"
    return "e2e" if kl_coeff > 0 else "local"


# ---- evaluation: figures over many batches ----


class FeatureCounts:
    """How many tokens each dictionary element fired on, over a window of tokens: the alive count and the
    activation frequencies (the paper's log10 histograms)."""

    def __init__(self, model):
        device = next(model.parameters()).device
        self.counts = {p: torch.zeros(model.sae(p).n_dict, dtype=torch.long, device=device)
                       for p in model.sae_positions}
        self.n_tokens = {p: 0 for p in model.sae_positions}

    def update(self, position, active):
        """active: boolean (..., n_dict), whether each element fired on each token."""
        active = active.flatten(0, -2)  # (tokens, n_dict)
        self.counts[position] += active.sum(0)
        self.n_tokens[position] += active.shape[0]

    def alive(self):
        return {p: int((n > 0).sum()) for p, n in self.counts.items()}

    def frequencies(self):
        return {p: n.double().cpu() / max(self.n_tokens[p], 1) for p, n in self.counts.items()}

    def reset(self):
        for p in self.counts:
            self.counts[p].zero_()
            self.n_tokens[p] = 0


class DeadElements:
    """Which dictionary elements are dead: none of the last `window` training tokens fired them (Gao et al.'s
    definition; the auxiliary-k loss trains them on the residual). After each step, step(counts) with that
    step's FeatureCounts (summed over processes under DDP)."""

    def __init__(self, model, window):
        device = next(model.parameters()).device
        self.window = window
        self.since = {p: torch.zeros(model.sae(p).n_dict, dtype=torch.long, device=device) for p in model.sae_positions}

    def step(self, counts):
        for p, fired in counts.counts.items():
            self.since[p] += counts.n_tokens[p]
            self.since[p].masked_fill_(fired > 0, 0)

    def masks(self):
        return {p: s >= self.window for p, s in self.since.items()}

    def state_dict(self):
        return {p: s.cpu() for p, s in self.since.items()}

    def load_state_dict(self, state):
        for p, s in state.items():
            self.since[p].copy_(s)


@torch.no_grad()
def evaluate(model, batches, loss_kwargs, autocast=None, all_reduce=None, progress=None):
    """compute_loss's metrics averaged over held-out batches of token ids (each weighted by its samples), and a
    FeatureCounts of them (alive features, activation frequencies), with the SAEs in inference mode (BatchTopK
    uses its threshold). Returns (metrics, counts): metrics are floats, plus `alive/<pos>` and `eval_tokens`.
    all_reduce, if given, sums a tensor in place over processes (DDP); progress(i, n, running_metrics) is called
    after each batch."""
    was_training = model.training
    model.eval()
    counts, sums, n_samples, n_tokens = FeatureCounts(model), {}, 0, 0
    for i, idx in enumerate(batches):
        idx = idx.to(next(model.parameters()).device)
        with autocast or contextlib.nullcontext():
            _, metrics = compute_loss(model, idx, **loss_kwargs, full_metrics=True, feature_counts=counts)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.float() * len(idx)
        n_samples, n_tokens = n_samples + len(idx), n_tokens + idx.numel()
        if progress:
            progress(i + 1, len(batches), {k: (v / n_samples).item() for k, v in sums.items()})
    model.train(was_training)
    keys = sorted(sums)
    totals = torch.stack([sums[k] for k in keys] + [torch.tensor(float(n_samples)).to(sums[keys[0]]),
                                                   torch.tensor(float(n_tokens)).to(sums[keys[0]])])
    if all_reduce:
        all_reduce(totals)
        for p in counts.counts:
            all_reduce(counts.counts[p])
            counts.n_tokens[p] = int(totals[-1].item())
    figures = {k: v / totals[-2].item() for k, v in zip(keys, totals.tolist())}
    figures |= {f"alive/{p}": a for p, a in counts.alive().items()}
    figures["eval_tokens"] = int(totals[-1].item())
    return figures, counts
