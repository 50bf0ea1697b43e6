"""
Sparse autoencoders spliced into a language model's residual stream: the SAE, the spliced model, its loss and metrics.

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
    jumprelu   c = pre [pre > theta_j], a learned threshold per element, with an L0 penalty (Rajamanoharan et al. 2024)

The paper's loss is a sum of coefficient x term (B tokens per batch):

    sparsity     ||c||_p averaged over tokens, / d_in (JumpReLU: ||c||_0, through a straight-through estimator)
    kl           KL(p_orig || p_spliced) per token, averaged                         (end-to-end)
    in_to_orig   MSE(spliced stream, original stream), averaged over later positions (end-to-end + downstream)
    out_to_in    MSE(x_hat, x)                                                       (local)
    out_to_orig  MSE(x_hat, original stream at the SAE)

    local  = sparsity + out_to_in;   e2e = sparsity + kl;   e2e+ds = sparsity + kl + in_to_orig

Two variants from later papers ride on it: aux_k, MSE(e_hat, x - x_hat), the residual reconstructed from the dead
elements alone (Gao et al. 2024), and kl_rescale, the KL scaled to the size of the MSE (Karvonen 2025).

"Spliced" means the SAE's output replaces the residual stream and the rest of the network runs on it. With several
SAEs and any end-to-end term they are chained: a later SAE reads the stream the earlier ones changed. Local training
feeds every SAE the clean stream and never runs the blocks after the last SAE. Where samples start with BOS (Llama,
Gemma), whose residual norm is far above every other position's, the SAEs leave those positions to the model
(SAETransformer.bos_token_id): they read and replace the others only, and every term and metric averages over those.

Usage:
    gpt = load_model("gpt2")                                     # language_models.py
    model = SAETransformer(gpt, ["blocks.6.hook_resid_pre"], dict_size_to_input_ratio=60)
    loss, metrics = compute_loss(model, idx, LossConfig(sparsity_coeff=3.0, kl_coeff=1.0))
    model = SAETransformer(gpt, ["blocks.6.hook_resid_pre"], 60, activation="topk", k=32)
    model = SAETransformer.from_checkpoint("out")                # any format interop.py reads
    model = SAETransformer.from_local_path("path/to/run")        # the reference library's names
"""

import contextlib
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import interop
import sae_kernels
from language_models import Unembedding

# ---- the activations: pre-activations (..., n_dict) -> the code c ----

class Activation(nn.Module):
    """What every activation shares: the L_p sparsity term, and no fused kernel unless it says so."""

    fused = None  # keyword arguments of sae_kernels.sae_forward when it computes this activation fused, else None
    saved = ()  # the attributes besides its name that rebuild it (make_activation's arguments), saved with checkpoints

    def settings(self):
        return {name: getattr(self, name) for name in self.saved}

    def extra_repr(self):
        return ", ".join(f"{name}={value}" for name, value in self.settings().items())

    def project_(self):
        """Put learned parameters back where they belong, after an optimiser step (nothing to do for most)."""

    def penalty(self, code, pre, p_norm):
        """The sparsity term of each token, before the mean over tokens and the division by d_in."""
        return torch.linalg.vector_norm(code, ord=p_norm, dim=-1, dtype=torch.float32)

    def observe(self, code):
        """See the code a fused kernel computed (where forward did not run): nothing to learn from it for most."""


class ReLU(Activation):
    """c = ReLU(pre): the paper's SAE, sparse only through the L_p penalty."""

    name, fused = "relu", {}

    def forward(self, pre):
        return F.relu(pre)


class TopK(Activation):
    """c = ReLU(TopK(pre)): each token's k largest pre-activations, the rest 0; k is the sparsity, no penalty needed."""

    name, saved = "topk", ("k",)

    def __init__(self, k, n_dict):
        super().__init__()
        sae_kernels.check_k(k, n_dict)
        self.k, self.fused = k, {"k": k}  # fused = None takes the module path (forward, then decode)

    def forward(self, pre):
        return sae_kernels.topk_relu(pre, self.k)


class BatchTopK(TopK):
    """Training: the B x k largest ReLU(pre) of a batch of B tokens. Inference: c = pre [pre > theta], theta a buffer
    (saved with the weights) tracking the smallest code kept: theta <- 0.99 theta + 0.01 min, as SAELens trains it."""

    name, momentum = "batchtopk", 0.01

    def __init__(self, k, n_dict):
        super().__init__(k, n_dict)
        self.register_buffer("threshold", torch.zeros(()))

    @property
    def fused(self):  # the batch selection in training; inference's threshold is a plain elementwise op
        return {"k": self.k, "batch_topk": True} if self.training else None

    @fused.setter
    def fused(self, value):  # (TopK's constructor sets its own; BatchTopK's is the property above)
        pass

    def forward(self, pre):
        if not self.training:
            return pre * (pre > self.threshold)
        tokens = pre.numel() // pre.shape[-1]
        code = sae_kernels.topk_relu(pre.flatten(), min(self.k * tokens, pre.numel())).view_as(pre)
        self.observe(code)
        return code

    @torch.no_grad()
    def observe(self, code):
        kept = code[code > 0]
        if self.training and kept.numel():
            self.threshold.lerp_(kept.min().float(), self.momentum)


class _JumpReLUFunction(torch.autograd.Function):
    """c = pre H(pre - theta), or with step=True H(pre - theta) itself (the L0 penalty's count). Gradients: to pre,
    H(pre - theta) (the step has none); to theta, the straight-through estimate -(theta / eps) K((pre - theta) / eps),
    the step's -(1 / eps) K((pre - theta) / eps), with the rectangle kernel K(u) = 1[|u| < 1/2]."""

    @staticmethod
    def forward(ctx, pre, theta, eps, step=False):
        ctx.save_for_backward(pre, theta)
        ctx.eps, ctx.step = eps, step
        return (pre > theta).to(pre.dtype) if step else pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < ctx.eps / 2).to(grad.dtype)
        grad_theta = -((1 if ctx.step else theta) / ctx.eps) * near * grad
        grad_pre = None if ctx.step else grad * (pre > theta)
        return grad_pre, grad_theta.reshape(-1, theta.shape[0]).sum(0), None, None


class JumpReLU(Activation):
    """c = pre H(pre - theta_j), a learned threshold theta_j >= 0 per element, with an L0 penalty; theta's gradients
    are straight-through estimates (bandwidth eps). theta is the parameter itself: log theta barely moves under Adam."""

    name, saved = "jumprelu", ("bandwidth",)

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

    def penalty(self, code, pre, p_norm):
        step = _JumpReLUFunction.apply(pre, self.threshold.to(pre.dtype), self.bandwidth, True)  # H(pre - theta)
        return step.sum(-1, dtype=torch.float32)


ACTIVATIONS = {"relu": ReLU, "topk": TopK, "batchtopk": BatchTopK, "jumprelu": JumpReLU}


def make_activation(activation, n_dict, k=None, bandwidth=None, init_threshold=None):
    """An activation by name, its settings checked: k for topk and batchtopk only, the rest for jumprelu only."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if k is not None and activation not in ("topk", "batchtopk"):
        raise ValueError(f"k={k} is the active codes per token of topk and batchtopk; activation={activation!r} has no "
                         "k (its sparsity comes from the sparsity coefficient): drop k or choose topk")
    if (bandwidth, init_threshold) != (None, None) and activation != "jumprelu":
        raise ValueError(f"bandwidth and init_threshold are JumpReLU's; activation={activation!r} has neither")
    if activation == "jumprelu":
        given = {"bandwidth": bandwidth, "init_threshold": init_threshold}
        return JumpReLU(n_dict, **{name: v for name, v in given.items() if v is not None})
    if activation == "relu":
        return ReLU()
    if k is None:
        raise ValueError(f"activation={activation!r} needs k, the active codes per token: e.g. --k=32")
    return ACTIVATIONS[activation](k, n_dict)


# ---- the SAE ----

def geometric_median(x, iterations=50):
    """The point minimising the summed distances to the rows of x (N, d): Weiszfeld's iteration from the mean."""
    median = x.mean(0)
    for _ in range(iterations):
        weights = 1 / (x - median).norm(dim=1).clamp_min(1e-8)  # (N,)
        median = (weights[:, None] * x).sum(0) / weights.sum()
    return median


class SAE(interop.SAEFiles, nn.Module):
    """A sparse autoencoder with a column-normalised decoder; `sae(x)` returns (x_hat, c). input_scale s (1 unless set;
    SAELens's "expected_average_only_in" normalisation): the SAE reads s x (of mean squared norm d_in) and writes
    x_hat / s; its codes, thresholds and reconstruction terms are in those units (folded_state_dict() folds s into the
    weights). Its file methods (from_saelens, save_saelens, from_spec) are interop.SAEFiles's."""

    def __init__(self, d_in, n_dict, activation="relu", k=None, bandwidth=None, init_threshold=None):
        super().__init__()
        self.d_in, self.n_dict = d_in, n_dict
        self.encoder = nn.Linear(d_in, n_dict)  # weight (n_dict, d_in)
        self.decoder = nn.Linear(n_dict, d_in)  # weight (d_in, n_dict): column j is dictionary element j
        nn.init.orthogonal_(self.decoder.weight)
        self.activation = make_activation(activation, n_dict, k, bandwidth, init_threshold)
        self.register_buffer("input_scale", torch.ones(()))

    @torch.no_grad()
    def init_tied_(self, x, decoder_bias="mean"):
        """Gao et al.'s (2024) initialisation on inputs x (N, d_in): the encoder is the dictionary's transpose, the
        decoder bias the inputs' mean or geometric median, subtracted before encoding: b_enc = -W_enc b_dec."""
        x = x.float() * self.input_scale
        center = x.mean(0) if decoder_bias == "mean" else geometric_median(x)
        self.encoder.weight.copy_(self.dict_elements.T)
        self.decoder.bias.copy_(center)
        self.encoder.bias.copy_(-self.encoder.weight.float() @ center)

    def folded_state_dict(self):
        """The state with input_scale s folded in: the activations are positively homogeneous (thresholds scaled too),
        act(W s x + b) / s = act(W x + b / s), so biases and thresholds divided by s give the same x_hat at scale 1."""
        s, scaled = self.input_scale.detach(), ("encoder.bias", "decoder.bias", "activation.threshold")
        state = {k: v.detach() / s if k in scaled else v.detach().clone() for k, v in self.state_dict().items()}
        state["input_scale"] = torch.ones_like(s)
        return state

    @property
    def dict_elements(self):
        """The dictionary D, (d_in, n_dict), every column of unit L2 norm."""
        return self.decoder.weight / self.decoder.weight.norm(dim=0, keepdim=True)

    @property
    def settings(self):
        """What rebuilds this SAE's activation: SAE(d_in, n_dict, **settings)."""
        return {"activation": self.activation.name, **self.activation.settings()}

    def encode(self, x):
        """The code c of activations x (..., d_in)."""
        return self.activation(self.encoder(x * self.input_scale.to(x.dtype)))

    def decode(self, code):
        """x_hat of a code, in the units of x: decode(encode(x)) is forward(x)'s x_hat."""
        x_hat = F.linear(code, self.dict_elements, self.decoder.bias)
        return x_hat / self.input_scale.to(x_hat.dtype)

    def forward(self, x):
        return self.forward_with_pre(x)[:2]

    def forward_with_pre(self, x):
        """(x_hat, c, pre): pre for the sparsity terms that need it (JumpReLU's), None where a fused kernel
        computed the activation (sae_kernels.sae_forward: on a GPU, without ever writing pre and c separately)."""
        if self.activation.fused is None:
            pre = self.encoder(x * self.input_scale.to(x.dtype))
            code = self.activation(pre)
            return self.decode(code), code, pre
        x_hat, code = sae_kernels.sae_forward(x * self.input_scale.to(x.dtype), self.encoder.weight, self.encoder.bias,
                                              self.decoder.weight, self.decoder.bias, **self.activation.fused)
        self.activation.observe(code)
        return x_hat / self.input_scale.to(x_hat.dtype), code, None


# ---- metrics, each a small function of tensors ----

def aux_k_loss(sae, x, x_hat, dead):
    """Gao et al.'s auxiliary loss: MSE between the residual x - x_hat (detached) and its reconstruction from the
    k_aux = d_in // 2 largest pre-activations of the dead elements alone (no decoder bias), scaled by
    min(n_dead / k_aux, 1) so that a few dead elements weigh little. 0 when none is dead. `dead`: bool (n_dict,)."""
    k_aux = sae.d_in // 2
    dead_ids = dead.nonzero().squeeze(1)  # (n_dead,); the host sync sizes the selection
    if len(dead_ids) == 0 or k_aux == 0:
        return x_hat.new_zeros((), dtype=torch.float32)
    pre = F.linear(x * sae.input_scale, sae.encoder.weight[dead_ids], sae.encoder.bias[dead_ids])  # (..., n_dead)
    codes = sae_kernels.topk_relu(pre, min(k_aux, len(dead_ids)))
    columns = sae.decoder.weight[:, dead_ids]  # (d_in, n_dead): the dead elements' alone, never the whole dictionary
    e_hat = F.linear(codes, columns / columns.norm(dim=0, keepdim=True)) / sae.input_scale  # (..., d_in), unscaled
    return min(len(dead_ids) / k_aux, 1.0) * F.mse_loss(e_hat.float(), (x - x_hat).detach().float())


def explained_variance(pred, target, layer_norm=False):
    """Per token: 1 - sum_d (pred - target)^2 / sum_d (target - mean_over_tokens(target))^2. Shape (tokens,).
    The "ln" variant first applies a layer norm without affine weights to both."""
    pred, target = pred.float().flatten(0, -2), target.float().flatten(0, -2)  # (tokens, d)
    if layer_norm:
        pred, target = F.layer_norm(pred, pred.shape[-1:]), F.layer_norm(target, target.shape[-1:])
    return 1 - (pred - target).pow(2).sum(-1) / (target - target.mean(0)).pow(2).sum(-1)


def reconstruction_metrics(prefix, pred, target):
    ev, ev_ln = explained_variance(pred, target), explained_variance(pred, target, layer_norm=True)
    return {f"{prefix}explained_variance": ev.mean(), f"{prefix}explained_variance_std": ev.std(),
            f"{prefix}explained_variance_ln": ev_ln.mean(), f"{prefix}explained_variance_ln_std": ev_ln.std()}


@torch.no_grad()
def output_metrics(h_orig, h_new, idx, head, keep=None, chunk_rows=None):
    """The spliced model's next-token predictions against the original's, from both final normed streams (B, T, d)
    through `head` (language_models.Unembedding), at the positions in `keep` (B, T; None: all): kl, ce_orig, ce_sae,
    ce_increase, top1_acc_orig, top1_acc_sae, top1_consistency, stat_distance = 0.5 sum_v |p_orig - p_new|. The logits
    at t predict token t + 1, computed chunk_rows positions at a time. Over a merged head's rows (log n_r in its logits)
    a token's log-probability is its row's minus log n_r; the KL and statistical distance are the rows'."""
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -1)], 1)  # (B, T): -1 where nothing follows
    at = torch.ones_like(idx, dtype=torch.bool) if keep is None else keep
    h_orig, h_new, targets = h_orig[at], h_new[at], targets[at]  # (N, d), (N, d), (N,)
    per_chunk = sae_kernels.kl.LOGITS_PER_CHUNK if idx.is_cuda else sae_kernels.kl.CPU_LOGITS_PER_CHUNK
    chunk_rows = chunk_rows or max(16, per_chunk // len(head.row_token))
    merged = bool(head.log_count.any())  # rows shared by several tokens: the argmax must take log n_r off
    sums = dict.fromkeys("kl ce_orig ce_sae top1_acc_orig top1_acc_sae top1_consistency stat_distance".split(), 0.0)
    for start in range(0, len(targets), chunk_rows):
        chunk = slice(start, start + chunk_rows)
        log_p = [F.log_softmax(head(h[chunk]).float(), -1) for h in (h_orig, h_new)]  # 2 x (C, U)
        top = [head.row_token[(lp - head.log_count if merged else lp).argmax(-1)] for lp in log_p]  # most likely
        sums["top1_consistency"] += (top[0] == top[1]).sum()
        target = targets[chunk]
        has, rows = target >= 0, head.token_row[target.clamp(min=0)]
        for name, lp, t in (("orig", log_p[0], top[0]), ("sae", log_p[1], top[1])):
            token_log_p = lp.gather(1, rows[:, None]).squeeze(1) - head.log_count[rows]  # log p(target)
            sums[f"ce_{name}"] -= token_log_p[has].sum()
            sums[f"top1_acc_{name}"] += (t == target)[has].sum()
        p_orig = log_p[0].exp()
        sums["kl"] += torch.dot(p_orig.view(-1), (log_p[0] - log_p[1]).view(-1))  # sum p_orig (log p_orig - log p_new)
        sums["stat_distance"] += 0.5 * log_p[1].exp_().sub_(p_orig).abs_().sum()  # in place: log_p is done with
    n, n_predicted = max(len(targets), 1), max(int((targets >= 0).sum()), 1)
    figures = {k: torch.as_tensor(v, dtype=torch.float32, device=idx.device)
               / (n_predicted if k.startswith(("ce", "top1_acc")) else n) for k, v in sums.items()}
    figures["ce_increase"] = figures["ce_sae"] - figures["ce_orig"]
    return figures


# ---- the spliced model ----

class SAETransformer(interop.SAETransformerFiles, nn.Module):
    """A frozen language model (model.GPT, or anything with its seam) with an SAE at each listed residual-stream
    position: `saes` ({position: SAE}) places trained ones, the others are built with `sae_kwargs` (activation, k, ...).
    Its file methods (from_checkpoint, from_local_path, from_wandb, save, save_saelens): interop.SAETransformerFiles."""

    sae_type = SAE  # what those methods build the SAEs of a checkpoint as

    def __init__(self, gpt, sae_positions, dict_size_to_input_ratio=60.0, saes=None, **sae_kwargs):
        super().__init__()
        if isinstance(sae_positions, str) or not sae_positions:
            raise ValueError(f"sae_positions must be a non-empty list of position names, got {sae_positions!r}")
        indices = [gpt.resid_index(p) for p in sae_positions]  # raises for unknown names, listing the valid ones
        if len(set(indices)) != len(indices):
            raise ValueError(f"sae_positions {list(sae_positions)} name the same place in the residual stream twice "
                             "(blocks.i.hook_resid_post is blocks.{i+1}.hook_resid_pre)")
        if int(gpt.config.n_embd * dict_size_to_input_ratio) < 1:
            raise ValueError(f"dict_size_to_input_ratio={dict_size_to_input_ratio} gives a dictionary of 0 elements at "
                             f"width {gpt.config.n_embd}: use at least {1 / gpt.config.n_embd:.2g}")
        self.gpt = gpt.requires_grad_(False).eval()  # frozen: only the SAEs train
        self.sae_positions = [p for _, p in sorted(zip(indices, sae_positions))]  # in order of depth
        self.dict_size_to_input_ratio = float(dict_size_to_input_ratio)
        d_in, saes = gpt.config.n_embd, saes or {}
        for p, sae in saes.items():
            if sae.d_in != d_in:
                raise ValueError(f"the SAE at {p} reads activations of width {sae.d_in}, but the model is {d_in} "
                                 "wide: give the model it was trained on (eval.py: --init_from=...)")
        self.saes = nn.ModuleDict({interop.sae_key(p): saes.get(p) or SAE(d_in, int(d_in * dict_size_to_input_ratio),
                                                                         **sae_kwargs) for p in self.sae_positions})
        self.head = Unembedding.of(gpt)  # the lm_head, identical rows merged where some tokens share one
        self.bos_token_id = None  # a token whose positions the SAEs leave alone (BOS: train.py's include_bos)
        self.config = {}  # the training config, where a checkpoint records one

    def train(self, mode=True):
        super().train(mode)
        self.gpt.eval()  # the model stays in eval mode (GPT-2 has no dropout, but be explicit)
        return self

    def sae(self, position):
        return self.saes[interop.sae_key(position)]

    def later_positions(self):
        """Every hook_resid_pre after the last SAE: where the spliced stream can be compared with the original."""
        last = max(self.gpt.resid_index(p) for p in self.sae_positions)
        return [f"blocks.{i}.hook_resid_pre" for i in range(last + 1, self.gpt.config.n_layer)]

    def positions_read(self, idx):
        """(B, T) bool: the positions of idx the SAEs read and replace (all but bos_token_id's), or None for all."""
        return None if self.bos_token_id is None else idx != self.bos_token_id

    def forward_raw(self, idx):
        """The original model's logits."""
        return self.gpt(idx)

    def forward(self, idx):
        """Logits with every SAE spliced in, chained."""
        return self.gpt(idx, edits={p: (lambda x, s=self.sae(p): s(x)[0]) for p in self.sae_positions})

    def run(self, x, start, stop, record=(), splice=False, keep=None):
        """Run the residual x from index `start` to `stop`, recording the stream at each index in `record` (at an SAE
        position, its input). With `splice`, each SAE's output replaces the stream, at every token or only at those in
        `keep` (B, T), read as a flat (N, d). Returns (x at stop, {index: stream}, {position: (x_hat, c, pre)})."""
        sae_at = {self.gpt.resid_index(p): p for p in self.sae_positions} if splice else {}
        kept, outs, at = {}, {}, start
        for r in sorted({*record, *sae_at} & set(range(start, stop + 1))):
            x, at = self.gpt.run_blocks(x, at, r), r
            if r in record:
                kept[r] = x
            if r in sae_at:
                outs[sae_at[r]] = self.sae(sae_at[r]).forward_with_pre(x if keep is None else x[keep])
                x = outs[sae_at[r]][0] if keep is None else x.index_put((keep,), outs[sae_at[r]][0])
        return self.gpt.run_blocks(x, at, stop), kept, outs


# ---- the loss ----

@dataclass
class LossConfig:
    """The loss's settings, named as train.py's config keys: the paper's five terms, then aux_k_coeff and kl_rescale."""

    sparsity_coeff: float = 0.0
    p_norm: float = 1.0
    kl_coeff: float = 0.0
    in_to_orig_coeff: float = 0.0
    in_to_orig_positions: tuple = ()
    out_to_in_coeff: float = 0.0
    out_to_orig_coeff: float = 0.0
    aux_k_coeff: float = 0.0
    kl_rescale: bool = False

    @classmethod
    def of(cls, config):
        """The loss settings among a config's (train.py's, or a checkpoint's)."""
        return cls(**{f.name: config[f.name] for f in fields(cls) if config.get(f.name) is not None})

    @classmethod
    def for_evaluation(cls, config, downstream=()):
        """The loss a trained model is measured with, from its training config, whose coefficients decide how the SAEs
        are fed (chained if end-to-end); in_to_orig at `downstream` alone, dropped without it."""
        loss = cls.of({k: v for k, v in config.items() if k not in ("aux_k_coeff", "kl_rescale")})
        loss.in_to_orig_positions = tuple(downstream)
        if not downstream:
            loss.in_to_orig_coeff = 0.0
        if not (loss.kl_coeff or loss.in_to_orig_coeff or loss.out_to_in_coeff or loss.out_to_orig_coeff):
            loss.out_to_in_coeff = 1.0  # a checkpoint with no loss recorded (SAELens's): measure it as local
        return loss

    @property
    def local(self):
        """No end-to-end term: every SAE reads the clean stream, and the model after the last SAE never runs."""
        return self.kl_coeff == 0 and self.in_to_orig_coeff == 0

    def check(self, model=None):
        """Refuse what cannot train: negative coefficients, no reconstruction term, in_to_orig up to the first SAE."""
        for name, value in asdict(self).items():
            if name.endswith("_coeff") and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not (self.kl_coeff or self.in_to_orig_coeff or self.out_to_in_coeff or self.out_to_orig_coeff):
            raise ValueError("kl_coeff, in_to_orig_coeff, out_to_in_coeff and out_to_orig_coeff are all 0, so nothing "
                             "asks the SAEs to reconstruct anything: set out_to_in_coeff (local) or kl_coeff (e2e)")
        if self.p_norm <= 0:
            raise ValueError(f"p_norm must be positive, got {self.p_norm}")
        if isinstance(self.in_to_orig_positions, str):
            raise ValueError(f"in_to_orig_positions must be a list of names, got {self.in_to_orig_positions!r}")
        if self.in_to_orig_coeff > 0 and not self.in_to_orig_positions:
            raise ValueError("in_to_orig_coeff > 0 needs in_to_orig_positions (e.g. every later "
                             "blocks.{i}.hook_resid_pre)")
        if self.kl_rescale and not (self.kl_coeff > 0 and self.out_to_in_coeff > 0):
            raise ValueError("kl_rescale scales the KL term to the local MSE's size: it needs kl_coeff > 0 and "
                             "out_to_in_coeff > 0")
        if model is None:
            return
        first = min(model.gpt.resid_index(p) for p in model.sae_positions)
        for p in self.in_to_orig_positions:
            if model.gpt.resid_index(p) <= first:  # resid_index raises for unknown names
                raise ValueError(f"in_to_orig position {p} is not after the first SAE ({model.sae_positions[0]}): the "
                                 "spliced and original streams are identical there, so the term is always 0")


def at_positions(t, keep):
    """t (B, T, ...) at the positions in keep (B, T), as a flat (N, ...); t itself where keep is None (every one)."""
    return t if keep is None else t[keep]


def forward_passes(model, idx, loss, downstream, need_logits, keep):
    """The clean pass, and the SAEs on it (local) or spliced into a second pass (end-to-end) after the shared prefix,
    reading the positions in `keep`. Returns a dict: h_orig, h_new, the final streams (h_new None if the spliced model
    never runs); orig, new, the streams recorded by index; outs, each SAE's (x_hat, c, pre); inputs, what each read."""
    gpt, L = model.gpt, model.gpt.config.n_layer
    sae_at = {p: gpt.resid_index(p) for p in model.sae_positions}
    first, last = min(sae_at.values()), max(sae_at.values())
    deepest = max([last, *downstream.values()])
    record = {*sae_at.values(), *downstream.values()}
    with torch.no_grad():
        shared = gpt.run_blocks(gpt.embed(idx), 0, first)
        clean_stop = L if need_logits else (last if loss.local else deepest)
        h_orig, orig, _ = model.run(shared, first, clean_stop, record=record)
    if loss.local:
        inputs = {p: at_positions(orig[r], keep) for p, r in sae_at.items()}
        outs = {p: model.sae(p).forward_with_pre(inputs[p]) for p in sae_at}
        h_new, new = None, {}
        if need_logits or downstream:  # the spliced model, for the metrics only
            with torch.no_grad():
                h_new, new, _ = model.run(shared, first, L, record=downstream.values(), splice=True, keep=keep)
    else:
        h_new, new, outs = model.run(shared, first, L if need_logits else deepest, record=record, splice=True,
                                     keep=keep)
        inputs = {p: at_positions(new[r], keep) for p, r in sae_at.items()}
    return dict(h_orig=h_orig, orig=orig, h_new=h_new, new=new, outs=outs, inputs=inputs)


def sae_term(name, sae, x, x_hat, code, pre, x_orig, p_norm, dead):
    """One SAE's term: sparsity, out_to_in, out_to_orig or aux_k, in its own units (x times input_scale)."""
    if name == "sparsity":
        return sae.activation.penalty(code, pre, p_norm).mean() / sae.d_in
    units = sae.input_scale.float() ** 2
    if name == "aux_k":
        return units * aux_k_loss(sae, x, x_hat, dead)
    return units * F.mse_loss(x_hat.float(), (x if name == "out_to_in" else x_orig).float())


def compute_loss(model, idx, loss, *, full_metrics=True, feature_counts=None, dead=None):
    """The training loss of `model` (an SAETransformer) on token ids idx (B, T) under `loss` (a LossConfig): (total,
    metrics), total a scalar to backpropagate, metrics detached 0-d tensors named as in the paper's logs (<pos> the
    position): output_metrics's with full_metrics, else kl where kl_coeff > 0; l0/<pos> and frac_zeros/<pos>;
    <term>/<pos> for each term computed (coefficient > 0, or with full_metrics any but aux_k); with full_metrics,
    explained_variance[_ln][_std]/<pos> and in_to_orig_explained_variance[...]/<pos>. full_metrics=False skips the work
    only metrics need (full logits, extra passes); the loss is the same. feature_counts (a FeatureCounts) counts the
    elements that fired; dead (DeadElements.masks()) names those aux_k reconstructs the residual from. kl_rescale:
    0.5 (out_to_in_coeff sum(out_to_in) + kl_coeff alpha kl) replaces both, alpha = (sum(out_to_in) / kl) detached."""
    loss.check(model)
    gpt = model.gpt
    downstream = {p: gpt.resid_index(p) for p in loss.in_to_orig_positions}
    if loss.local and not full_metrics:
        downstream = {}  # nothing downstream enters a local loss, and its metrics are not asked for
    need_logits = loss.kl_coeff > 0 or full_metrics
    keep = model.positions_read(idx)  # (B, T), or None: every position
    run = forward_passes(model, idx, loss, downstream, need_logits, keep)
    weight = dict(sparsity=loss.sparsity_coeff, out_to_in=0.0 if loss.kl_rescale else loss.out_to_in_coeff,
                  out_to_orig=loss.out_to_orig_coeff, aux_k=loss.aux_k_coeff if dead is not None else 0.0)
    total, mse, metrics = 0.0, 0.0, {}

    for p, (x_hat, code, pre) in run["outs"].items():  # the terms of each SAE
        sae, x, x_orig = model.sae(p), run["inputs"][p], at_positions(run["orig"][gpt.resid_index(p)], keep)
        for name, coeff in weight.items():
            rescaled = name == "out_to_in" and loss.kl_rescale  # enters with the KL term, below
            if coeff > 0 or rescaled or (full_metrics and name != "aux_k"):
                with torch.set_grad_enabled((coeff > 0 or rescaled) and torch.is_grad_enabled()):  # else a metric
                    value = sae_term(name, sae, x, x_hat, code, pre, x_orig, loss.p_norm, dead[p] if dead else None)
                total = total + coeff * value if coeff > 0 else total
                mse = mse + value if rescaled else mse
                metrics[f"{name}/{p}"] = value.detach()
        with torch.no_grad():
            active = code > 0  # a count of it, never a sum: summing bools converts every (token, element) to int64
            fired = torch.count_nonzero(active).float()
            metrics[f"l0/{p}"] = fired / (active.numel() // active.shape[-1])
            metrics[f"frac_zeros/{p}"] = 1 - fired / active.numel()
            if full_metrics:
                metrics.update({f"{k}/{p}": v for k, v in reconstruction_metrics("", x_hat, x).items()})
            if feature_counts is not None:
                feature_counts.update(p, active)

    for p, r in downstream.items():  # the downstream term, split evenly over its positions
        new, orig = at_positions(run["new"][r], keep), at_positions(run["orig"][r], keep)
        term = F.mse_loss(new.float(), orig.float())
        total = total + loss.in_to_orig_coeff / len(downstream) * term
        metrics[f"in_to_orig/{p}"] = term.detach()
        if full_metrics:
            with torch.no_grad():
                metrics.update({f"{k}/{p}": v for k, v in reconstruction_metrics("in_to_orig_", new, orig).items()})

    if need_logits:  # the KL term, through the lm_head in chunks: neither model's (tokens, vocab) logits held whole
        h_new, h_orig = gpt.final_norm(run["h_new"]), gpt.final_norm(run["h_orig"])
        if full_metrics:
            metrics.update(output_metrics(h_orig, h_new, idx, model.head, keep))
        if full_metrics and not torch.is_grad_enabled():
            kl = metrics["kl"]  # evaluation: the figures' own
        else:
            kl = sae_kernels.linear_kl_div(at_positions(h_new, keep), at_positions(h_orig, keep), model.head.weight,
                                           model.head.bias, model.head.softcap)
        if loss.kl_rescale:
            alpha = (mse / kl.clamp_min(1e-12)).detach()
            total = total + 0.5 * (loss.out_to_in_coeff * mse + loss.kl_coeff * alpha * kl)
            metrics["kl_alpha"] = alpha
        elif loss.kl_coeff > 0:
            total = total + loss.kl_coeff * kl
        metrics["kl"] = kl.detach()
    metrics["loss"] = total.detach()
    return total, metrics


@torch.no_grad()
def prepare_saes(model, positions, batches, sae_init="orthogonal", normalize_activations="none"):
    """Before training, from the clean stream the SAEs at `positions` read on `batches` of token ids (BOS left out):
    each one's input_scale (normalize_activations="expected_average_only_in") and tied initialisation (sae_init
    "tied_mean" or "tied_median": SAE.init_tied_; "orthogonal" keeps its own). Returns {position: tokens read}."""
    at = {model.gpt.resid_index(p): p for p in positions}
    seen = {p: [] for p in positions}
    for idx in batches:
        idx = idx.to(next(model.parameters()).device)
        keep = model.positions_read(idx)
        _, streams, _ = model.run(model.gpt.embed(idx), 0, max(at), record=at)
        for r, p in at.items():
            seen[p].append(at_positions(streams[r], keep).flatten(0, -2).float())  # (N, d)
    for p in positions:
        sae, x = model.sae(p), torch.cat(seen[p])
        if normalize_activations == "expected_average_only_in":
            sae.input_scale.fill_((sae.d_in / x.pow(2).sum(-1).mean()).sqrt().item())
        if sae_init != "orthogonal":
            sae.init_tied_(x, decoder_bias=sae_init.removeprefix("tied_"))
        seen[p] = len(x)
    return seen


# ---- evaluation: figures over many batches ----

class FeatureCounts:
    """How many tokens each dictionary element fired on: alive counts, activation frequencies (log10 histograms)."""

    def __init__(self, model):
        device = next(model.parameters()).device
        self.counts = {p: torch.zeros(model.sae(p).n_dict, dtype=torch.long, device=device)
                       for p in model.sae_positions}
        self.n_tokens = {p: 0 for p in model.sae_positions}

    def update(self, position, active):
        """active: boolean (..., n_dict), whether each element fired on each token."""
        n_dict = active.shape[-1]
        fired = active.reshape(-1).nonzero().squeeze(1) % n_dict  # the element of each firing: the code is sparse
        self.counts[position] += torch.bincount(fired, minlength=n_dict)
        self.n_tokens[position] += active.numel() // n_dict

    def sum_over_processes(self, all_reduce):
        """The counts of every process (DDP), with all_reduce summing a tensor in place."""
        for p, counts in self.counts.items():
            n_tokens = torch.tensor(self.n_tokens[p], device=counts.device)
            all_reduce(counts)
            all_reduce(n_tokens)
            self.n_tokens[p] = int(n_tokens)

    def alive(self):
        return {p: int((n > 0).sum()) for p, n in self.counts.items()}

    def frequencies(self):
        return {p: n.double().cpu() / max(self.n_tokens[p], 1) for p, n in self.counts.items()}


class DeadElements:
    """Which dictionary elements are dead: fired by none of the last `window` training tokens (Gao et al.; aux_k trains
    them on the residual). Call step(counts) after each step with its FeatureCounts (summed under DDP)."""

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
def evaluate(model, batches, loss, autocast=None, all_reduce=None, progress=None):
    """compute_loss's metrics under `loss` (e.g. LossConfig.for_evaluation of a checkpoint's config) over held-out
    batches of token ids, weighted by their samples, with the SAEs in inference mode (BatchTopK uses its threshold).
    Returns (figures, counts): floats, plus alive/<pos> and eval_tokens, and a FeatureCounts. all_reduce (DDP), if
    given, sums a tensor over processes in place; progress(i, n, running_metrics) runs after each batch."""
    was_training = model.training
    model.eval()
    counts, sums, n_samples, n_tokens = FeatureCounts(model), {}, 0, 0
    for i, idx in enumerate(batches):
        idx = idx.to(next(model.parameters()).device)
        with autocast or contextlib.nullcontext():
            _, metrics = compute_loss(model, idx, loss, full_metrics=True, feature_counts=counts)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.float() * len(idx)
        n_samples, n_tokens = n_samples + len(idx), n_tokens + idx.numel()
        if progress:
            progress(i + 1, len(batches), {k: (v / n_samples).item() for k, v in sums.items()})
    model.train(was_training)
    keys = sorted(sums)
    totals = torch.cat([torch.stack([sums[k] for k in keys]), sums[keys[0]].new_tensor([n_samples, n_tokens])])
    if all_reduce:
        all_reduce(totals)
        counts.sum_over_processes(all_reduce)
    figures = {k: v / totals[-2].item() for k, v in zip(keys, totals.tolist())}
    figures |= {f"alive/{p}": a for p, a in counts.alive().items()}
    figures["eval_tokens"] = int(totals[-1].item())
    return figures, counts
