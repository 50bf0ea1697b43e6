"""
Evaluate SAE checkpoints on held-out text: one table, every metric as JSON, and optional plots.

    python eval.py --checkpoints="['out/saes.safetensors']"
    python eval.py --checkpoints="['path/to/e2e_sae_run', 'path/to/saelens_dir']" --init_from=gpt2
    python eval.py --checkpoints="['saelens:neuronpedia/gpt2-small__res_sce-ajt/6-res_sce-ajt']" \
        --dataset=apollo-research/Skylion007-openwebtext-tokenizer-gpt2 --n_ctx=1024 --eval_n_samples=500

A checkpoint is any spec interop.py reads: this project's out_dir or saes.safetensors, the reference library's run
directory or name.pt (+ name.yaml), a SAELens directory, wandb:entity/project/run_id, saelens:owner/repo/folder or
e2e_sae:owner/repo/name (see interop.py).

Each is evaluated on held-out text of the data it was trained on (its config's dataset, or the one its format
records; 'shakespeare' where none is recorded), or of `dataset` when that is given; the data used is printed.
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

import os
import re
import sys
import time
from types import SimpleNamespace

import configurator
import data
import e2esae
import report
from configurator import ConfigError
from e2esae import LossConfig, SAETransformer
from interop import check_specs
from language_models import check_context, load_model, tokenizer_of
from runs import check_writable, nonfinite_parameters, write_json

# -----------------------------------------------------------------------------
checkpoints = ["out/saes.safetensors"]
init_from = ""  # '' = the model each checkpoint names | 'gpt2' (-medium, ...) | a directory
dataset = ""  # '' = each checkpoint's own training data | 'shakespeare' | text files | a Hugging Face dataset name
n_ctx = 128
eval_n_samples = 200  # 200 samples x 128 tokens = 25,600 tokens (the paper: 500 x 1024)
batch_size = 8
device = configurator.default_device()
out_json = "eval.json"
plot_dir = ""  # if set: a Pareto plot and one activation-frequency histogram per SAE
# -----------------------------------------------------------------------------

DEFAULTS = configurator.defaults(globals())
SETTINGS = [  # (key, test, what the value must be)
    ("checkpoints", lambda v: bool(v) and all(isinstance(s, str) for s in v),
     "a non-empty list of paths or specs, e.g. ['out/saes.safetensors']"),
    ("n_ctx", lambda v: v >= 2, "at least 2 (a sample's tokens predict the next ones)"),
    ("eval_n_samples", lambda v: v > 0, "positive"),
    ("batch_size", lambda v: v > 0, "positive"),
    configurator.device_rule,
]


def check_output_file(path, what):
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path!r} is a directory: give a file name, e.g. {os.path.join(path, 'eval.json')!r}")
    check_writable(os.path.dirname(path) or ".", f"the folder of {what}")


def evaluate_checkpoint(spec, c, samples_of):
    """Load, check and evaluate one checkpoint: (model, rows, metrics, counts, dataset)."""
    model = SAETransformer.from_checkpoint(spec, load_model(c.init_from) if c.init_from else None).to(c.device).eval()
    broken = nonfinite_parameters(model.saes)
    if broken:
        raise ValueError(f"its SAE weights are not finite ({', '.join(broken[:4])}): the run diverged, so there is "
                         "nothing to evaluate; retrain it with a lower lr")
    check_context(model.gpt, c.n_ctx)
    dataset = c.dataset or model.config.get("dataset") or "shakespeare"
    tokenizer = tokenizer_of(model.gpt)  # the text as this checkpoint's model reads it
    if (dataset, tokenizer) not in samples_of:  # read once: checkpoints of one dataset and model share their samples
        print(f"data: {dataset!r}, held out: {data.heldout_rule(dataset)[1]}")
        samples_of[dataset, tokenizer] = data.heldout_samples(dataset, c.n_ctx, c.eval_n_samples,
                                                              vocab_size=model.gpt.config.vocab_size,
                                                              tokenizer=tokenizer)
        n = len(samples_of[dataset, tokenizer])
        print(f"data: {n} held-out samples x {c.n_ctx} tokens = {n * c.n_ctx:,} tokens"
              + (f" (the held-out part holds no more than {n})" if n < c.eval_n_samples else ""))
    print(f"{spec}: SAEs at {', '.join(model.sae_positions)}; evaluated on {dataset!r}"
          + ("" if c.dataset or model.config.get("dataset") else " (the checkpoint records no dataset)"))
    downstream = model.later_positions()
    def progress(i, n, m):
        if i % 10 == 0 or i == n:
            print(f"  batch {i}/{n} | ce_increase {m['ce_increase']:.4f} | kl {m['kl']:.4f}", flush=True)
    metrics, counts = e2esae.evaluate(model, data.in_batches(samples_of[dataset, tokenizer], c.batch_size),
                                      LossConfig.for_evaluation(model.config, downstream), progress=progress)
    metrics = {k: v for k, v in metrics.items() if k not in ("loss", "eval_tokens") and not k.startswith("alive/")}
    rows = [dict(r, dataset=dataset) for r in report.result_rows(spec, model, metrics, counts, downstream)]
    return model, rows, metrics, counts, dataset


def plot_histograms(spec, rows, counts, plot_dir):
    os.makedirs(plot_dir, exist_ok=True)
    freqs = counts.frequencies()
    for r in rows:
        name = re.sub(r"[^\w.-]+", "_", f"{spec}_{r['position']}").strip("_")
        report.plot_frequency_histogram(freqs[r["position"]].numpy(), os.path.join(plot_dir, f"freq_{name}.png"),
                                        title=f"{spec}\nat {r['position']}: {r['alive']:,} of {r['n_dict']:,} alive "
                                              f"over {r['n_tokens']:,} tokens")


def main(argv):
    config = configurator.configure(DEFAULTS, argv)
    configurator.check_settings(config, SETTINGS)
    c = SimpleNamespace(**config)
    try:  # every checkpoint and output place is checked before the first evaluation
        check_specs(c.checkpoints)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_output_file(c.out_json, "out_json")
    if c.plot_dir:
        check_writable(c.plot_dir, "plot_dir")
    print("config:")
    configurator.print_config(config)

    rows, details, failed, samples_of = [], [], [], {}
    for spec in c.checkpoints:
        t0 = time.time()
        try:
            model, new_rows, metrics, counts, dataset = evaluate_checkpoint(spec, c, samples_of)
        except Exception as e:  # one bad checkpoint costs only its own row
            message = e.code if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
            print(f"{spec}: FAILED ({message}); going on with the others", file=sys.stderr)
            failed.append(dict(checkpoint=spec, error=str(message)))
            continue
        rows += new_rows
        details.append(dict(checkpoint=spec, dataset=dataset, metrics=metrics, alive=counts.alive(),
                            n_tokens=counts.n_tokens,
                            config={k: v for k, v in model.config.items() if k != "reference_config"}))
        write_json(c.out_json, dict(settings=config, rows=rows, checkpoints=details, failed=failed))  # as it goes
        if c.plot_dir:
            plot_histograms(spec, new_rows, counts, c.plot_dir)
        print(f"  done in {time.time() - t0:.1f} s")
        del model

    write_json(c.out_json, dict(settings=config, rows=rows, checkpoints=details, failed=failed))
    print()
    report.print_table(rows)
    print(f"\nevery metric: {c.out_json}")
    if c.plot_dir and rows:
        n_tokens = rows[0]["n_tokens"]
        report.plot_pareto(rows, os.path.join(c.plot_dir, "pareto.png"),
                           title=f"{rows[0]['dataset']}, {n_tokens:,} tokens")
        print(f"plots: {c.plot_dir}/")
    if failed:
        names = "; ".join(f["checkpoint"] for f in failed)
        sys.exit(f"{len(failed)} of {len(c.checkpoints)} checkpoints failed: {names}")


if __name__ == "__main__":
    main(sys.argv[1:])
