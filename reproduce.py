"""
The paper's headline result at small scale: local, e2e and e2e+ds SAEs over a sweep of sparsity coefficients,
on the embedded default's small GPT-2 and its Shakespeare corpus, each evaluated on the same held-out tokens.

    python reproduce.py                          # train every run (skipping finished ones), evaluate, write results/
    python reproduce.py --n_samples=2000         # any setting below, e.g. a smaller token budget per run

The paper's claim: at equal CE-loss increase, e2e SAEs need far fewer active dictionary elements per token (L0)
and fewer alive elements than local SAEs. Every run here has the same token budget and, but for the loss, the
same settings (train.py's defaults: the paper's recipe scaled down). Writes results/small_scale.csv (a row per
run), results/small_scale.json (every metric) and results/small_scale_pareto.png, and prints the comparison at
matched CE increase, read off each type's curve by linear interpolation in log L0 between neighbouring runs.
"""

import csv
import json
import math
import os
import subprocess
import sys
import time

from configurator import configure

# -----------------------------------------------------------------------------
position = "blocks.2.hook_resid_pre"  # the middle of the small model's 4 blocks
downstream = ["blocks.3.hook_resid_pre"]  # every later hook_resid_pre, for e2e+ds
local_coeffs = [0.3, 1.0, 3.0, 10.0]  # sparsity_coeff sweeps (x3 apart); out_to_in_coeff = 1
e2e_coeffs = [0.1, 0.3, 1.0, 3.0]  # kl_coeff = 1
e2e_ds_coeffs = [0.1, 0.3, 1.0, 3.0]  # kl_coeff = 0.5, in_to_orig_coeff below
in_to_orig_coeff = 1.0
n_samples = 2_048  # per run, as train.py's default: 2,048 samples x 128 tokens = 262,144 training tokens
eval_n_samples = 160  # held-out samples for every run: 160 x 128 = 20,480 tokens
out_root = "out/small_scale"
results_dir = "results"
# -----------------------------------------------------------------------------

DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, list))}


def runs(c):
    """(type, sparsity_coeff, train.py overrides) for every run of the sweep."""
    loss = {"local": dict(kl_coeff=0.0, out_to_in_coeff=1.0),
            "e2e": dict(kl_coeff=1.0),
            "e2e+ds": dict(kl_coeff=0.5, in_to_orig_coeff=c.in_to_orig_coeff, in_to_orig_positions=c.downstream)}
    sweeps = {"local": c.local_coeffs, "e2e": c.e2e_coeffs, "e2e+ds": c.e2e_ds_coeffs}
    for kind, coeffs in sweeps.items():
        for coeff in coeffs:
            out_dir = os.path.join(c.out_root, f"{kind.replace('+', '_')}_{coeff:g}")
            yield kind, coeff, dict(sae_positions=[c.position], sparsity_coeff=float(coeff), n_samples=c.n_samples,
                                    eval_n_samples=c.eval_n_samples, eval_every_n_samples=c.n_samples, out_dir=out_dir,
                                    **loss[kind])


def finished(out_dir, n_samples):
    """A run is done when its last checkpoint has seen all its samples."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        return False
    import torch
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = ckpt["config"]
    return ckpt["step"] >= n_samples // (cfg["batch_size"] * cfg["gradient_accumulation_steps"])


def interpolate_l0(rows, target):
    """L0 at CE increase `target` along one type's curve (log L0 linear in CE increase between neighbours)."""
    pts = sorted((r["ce_increase"], math.log(r["l0"])) for r in rows)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if min(x0, x1) <= target <= max(x0, x1) and x1 != x0:
            return math.exp(y0 + (target - x0) * (y1 - y0) / (x1 - x0))
    return None


def report_matched(rows):
    """Each type against local where their CE-increase ranges overlap: L0 read off both curves at the ends and the
    middle of the overlap."""
    by_type = {k: [r for r in rows if r["type"] == k] for k in ("local", "e2e", "e2e+ds")}
    print("\nL0 at matched CE increase (log L0 interpolated linearly in CE increase along each type's curve):")
    for kind in ("e2e", "e2e+ds"):
        spans = [sorted(r["ce_increase"] for r in by_type[k]) for k in ("local", kind)]
        lo, hi = max(s[0] for s in spans), min(s[-1] for s in spans)
        if lo > hi:
            print(f"  {kind} vs local: their CE-increase ranges do not overlap; widen the sweeps")
            continue
        for target in (lo, (lo + hi) / 2, hi):
            a, b = interpolate_l0(by_type["local"], target), interpolate_l0(by_type[kind], target)
            print(f"  CE increase {target:.4f}: local L0 {a:.1f}, {kind} L0 {b:.1f} ({b / a:.2f}x local)")


def main(argv):
    c = type("Config", (), configure(DEFAULTS, argv))
    t0 = time.time()
    plan = list(runs(c))
    for i, (kind, coeff, overrides) in enumerate(plan):
        if finished(overrides["out_dir"], c.n_samples):
            print(f"[{i + 1}/{len(plan)}] {kind} sparsity_coeff={coeff:g}: done already ({overrides['out_dir']})")
            continue
        print(f"[{i + 1}/{len(plan)}] {kind} sparsity_coeff={coeff:g} -> {overrides['out_dir']}", flush=True)
        argv = [f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}" for k, v in overrides.items()]
        start = time.time()
        result = subprocess.run([sys.executable, "train.py", *argv], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"run {overrides['out_dir']} failed:\n{result.stderr[-3000:]}")
        print(f"    trained in {time.time() - start:.0f} s; " + result.stdout.strip().splitlines()[-1].strip())

    # every run on the same held-out tokens, by eval.py
    os.makedirs(c.results_dir, exist_ok=True)
    json_path = os.path.join(c.results_dir, "small_scale.json")
    checkpoints = [os.path.join(o["out_dir"], "saes.safetensors") for _, _, o in plan]
    result = subprocess.run([sys.executable, "eval.py", f"--checkpoints={checkpoints!r}", f"--out_json={json_path}",
                             f"--eval_n_samples={c.eval_n_samples}"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"eval.py failed:\n{result.stderr[-3000:]}")
    with open(json_path) as f:
        evaluated = json.load(f)
    rows = [dict(type=kind, sparsity_coeff=coeff, **{k: r[k] for k in ("l0", "ce_increase", "alive", "kl", "ce_orig",
                                                                      "ce_sae", "explained_variance")},
                 explained_variance_downstream=r["downstream_explained_variance"].get(c.downstream[-1], float("nan")))
            for (kind, coeff, _), r in zip(plan, evaluated["rows"])]
    csv_path = os.path.join(c.results_dir, "small_scale.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    from eval import plot_pareto
    plot_path = os.path.join(c.results_dir, "small_scale_pareto.png")
    plot_pareto(rows, plot_path, title=f"small GPT-2 on Shakespeare, SAEs at {c.position}")

    print(f"\n{'type':<7} {'lambda':>6} {'L0':>7} {'alive':>6} {'CE inc':>8} {'EV':>6} {'EV ds':>6}")
    for r in rows:
        print(f"{r['type']:<7} {r['sparsity_coeff']:>6g} {r['l0']:>7.1f} {r['alive']:>6} {r['ce_increase']:>8.4f} "
              f"{r['explained_variance']:>6.3f} {r['explained_variance_downstream']:>6.3f}")
    report_matched(rows)
    print(f"\nwrote {csv_path}, {json_path}, {plot_path} in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main(sys.argv[1:])
