"""
Tables, lines and plots of SAEs: what train.py shows while it trains (TrainingLog: its opening lines, a line per
logging step, the eval line, wandb, the summary it ends with; MFU from flops_per_token), one row per SAE, the table
eval.py prints, the paper's Pareto plot (L0 and alive elements against CE increase) and its activation-frequency
histogram. eval.py, train.py, reproduce.py, analysis.py and mlp.py share them. matplotlib is imported where a plot
is drawn.
"""

import os
import re
import time
from dataclasses import fields

import torch
import torch.distributed as dist

from e2esae import LossConfig, evaluate

COEFF_KEYS = [f.name for f in fields(LossConfig) if f.name.endswith("_coeff") and f.name != "aux_k_coeff"]
PUBLISHED = {"l": "local", "e": "e2e", "efr": "e2e+ds"}  # the paper's SAEs on the hub: res_s{c,l}{l,e,efr}-ajt


def training_type(kl_coeff, in_to_orig_coeff):
    """The paper's name for a mix of coefficients: e2e+ds (KL and downstream), e2e (KL), else local."""
    if kl_coeff > 0 and in_to_orig_coeff > 0:
        return "e2e+ds"
    return "e2e" if kl_coeff > 0 else "local"


def describe(spec, config):
    """Training type and coefficients, from the checkpoint's config or (for the paper's hub SAEs) its name."""
    out = {k: config.get(k) for k in (*COEFF_KEYS, "p_norm")}
    if config.get("sparsity_coeff") is not None:
        out["type"] = training_type(config.get("kl_coeff") or 0, config.get("in_to_orig_coeff") or 0)
    else:
        m = re.search(r"res_s[cl](l|e|efr)-ajt", spec)
        out["type"] = PUBLISHED[m.group(1)] if m else "unknown"
    return out


def result_rows(spec, model, metrics, counts, downstream):
    """One flat row per SAE position: what the table prints and plot_pareto reads."""
    info, alive, rows = describe(spec, getattr(model, "config", {}) or {}), counts.alive(), []
    for p in model.sae_positions:
        rows.append(dict(
            checkpoint=spec, position=p, **info, **model.sae(p).settings, n_dict=model.sae(p).n_dict,
            n_tokens=counts.n_tokens[p],
            l0=metrics[f"l0/{p}"], alive=alive[p], frac_zeros=metrics[f"frac_zeros/{p}"],
            ce_orig=metrics["ce_orig"], ce_sae=metrics["ce_sae"], ce_increase=metrics["ce_increase"], kl=metrics["kl"],
            explained_variance=metrics[f"explained_variance/{p}"],
            explained_variance_ln=metrics[f"explained_variance_ln/{p}"],
            downstream_explained_variance={q: metrics[f"in_to_orig_explained_variance/{q}"] for q in downstream}))
    return rows


UNSETTLED = 2.0  # a BatchTopK SAE whose held-out L0 is more than this factor away from k, either way, is flagged


def threshold_warning(position, settings, l0):
    """A warning where a BatchTopK SAE's held-out L0 is far from its k, else None. Inference keeps the codes above one
    threshold, a running average of the batch selection's smallest code that moves 1% of the way each training step
    from 0: a run of a few hundred steps or less leaves it low (L0 many times k), and the figures then describe that
    unsettled threshold, not the SAE that training selected k codes per token for."""
    k = settings.get("k")
    if settings.get("activation") != "batchtopk" or not k or 1 / UNSETTLED <= l0 / k <= UNSETTLED:
        return None
    return (f"warning: the BatchTopK SAE at {position} keeps {l0:.1f} codes per held-out token, {l0 / k:.1f}x its "
            f"k={k}: its inference threshold has not settled at about k codes per token (it starts at 0 and moves 1% "
            "of the way each training step), so these figures are not those of an SAE of L0 about k. Train it longer "
            "(a few hundred steps at least)")


def print_table(rows, file=None):
    num = lambda v, f: "-" if v is None else format(v, f)
    table = [("checkpoint", "position", "type", "activation", "lambda", "L0", "alive", "CE", "CE+SAE", "dCE", "KL",
              "EV", "EV at later hook_resid_pre")]
    for r in rows:
        activation = r.get("activation", "relu") + (f" k={r['k']}" if r.get("k") else "")
        table.append((r["checkpoint"], r["position"], r["type"], activation, num(r["sparsity_coeff"], "g"),
                      f"{r['l0']:.1f}",
                      f"{r['alive']:,}/{r['n_dict']:,}", f"{r['ce_orig']:.4f}", f"{r['ce_sae']:.4f}",
                      f"{r['ce_increase']:.4f}", f"{r['kl']:.4f}", f"{r['explained_variance']:.3f}",
                      " ".join(f"{v:.2f}" for v in r["downstream_explained_variance"].values()) or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=file)
        if i == 0:
            print("-+-".join("-" * w for w in widths), file=file)
    for r in rows:
        warning = threshold_warning(f"{r['position']} of {r['checkpoint']}", r, r["l0"])
        if warning:
            print(warning, file=file)


# ---- plots (matplotlib, an optional dependency) ----

TYPE_STYLE = {"local": ("o", "tab:blue"), "e2e": ("s", "tab:orange"), "e2e+ds": ("^", "tab:green")}
OTHER_STYLES = [("D", "tab:purple"), ("v", "tab:red"), ("P", "tab:brown"), ("X", "tab:pink")]


def type_style(kind, kinds):
    """(marker, colour) of a training type: the paper's three fixed, any other (fine-tunes) by its place in kinds."""
    others = sorted(k for k in kinds if k not in TYPE_STYLE)
    return TYPE_STYLE.get(kind) or OTHER_STYLES[others.index(kind) % len(OTHER_STYLES)]


def plot_frequency_histogram(freqs, path, title=""):
    """Histogram of log10 activation frequency per dictionary element (the paper's feature-density plot). Elements
    that never fired over the evaluated tokens are dead: log10(0) does not exist, so they get their own bar at left."""
    import numpy as np
    from matplotlib.figure import Figure
    freqs = np.asarray(freqs, dtype=np.float64)
    dead, logf = int((freqs == 0).sum()), np.log10(freqs[freqs > 0])
    lo = float(np.floor(logf.min())) if len(logf) else -6.0
    bins = np.linspace(lo, 0.0, 41)
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    ax.hist(logf, bins=bins, color="tab:blue", label=f"alive: {len(logf):,}")
    dead_x = lo - 0.75
    ax.bar([dead_x], [dead], width=0.5, color="tab:red", label=f"dead: {dead:,}")
    ticks = [t for t in range(int(lo), 1)]
    ax.set_xticks([dead_x, *ticks], ["dead", *map(str, ticks)])
    ax.set_xlabel("log10 activation frequency (share of tokens on which the element fires)")
    ax.set_ylabel("dictionary elements")
    ax.set_title(title or f"{len(freqs):,} dictionary elements", fontsize=9)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


Y_LABELS = {"ce_increase": "CE loss increase", "kl": "KL(original || spliced)"}


def plot_pareto(results, path, title="", y="ce_increase", per="token"):
    """L0 and alive dictionary elements against CE loss increase (or another figure `y`, e.g. 'kl'), one marker and
    colour per training type (the paper's Figure 1). `results`: dicts with keys type, sparsity_coeff, l0, alive, y
    (and optionally position, activation, k, reference); points of one type, activation and position are joined in
    order of L0, each labelled with its coefficient (or k). Rows with a `reference` (another sweep's, for
    comparison) are drawn faint. `per` names what L0 counts over (a token; an image for mlp.py)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4.4))
    axes = fig.subplots(1, 2, sharey=True)
    positions = sorted({str(r["position"]) for r in results if r.get("position")})  # several: a style each
    activations = list(dict.fromkeys(r.get("activation") or "relu" for r in results))  # several: one style each
    groups = {}
    for r in results:
        key = (r["type"], r.get("activation") or "relu", (r.get("position") or None) if len(positions) > 1 else None,
               bool(r.get("reference")))
        groups.setdefault(key, []).append(r)
    rank = lambda kind: list(TYPE_STYLE).index(kind) if kind in TYPE_STYLE else len(TYPE_STYLE)  # local, e2e, ...
    for (kind, activation, pos, faint), rows in sorted(groups.items(), key=lambda g: (g[0][3], rank(g[0][0]),
                                                                                       str(g[0][1:3]))):
        rows = sorted(rows, key=lambda r: r["l0"])
        marker, colour = type_style(kind, {g[0] for g in groups})
        label = kind + (f", {activation}" if len(activations) > 1 else "") + (f" ({pos})" if pos else "")
        style = ["-", "--", ":", "-."][(positions.index(str(pos)) if pos else activations.index(activation)) % 4]
        for ax, x in zip(axes, ("l0", "alive")):
            xs, ys = [r[x] for r in rows], [r[y] for r in rows]
            ax.plot(xs, ys, marker=marker, color=colour, linestyle=style, label=label, linewidth=1,
                    markersize=5 if faint else 7, alpha=0.35 if faint else 1.0)
            for r in rows:
                text = f"k={r['k']:g}" if r.get("k") else (f"{r['sparsity_coeff']:g}" if r.get("sparsity_coeff")
                                                          is not None else "")
                if text and not faint:
                    ax.annotate(text, (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
    axes[0].set_xlabel(f"L0 (active dictionary elements per {per})")
    axes[1].set_xlabel("alive dictionary elements")
    axes[0].set_ylabel(Y_LABELS.get(y, y))
    axes[0].legend(frameon=False, fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def print_summary(m, model, dataset, out_dir, unigram=None):
    """The paper's figures for a finished run, on held-out text (`m`: e2esae.evaluate's metrics); with `unigram`, a
    unigram model's cross-entropy on the same text and how much of the model's advantage over it the SAEs keep."""
    rows = [("CE loss of the model", f"{m['ce_orig']:.4f}"), ("CE loss with the SAEs spliced in", f"{m['ce_sae']:.4f}"),
            ("CE loss increase", f"{m['ce_increase']:.4f}"), ("KL(original || spliced)", f"{m['kl']:.4f}")]
    for p in model.sae_positions:
        n_dict = model.sae(p).n_dict
        rows += [(f"L0 at {p}", f"{m['l0/' + p]:.1f}"), (f"alive features at {p}", f"{m['alive/' + p]:,} / {n_dict:,}"),
                 (f"explained variance at {p}", f"{m['explained_variance/' + p]:.3f} (after layer norm "
                                                  f"{m['explained_variance_ln/' + p]:.3f})")]
    if unigram is not None:
        gap = unigram - m["ce_orig"]
        rows += [("CE loss of a unigram model", f"{unigram:.4f}"), ("model's advantage over unigram", f"{gap:.4f}"),
                 ("advantage kept with the SAEs", f"{100 * (gap - m['ce_increase']) / gap:.1f}%")]
    width = max(len(r[0]) for r in rows)
    print(f"\nheld-out results ({m['eval_tokens']:,} tokens of {dataset!r}, model {model.gpt.name_or_path}):")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for p in model.sae_positions:
        warning = threshold_warning(p, model.sae(p).settings, m["l0/" + p])
        if warning:
            print(warning)
    print(f"\nthe SAEs: {os.path.join(out_dir, 'saes.safetensors')} (python eval.py --checkpoints=\"['{out_dir}']\")")


def log_line(step, figures, positions, lr, dt, tokens_per_s, mfu):
    """train.py's line per logging step: the figures a practitioner scans, per SAE where there are several."""
    line = [f"step {step}", f"loss {figures['loss']:.4f}"]
    line += [f"{k} {figures[k]:.4f}" for k in ("kl",) if k in figures]
    for term in ("out_to_in", "out_to_orig", "in_to_orig"):  # summed over positions
        values = [v for k, v in figures.items() if k.startswith(term + "/")]
        line += [f"{term} {sum(values):.4f}"] if values else []
    line += ["l0 " + "/".join(f"{figures['l0/' + p]:.1f}" for p in positions)]
    if "dead/" + positions[0] in figures:
        line += ["dead " + "/".join(f"{figures['dead/' + p]:.0f}" for p in positions)]
    reached = [figures.get("reached/" + p) for p in positions]  # the share of elements the gradient reached
    if any(r is not None for r in reached):  # (- for an SAE kept fixed)
        line += ["reached " + "/".join("-" if r is None else f"{100 * r:.0f}%" for r in reached)]
    line += [f"lr {lr:.1e}", f"norm {figures['grad_norm']:.2f}", f"{dt * 1000:.0f} ms", f"{tokens_per_s:,.0f} tok/s"]
    line += [f"mfu {100 * mfu:.1f}%"] if mfu is not None else []
    return " | ".join(line)


def fmt(v):
    return f"{v:,}" if isinstance(v, int) else f"{v:.4f}"


def flops_per_token(model, local):
    """Dense FLOPs of one training step per token of an e2esae.SAETransformer (matmuls only), for MFU. The frozen
    model's backward computes input gradients only (one matmul per forward matmul); the SAE's backward also computes
    weight gradients. local: no end-to-end term (the model after the last SAE never runs)."""
    gpt = model.gpt
    block = 2 * sum(p.numel() for p in gpt.layers[0].parameters() if p.dim() == 2)  # 2 FLOPs per MAC
    head = 2 * model.head.bias.numel() * gpt.config.n_embd
    at = [gpt.resid_index(p) for p in model.sae_positions]
    sae = sum(6 * 2 * s.d_in * s.n_dict for s in model.saes.values())  # encode + decode, forward and backward
    if local:
        return max(at) * block + sae
    after = (gpt.config.n_layer - min(at)) * block + head
    return min(at) * block + after + 2 * after + sae  # shared prefix, clean rest, spliced rest fwd + bwd


class TrainingLog:
    """What train.py shows as it trains, on the master process (and wandb, with c.wandb_log): the opening lines, every
    log_every_n_steps steps the figures averaged over those steps and the processes (log_line), each evaluation's line,
    and the summary of the finished run. `c` is train.py's settings, `config` the dict wandb records."""

    def __init__(self, model, c, config, world_size, global_batch, master, log):
        self.model, self.c, self.world_size, self.global_batch, self.master, self.log = \
            model, c, world_size, global_batch, master, log
        self.wandb = None
        if c.wandb_log and master:
            import wandb
            os.makedirs(c.out_dir, exist_ok=True)
            wandb.init(project=c.wandb_project, name=c.wandb_run_name or None, config=config, dir=c.out_dir)
            self.wandb = wandb
        self.flops_per_token = flops_per_token(model, local=LossConfig.of(config).local)
        self.sums, self.last_step, self.t = {}, 0, time.time()

    def start(self, step, n_steps, local_steps, resumed_from=None):
        """The run's two opening lines: the model, its SAEs and the training type; the steps and where they go."""
        model, c, global_batch = self.model, self.c, self.global_batch
        kind = training_type(c.kl_coeff, c.in_to_orig_coeff)
        if local_steps:
            kind = (f"local for steps 1-{local_steps}, then {kind} for steps {local_steps + 1}-{n_steps} "
                    "(finetune_fraction)")
        first = model.sae(model.sae_positions[0])
        self.log(f"model: {model.gpt.name_or_path} ({model.gpt.num_params() / 1e6:.1f}M parameters, frozen); SAEs at "
                 f"{', '.join(model.sae_positions)}, {first.n_dict:,} elements each, {first.activation.name}"
                 + (f" k={first.activation.k}" if hasattr(first.activation, "k") else "") + f"; training type: {kind}")
        self.log(f"{n_steps:,} steps of {global_batch} samples x {c.n_ctx} tokens = {global_batch * c.n_ctx:,} tokens "
                 f"per step ({c.batch_size} per micro-step x {c.gradient_accumulation_steps} accumulation x "
                 f"{self.world_size} processes); out_dir {c.out_dir}"
                 + (f"; resumed from {resumed_from} at step {step}" if resumed_from else ""))
        self.last_step, self.t, self.n_steps, self.reached = step, time.time(), n_steps, {}

    def logs_at(self, step):
        return step % self.c.log_every_n_steps == 0 or step == self.n_steps

    def gradient_reach(self, step):
        """At a step that logs, between backward and the update: the share of each SAE's elements the gradient
        reached (a pass over the encoder's gradient the step itself does not need)."""
        if self.logs_at(step):
            grads = {p: self.model.sae(p).encoder.weight.grad for p in self.model.sae_positions}
            self.reached = {f"reached/{p}": (g != 0).any(1).float().mean().item()
                            for p, g in grads.items() if g is not None}

    def add(self, figures, weight=1.0):
        """A step's figures (0-d tensors), weighted (1 / the micro-steps of a step), summed until the next line."""
        for k, v in figures.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.float() * weight

    def line(self, step, lr, ddp):
        """The line of the steps since the last: their figures' mean over steps and processes, and the gradient's
        reach at this step."""
        n, keys = step - self.last_step, sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]) / n
        if ddp:
            dist.all_reduce(values)
            values /= self.world_size
        figures, dt = dict(zip(keys, values.tolist())) | self.reached, (time.time() - self.t) / n
        tokens_per_s = self.global_batch * self.c.n_ctx / dt
        on_gpu = self.c.device.startswith("cuda")
        mfu = self.flops_per_token * tokens_per_s / self.world_size / self.c.peak_flops if on_gpu else None
        self.log(log_line(step, figures, self.model.sae_positions, lr, dt, tokens_per_s, mfu))
        if self.wandb:
            self.wandb.log({f"train/{k}": v for k, v in figures.items()} | {
                "train/lr": lr, "train/tokens_per_s": tokens_per_s, "samples": step * self.global_batch}, step=step)
        self.sums, self.last_step, self.t = {}, step, time.time()

    def evaluate(self, eval_batches, autocast, ddp, step):
        """Every metric on the held-out batches (e2esae.evaluate, summed over processes), one eval line, and wandb."""
        model, c = self.model, self.c
        metrics, counts = evaluate(model, eval_batches, LossConfig.for_evaluation(vars(c), c.in_to_orig_positions),
                                   autocast, dist.all_reduce if ddp else None)
        shown = ["ce_orig", "ce_sae", "ce_increase", "kl"] + [f"{k}/{p}" for p in model.sae_positions
                                                             for k in ("l0", "alive", "explained_variance")]
        self.log("eval | " + " | ".join(f"{k} {fmt(metrics[k])}" for k in shown))
        if self.wandb:
            import numpy as np
            self.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            for p, f in counts.frequencies().items():
                self.wandb.log({f"eval/log10_feature_frequency/{p}": self.wandb.Histogram(np.log10(f[f > 0].numpy()))},
                               step=step)
            self.wandb.save(os.path.join(c.out_dir, "saes.safetensors"), base_path=c.out_dir)
        return metrics

    def finish(self, metrics, unigram=None):
        """The paper's figures for the finished run (print_summary), and the end of the wandb run."""
        if self.master:
            print_summary(metrics, self.model, self.c.dataset, self.c.out_dir, unigram)
        if self.wandb:
            self.wandb.finish()
