"""
Sparse autoencoders spliced into GPT-2's residual stream: the SAE, the spliced model, the losses and the metrics.

Follows Braun et al. (2024), "Identifying Functionally Important Features with End-to-End Sparse Dictionary
Learning", and computes every term exactly as its reference library (`e2e_sae`) does.

The SAE. For an activation x (d_in) and a dictionary of n_dict elements:

    c     = ReLU(W_enc x + b_enc)                   the code, (n_dict,), mostly zeros once trained
    x_hat = D c + b_dec,   D[:, j] = W_dec[:, j] / ||W_dec[:, j]||    unit-norm dictionary elements

The losses (B tokens per batch, the total is the sum of coefficient x term):

    sparsity     ||c||_p averaged over tokens, / d_in                      (every training type)
    kl           KL(p_orig || p_spliced) per token, averaged               (end-to-end)
    in_to_orig   MSE(spliced stream, original stream) at later positions,  (end-to-end + downstream)
                 the coefficient split evenly over those positions
    out_to_in    MSE(x_hat, x)                                             (local)
    out_to_orig  MSE(x_hat, original stream at the SAE)

    local  = sparsity + out_to_in;   e2e = sparsity + kl;   e2e+ds = sparsity + kl + in_to_orig

"Spliced" means the SAE's output replaces the residual stream and the rest of the network runs on it. With
several SAEs and any end-to-end term they are chained: a later SAE reads the stream the earlier ones changed.
Purely local training feeds every SAE the clean stream and never runs the blocks after the last SAE.

Usage:
    gpt = GPT.from_pretrained("gpt2")
    model = SAETransformer(gpt, ["blocks.6.hook_resid_pre"], dict_size_to_input_ratio=60)
    loss, metrics = compute_loss(model, idx, sparsity_coeff=3.0, kl_coeff=1.0)
"""

import contextlib
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


class SAE(nn.Module):
    """A ReLU sparse autoencoder with a column-normalised decoder. `sae(x)` returns (x_hat, c)."""

    def __init__(self, d_in, n_dict):
        super().__init__()
        self.d_in, self.n_dict = d_in, n_dict
        self.encoder = nn.Linear(d_in, n_dict)  # weight (n_dict, d_in)
        self.decoder = nn.Linear(n_dict, d_in)  # weight (d_in, n_dict): column j is dictionary element j
        nn.init.orthogonal_(self.decoder.weight)

    @property
    def dict_elements(self):
        """The dictionary D, (d_in, n_dict), every column of unit L2 norm."""
        return self.decoder.weight / self.decoder.weight.norm(dim=0, keepdim=True)

    def forward(self, x):
        return kernels.sae_forward(x, self.encoder.weight, self.encoder.bias, self.decoder.weight, self.decoder.bias)


# ---- losses and metrics, each a small function of tensors ----

def sparsity_loss(c, p_norm, d_in):
    """The p-norm of each token's code (not its p-th power), averaged over tokens, divided by d_in."""
    return torch.linalg.vector_norm(c, ord=p_norm, dim=-1, dtype=torch.float32).mean() / d_in


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


def load_gpt(init_from, small_model_config=""):
    """The frozen model an SAE splices into: 'gpt2' (-medium, ...), a directory in Hugging Face's layout, or
    'shakespeare', the embedded default's small model, or with `small_model_config` the small model that
    train_gpt.py config file describes (train_gpt.py trains and caches it on first use)."""
    from model import GPT
    if init_from == "shakespeare":
        from train_gpt import small_model
        init_from = small_model(small_model_config)
    return GPT.from_pretrained(init_from)


class SAETransformer(nn.Module):
    """A frozen GPT with one SAE at each listed residual-stream position."""

    def __init__(self, gpt, sae_positions, dict_size_to_input_ratio=60.0):
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
        self.saes = nn.ModuleDict({sae_key(p): SAE(d_in, int(d_in * dict_size_to_input_ratio))
                                   for p in self.sae_positions})
        self.merged = merge_identical_rows(gpt.lm_head.weight)  # None unless some tokens share a row

    def train(self, mode=True):
        super().train(mode)
        self.gpt.eval()  # the GPT stays in eval mode (it has no dropout, but be explicit)
        return self

    def sae(self, position):
        return self.saes[sae_key(position)]

    def forward_raw(self, idx):
        """The original model's logits."""
        return self.gpt(idx)

    def forward(self, idx):
        """Logits with every SAE spliced in, chained."""
        return self.gpt(idx, edits={p: (lambda x, s=self.sae(p): s(x)[0]) for p in self.sae_positions})

    def run(self, x, start, stop, record=(), splice=False):
        """Run the residual x (at index `start`) to index `stop`. At each index in `record` keep the stream; at each
        SAE position replace the stream with its SAE's reconstruction if `splice`. The recorded stream at an SAE
        position is the SAE's input. Returns (x at stop, {index: stream}, {position: (x_hat, c)})."""
        sae_at = {self.gpt.resid_index(p): p for p in self.sae_positions} if splice else {}
        kept, outs, at = {}, {}, start
        for r in sorted({*record, *sae_at} & set(range(start, stop + 1))):
            x, at = self.gpt.run_blocks(x, at, r), r
            if r in record:
                kept[r] = x
            if r in sae_at:
                outs[sae_at[r]] = self.sae(sae_at[r])(x)
                x = outs[sae_at[r]][0]
        return self.gpt.run_blocks(x, at, stop), kept, outs

    # ---- checkpoints: the SAE weights as safetensors, with positions, ratio and config as metadata ----

    def save(self, path, config=None):
        from safetensors.torch import save_file
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.saes.state_dict().items()}
        meta = {"sae_positions": json.dumps(self.sae_positions),
                "dict_size_to_input_ratio": json.dumps(self.dict_size_to_input_ratio),
                "config": json.dumps(config or {})}
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)  # atomic: a reader never sees half a file

    @classmethod
    def from_checkpoint(cls, path, gpt=None):
        """Rebuild from `save`'s file. Without `gpt`, load the model named by the saved config's `init_from`."""
        from safetensors import safe_open
        from safetensors.torch import load_file
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no SAE checkpoint at {path}")
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise ValueError(f"{path} is not a safetensors file ({e}); train.py writes saes.safetensors") from None
        if "sae_positions" not in meta:
            raise ValueError(f"{path} is not an e2esae checkpoint (its metadata has no sae_positions)")
        config = json.loads(meta["config"])
        if gpt is None:
            gpt = load_gpt(config["init_from"], config.get("small_model_config", ""))
        model = cls(gpt, json.loads(meta["sae_positions"]), json.loads(meta["dict_size_to_input_ratio"]))
        model.saes.load_state_dict(load_file(path))
        model.config = config
        return model.to(next(gpt.parameters()).device)

# ---- the loss ----

def _check_loss_args(model, coeffs, p_norm, in_to_orig_positions):
    for name, value in coeffs.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not any(coeffs.values()):
        raise ValueError("every loss coefficient is 0, so there is nothing to train: set sparsity_coeff and at least "
                         "one of kl_coeff, in_to_orig_coeff, out_to_in_coeff, out_to_orig_coeff")
    if p_norm <= 0:
        raise ValueError(f"p_norm must be positive, got {p_norm}")
    if isinstance(in_to_orig_positions, str):
        raise ValueError(f"in_to_orig_positions must be a list of position names, got the string {in_to_orig_positions!r}")
    first = min(model.gpt.resid_index(p) for p in model.sae_positions)
    for p in in_to_orig_positions:
        if model.gpt.resid_index(p) < first:  # resid_index raises for unknown names
            raise ValueError(f"in_to_orig position {p} lies before the first SAE ({model.sae_positions[0]}): the "
                             "spliced and original streams are identical there")
    if coeffs["in_to_orig_coeff"] > 0 and not in_to_orig_positions:
        raise ValueError("in_to_orig_coeff > 0 needs in_to_orig_positions (e.g. every later blocks.{i}.hook_resid_pre)")


def compute_loss(model, idx, *, sparsity_coeff, p_norm=1.0, kl_coeff=0.0, in_to_orig_coeff=0.0,
                 in_to_orig_positions=(), out_to_in_coeff=0.0, out_to_orig_coeff=0.0, full_metrics=True,
                 feature_counts=None):
    """The training loss of `model` (an SAETransformer) on token ids idx (B, T), and a flat dict of metrics.

    Returns (loss, metrics): loss a scalar to backpropagate; metrics detached 0-d tensors named as in the paper's
    logs (<pos> is the dotted position name): kl, ce_orig, ce_sae, ce_increase, top1_acc_orig, top1_acc_sae,
    top1_consistency, stat_distance; sparsity/<pos>, l0/<pos>, frac_zeros/<pos>, out_to_in/<pos>,
    out_to_orig/<pos>, explained_variance[_ln][_std]/<pos>; in_to_orig/<pos> and
    in_to_orig_explained_variance[_ln][_std]/<pos> at each downstream position.
    full_metrics=False skips the work only metrics need (full logits, extra passes); the loss is the same.
    feature_counts, a FeatureCounts, counts which dictionary elements fired in this batch.
    """
    coeffs = dict(sparsity_coeff=sparsity_coeff, kl_coeff=kl_coeff, in_to_orig_coeff=in_to_orig_coeff,
                  out_to_in_coeff=out_to_in_coeff, out_to_orig_coeff=out_to_orig_coeff)
    _check_loss_args(model, coeffs, p_norm, in_to_orig_positions)
    gpt, L = model.gpt, model.gpt.config.n_layer
    sae_at = {p: gpt.resid_index(p) for p in model.sae_positions}
    ds_at = {p: gpt.resid_index(p) for p in in_to_orig_positions}
    local = kl_coeff == 0 and in_to_orig_coeff == 0
    need_logits = kl_coeff > 0 or full_metrics
    first, last = min(sae_at.values()), max(sae_at.values())
    deepest = max([last, *ds_at.values()])

    # The clean pass. Both passes are identical up to the first SAE, so that prefix runs once.
    with torch.no_grad():
        shared = gpt.run_blocks(gpt.embed(idx), 0, first)
        clean_stop = L if need_logits else (last if local else deepest)
        h_orig, orig, _ = model.run(shared, first, clean_stop, record={*sae_at.values(), *ds_at.values()})

    # The SAEs: on the clean stream (local) or spliced into a second pass, chained (end-to-end)
    if local:
        outs = {p: model.sae(p)(orig[r]) for p, r in sae_at.items()}
        inputs = {p: orig[r] for p, r in sae_at.items()}
        if full_metrics:  # the spliced model, for the metrics only
            with torch.no_grad():
                h_new, new, _ = model.run(shared, first, L, record=ds_at.values(), splice=True)
    else:
        h_new, new, outs = model.run(shared, first, L if need_logits else deepest,
                                     record={*sae_at.values(), *ds_at.values()}, splice=True)
        inputs = {p: new[r] for p, r in sae_at.items()}

    loss, metrics = 0.0, {}
    d_in = gpt.config.n_embd
    for p, (x_hat, c) in outs.items():
        terms = {"sparsity": sparsity_loss(c, p_norm, d_in), "out_to_in": F.mse_loss(x_hat.float(), inputs[p].float()),
                 "out_to_orig": F.mse_loss(x_hat.float(), orig[sae_at[p]].float())}
        loss = loss + sparsity_coeff * terms["sparsity"]
        loss = loss + out_to_in_coeff * terms["out_to_in"] + out_to_orig_coeff * terms["out_to_orig"]
        with torch.no_grad():
            active = c > 0
            terms["l0"] = active.sum(-1).float().mean()
            terms["frac_zeros"] = 1 - active.float().mean()
            metrics.update({f"{k}/{p}": v.detach() for k, v in terms.items()})
            if full_metrics:
                metrics.update({f"{k}/{p}": v for k, v in reconstruction_metrics("", x_hat, inputs[p]).items()})
            if feature_counts is not None:
                feature_counts.update(p, active)

    if ds_at and (not local or full_metrics):
        for p, r in ds_at.items():
            term = F.mse_loss(new[r].float(), orig[r].float())
            loss = loss + in_to_orig_coeff / len(ds_at) * term
            metrics[f"in_to_orig/{p}"] = term.detach()
            if full_metrics:
                with torch.no_grad():
                    ds = reconstruction_metrics("in_to_orig_", new[r], orig[r])
                metrics.update({f"{k}/{p}": v for k, v in ds.items()})

    if need_logits:  # over the lm_head's distinct rows where some are identical (exact: MergedUnembedding)
        ln_f, merged = gpt.transformer.ln_f, model.merged
        weight, bias = (merged.weight, merged.bias) if merged is not None else (gpt.lm_head.weight, None)
        if full_metrics:
            logits_orig, logits_new = F.linear(ln_f(h_orig), weight, bias), F.linear(ln_f(h_new), weight, bias)
            kl = kernels.kl_div(logits_new, logits_orig)
            with torch.no_grad():
                metrics.update(output_metrics(logits_orig, logits_new, idx, merged))
        else:  # the fused path: neither model's (tokens, vocab) logits are ever held whole
            kl = kernels.linear_kl_div(ln_f(h_new), ln_f(h_orig), weight, bias)
        loss = loss + kl_coeff * kl
        metrics["kl"] = kl.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


@torch.no_grad()
def evaluate(model, batches, loss_kwargs, autocast=None, all_reduce=None, progress=None):
    """compute_loss's metrics averaged over held-out batches of token ids (each weighted by its samples), and a
    FeatureCounts of them (alive features, activation frequencies). Returns (metrics, counts): metrics are floats,
    plus `alive/<pos>` and `eval_tokens`. all_reduce, if given, sums a tensor in place over processes (DDP);
    progress(i, n, running_metrics) is called after each batch."""
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


def training_type(kl_coeff, in_to_orig_coeff):
    """The paper's name for a mix of coefficients: e2e+ds (KL and downstream), e2e (KL), else local."""
    if kl_coeff > 0 and in_to_orig_coeff > 0:
        return "e2e+ds"
    return "e2e" if kl_coeff > 0 else "local"


class FeatureCounts:
    """How many tokens each dictionary element fired on, over a window of tokens: the alive count and the
    activation frequencies (the paper's log10 histograms)."""

    def __init__(self, model):
        device = next(model.parameters()).device
        self.counts = {p: torch.zeros(model.sae(p).n_dict, dtype=torch.long, device=device) for p in model.sae_positions}
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
