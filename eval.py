"""
Evaluate SAE checkpoints on held-out text: one table, every metric as JSON, and optional plots.

    python eval.py --checkpoints="['out/saes.safetensors']"
    python eval.py --checkpoints="['path/to/e2e_sae_run', 'path/to/saelens_dir']" --init_from=gpt2
    python eval.py --checkpoints="['saelens:neuronpedia/gpt2-small__res_sce-ajt/6-res_sce-ajt']" \
        --dataset=apollo-research/Skylion007-openwebtext-tokenizer-gpt2 --n_ctx=1024 --eval_n_samples=500

A checkpoint is any of:
    out/saes.safetensors | out | out/ckpt.pt   this project's (train.py's out_dir; SAETransformer.from_checkpoint)
    path/to/dir | path/to/samples_N.pt         the reference library's: final_config.yaml + samples_{N}.pt
    path/to/dir                                SAELens's: cfg.json + sae_weights.safetensors
    wandb:entity/project/run_id                the reference library's run on wandb, e.g. wandb:sparsify/gpt2/tvj2owza
    saelens:owner/repo/folder                  SAELens's on the Hugging Face hub (the paper's SAEs are published so)

For each, compute_loss (e2esae.py) runs with full metrics on eval_n_samples held-out samples and its figures are
averaged over them: L0, alive dictionary elements (over all evaluated tokens), the CE loss of the model and with the
SAEs spliced in, their difference, the KL divergence, and the explained variance at each SAE and at every later
hook_resid_pre. Training type and sparsity coefficient come from the checkpoint's config where it has one.
Full metrics hold several (batch_size, n_ctx, 50,257) fp32 tensors at once: about 1.6 GB each at 8 x 1024, so on a
CPU with GPT-2 small and n_ctx=1024 use --batch_size=2.

Every spec and output folder is checked before the first evaluation. out_json is rewritten after each checkpoint,
so an interruption keeps what was done; a checkpoint that fails to load or evaluate is reported and skipped, and
the script ends with exit status 1 naming it.
"""

import json
import os
import re
import sys
import time
from itertools import islice

import torch

import data
from configurator import ConfigError, check_settings, check_writable, configure, print_config
import e2esae
import interop
from e2esae import SAETransformer, load_gpt, training_type

# -----------------------------------------------------------------------------
checkpoints = ["out/saes.safetensors"]
init_from = ""  # '' = the GPT-2 each checkpoint names | 'gpt2' (-medium, ...) | a directory | 'shakespeare'
dataset = "shakespeare"  # 'shakespeare' | text files (a file, directory or glob) | a Hugging Face dataset name
n_ctx = 128
eval_n_samples = 200  # 200 samples x 128 tokens = 25,600 tokens (the paper: 500 x 1024)
batch_size = 8
device = "cuda" if torch.cuda.is_available() else "cpu"
out_json = "eval.json"
plot_dir = ""  # if set: a Pareto plot and one activation-frequency histogram per SAE
# -----------------------------------------------------------------------------

DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, list))}
COEFF_KEYS = ("sparsity_coeff", "kl_coeff", "in_to_orig_coeff", "out_to_in_coeff", "out_to_orig_coeff")
PUBLISHED = {"l": "local", "e": "e2e", "efr": "e2e+ds"}  # the hub names: res_s{c,l}{l,e,efr}-ajt


# ---- loading any checkpoint as an SAETransformer ----

def checkpoint_kind(spec):
    """(kind, where) for a checkpoint spec, found without loading it, so that every spec is checked before any is
    evaluated. kind: 'ours' (where: the .safetensors), 'e2e_sae', 'saelens', 'saelens-hub' or 'wandb'."""
    if spec.startswith("wandb:"):
        return "wandb", spec[len("wandb:"):]
    if spec.startswith("saelens:"):
        where = spec[len("saelens:"):]
        return ("saelens", where) if os.path.isdir(where) else ("saelens-hub", where)
    inside = lambda name: os.path.join(spec, name)
    if os.path.isdir(spec):
        if os.path.isfile(inside("saes.safetensors")):  # train.py's out_dir
            return "ours", inside("saes.safetensors")
        if os.path.isfile(inside("final_config.yaml")):
            return "e2e_sae", spec
        if os.path.isfile(inside("cfg.json")):
            return "saelens", spec
        raise ConfigError(f"checkpoint {spec!r} is a directory without saes.safetensors (train.py), "
                          "final_config.yaml (e2e_sae) or cfg.json (SAELens)")
    if os.path.isfile(spec):
        beside = os.path.join(os.path.dirname(spec), "saes.safetensors")
        if spec.endswith(".safetensors"):
            return "ours", spec
        if os.path.basename(spec) == "ckpt.pt" and os.path.isfile(beside):  # train.py's resumable checkpoint
            return "ours", beside  # the SAEs it holds are also written beside it
        if spec.endswith(".pt"):
            return "e2e_sae", spec
    if not os.path.exists(spec):
        raise ConfigError(f"checkpoint {spec!r} does not exist")
    raise ConfigError(f"checkpoint {spec!r} is none of: a .safetensors file or out_dir of train.py, a directory with "
                      "final_config.yaml (e2e_sae) or cfg.json (SAELens), a .pt file, wandb:..., saelens:...")


def load_checkpoint(spec, init_from=""):
    """An SAETransformer for a checkpoint spec (see the docstring). `model.config` holds the training coefficients
    where the checkpoint records them, else {}."""
    kind, where = checkpoint_kind(spec)
    gpt = load_gpt(init_from) if init_from else None
    if kind == "wandb":
        return interop.load_wandb(where, gpt)
    if kind == "saelens-hub":
        parts = where.split("/")
        return interop.saelens_model(interop.load_saelens("/".join(parts[:2]), "/".join(parts[2:])), gpt)
    if kind == "saelens":
        return interop.saelens_model(interop.load_saelens(where), gpt)
    if kind == "ours":
        return SAETransformer.from_checkpoint(where, gpt)
    return interop.load_e2e_sae(where, gpt)


def describe(spec, config):
    """Training type and coefficients, from the checkpoint's config or (for the paper's hub SAEs) its name."""
    out = {k: config.get(k) for k in (*COEFF_KEYS, "p_norm")}
    if config.get("sparsity_coeff") is not None:
        out["type"] = training_type(config.get("kl_coeff") or 0, config.get("in_to_orig_coeff") or 0)
    else:
        m = re.search(r"res_s[cl](l|e|efr)-ajt", spec)
        out["type"] = PUBLISHED[m.group(1)] if m else "unknown"
    return out


# ---- evaluation ----

def loss_kwargs(model, downstream):
    """compute_loss's arguments for measuring a checkpoint: its own coefficients decide how its SAEs are fed
    (chained with an end-to-end term, the clean stream for local ones), and `downstream` lists the positions
    where the spliced stream is compared with the original."""
    config = getattr(model, "config", {}) or {}
    coeffs = {k: float(config.get(k) or 0.0) for k in COEFF_KEYS}
    if not downstream:
        coeffs["in_to_orig_coeff"] = 0.0
    if not any(coeffs.values()):
        coeffs["sparsity_coeff"] = 1.0  # only to measure: compute_loss refuses a loss of all-zero coefficients
    return dict(coeffs, p_norm=float(config.get("p_norm") or 1.0), in_to_orig_positions=list(downstream))


def later_positions(model):
    """Every hook_resid_pre after the model's last SAE: where the spliced stream is compared with the original."""
    gpt = model.gpt
    last = max(gpt.resid_index(p) for p in model.sae_positions)
    return [f"blocks.{i}.hook_resid_pre" for i in range(last + 1, gpt.config.n_layer)]


def sample_batches(samples, batch_size):
    """The held-out samples as (B, n_ctx) tensors, in order; the last batch may be short."""
    return [torch.stack(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def evaluate(model, samples, batch_size, log_every=10, downstream=None):
    """compute_loss's metrics averaged over the samples, and the feature counts (e2esae.evaluate). The
    checkpoint's own coefficients pick how SAEs are fed (chained for e2e, clean for local); the downstream
    positions (default: every later hook_resid_pre) get the explained variance of the spliced stream.
    Returns (metrics, counts, downstream)."""
    if downstream is None:
        downstream = later_positions(model)
    batches = sample_batches(samples, batch_size)

    def progress(i, n, m):
        if i % log_every == 0 or i == n:
            print(f"  batch {i}/{n} | ce_increase {m['ce_increase']:.4f} | kl {m['kl']:.4f}", flush=True)
    metrics, counts = e2esae.evaluate(model, batches, loss_kwargs(model, downstream), progress=progress)
    metrics = {k: v for k, v in metrics.items() if k != "loss" and not k.startswith("alive/") and k != "eval_tokens"}
    return metrics, counts, downstream


def result_rows(spec, model, metrics, counts, downstream):
    """One flat row per SAE position: what the table prints and plot_pareto reads."""
    info, alive, rows = describe(spec, getattr(model, "config", {}) or {}), counts.alive(), []
    for p in model.sae_positions:
        rows.append(dict(
            checkpoint=spec, position=p, **info, n_dict=model.sae(p).n_dict, n_tokens=counts.n_tokens[p],
            l0=metrics[f"l0/{p}"], alive=alive[p], frac_zeros=metrics[f"frac_zeros/{p}"],
            ce_orig=metrics["ce_orig"], ce_sae=metrics["ce_sae"], ce_increase=metrics["ce_increase"], kl=metrics["kl"],
            explained_variance=metrics[f"explained_variance/{p}"],
            explained_variance_ln=metrics[f"explained_variance_ln/{p}"],
            downstream_explained_variance={q: metrics[f"in_to_orig_explained_variance/{q}"] for q in downstream}))
    return rows


def print_table(rows, file=None):
    num = lambda v, f: "-" if v is None else format(v, f)
    table = [("checkpoint", "position", "type", "lambda", "L0", "alive", "CE", "CE+SAE", "dCE", "KL", "EV",
              "EV at later hook_resid_pre")]
    for r in rows:
        table.append((r["checkpoint"], r["position"], r["type"], num(r["sparsity_coeff"], "g"), f"{r['l0']:.1f}",
                      f"{r['alive']:,}/{r['n_dict']:,}", f"{r['ce_orig']:.4f}", f"{r['ce_sae']:.4f}",
                      f"{r['ce_increase']:.4f}", f"{r['kl']:.4f}", f"{r['explained_variance']:.3f}",
                      " ".join(f"{v:.2f}" for v in r["downstream_explained_variance"].values()) or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=file)
        if i == 0:
            print("-+-".join("-" * w for w in widths), file=file)


# ---- plots (matplotlib, an optional dependency) ----

TYPE_STYLE = {"local": ("o", "tab:blue"), "e2e": ("s", "tab:orange"), "e2e+ds": ("^", "tab:green")}


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
    (and optionally position); points of one type (and position) are joined in order of L0, each labelled with
    its coefficient. `per` names what L0 counts over (a token; an image for mlp.py)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    positions = sorted({str(r.get("position")) for r in results})  # several: one line style per position
    groups = {}
    for r in results:
        key = (r["type"], r.get("position")) if len(positions) > 1 else (r["type"], None)
        groups.setdefault(key, []).append(r)
    rank = lambda kind: list(TYPE_STYLE).index(kind) if kind in TYPE_STYLE else len(TYPE_STYLE)  # local, e2e, ...
    for (kind, pos), rows in sorted(groups.items(), key=lambda g: (rank(g[0][0]), g[0][0], str(g[0][1]))):
        rows = sorted(rows, key=lambda r: r["l0"])
        marker, colour = TYPE_STYLE.get(kind, ("x", "tab:gray"))
        label = kind if pos is None else f"{kind} ({pos})"
        style = "-" if pos is None else ["-", "--", ":", "-."][positions.index(str(pos)) % 4]
        for ax, x in zip(axes, ("l0", "alive")):
            xs, ys = [r[x] for r in rows], [r[y] for r in rows]
            ax.plot(xs, ys, marker=marker, color=colour, linestyle=style, label=label, linewidth=1, markersize=7)
            for r in rows:
                if r.get("sparsity_coeff") is not None:
                    ax.annotate(f"{r['sparsity_coeff']:g}", (r[x], r[y]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=colour)
    axes[0].set_xlabel(f"L0 (active dictionary elements per {per})")
    axes[1].set_xlabel("alive dictionary elements")
    axes[0].set_ylabel(Y_LABELS.get(y, y))
    axes[0].legend(frameon=False)
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


# ---- the script ----

SETTINGS = [  # (key, test, what the value must be)
    ("checkpoints", lambda v: bool(v) and all(isinstance(s, str) for s in v),
     "a non-empty list of paths or specs, e.g. ['out/saes.safetensors']"),
    ("n_ctx", lambda v: v >= 2, "at least 2 (a sample's tokens predict the next ones)"),
    ("eval_n_samples", lambda v: v > 0, "positive"),
    ("batch_size", lambda v: v > 0, "positive"),
    ("device", lambda v: not v.startswith("cuda") or torch.cuda.is_available(), "'cpu': no CUDA GPU is available"),
]


def main(argv):
    config = configure(DEFAULTS, argv)
    check_settings(config, SETTINGS)
    c = type("Config", (), config)
    for spec in c.checkpoints:  # every checkpoint and output place is checked before the first evaluation
        checkpoint_kind(spec)
    check_writable(os.path.dirname(c.out_json) or ".", "the folder of out_json")
    if c.plot_dir:
        check_writable(c.plot_dir, "plot_dir")
    print("config:")
    print_config(config)
    samples = heldout_samples(c.dataset, c.n_ctx, c.eval_n_samples)

    rows, details, failed = [], [], []
    for spec in c.checkpoints:
        t0 = time.time()
        try:
            model = load_checkpoint(spec, c.init_from).to(c.device).eval()
            if c.n_ctx > model.gpt.config.block_size:
                raise ConfigError(f"n_ctx={c.n_ctx} is longer than the model's context of {model.gpt.config.block_size} "
                                  f"tokens: use --n_ctx={model.gpt.config.block_size} or less")
            print(f"{spec}: SAEs at {', '.join(model.sae_positions)}")
            metrics, counts, downstream = evaluate(model, samples, c.batch_size)
        except Exception as e:  # one bad checkpoint costs only its own row
            message = e.code if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
            print(f"{spec}: FAILED ({message}); going on with the others", file=sys.stderr)
            failed.append(dict(checkpoint=spec, error=str(message)))
            continue
        new_rows = result_rows(spec, model, metrics, counts, downstream)
        rows += new_rows
        details.append(dict(checkpoint=spec, config={k: v for k, v in (getattr(model, "config", {}) or {}).items()
                                                     if k != "reference_config"},
                            metrics=metrics, alive=counts.alive(), n_tokens=counts.n_tokens))
        write_json(c.out_json, dict(settings=config, rows=rows, checkpoints=details, failed=failed))  # as it goes
        if c.plot_dir:
            os.makedirs(c.plot_dir, exist_ok=True)
            freqs = counts.frequencies()
            for r in new_rows:
                name = re.sub(r"[^\w.-]+", "_", f"{spec}_{r['position']}").strip("_")
                plot_frequency_histogram(freqs[r["position"]].numpy(), os.path.join(c.plot_dir, f"freq_{name}.png"),
                                         title=f"{spec}\nat {r['position']}: {r['alive']:,} of {r['n_dict']:,} alive "
                                               f"over {r['n_tokens']:,} tokens")
        print(f"  done in {time.time() - t0:.1f} s")
        del model

    write_json(c.out_json, dict(settings=config, rows=rows, checkpoints=details, failed=failed))
    print()
    print_table(rows)
    print(f"\nevery metric: {c.out_json}")
    if c.plot_dir and rows:
        plot_pareto(rows, os.path.join(c.plot_dir, "pareto.png"), title=f"{c.dataset}, {len(samples) * c.n_ctx:,} tokens")
        print(f"plots: {c.plot_dir}/")
    if failed:
        sys.exit(f"{len(failed)} of {len(c.checkpoints)} checkpoints failed: " + "; ".join(f["checkpoint"] for f in failed))


def heldout_samples(dataset, n_ctx, eval_n_samples):
    """The first eval_n_samples held-out samples of n_ctx tokens (all there are, if fewer: said so), as train.py
    evaluates on them. A ConfigError names data that cannot give one."""
    try:
        print(f"data: {dataset!r}, held out: {data.heldout_rule(dataset)[1]}")
        samples = list(islice(data.token_samples(dataset, n_ctx, split="eval", repeat=False), eval_n_samples))
    except data.DataError as e:
        raise ConfigError(str(e)) from None
    if not samples:
        raise ConfigError(f"the held-out part of dataset {dataset!r} holds fewer than n_ctx={n_ctx} tokens: give "
                          "more text or a smaller n_ctx")
    if len(samples) < eval_n_samples:
        print(f"note: the held-out part of {dataset!r} holds only {len(samples)} samples of {n_ctx} tokens")
    print(f"data: {len(samples)} held-out samples x {n_ctx} tokens = {len(samples) * n_ctx:,} tokens")
    return samples


def write_json(path, obj, indent=2):
    """Atomically: a reader (or an interrupted run) never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main(sys.argv[1:])
