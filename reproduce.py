"""
The paper's headline result at small scale: local, e2e and e2e+ds SAEs over a sweep of sparsity coefficients,
each evaluated on the same held-out tokens; and how that comparison moves with the model and the SAE budget.

    python reproduce.py                          # the headline sweep: results/small_scale.{csv,json} + Pareto plot
    python reproduce.py --models="['']"          # the same on the embedded default's smaller model (faster)
    python reproduce.py config/scaling_cpu.py    # the grid of models x SAE budgets: results/scaling*.{csv,png}
    python reproduce.py config/scaling_gpu.py    # the same measurement, larger, on one GPU (sized for ~8 minutes)
    python reproduce.py config/topk_sweep.py     # TopK SAEs at k = 8 ... 64: local and e2e at exactly equal L0
    python reproduce.py config/jumprelu_sweep.py # JumpReLU SAEs over L0 penalties
    python reproduce.py --local_coeffs="[1, 3]"  # any setting below overridden

The paper's claim: at equal CE-loss increase, e2e SAEs need far fewer active dictionary elements per token (L0)
and fewer alive elements than local SAEs (GPT-2 small, layer 6: L0 27.5 against 69.4, 0.40x; Braun et al. 2024).
Every run of a grid point has the same token budget and, but for the loss, the same settings (train.py's defaults: the
paper's recipe scaled down). A grid point is a model (a train_gpt.py config: '' is the embedded default's
model, each other is trained once and cached) and an SAE budget in tokens.

Each sweep has one activation (`activation`) and sets one value per run (`sweep`): the sparsity coefficient, or
for TopK and BatchTopK the number k of active elements, which fixes L0 exactly, so that local and e2e compare at
equal L0 with no interpolation. Runs are train.py subprocesses into out_root/<model>/<tokens>/<run>, where <run>
is <type>_<coeff> for the paper's ReLU SAEs and <activation>_<type>_<value> (k<k> for a k sweep) for the others,
with a hash of `train_args` appended when there are any. A run's stored config must be the one the sweep asks
for, or it is refused (never reported as this sweep's); a finished run is skipped, an interrupted one resumed;
Ctrl-C is passed on to the running train.py, which saves its checkpoint before this script stops. Each finished
run is evaluated once on eval_n_samples held-out samples and the figures are kept beside its checkpoint
(eval.json), reused while its weights, eval_n_samples and n_ctx are the same. The comparison at matched CE
increase reads L0 (and alive elements) off each type's curve, log-log interpolated between neighbouring runs, at
points spread over the CE-increase range both curves cover; the ratio is their geometric mean.
"""

import csv
import hashlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

from configurator import ConfigError, configure, defaults
from runs import load_checkpoint, write_atomic, write_json

# -----------------------------------------------------------------------------
models = ["config/gpt_shakespeare_6x256.py"]  # train_gpt.py config files ('' = the embedded default's 4 x 128 model)
sae_tokens = [1_048_576]  # SAE budgets in tokens (n_samples = tokens / n_ctx); 6 x 256 at 1M: where e2e does best
position = ""  # where the SAE sits; '' = each model's middle, blocks.{n_layer // 2}.hook_resid_pre
types = ["local", "e2e", "e2e+ds"]
activation = "relu"  # every run's SAE: 'relu' (the paper's), 'topk', 'batchtopk' or 'jumprelu'
sweep = "sparsity_coeff"  # what the lists below set per run: 'sparsity_coeff', or 'k' (topk, batchtopk)
local_coeffs = [0.3, 1.0, 3.0, 10.0]  # sparsity_coeff sweeps (x3 apart); out_to_in_coeff = 1; 30 collapses 6 x 256
e2e_coeffs = [0.1, 0.3, 1.0, 3.0]  # kl_coeff = 1
e2e_ds_coeffs = [1.0, 3.0, 10.0, 30.0]  # kl_coeff = 0.5, in_to_orig_coeff below
kl_mse_coeffs = []  # type 'kl+mse' (Karvonen 2025's full e2e): KL + MSE from the start, the KL rescaled to the MSE's
in_to_orig_coeff = 1.0
train_args = []  # more train.py settings for every run, e.g. ["--lr=1e-3", "--dict_size_to_input_ratio=32"]
compare = []  # results CSVs of other sweeps on the same model and budget, drawn beside this one's Pareto curves
finetune_fractions = []  # per local run, one more that fine-tunes end to end for this last share of the budget
n_ctx = 128
eval_n_samples = 160  # held-out samples for every run: 160 x 128 = 20,480 tokens
device = ""  # '' = train.py's default (cuda if available)
train = True  # False: train nothing, report the runs of the plan that are finished (and list the others)
out_root = "out/scaling"  # runs live in out_root/<model>/<tokens>/<type>_<coeff>: every preset shares them
results_dir = "results"
combine = []  # results CSVs of earlier sweeps: nothing is trained; their rows become one table, results/<name>.csv
name = "small_scale"  # results/<name>.csv etc.; a grid of several points also writes <name>_ratio.csv and plots
# -----------------------------------------------------------------------------

DEFAULTS = defaults(globals())
PAPER_L0_RATIO = 27.5 / 69.4  # GPT-2 small, layer 6, runs of similar CE increase (Braun et al. 2024)
RECIPE = ("lr", "sae_init", "normalize_activations", "seed")
SMALL_SCALE_COLUMNS = ["type", "sparsity_coeff", "l0", "ce_increase", "alive", "kl", "ce_orig", "ce_sae",
                       "explained_variance", "explained_variance_downstream", "activation", "k", "train_seconds",
                       "sae_tokens", *RECIPE]
# the one table of a combined recipe study (combine)
RECIPE_COLUMNS = ["type", "activation", "k", "sparsity_coeff", "lr", "sae_init", "normalize_activations", "sae_tokens",
                  "seed", "l0", "alive", "ce_increase", "kl", "explained_variance", "train_minutes", "source"]
SCALING_COLUMNS = ["model", "model_ce", "sae_tokens", "type", "sparsity_coeff", "l0", "ce_increase", "alive", "kl",
                   "ce_orig", "ce_sae", "explained_variance", "explained_variance_downstream", "n_dict", "out_dir"]


def model_name(config_file):
    return os.path.splitext(os.path.basename(config_file))[0] if config_file else "gpt_shakespeare"


def positions(c, config_file):
    """The SAE's position in a model and the later hook_resid_pre positions (e2e+ds's downstream terms)."""
    import train_gpt
    n_layer = configure(train_gpt.DEFAULTS, [config_file] if config_file else [])["n_layer"]
    index = int(c.position.split(".")[1]) if c.position else n_layer // 2
    return f"blocks.{index}.hook_resid_pre", [f"blocks.{i}.hook_resid_pre" for i in range(index + 1, n_layer)]


# what reproduce.py sets for every run itself: train_args may not set these (nor train on other data or models,
# which would be labelled and evaluated as this sweep's model on Shakespeare)
PLANNED = ("small_model_config", "sae_positions", "n_ctx", "sparsity_coeff", "n_samples", "eval_n_samples",
           "eval_every_n_samples", "save_every_n_samples", "out_dir", "kl_coeff", "out_to_in_coeff",
           "in_to_orig_coeff", "in_to_orig_positions", "activation", "k", "device", "resume", "overwrite",
           "init_from", "dataset", "kl_rescale", "finetune_fraction")


def run_name(c, kind, value):
    """The run's folder: <type>_<coeff> for ReLU sparsity sweeps (the layout of the committed results), else
    <activation>_<type>_<value>; a hash of train_args appended when there are any."""
    label = f"{value:g}" if c.sweep == "sparsity_coeff" else f"k{value}"
    name = f"{kind.replace('+', '_').replace(' ', '').replace('%', 'pct')}_{label}"
    if c.activation != "relu":
        name = f"{c.activation}_{name}"
    if c.train_args:
        name += "-" + hashlib.sha1(json.dumps(c.train_args).encode()).hexdigest()[:8]
    return name


def finetune_type(fraction):
    return f"local+ft {fraction:.0%}"


def plan(c):
    """Every run of the grid: dicts with model, sae_tokens, type, the swept value, out_dir and train.py's argv. A
    fine-tune run (finetune_fractions) trains locally, then for its last share of the steps with KL + MSE, the KL
    rescaled to the MSE's size (Karvonen 2025's recipe), at each of the local sweep's values."""
    sweeps = {"local": c.local_coeffs, "e2e": c.e2e_coeffs, "e2e+ds": c.e2e_ds_coeffs, "kl+mse": c.kl_mse_coeffs}
    sweeps |= {finetune_type(f): c.local_coeffs for f in c.finetune_fractions}
    runs = []
    for tokens in sorted(c.sae_tokens):  # the cheap budgets first: a first look at every model early
        n_samples = tokens // c.n_ctx
        for config_file in c.models:
            position, downstream = positions(c, config_file)
            loss = {"local": dict(kl_coeff=0.0, out_to_in_coeff=1.0),
                    "e2e": dict(kl_coeff=1.0),
                    "e2e+ds": dict(kl_coeff=0.5, in_to_orig_coeff=c.in_to_orig_coeff, in_to_orig_positions=downstream),
                    "kl+mse": dict(kl_coeff=1.0, out_to_in_coeff=1.0, kl_rescale=True)}
            loss |= {finetune_type(f): dict(kl_coeff=1.0, out_to_in_coeff=1.0, kl_rescale=True, finetune_fraction=f)
                     for f in c.finetune_fractions}
            for kind in [*c.types, *(finetune_type(f) for f in c.finetune_fractions)]:
                for value in sweeps[kind]:
                    out_dir = os.path.join(c.out_root, model_name(config_file), str(tokens), run_name(c, kind, value))
                    swept = (dict(sparsity_coeff=float(value)) if c.sweep == "sparsity_coeff"
                             else dict(sparsity_coeff=0.0, k=int(value)))
                    settings = dict(small_model_config=config_file, sae_positions=[position], n_ctx=c.n_ctx,
                                    n_samples=n_samples, eval_n_samples=c.eval_n_samples,
                                    eval_every_n_samples=n_samples, save_every_n_samples=max(n_samples // 8, 1),
                                    out_dir=out_dir, **swept, **loss[kind],
                                    **({"activation": c.activation} if c.activation != "relu" else {}),
                                    **({"device": c.device} if c.device else {}))
                    argv = [f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}" for k, v in settings.items()]
                    runs.append(dict(model=model_name(config_file), config_file=config_file, sae_tokens=tokens,
                                     type=kind, activation=c.activation, sparsity_coeff=swept["sparsity_coeff"],
                                     k=swept.get("k"), position=position, downstream=downstream, out_dir=out_dir,
                                     argv=argv + c.train_args))
    return runs


MOVE_AWAY = "Move its run folder away, or choose another out_root"


def stored_mismatch(run):
    """The settings in which a run's checkpoint differs from what the plan asks of it ({} if none, or if there
    is no checkpoint): a run is identified by every setting that changes the SAE it trains. Both sides as train.py
    resolves them (topk's own defaults applied); a setting a checkpoint does not record is one that did not exist
    when it was trained, so it ran with the default (as train.py reads it when resuming)."""
    path = os.path.join(run["out_dir"], "ckpt.pt")
    if not os.path.isfile(path):
        return {}
    import train
    asked = train.settings(run["argv"])[0]
    saved = load_checkpoint(path, MOVE_AWAY)["config"]
    stored = {k: saved.get(k, v) for k, v in train.DEFAULTS.items()}
    return {k: (stored[k], v) for k, v in asked.items() if k not in train.HOW_IT_RUNS and stored[k] != v}


def progress(out_dir):
    """(steps done, steps in all) of a run's checkpoint, or None if it has none."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        return None
    ckpt = load_checkpoint(path, MOVE_AWAY)
    cfg = ckpt["config"]
    global_batch = ckpt.get("global_batch", cfg["batch_size"] * cfg["gradient_accumulation_steps"])
    return ckpt["step"], cfg["n_samples"] // global_batch


def train_run(run):
    """train.py for one run in a subprocess, resumed if it has a partial checkpoint. The child runs in its own
    session, so Ctrl-C reaches only this script, which passes it on once and waits while train.py finishes its
    step and saves."""
    done = progress(run["out_dir"])
    argv = run["argv"] + (["--resume=True"] if done else [])
    child = subprocess.Popen([sys.executable, "train.py", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    lines, tty = [], sys.stdout.isatty()
    try:
        for line in child.stdout:
            lines.append(line)
            if tty and line.startswith(("step ", "eval |")):  # one line of progress, overwritten
                print(f"\r    {line.strip()[:110]:<110}", end="", flush=True)
            elif not tty and line.startswith("eval |"):
                print(f"    {line.strip()}", flush=True)
        child.wait()
    except KeyboardInterrupt:
        print("\n    interrupted: train.py is saving its checkpoint ...", flush=True)
        child.send_signal(signal.SIGINT)
        while child.poll() is None:
            try:
                child.wait()
            except KeyboardInterrupt:
                print("    still saving; it stops after the current step", flush=True)
        sys.exit(f"stopped; {run['out_dir']} holds a checkpoint: rerun the same command to continue it")
    if tty:
        print("\r" + " " * 116 + "\r", end="")
    if child.returncode != 0:
        sys.exit(f"run {run['out_dir']} failed (exit {child.returncode}):\n{''.join(lines[-40:])}")
    return done


def evaluate_run(run, samples, device):
    """eval.py's figures for a finished run, computed once and kept in out_dir/eval.json: reused only while they
    are of these weights and of as many held-out samples of as many tokens (eval_n_samples and n_ctx)."""
    path = os.path.join(run["out_dir"], "eval.json")
    weights = os.path.join(run["out_dir"], "saes.safetensors")
    if os.path.isfile(path) and os.path.isfile(weights) and os.path.getmtime(path) >= os.path.getmtime(weights):
        with open(path) as f:
            kept = json.load(f)
        if (kept.get("n_ctx"), kept.get("eval_samples")) == (samples[0].shape[0], len(samples)):
            return kept
    import data
    from e2esae import LossConfig, SAETransformer, evaluate
    from report import result_rows
    model = SAETransformer.from_checkpoint(weights).to(device).eval()
    downstream = model.later_positions()
    metrics, counts = evaluate(model, data.in_batches(samples, 16), LossConfig.for_evaluation(model.config, downstream))
    row = result_rows(weights, model, metrics, counts, downstream)[0]
    row["n_ctx"], row["eval_samples"] = samples[0].shape[0], len(samples)
    write_json(path, row)
    return row


# ---- the comparison at matched CE increase ----

def interpolate(points, target):
    """y at x = target along a curve of (x, y) points, log-log linear between neighbours (None outside it)."""
    pts = sorted((math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0)
    t = math.log(target)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= t <= x1 and x1 > x0:
            return math.exp(y0 + (t - x0) * (y1 - y0) / (x1 - x0))
    return None


def matched(rows, kind, against="local", n_points=5, ce_range=None):
    """kind's L0 and alive elements relative to `against`'s at matched CE increase: the geometric mean of the
    ratios at n_points CE increases spread (log-evenly) over the range both curves cover (within ce_range, if
    given); None if they don't overlap there."""
    curves = {k: [r for r in rows if r["type"] == k] for k in (kind, against)}
    if any(len(v) < 2 for v in curves.values()):
        return None
    spans = [sorted(r["ce_increase"] for r in v if r["ce_increase"] > 0) for v in curves.values()]
    if any(len(s) < 2 for s in spans):
        return None
    lo, hi = max(s[0] for s in spans), min(s[-1] for s in spans)
    if ce_range:
        lo, hi = max(lo, ce_range[0]), min(hi, ce_range[1])
    if lo >= hi:
        return None
    targets = [lo * (hi / lo) ** (i / (n_points - 1)) for i in range(n_points)]
    out = dict(ce_lo=lo, ce_hi=hi, points=[])
    for t in targets:
        a = {k: interpolate([(r["ce_increase"], r[k]) for r in curves[against]], t) for k in ("l0", "alive")}
        b = {k: interpolate([(r["ce_increase"], r[k]) for r in curves[kind]], t) for k in ("l0", "alive")}
        out["points"].append(dict(ce_increase=t, **{f"{against}_{k}": a[k] for k in a},
                                  **{f"{kind}_{k}": b[k] for k in b}))
    for k in ("l0", "alive"):
        logs = [math.log(p[f"{kind}_{k}"] / p[f"{against}_{k}"]) for p in out["points"]]
        out[f"{k}_ratio"] = math.exp(sum(logs) / len(logs))
    return out


def report_matched(rows, kinds):
    for kind in kinds:
        m = matched(rows, kind)
        if m is None:
            print(f"  {kind} vs local: their CE-increase ranges do not overlap; widen the sweeps")
            continue
        for p in m["points"]:
            l0, alive = p[kind + "_l0"], p[kind + "_alive"]
            print(f"  CE increase {p['ce_increase']:.4f}: local L0 {p['local_l0']:6.1f}, {kind} L0 {l0:6.1f} "
                  f"({l0 / p['local_l0']:.2f}x); alive {p['local_alive']:6.0f} vs {alive:6.0f}")
        print(f"  {kind} / local over CE increase {m['ce_lo']:.4f}..{m['ce_hi']:.4f}: L0 {m['l0_ratio']:.2f}x, "
              f"alive {m['alive_ratio']:.2f}x (the paper, layer 6: L0 {PAPER_L0_RATIO:.2f}x)")


# ---- plots ----

def plot_ratios(ratio_rows, path):
    """The e2e/local ratios at matched CE increase against the SAE budget, one line per model: over the CE range
    common to all of the model's budgets where there is one, else over each budget's own range."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for model in dict.fromkeys(r["model"] for r in ratio_rows):
        rows = sorted((r for r in ratio_rows if r["model"] == model), key=lambda r: r["sae_tokens"])
        label = f"{model} (CE {rows[0]['model_ce']:.2f})"
        common = all(r["l0_ratio_common"] is not None for r in rows)  # one CE range for every budget
        if common:
            label += f", CE increase {rows[0]['common_ce_lo']:.3f}-{rows[0]['common_ce_hi']:.3f}"
        for ax, key in zip(axes, ("l0_ratio", "alive_ratio")):
            key = key + "_common" if common else key
            pts = [(r["sae_tokens"], r[key]) for r in rows if r[key] is not None]  # None: the curves don't overlap
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    budgets = sorted({r["sae_tokens"] for r in ratio_rows})
    axes[0].axhline(PAPER_L0_RATIO, color="tab:red", linestyle="--", linewidth=1,
                    label=f"the paper, GPT-2 layer 6 ({PAPER_L0_RATIO:.2f}x)")
    for ax, what in zip(axes, ("L0", "alive elements")):
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(budgets[0] / 1.5, budgets[-1] * 1.5)
        ax.set_xticks(budgets, [f"{b:,}" for b in budgets])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("SAE training tokens")
        ax.set_ylabel(f"e2e / local {what}")
        ax.grid(alpha=0.3)
    fig.suptitle("e2e SAEs against local ones at matched CE increase", fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # the legend below both panels, clear of every line
    fig.savefig(path, dpi=150)


def plot_ratio_curves(rows, kind, path, n_points=9):
    """kind/local L0 against the CE increase where they are matched, one line per model (colour) and budget
    (line style): the ratio moves along the frontier, so one number per grid point hides where it is won."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    budgets = sorted({r["sae_tokens"] for r in rows})
    styles = dict(zip(budgets, [":", "--", "-", "-."] * len(budgets)))
    for colour, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        for tokens in budgets:
            m = matched([r for r in rows if r["model"] == model and r["sae_tokens"] == tokens], kind, n_points=n_points)
            if m:
                ax.plot([p["ce_increase"] for p in m["points"]], [p[f"{kind}_l0"] / p["local_l0"] for p in m["points"]],
                        color=f"C{colour}", linestyle=styles[tokens], marker=".", label=f"{model}, {tokens:,} tokens")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.axhline(PAPER_L0_RATIO, color="tab:red", linestyle="--", linewidth=1,
               label=f"the paper, GPT-2 layer 6 ({PAPER_L0_RATIO:.2f}x)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([a * 10.0**e for e in range(-4, 2) for a in (1, 2, 5)]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("log")  # 0.5x and 2x equally far from 1
    ax.yaxis.set_major_locator(FixedLocator([2.0**e for e in range(-4, 5)]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(min(ax.get_ylim()[0], 0.25), max(ax.get_ylim()[1], 2.0))
    ax.set_xlabel("CE increase")
    ax.set_ylabel(f"{kind} / local L0 at that CE increase")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def plot_grid(rows, path):
    """L0 against CE increase for every grid point (rows: models, columns: budgets), one curve per type."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from report import TYPE_STYLE
    model_list = list(dict.fromkeys(r["model"] for r in rows))
    budgets = sorted({r["sae_tokens"] for r in rows})
    fig = Figure(figsize=(3.6 * len(budgets), 3.0 * len(model_list)))
    axes = fig.subplots(len(model_list), len(budgets), squeeze=False, sharey=True)
    for i, model in enumerate(model_list):
        for j, tokens in enumerate(budgets):
            ax = axes[i][j]
            for kind, (marker, colour) in TYPE_STYLE.items():
                pts = sorted((r["l0"], r["ce_increase"]) for r in rows
                             if r["model"] == model and r["sae_tokens"] == tokens and r["type"] == kind)
                pts = [p for p in pts if p[1] > 0]  # (a CE increase <= 0 has no place on a log scale)
                if pts:
                    ax.plot(*zip(*pts), marker=marker, color=colour, label=kind, linewidth=1)
                    ax.set_xscale("log")
                    ax.set_yscale("log")
                    ax.xaxis.set_minor_formatter(NullFormatter())  # label the powers of ten only
            ax.set_title(f"{model}, {tokens:,} tokens", fontsize=9)
            ax.grid(alpha=0.3)
            if not ax.lines:
                ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes, color="gray")
                ax.set_xticks([])
            if i == len(model_list) - 1:
                ax.set_xlabel("L0")
            if j == 0:
                ax.set_ylabel("CE increase")
    axes[0][0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_csv(path, rows, columns):
    def write(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        f.write(text.getvalue().encode())
    write_atomic(path, write)


# ---- the script ----

def check(c):
    """Everything that can be wrong with the settings, before any run starts."""
    if not c.models or not c.sae_tokens or not c.types:
        raise ConfigError("models, sae_tokens and types must each name at least one")
    for f in c.models:
        if f and not os.path.isfile(f):
            raise ConfigError(f"models names {f!r}, which is not a file: give train_gpt.py config files ('' = default)")
    if c.position and not re.fullmatch(r"blocks\.\d+\.hook_resid_pre", c.position):
        raise ConfigError(f"position must be '' (each model's middle) or a name like 'blocks.2.hook_resid_pre', "
                          f"got {c.position!r}")
    bad = [k for k in c.types if k not in ("local", "e2e", "e2e+ds", "kl+mse")]
    if bad:
        raise ConfigError(f"types {bad} unknown: choose from 'local', 'e2e', 'e2e+ds', 'kl+mse'")
    for t in c.sae_tokens:
        if t < c.n_ctx * 16:
            raise ConfigError(f"sae_tokens {t:,} is less than one step (16 samples x n_ctx={c.n_ctx} tokens)")
    if c.eval_n_samples <= 0:
        raise ConfigError(f"eval_n_samples must be positive, got {c.eval_n_samples}")
    check_sweep(c)
    for f in c.compare:
        if not os.path.isfile(f):
            raise ConfigError(f"compare names {f!r}, which is not a file: give results CSVs of earlier sweeps")
    try:
        os.makedirs(c.results_dir, exist_ok=True)
        os.makedirs(c.out_root, exist_ok=True)
        probe = os.path.join(c.results_dir, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cannot write to results_dir={c.results_dir!r} or out_root={c.out_root!r} ({e})") from None


def check_sweep(c):
    """The activation, what is swept, its values, and train_args that leave the plan's own settings alone."""
    if c.activation not in ("relu", "topk", "batchtopk", "jumprelu"):
        raise ConfigError(f"activation must be 'relu', 'topk', 'batchtopk' or 'jumprelu', got {c.activation!r}")
    if any(not 0 < f < 1 for f in c.finetune_fractions):
        raise ConfigError(f"finetune_fractions are shares of the budget, in (0, 1), got {c.finetune_fractions}")
    if c.finetune_fractions and "local" not in c.types:
        raise ConfigError("finetune_fractions compare fine-tunes with local runs: types must include 'local'")
    if c.sweep not in ("sparsity_coeff", "k") or (c.sweep == "k") != (c.activation in ("topk", "batchtopk")):
        raise ConfigError(f"sweep={c.sweep!r} with activation={c.activation!r}: topk and batchtopk sweep 'k' (their "
                          "sparsity is k), relu and jumprelu sweep 'sparsity_coeff'")
    lists = {"local": "local_coeffs", "e2e": "e2e_coeffs", "e2e+ds": "e2e_ds_coeffs", "kl+mse": "kl_mse_coeffs"}
    for key in [lists[t] for t in c.types if t in lists]:
        values = getattr(c, key)
        if c.sweep == "k" and any(not isinstance(v, int) or v < 1 for v in values):
            raise ConfigError(f"{key} sets k for each run here (sweep='k'): whole numbers >= 1, got {values}")
        if any(not isinstance(v, (int, float)) or v <= 0 for v in values):
            raise ConfigError(f"{key} must be positive numbers, got {values}")
    for arg in c.train_args:
        key = arg[2:].partition("=")[0] if arg.startswith("--") else None
        if key is None:
            raise ConfigError(f"train_args holds {arg!r}: give train.py settings as '--key=value'")
        if key in PLANNED:
            raise ConfigError(f"train_args sets {key}, which reproduce.py sets for every run itself (or which would "
                              "train on another model or data than the sweep reports): use its own settings instead")


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # a scheduler's SIGTERM stops the sweep like Ctrl-C: the running train.py saves first


def run_label(i, runs, run):
    value = f"k={run['k']}" if run["k"] else f"sparsity_coeff={run['sparsity_coeff']:g}"
    activation = "" if run["activation"] == "relu" else f"{run['activation']} "
    return f"[{i + 1}/{len(runs)}] {run['model']}, {run['sae_tokens']:,} tokens, {activation}{run['type']} {value}"


def train_all(runs, c):
    """Train every run of the plan that is not finished (resuming those that started); with train=False, mark
    them left out instead. A run whose stored settings differ from the plan's is refused before any training."""
    for run in runs:
        differ = stored_mismatch(run)
        if differ:
            shown = ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in list(differ.items())[:4])
            raise ConfigError(f"{run['out_dir']} holds a run trained with other settings ({shown}): its results "
                              "are not this sweep's. Move it away, or choose another out_root")
    for i, run in enumerate(runs):
        state, label = progress(run["out_dir"]), run_label(i, runs, run)
        if state and state[0] >= state[1]:
            print(f"{label}: done already ({run['out_dir']})")
            continue
        if not c.train:
            print(f"{label}: not finished, left out (train=False)")
            run["left_out"] = True
            continue
        print(f"{label} -> {run['out_dir']}" + (f" (resuming at step {state[0]})" if state else ""), flush=True)
        start = time.time()
        train_run(run)
        print(f"    trained in {time.time() - start:.0f} s", flush=True)
    return [run for run in runs if not run.get("left_out")]


def evaluate_all(runs, c):
    """Every run on the same held-out tokens: one row per run with the figures the CSV and the plots read."""
    import torch

    import data
    eval_device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\nevaluating {len(runs)} runs on the same held-out tokens", flush=True)
    held_out = data.heldout_samples("shakespeare", c.n_ctx, c.eval_n_samples)
    rows = []
    for run in runs:
        r = evaluate_run(run, held_out, eval_device)
        ckpt = load_checkpoint(os.path.join(run["out_dir"], "ckpt.pt"), MOVE_AWAY)
        recipe = {k: ckpt["config"].get(k) for k in RECIPE}  # the settings a recipe sweep varies, as trained
        rows.append(dict(run, **{k: r[k] for k in ("l0", "ce_increase", "alive", "kl", "ce_orig", "ce_sae",
                                                   "explained_variance", "n_dict")}, **recipe,
                         model_ce=r["ce_orig"], train_seconds=ckpt.get("train_seconds"),
                         explained_variance_downstream=r["downstream_explained_variance"].get(
                             (run["downstream"] or [None])[-1], float("nan"))))
    return rows


def ratios(rows, c, kinds):
    """The matched-CE ratios of every model and budget (one row each), printed as it goes."""
    ratio_rows = []
    for model in dict.fromkeys(r["model"] for r in rows):
        points = {t: [r for r in rows if r["model"] == model and r["sae_tokens"] == t] for t in sorted(c.sae_tokens)}
        points = {t: p for t, p in points.items() if p}
        for kind in kinds:
            # one CE-increase range for all of a model's budgets, where every budget's curves overlap: there the
            # ratios compare like with like as the budget grows (each budget's own range is kept too)
            own = {t: matched(p, kind) for t, p in points.items()}
            spans = [(m["ce_lo"], m["ce_hi"]) for m in own.values() if m]
            common = (max(s[0] for s in spans), min(s[1] for s in spans)) if spans else None
            common = common if common and common[0] < common[1] and len(spans) == len(points) else None
            for t, p in points.items():
                m, mc = own[t] or {}, (matched(p, kind, ce_range=common) if common else None) or {}
                ratio_rows.append(dict(model=model, model_ce=p[0]["model_ce"], sae_tokens=t, type=kind,
                                       ce_lo=m.get("ce_lo"), ce_hi=m.get("ce_hi"), l0_ratio=m.get("l0_ratio"),
                                       alive_ratio=m.get("alive_ratio"), common_ce_lo=mc.get("ce_lo"),
                                       common_ce_hi=mc.get("ce_hi"), l0_ratio_common=mc.get("l0_ratio"),
                                       alive_ratio_common=mc.get("alive_ratio")))
        for t, p in points.items():
            print(f"\n{model}, {t:,} SAE tokens (model CE {p[0]['model_ce']:.4f}): at matched CE increase")
            report_matched(p, kinds)
            if c.sweep == "k":
                report_equal_k(p)
    print("\nthe ratio as the budget grows:" if len(c.sae_tokens) > 1 else "\nthe ratios:")
    for r in ratio_rows:
        fmt_ratio = lambda v: "-" if v is None else f"{v:.2f}x"
        common = (f"; over {r['common_ce_lo']:.4f}..{r['common_ce_hi']:.4f} (common to the model's budgets) L0 "
                  f"{fmt_ratio(r['l0_ratio_common'])}, alive {fmt_ratio(r['alive_ratio_common'])}"
                  if r["common_ce_lo"] is not None and len(c.sae_tokens) > 1 else "")
        print(f"  {r['model']:<24} {r['sae_tokens']:>10,} {r['type']:<7} L0 {fmt_ratio(r['l0_ratio'])}, alive "
              f"{fmt_ratio(r['alive_ratio'])}{common}")
    return ratio_rows


def report_equal_k(rows):
    """At each k, the types side by side: with L0 fixed by k, what each costs (CE increase, KL) and keeps alive."""
    print("  at equal k (L0 fixed; no interpolation):")
    for k in sorted({r["k"] for r in rows}):
        at = {r["type"]: r for r in rows if r["k"] == k}
        cells = [f"{t} CE +{r['ce_increase']:.4f} KL {r['kl']:.4f} alive {r['alive']} EV {r['explained_variance']:.2f}"
                 for t, r in at.items()]
        ratio = (f"; e2e/local CE increase {at['e2e']['ce_increase'] / at['local']['ce_increase']:.2f}x"
                 if {"e2e", "local"} <= set(at) and at["local"]["ce_increase"] > 0 else "")
        print(f"  k={k:<4} " + " | ".join(cells) + ratio)


def report_finetune(rows, fractions):
    """Per setting: how much each fine-tune cuts local's CE increase (Karvonen's measure), what share of the gap
    between local and full e2e it closes, and what it cost in training time."""
    print("\nthe short end-to-end fine-tune (local, then KL + MSE for the last share of the same budget):")
    for value in sorted({r["k"] or r["sparsity_coeff"] for r in rows if r["type"] == "local"}):
        at = {r["type"]: r for r in rows if (r["k"] or r["sparsity_coeff"]) == value and r["type"] != "e2e+ds"}
        local, e2e = at.get("local"), at.get("e2e")
        if local is None:
            continue
        line = [f"  {'k' if local['k'] else 'lambda'}={value:g}: local CE +{local['ce_increase']:.4f} "
                f"({local['train_seconds'] or 0:.0f} s)"]
        gap = local["ce_increase"] - e2e["ce_increase"] if e2e else 0.0  # <= 0: e2e no better, nothing to close
        for f in fractions:
            ft = at.get(finetune_type(f))
            if ft is None:
                continue
            cut = 1 - ft["ce_increase"] / local["ce_increase"]
            line.append(f"{finetune_type(f)} +{ft['ce_increase']:.4f} (cut {cut:.0%}"
                        + (f", {(local['ce_increase'] - ft['ce_increase']) / gap:.0%} of the gap to e2e" if gap > 0
                           else "") + f"; {ft['train_seconds'] or 0:.0f} s)")
        if e2e:
            line.append(f"e2e +{e2e['ce_increase']:.4f} ({e2e['train_seconds'] or 0:.0f} s"
                        + ("; no better than local: no gap to close" if gap <= 0 else "") + ")")
        print(" | ".join(line))


def read_compare(paths):
    """Rows of earlier sweeps' CSVs, to draw beside this one's (numbers as numbers; a missing activation is relu)."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                row = {k: (float(v) if re.fullmatch(r"-?[\d.]+(e-?\d+)?|nan", v or "") else v) for k, v in r.items()}
                rows.append(dict(row, activation=row.get("activation") or "relu", reference=path))
    return rows


def write_results(rows, ratio_rows, c, grid):
    """The CSV, the JSON and the plots of the sweep; returns the paths written."""
    csv_path = os.path.join(c.results_dir, f"{c.name}.csv")
    write_csv(csv_path, rows, SCALING_COLUMNS if grid else SMALL_SCALE_COLUMNS)
    json_path = os.path.join(c.results_dir, f"{c.name}.json")
    write_json(json_path, dict(settings={k: getattr(c, k) for k in DEFAULTS},
                               rows=[{k: v for k, v in r.items() if k != "argv"} for r in rows], ratios=ratio_rows))
    written = [csv_path, json_path]
    if grid:
        ratio_path = os.path.join(c.results_dir, f"{c.name}_ratio.csv")
        write_csv(ratio_path, ratio_rows, list(ratio_rows[0]))
        plot_ratios([r for r in ratio_rows if r["type"] == "e2e"], os.path.join(c.results_dir, f"{c.name}.png"))
        plot_grid(rows, os.path.join(c.results_dir, f"{c.name}_pareto.png"))
        plot_ratio_curves(rows, "e2e", os.path.join(c.results_dir, f"{c.name}_vs_ce.png"))
        return written + [ratio_path] + [os.path.join(c.results_dir, f"{c.name}{suffix}.png")
                                         for suffix in ("", "_pareto", "_vs_ce")]
    from report import plot_pareto
    activation = "" if c.activation == "relu" else f"{c.activation} "
    plot_pareto(rows + read_compare(c.compare), os.path.join(c.results_dir, f"{c.name}_pareto.png"),
                title=f"{rows[0]['model']} on Shakespeare, {activation}SAEs at {rows[0]['position']}, "
                      f"{c.sae_tokens[0]:,} tokens each")
    return written + [os.path.join(c.results_dir, f"{c.name}_pareto.png")]


def spread(values):
    """(mean, half the range) of a cell's runs (its seeds)."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def recipe_cells(rows):
    """The runs grouped by recipe (all but the seed), each cell with its mean and spread over seeds, printed."""
    key = lambda r: (r["type"], r["k"], r["sparsity_coeff"], r["lr"], r["sae_init"], r["normalize_activations"],
                     r["sae_tokens"])
    cells = {}
    for r in rows:
        cells.setdefault(key(r), []).append(r)
    print(f"\n{'type':<13} {'k or λ':>7} {'lr':>7} {'init':<12} {'inputs':<8} {'tokens':>10} {'seeds':>5} "
          f"{'CE increase':>17} {'KL':>17} {'alive':>11} {'EV':>6}")
    out = []
    for k, runs in sorted(cells.items(), key=lambda kv: [str(x) for x in kv[0]]):
        ce, kl, alive = (spread([r[m] for r in runs]) for m in ("ce_increase", "kl", "alive"))
        ev = spread([r["explained_variance"] for r in runs])[0]
        out.append(dict(zip(("type", "k", "sparsity_coeff", "lr", "sae_init", "normalize_activations", "sae_tokens"),
                            k), n=len(runs), ce=ce, kl=kl, alive=alive, ev=ev))
        k_or_lambda = f"{k[1]:g}" if k[1] else f"λ={k[2]:g}"  # TopK's k, else the sparsity coefficient
        inputs = "scaled" if k[5] not in (None, "", "none") else "raw"  # normalize_activations
        print(f"{k[0]:<13} {k_or_lambda:>7} {k[3]:>7g} {k[4]:<12} {inputs:<8} {int(k[6]):>10,} {len(runs):>5} "
              f"{ce[0]:>9.4f} ± {ce[1]:.4f} {kl[0]:>9.4f} ± {kl[1]:.4f} {alive[0]:>5.0f} ± {alive[1]:<3.0f} {ev:>6.3f}")
    return out


def plot_recipe(cells, path):
    """CE increase against k per objective (1M tokens, the default initialisation and lr: the mean over seeds with
    its spread), and each variation at k = 32 beside them."""
    from matplotlib.figure import Figure

    from report import type_style
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    base = [c for c in cells if c["sae_tokens"] == min(x["sae_tokens"] for x in cells) and c["lr"] == 3e-3
            and c["sae_init"] == "orthogonal" and c["k"]]
    kinds = list(dict.fromkeys(c["type"] for c in base))
    for kind in kinds:
        pts = sorted((c["k"], *c["ce"]) for c in base if c["type"] == kind)
        marker, colour = type_style(kind, kinds)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker, color=colour,
                    label=kind, capsize=3, linewidth=1)
    others = [c for c in cells if c not in base and c["k"]]
    for i, c in enumerate(others):
        label = f"{c['type']}, " + ", ".join(x for x in (f"lr {c['lr']:g}" if c["lr"] != 3e-3 else "",
                                                         c["sae_init"] if c["sae_init"] != "orthogonal" else "",
                                                         f"{c['sae_tokens'] / 2**20:g}M tokens"
                                                         if c["sae_tokens"] != base[0]["sae_tokens"] else "") if x)
        ax.errorbar([c["k"] * (1.04 + 0.03 * i)], [c["ce"][0]], yerr=[c["ce"][1]], marker="x", linestyle="none",
                    label=label, capsize=2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("k = L0")
    ax.set_ylabel("CE increase (held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def combine_results(c):
    """The rows of earlier sweeps' CSVs as one table with each run's recipe (RECIPE_COLUMNS), no training; the
    cells (mean and spread over seeds) printed and plotted."""
    rows, seen = [], set()
    for path in c.combine:
        for r in read_compare([path]):
            minutes = r.get("train_seconds")
            row = {**{k: r.get(k) for k in RECIPE_COLUMNS}, "sae_tokens": r.get("sae_tokens") or c.sae_tokens[0],
                   "train_minutes": round(minutes / 60, 1) if isinstance(minutes, float) else None,
                   "source": os.path.basename(path)}
            run = tuple(str(row[k]) for k in RECIPE_COLUMNS if k != "source")  # a finished run met by two sweeps
            if run not in seen:
                seen.add(run)
                rows.append(row)
    path = os.path.join(c.results_dir, f"{c.name}.csv")
    write_csv(path, rows, RECIPE_COLUMNS)
    plot_recipe(recipe_cells(rows), os.path.join(c.results_dir, f"{c.name}.png"))
    print(f"{len(rows)} runs of {len(c.combine)} sweeps -> {path}, {c.name}.png")


def main(argv):
    c = SimpleNamespace(**configure(DEFAULTS, argv))
    if c.combine:
        return combine_results(c)
    check(c)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    t0 = time.time()
    runs = train_all(plan(c), c)
    if not runs:
        sys.exit("no finished run to report: train some first (train=True)")
    rows = evaluate_all(runs, c)
    print(f"\n{'model':<24} {'tokens':>10} {'type':<7} {'lambda':>6} {'k':>4} {'L0':>7} {'alive':>6} {'CE inc':>8} "
          f"{'EV':>6}")
    for r in rows:
        print(f"{r['model']:<24} {r['sae_tokens']:>10,} {r['type']:<7} {r['sparsity_coeff']:>6g} {r['k'] or '-':>4} "
              f"{r['l0']:>7.1f} {r['alive']:>6} {r['ce_increase']:>8.4f} {r['explained_variance']:>6.3f}")
    ratio_rows = ratios(rows, c, [k for k in c.types if k != "local"])
    if c.finetune_fractions:
        report_finetune(rows, c.finetune_fractions)
    written = write_results(rows, ratio_rows, c, grid=len(c.models) > 1 or len(c.sae_tokens) > 1)
    print(f"\nwrote {', '.join(written)} in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main(sys.argv[1:])
