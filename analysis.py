"""
What the dictionaries look like: their geometry, the path the spliced model takes, and a browser of features.

The original library's `scripts/analysis/` reproduce the paper's analysis beyond the performance plots (eval.py
has those). This script computes, for any checkpoints eval.py accepts:

    within_similarity.png   each alive dictionary element's cosine similarity to its nearest *other* alive element
                            of the same dictionary, one histogram per SAE (the paper's within-SAE comparison)
    cross_similarity.png    for each pair of SAEs at one position, each alive element's largest cosine similarity to
                            the other dictionary's alive elements, both ways (cross-type and cross-seed comparisons)
    downstream.png          explained variance of the spliced stream against the original one, at the SAE and at
                            every later layer (e2e SAEs take another path through the later layers; e2e+ds follow)
    features.html           for each SAE, some alive elements (the most frequent, a random sample, any given with
                            --features): how often each fires, the held-out contexts where it fires hardest, and
                            the tokens its direction promotes and suppresses through the unembedding. One file that
                            works offline: inline CSS, no scripts, no fonts or images from elsewhere
    analysis.json           every number above, and the same similarities for two untrained dictionaries of each
                            shape: the level of chance, drawn as a grey outline in both similarity plots

    python analysis.py --checkpoints="['out/local/saes.safetensors', 'out/e2e', 'out/e2e_ds']" --out_dir=analysis
    python analysis.py --checkpoints="['saelens:neuronpedia/gpt2-small__res_scl-ajt/6-res_scl-ajt', ...]" \\
        --dataset=apollo-research/Skylion007-openwebtext-tokenizer-gpt2 --n_ctx=1024 --eval_n_samples=500 --batch_size=2

Definitions. D is an SAE's dictionary, (d_in, n_dict), unit-norm columns (`SAE.dict_elements`), so the cosine
similarity of elements i and j is D[:, i] . D[:, j]. An element is alive if it fired on at least one evaluated
held-out token. As in the original library, both sides of every comparison are the alive elements: a dead element
never contributes to a reconstruction, and an untrained one would only add the random similarities of its
orthogonal initialisation. Similarities are computed in blocks of chunk_size x chunk_size, so that GPT-2 small's
46,080 x 46,080 matrix (8.5 GB in fp32) never exists; a block costs chunk_size^2 x 4 bytes (67 MB at 4,096).
train.py builds the SAEs right after seeding, so runs with the same `seed` start from the same dictionary: where
training moves the elements little, their cross-SAE similarity mostly measures that shared start. Compare SAEs of
different seeds to see what training found.

The downstream figure: e2esae.evaluate runs the model twice, clean and with the SAEs spliced in (chained when the
checkpoint has an end-to-end term; for local SAEs too, for the metrics), and reports the explained variance of the
spliced stream against the clean one at every position it is given (`in_to_orig_explained_variance/<pos>`). Here
those are every hook_resid_pre after the last SAE and the final stream (`blocks.{L-1}.hook_resid_post`, what ln_f
and the unembedding read); at the SAE itself the point is the SAE's output against its input, which is the original
stream for a checkpoint's first SAE and for local SAEs. (Between two SAEs of one checkpoint nothing is plotted.)

Logit effects: element j adds a multiple of D[:, j] to the stream, which moves the logits along W_U D[:, j] before
ln_f's normalisation and any later block (the direct path, as SAE dashboards show it). The embedded default's small
model gives the ~31,000 tokens that never occur in its training text one shared unembedding row; such shared rows
are left out of the lists (the page says how many tokens they hold).
"""

import html
import math
import os
import sys
import time
from types import SimpleNamespace

import torch

import data
import e2esae
from configurator import (
    ConfigError,
    check_settings,
    configure,
    default_device,
    defaults,
    device_rule,
    print_config,
)
from e2esae import LossConfig, SAETransformer
from interop import check_specs
from language_models import check_context, load_model, tokenizer_of
from report import TYPE_STYLE, result_rows
from runs import check_writable, nonfinite_parameters, write_atomic, write_json

# -----------------------------------------------------------------------------
checkpoints = ["out/saes.safetensors"]
init_from = ""  # '' = the model each checkpoint names | 'gpt2' (-medium, ...) | a directory
dataset = "shakespeare"  # the same held-out text eval.py and train.py use
n_ctx = 128
eval_n_samples = 200  # 200 samples x 128 tokens = 25,600 tokens (the paper: 500 x 1024)
batch_size = 8
device = default_device()
out_dir = "analysis"
chunk_size = 4096  # similarity blocks of 4,096 x 4,096 elements: 67 MB in fp32
near = 0.7  # a cosine similarity above this counts as a near-duplicate (within an SAE) or a counterpart (across)
n_frequent = 6  # the browser shows, per SAE, the most frequent alive elements...
n_random = 6  # ...a random sample of the other alive ones...
features = []  # ...and these element indices, in every SAE, e.g. [12, 345]
n_contexts = 6  # held-out contexts per element, where it fires hardest
context_before, context_after = 12, 4  # tokens shown around each
n_logit_tokens = 8  # tokens promoted and suppressed per element
seed = 0  # for the random sample of elements and the untrained reference dictionaries
# -----------------------------------------------------------------------------

DEFAULTS = defaults(globals())


# ---- geometry: cosine similarities between dictionary elements, in blocks ----

def max_similarities(A, B, chunk_size=4096, same=False, progress=None):
    """For unit columns A (d, n_a) and B (d, n_b): (a_to_b (n_a,), b_to_a (n_b,)), each column's largest cosine
    similarity to a column of the other. With same=True, A and B are one dictionary and an element's similarity to
    itself is left out: a_to_b is then each element's similarity to its nearest *other* element.

    The n_a x n_b similarity matrix is visited one (chunk_size, chunk_size) block at a time; each block updates the
    running maxima of its rows (A's elements) and of its columns (B's), so both directions cost one pass.
    progress(i, n), if given, is called after each of the n rows of blocks."""
    a_best = torch.full((A.shape[1],), -torch.inf, device=A.device)
    b_best = torch.full((B.shape[1],), -torch.inf, device=B.device)
    for i in range(0, A.shape[1], chunk_size):
        for j in range(0, B.shape[1], chunk_size):
            block = A[:, i:i + chunk_size].T @ B[:, j:j + chunk_size]  # (chunk_a, chunk_b)
            if same and i == j:  # the diagonal blocks hold each element against itself
                block.fill_diagonal_(-torch.inf)
            a_best[i:i + chunk_size] = torch.maximum(a_best[i:i + chunk_size], block.max(1).values)
            b_best[j:j + chunk_size] = torch.maximum(b_best[j:j + chunk_size], block.max(0).values)
        if progress:
            progress(i // chunk_size + 1, math.ceil(A.shape[1] / chunk_size))
    return a_best, b_best


def show_progress(i, n):
    """Rows of similarity blocks done, on one line, for dictionaries big enough to take a while."""
    if n >= 4:
        print(f"{i}/{n}", end=" " if i < n else "; ", flush=True)


def alive_dictionary(sae, counts):
    """The alive elements' columns of the dictionary, (d_in, n_alive) in fp32, and their indices."""
    alive = (counts > 0).nonzero().flatten()
    return sae.dict_elements.detach().float()[:, alive.to(sae.decoder.weight.device)], alive.cpu()


def distribution(values, near):
    """A 1-d tensor of similarities as the JSON keeps it: count, mean, quantiles, the share above `near` (elements
    with a near-duplicate, or with a counterpart in the other dictionary) and the values themselves (an element
    with nothing to compare with, the one alive element of a dictionary, has no value)."""
    values = values[torch.isfinite(values)].double().cpu()
    qs = {"min": 0.0, "q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95, "max": 1.0}
    if len(values) == 0:
        return dict(n=0, mean=None, **{k: None for k in qs}, share_above_near=None, values=[])
    quantiles = torch.quantile(values, torch.tensor(list(qs.values()), dtype=torch.double))
    return dict(n=len(values), mean=values.mean().item(), **{k: q.item() for k, q in zip(qs, quantiles)},
                share_above_near=(values > near).double().mean().item(), values=[round(v, 5) for v in values.tolist()])


def untrained_similarities(d_in, n_dict, chunk_size, near, seed, device):
    """The same two measures for dictionaries that learned nothing: two freshly initialised SAEs of this shape
    (orthogonal decoder, as training starts). n_dict > d_in directions cannot all be orthogonal: in 128 dimensions
    2,048 of them have nearest neighbours at about 0.3. This is the level of chance each histogram is read against.
    Returns {'within': distribution, 'cross': distribution}, over all n_dict elements."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        A, B = (e2esae.SAE(d_in, n_dict).dict_elements.detach().to(device) for _ in range(2))
    within, _ = max_similarities(A, A, chunk_size, same=True)
    a_to_b, _ = max_similarities(A, B, chunk_size)
    return dict(within=distribution(within, near), cross=distribution(a_to_b, near))


def firing_share(counts, elements):
    """The share of all firings (element x token) that these elements account for."""
    return float(counts[elements.to(counts.device)].sum() / counts.sum().clamp(min=1))


# ---- choosing elements to show, and what to show of them ----

def choose_elements(counts, n_frequent, n_random, given, seed):
    """[(element, why)]: the given elements, then the n_frequent other alive elements that fire most often, then
    n_random of the remaining alive ones, drawn with `seed` (listed in index order)."""
    given = list(dict.fromkeys(given))
    alive = (counts > 0).nonzero().flatten().cpu()
    alive = alive[~torch.isin(alive, torch.tensor(given, dtype=torch.long))]
    by_frequency = alive[counts.cpu()[alive].argsort(descending=True, stable=True)]
    frequent, rest = by_frequency[:n_frequent], by_frequency[n_frequent:]
    drawn = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:n_random]].sort().values
    return ([(e, "given") for e in given] + [(int(e), "most frequent") for e in frequent]
            + [(int(e), "random") for e in drawn])


@torch.no_grad()
def element_activations(model, batches, elements, chained):
    """{position: (n_samples, n_ctx, len(elements[position]))}: the codes of the chosen elements on every held-out
    token, each SAE fed as in evaluation (chained, or the clean stream). Only the model's prefix up to the last SAE
    runs; the chosen columns are all that is kept, so this stays small for a dictionary of any size."""
    gpt, device = model.gpt, next(model.parameters()).device
    at = {p: gpt.resid_index(p) for p in model.sae_positions}
    first, last = min(at.values()), max(at.values())
    kept = {p: [] for p in at}
    for idx in batches:
        x = gpt.run_blocks(gpt.embed(idx.to(device)), 0, first)
        _, clean, outs = model.run(x, first, last, record=set(at.values()), splice=chained)
        for p, r in at.items():
            c = outs[p][1] if chained else model.sae(p)(clean[r])[1]  # (B, T, n_dict)
            kept[p].append(c[..., elements[p].to(device)].float().cpu())  # (B, T, n_chosen)
    return {p: torch.cat(v) for p, v in kept.items()}


def top_contexts(acts, k):
    """For activations (n_samples, n_ctx, n_elements): per element, up to k (sample, position, activation) where it
    is largest, largest first; tokens where it does not fire are never listed."""
    values, flat = acts.flatten(0, 1).topk(min(k, acts.shape[0] * acts.shape[1]), dim=0)  # (k, n_elements)
    T = acts.shape[1]
    return [[(int(f // T), int(f % T), float(v)) for v, f in zip(values[:, e], flat[:, e]) if v > 0]
            for e in range(acts.shape[2])]


def logit_effects(model, directions, k):
    """The k tokens each direction (d, n) promotes and suppresses most through the unembedding: W_U @ direction,
    over the lm_head's distinct rows. Returns ([[(token, effect)] promoted], [[...] suppressed], tokens left out):
    rows shared by several tokens (the embedded default's unseen tokens) are left out."""
    head = model.head
    single = head.log_count == 0  # a row of one token
    rows, tokens = head.weight[single], head.row_token[single]
    effects = rows.float() @ directions.float()  # (n_rows, n)
    k = min(k, len(tokens))
    top, bottom = effects.topk(k, dim=0), effects.topk(k, dim=0, largest=False)
    pick = lambda t: [[(int(tokens[i]), float(v)) for v, i in zip(t.values[:, e], t.indices[:, e])]
                      for e in range(directions.shape[1])]
    return pick(top), pick(bottom), len(head.token_row) - len(tokens)


# ---- one checkpoint: evaluation, geometry and the chosen elements ----

def label_of(row, config):
    """A short name for an SAE in plots and the browser: type, activation (k where it has one, else the sparsity
    coefficient), seed."""
    if row.get("k") is not None:
        sparsity = f" {row['activation']} k={row['k']}"
    else:
        activation = "" if row.get("activation", "relu") == "relu" else f" {row['activation']}"
        sparsity = activation + ("" if row["sparsity_coeff"] is None else f" λ={row['sparsity_coeff']:g}")
    return f"{row['type']}{sparsity}" + (f" seed {config['seed']}" if "seed" in config else "")


def analyse_checkpoint(spec, c, samples_of):
    """Evaluate one checkpoint and describe each of its SAEs. Returns (records, dictionaries): per SAE a dict for
    the JSON's `saes` (its figures, alive elements, nearest-neighbour similarities and chosen elements) and its
    alive dictionary (d_in, n_alive), kept to compare across checkpoints. samples_of: the held-out samples by
    tokenizer, read once for the checkpoints of one model family."""
    try:
        gpt = load_model(c.init_from) if c.init_from else None
        model = SAETransformer.from_checkpoint(spec, gpt).to(c.device).eval()
    except (OSError, ValueError, RuntimeError) as e:  # a damaged file, a model of another width: it says which
        raise ConfigError(f"{spec}: {e}") from None
    broken = nonfinite_parameters(model.saes)
    if broken:
        raise ConfigError(f"{spec}: its SAE weights are not finite ({', '.join(broken[:4])}): the run diverged, so "
                          "there is no dictionary to analyse; retrain it with a lower lr")
    gpt = model.gpt
    check_context(gpt, c.n_ctx)
    tokenizer = tokenizer_of(gpt)  # the text as this checkpoint's model reads it
    with data.as_config_error():
        if tokenizer not in samples_of:
            samples_of[tokenizer] = data.heldout_samples(c.dataset, c.n_ctx, c.eval_n_samples, tokenizer=tokenizer)
    samples, enc = samples_of[tokenizer], data.load_tokenizer(tokenizer)
    L, last = gpt.config.n_layer, max(gpt.resid_index(p) for p in model.sae_positions)
    downstream = model.later_positions()
    downstream += [f"blocks.{L - 1}.hook_resid_post"] if last < L else []  # the final stream, read by ln_f
    batches = data.in_batches(samples, c.batch_size)
    loss = LossConfig.for_evaluation(model.config, downstream)
    metrics, counts = e2esae.evaluate(model, batches, loss)

    config, records, dictionaries = getattr(model, "config", {}) or {}, [], []
    for row in result_rows(spec, model, metrics, counts, downstream):
        p, sae, n = row["position"], model.sae(row["position"]), counts.counts[row["position"]]
        too_big = [e for e in c.features if e >= sae.n_dict]
        if too_big:
            raise ConfigError(f"features {too_big} do not exist in the SAE at {p} of {spec}: it has {sae.n_dict:,} "
                              "elements")
        D, alive = alive_dictionary(sae, n)
        print(f"  {p}: {len(alive):,} of {sae.n_dict:,} elements alive; their nearest neighbours:", end=" ", flush=True)
        t0 = time.time()
        within, _ = max_similarities(D, D, c.chunk_size, same=True, progress=show_progress)
        print(f"{time.time() - t0:.1f} s")
        records.append(dict(label=label_of(row, config), seed=config.get("seed"), **row, d_in=sae.d_in, n_layer=L,
                            near=c.near,
                            resid_index={q: gpt.resid_index(q) for q in [p, *downstream]},
                            alive_elements=alive.tolist(), counts=n.cpu().tolist(),
                            within_similarity=distribution(within, c.near),
                            near_duplicate_firings=firing_share(n, alive[within.cpu() > c.near]),
                            features=choose_elements(n, c.n_frequent, c.n_random, c.features, c.seed)))
        dictionaries.append(D)
    chained = not loss.local  # as compute_loss feeds the SAEs
    describe_features(model, records, batches, chained, samples, c, enc)
    return records, dictionaries


def describe_features(model, records, batches, chained, samples, c, enc):
    """Replace each record's chosen (element, why) pairs with what the browser shows of them: frequency, the
    contexts where the element fires hardest, and the tokens its direction promotes and suppresses."""
    elements = {r["position"]: torch.tensor([e for e, _ in r["features"]], dtype=torch.long) for r in records}
    acts = element_activations(model, batches, elements, chained)
    for r in records:
        p = r["position"]
        directions = model.sae(p).dict_elements.detach()[:, elements[p].to(c.device)]  # (d_in, n_chosen)
        promoted, suppressed, r["shared_row_tokens"] = logit_effects(model, directions, c.n_logit_tokens)
        contexts = top_contexts(acts[p], c.n_contexts)
        r["features"] = [
            dict(element=e, why=why, count=r["counts"][e], frequency=r["counts"][e] / r["n_tokens"],
                 max_activation=float(acts[p][..., i].max()),
                 contexts=[context_record(samples[s], t, a, acts[p][s, :, i], c, enc) for s, t, a in contexts[i]],
                 promoted=[(token_text(enc, t), v) for t, v in promoted[i]],
                 suppressed=[(token_text(enc, t), v) for t, v in suppressed[i]])
            for i, (e, why) in enumerate(r["features"])]


def token_text(enc, token):
    """One token's text (a token can hold part of a UTF-8 character: shown as the replacement character); enc is
    GPT-2's tiktoken encoding or a transformers tokenizer."""
    if hasattr(enc, "decode_single_token_bytes"):
        return enc.decode_single_token_bytes(token).decode("utf-8", errors="replace")
    return enc.decode([token])


def context_record(sample, position, activation, acts, c, enc):
    """The tokens around `position` of a held-out sample, each with the element's activation on it."""
    lo, hi = max(0, position - c.context_before), min(len(sample), position + c.context_after + 1)
    return dict(position=position, activation=activation, highlight=position - lo, cut_before=lo > 0,
                cut_after=hi < len(sample), tokens=[token_text(enc, int(t)) for t in sample[lo:hi]],
                activations=acts[lo:hi].tolist())


# ---- plots (matplotlib, an optional dependency) ----

def shape(sae):
    """The key of an SAE's untrained reference: its dictionary's shape."""
    return f"{sae['d_in']}x{sae['n_dict']}"


def style(sae):
    marker, colour = TYPE_STYLE.get(sae["type"], ("x", "tab:gray"))
    return marker, colour, "-" if not sae.get("seed") else "--"


def stacked_histograms(panels, path, xlabel, title):
    """One small histogram per panel, stacked with a shared x axis from -0.2 (or lower) to 1: panels are
    (title, [(values, label, colour)], untrained values), each series with a dashed line at its median and the
    untrained dictionaries' histogram as a grey outline."""
    import numpy as np
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.5, 0.6 + 1.1 * len(panels)))
    axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True))
    lowest = min([-0.2] + [min(v) for _, series, _ in panels for v, _, _ in series if len(v)])
    bins = np.linspace(np.floor(lowest * 10) / 10, 1.0, 61)
    for ax, (panel_title, series, untrained) in zip(axes, panels):
        ax.hist(untrained, bins=bins, histtype="step", color="0.45", density=True,
                label=f"untrained: median {np.median(untrained):.2f}")
        for values, label, colour in series:
            values = np.asarray(values)
            ax.hist(values, bins=bins, color=colour, alpha=0.55 if len(series) > 1 else 0.8, density=True,
                    label=f"{label}: median {np.median(values):.2f}" if len(values) else f"{label}: none")
            if len(values):
                ax.axvline(np.median(values), color=colour, linestyle="--", linewidth=1)
        ax.set_title(panel_title, fontsize=8, loc="left", pad=2)
        ax.set_yticks([])
        ax.legend(frameon=False, fontsize=7, loc="upper left")
    axes[-1].set_xlabel(xlabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def plot_within(saes, untrained, path):
    panels = [(f"{s['label']} at {s['position']}: {s['alive']:,} alive of {s['n_dict']:,}",
               [(s["within_similarity"]["values"], s["label"], style(s)[1])], untrained[shape(s)]["within"]["values"])
              for s in saes]
    stacked_histograms(panels, path, "cosine similarity to the nearest other alive element of the same dictionary",
                       "Within each SAE: how close is each element's nearest neighbour?")


def plot_cross(pairs, untrained, path):
    colours = ("tab:purple", "tab:olive")
    panels = [(f"{p['a']} vs {p['b']} ({p['position']})",
               [(p["a_to_b"]["values"], f"{p['a']} → {p['b']}", colours[0]),
                (p["b_to_a"]["values"], f"{p['b']} → {p['a']}", colours[1])],
               untrained[p["shape"]]["cross"]["values"]) for p in pairs]
    stacked_histograms(panels, path, "largest cosine similarity of an alive element to the other SAE's alive elements",
                       "Across SAEs: does each element have a counterpart in the other dictionary?")


def plot_downstream(saes, path):
    """Explained variance of the spliced stream against the original, at the SAE and every later position, over
    the residual index (blocks.i.hook_resid_pre is i; the final stream, after the last block, is n_layer)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    names = {}
    for s in saes:
        evs = {s["position"]: s["explained_variance"], **s["downstream_explained_variance"]}
        xs, ys = [s["resid_index"][q] for q in evs], list(evs.values())
        for r in xs:
            names[r] = "final\n(ln_f input)" if r == s["n_layer"] else f"blocks.{r}\nresid_pre"
        marker, colour, line = style(s)
        ax.plot(xs, ys, marker=marker, color=colour, linestyle=line, label=s["label"])
        ax.plot(xs[:1], ys[:1], marker=marker, color=colour, markersize=12, markerfacecolor="none")  # the SAE itself
    ax.set_xticks(sorted(names), [names[r] for r in sorted(names)], fontsize=8)
    ax.set_ylabel("explained variance of the spliced stream")
    ax.set_title("At the SAE (large open marker) and downstream: does the spliced model follow the original?",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


# ---- the feature browser: one HTML file, inline CSS, every token escaped ----

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 20px 28px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 4px; border-bottom: 2px solid #ddd; }
h3 { font-size: 14px; margin: 0 0 2px; } .why { font-weight: normal; color: #777; font-size: 12px; }
.meta, .stats { color: #555; font-size: 12px; margin: 2px 0 8px; } nav a { margin-right: 14px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(580px, 1fr)); gap: 12px; }
.feature { border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; background: #fcfcfc; }
table { border-collapse: collapse; width: 100%; } td { padding: 1px 4px; vertical-align: top; }
td.act { width: 48px; text-align: right; color: #a0522d; font: 12px monospace; }
td.ctx { font: 12px/1.6 ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-all; }
mark { background: #ff8c00; color: #000; outline: 1.5px solid #c05000; border-radius: 2px; }
.tok { border-radius: 2px; } .effects { font-size: 12px; margin-top: 6px; }
.chip { display: inline-block; font: 11px ui-monospace, Menlo, Consolas, monospace; white-space: pre; margin: 1px 2px;
        padding: 0 3px; border-radius: 3px; } .up { background: #dbeeff; } .down { background: #ffe0e0; }
.none { color: #999; font-style: italic; font-size: 12px; }
"""


def shown(token):
    """A token as text on the page: newlines and tabs made visible, then HTML-escaped."""
    return html.escape(token.replace("\n", "↵").replace("\t", "⇥"))


def context_html(ctx, max_activation):
    """One context: every token shaded by the element's activation on it, the hardest one in a <mark>."""
    parts = ["…"] if ctx["cut_before"] else []
    for i, (tok, a) in enumerate(zip(ctx["tokens"], ctx["activations"])):
        if i == ctx["highlight"]:
            parts.append(f'<mark title="{a:.3f}">{shown(tok)}</mark>')
        elif a > 0:
            alpha = min(1.0, a / max_activation) * 0.6
            parts.append(f'<span class="tok" style="background: rgba(255,140,0,{alpha:.2f})" title="{a:.3f}">'
                         f'{shown(tok)}</span>')
        else:
            parts.append(shown(tok))
    return "".join(parts) + ("…" if ctx["cut_after"] else "")


def chips(effects, kind):
    return "".join(f'<span class="chip {kind}" title="{v:+.3f}">{shown(t)} {v:+.2f}</span>' for t, v in effects)


def feature_html(f, sae_index):
    head = (f'<div class="feature" id="sae{sae_index}-e{f["element"]}" data-element="{f["element"]}">'
            f'<h3>element {f["element"]} <span class="why">{html.escape(f["why"])}</span></h3>'
            f'<p class="stats">fires on {f["frequency"]:.3%} of tokens ({f["count"]:,}); '
            f'max activation {f["max_activation"]:.3f}</p>')
    if f["contexts"]:
        rows = "".join(f'<tr><td class="act">{ctx["activation"]:.2f}</td><td class="ctx">'
                       f'{context_html(ctx, f["max_activation"])}</td></tr>' for ctx in f["contexts"])
        body = f'<table class="contexts">{rows}</table>'
    else:
        body = '<p class="none">never fired on the evaluated tokens</p>'
    effects = (f'<div class="effects">promotes {chips(f["promoted"], "up")}<br>'
               f'suppresses {chips(f["suppressed"], "down")}</div>')
    return head + body + effects + "</div>"


def section_html(s, i):
    """One SAE: what it is, its figures, and a grid of its chosen elements."""
    shared = (f" · the {s['shared_row_tokens']:,} tokens that share one unembedding row are left out of the promoted "
              "and suppressed lists" if s["shared_row_tokens"] else "")
    w = s["within_similarity"]
    meta = (f'{html.escape(s["checkpoint"])} · {s["alive"]:,} of {s["n_dict"]:,} elements alive · '
            f'L0 {s["l0"]:.1f} · CE increase {s["ce_increase"]:.4f} · '
            f'explained variance {s["explained_variance"]:.3f} · '
            f'median nearest-neighbour similarity {fmt(w["median"])} · {w["share_above_near"] or 0:.1%} of alive '
            f'elements have a near-duplicate (> {s["near"]:g}); they account for {s["near_duplicate_firings"]:.0%} of '
            f'all firings{shared}')
    position = html.escape(s["position"])
    return (f'<section class="sae" id="sae{i}" data-position="{position}"><h2>{html.escape(s["label"])} at {position}'
            f'</h2><p class="meta">{meta}</p>'
            f'<div class="grid">{"".join(feature_html(f, i) for f in s["features"])}</div></section>')


def browser_html(saes, settings, n_tokens):
    """The whole page: a header, links to each SAE, then one <section class="sae"> per SAE."""
    nav = " ".join(f'<a href="#sae{i}">{html.escape(s["label"])}</a>' for i, s in enumerate(saes))
    intro = (f'{n_tokens:,} held-out tokens of {html.escape(repr(settings["dataset"]))}. Each element: how often it '
             'fires, the contexts where it fires hardest (the token in orange, its activation at left, other tokens '
             'shaded by theirs; hover for values), and the tokens its direction promotes and suppresses through the '
             'unembedding (W_U · d, before ln_f). Written by analysis.py.')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>SAE feature browser</title>'
            f'<style>{CSS}</style></head><body><h1>SAE feature browser</h1><p class="meta">{intro}</p>'
            f'<nav>{nav}</nav>{"".join(section_html(s, i) for i, s in enumerate(saes))}</body></html>\n')


def fmt(v):
    return "-" if v is None else f"{v:.3f}"


# ---- the script ----

SETTINGS = [  # (key, test, what the value must be)
    ("checkpoints", lambda v: bool(v) and all(isinstance(s, str) for s in v),
     "a non-empty list of paths or specs, e.g. ['out/saes.safetensors']"),
    ("n_ctx", lambda v: v >= 2, "at least 2 (a sample's tokens predict the next ones)"),
    *[(k, lambda v: v > 0, "positive") for k in ("eval_n_samples", "batch_size")],
    device_rule,
    ("chunk_size", lambda v: v > 0, "positive"),
    ("near", lambda v: -1 <= v < 1, "a cosine similarity in [-1, 1)"),
    ("n_frequent", lambda v: v >= 0, "0 or more"),
    ("n_random", lambda v: v >= 0, "0 or more"),
    ("features", lambda v: all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in v),
     "a list of dictionary element indices (integers >= 0), e.g. [12, 345]"),
    ("n_contexts", lambda v: v > 0, "positive"),
    ("context_before", lambda v: v >= 0, "0 or more"),
    ("context_after", lambda v: v >= 0, "0 or more"),
    ("n_logit_tokens", lambda v: v > 0, "positive"),
]


def cross_pairs(saes, dictionaries, chunk_size, near):
    """Every pair of SAEs at the same position: each alive element's largest similarity to the other's, both ways."""
    pairs = []
    for i, (a, A) in enumerate(zip(saes, dictionaries)):
        for b, B in zip(saes[i + 1:], dictionaries[i + 1:]):
            if a["position"] == b["position"] and a["d_in"] == b["d_in"]:
                print(f"  {a['label']} vs {b['label']}:", end=" ", flush=True)
                a_to_b, b_to_a = max_similarities(A, B, chunk_size, progress=show_progress)
                pairs.append(dict(position=a["position"], a=a["label"], b=b["label"], shape=shape(a),
                                  a_to_b=distribution(a_to_b, near), b_to_a=distribution(b_to_a, near)))
                print(f"medians {fmt(pairs[-1]['a_to_b']['median'])} → and {fmt(pairs[-1]['b_to_a']['median'])} ←")
    return pairs


def unique_labels(saes):
    """Make labels unique (the same checkpoint twice, two runs of one recipe): add the position, then a number."""
    positions = {s["position"] for s in saes}
    for s in saes:
        s["label"] += f" @{s['position'].split('.')[1]}" if len(positions) > 1 else ""
    seen = {}
    for s in saes:
        seen[s["label"]] = seen.get(s["label"], 0) + 1
        s["label"] += f" #{seen[s['label']]}" if seen[s["label"]] > 1 else ""


def print_summary(saes, near):
    """One line per SAE: alive elements, nearest-neighbour similarity, near-duplicates, explained variance."""
    print(f"\n{'SAE':<24} {'alive':>13}  {'nearest other: median (q05-q95)':<33} {f'near-duplicates (> {near:g})':<26} "
          "EV at the SAE and downstream")
    for s in saes:
        w = s["within_similarity"]
        within = f"{fmt(w['median'])} ({fmt(w['q05'])}-{fmt(w['q95'])})"
        duplicates = f"{w['share_above_near'] or 0:.1%}, firing {s['near_duplicate_firings']:.1%}"
        evs = " ".join(f"{v:.2f}" for v in [s["explained_variance"], *s["downstream_explained_variance"].values()])
        print(f"{s['label']:<24} {s['alive']:>6,}/{s['n_dict']:<6,}  {within:<33} {duplicates:<26} {evs}")


def main(argv):
    config = configure(DEFAULTS, argv)
    check_settings(config, SETTINGS)
    c = SimpleNamespace(**config)
    try:  # every checkpoint and the output folder are checked before the first is loaded
        check_specs(c.checkpoints)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_writable(c.out_dir, "out_dir")
    print("config:")
    print_config(config)
    with data.as_config_error():
        print(f"data: {c.dataset!r}, held out: {data.heldout_rule(c.dataset)[1]}")

    saes, dictionaries, samples_of = [], [], {}
    for spec in c.checkpoints:
        t0 = time.time()
        print(f"{spec}:")
        records, dicts = analyse_checkpoint(spec, c, samples_of)
        saes, dictionaries = saes + records, dictionaries + dicts
        print(f"  done in {time.time() - t0:.1f} s")
    unique_labels(saes)
    print("cross-SAE similarities:")
    pairs = cross_pairs(saes, dictionaries, c.chunk_size, c.near)
    print("untrained dictionaries of the same shapes, for reference:")
    untrained = {}
    for s in saes:
        if shape(s) not in untrained:
            untrained[shape(s)] = untrained_similarities(s["d_in"], s["n_dict"], c.chunk_size, c.near, c.seed, c.device)
            print(f"  {shape(s)}: median nearest other element {fmt(untrained[shape(s)]['within']['median'])}, "
                  f"median closest in another {fmt(untrained[shape(s)]['cross']['median'])}")

    os.makedirs(c.out_dir, exist_ok=True)
    n_tokens = len(next(iter(samples_of.values()))) * c.n_ctx
    page = os.path.join(c.out_dir, "features.html")
    write_atomic(page, lambda f: f.write(browser_html(saes, config, n_tokens).encode("utf-8")))
    everything = dict(settings=config, n_tokens=n_tokens, saes=saes, cross_similarity=pairs, untrained=untrained)
    write_json(os.path.join(c.out_dir, "analysis.json"), everything, indent=None)
    plot_within(saes, untrained, os.path.join(c.out_dir, "within_similarity.png"))
    plot_downstream(saes, os.path.join(c.out_dir, "downstream.png"))
    if pairs:
        plot_cross(pairs, untrained, os.path.join(c.out_dir, "cross_similarity.png"))
    print_summary(saes, c.near)
    print(f"\nwritten to {c.out_dir}/: {', '.join(sorted(os.listdir(c.out_dir)))}")


if __name__ == "__main__":
    main(sys.argv[1:])
