"""The prepared GPU run: the kernel tests compiled, a short e2e training run and bench.py --quick, into one JSON file.

GPU time is short, so one command checks and times everything (BENCHMARKS.md, "How to run"):

    python gpu_check.py                                   # on a GPU: 9.1 min at most; writes gpu_check.json
    python gpu_check.py --out h200.json --no-compile      # skip bench.py's torch.compile rows
    python gpu_check.py --device cpu --tiny --no-compile  # a smoke test on a CPU (kernels interpreted)

It needs torch, triton, numpy and pytest: no `datasets`, no `wandb`, no network, no GPT-2 weights. GPT-2 small runs
on random weights and random tokens (speed does not depend on their values). Three stages, each in its own process
under a time limit, so that one that fails or hangs still leaves the others' results (four stages):

1. tests: `pytest tests/test_kernels.py`, every kernel against its reference, compiled for this GPU (bf16 included;
   autotuning on: every config runs, and the in-place KL kernel must be restored between them);
2. train: e2e training of GPT-2 small with an SAE at blocks.6.hook_resid_pre (ratio 60: 46,080 elements), 8 x 1,024
   random tokens per step, sparsity 3 + KL 1 (config/e2e_layer6.py's loss and lr), Adam, gradient clipping, bf16
   autocast. First as initialised (about half the codes fire: the dense path), then with the encoder bias moved so
   that ~40 codes per token fire (the sparse kernels: the regime of most of a real run). For each phase: tokens/s,
   MFU (dense FLOPs from report.flops_per_token) and peak memory;
3. bench: `python bench.py --quick`, each kernel against eager PyTorch and torch.compile (BENCHMARKS.md);
4. peers: bench.py --peers's works A and B on the GPU: one local TopK SAE training step (8,192 x 768 activations,
   46,080 latents, k = 32) and one e2e KL step (6 x 384 GPT-2, 8 x 128 tokens), this project's Triton path against
   sparsify's GPU path and SAELens where they are installed (a missing one is skipped and said so).

The JSON holds the environment and, per stage, its status, seconds, results and the tail of its output. A summary
is printed last.
"""
import argparse
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.abspath(__file__))
# Seconds each stage may take on the GPU; 545 s in all, so that the whole run stays within 9.5 minutes.
TIME_LIMITS = dict(tests=150, train=95, bench=210, peers=90)
OUTPUT_TAIL = 20_000  # characters of each stage's output kept in the JSON
# the training run (config/e2e_layer6.py's loss and optimiser; a constant learning rate)
SPARSITY_COEFF, KL_COEFF, LR, MAX_GRAD_NORM = 3.0, 1.0, 5e-4, 10.0
WARMUP_STEPS = 2  # untimed steps before each phase: autotuning and the allocator's first requests
PHASE_STEPS = {"as initialised": 8, "sparse": 16}
# the peers stage: work A's shape on the GPU (the paper's ratio 60), rounds of every implementation in turn
GPU_PEERS_A = dict(tokens=8192, d_in=768, n_dict=46080, k=32)
TINY_PEERS_A = dict(tokens=64, d_in=48, n_dict=96, k=4)
TINY_PEERS_MODEL = dict(n_layer=4, n_embd=48, n_head=2, vocab_size=301, n_positions=128)  # and 2 x 32 tokens
PEER_ROUNDS = 10


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny shapes (with --device cpu: a smoke test)")
    p.add_argument("--out", default="gpu_check.json", help="the JSON file with every result")
    p.add_argument("--no-compile", action="store_true", help="skip bench.py's torch.compile rows")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200: 989)")
    p.add_argument("--stage", default="all", choices=["all", "train", "peers"], help="internal: run one stage here")
    return p.parse_args(argv)


# ---- stage 2: the training run, in its own process ----

def train_run(args):
    """Train the SAE for a few steps in each regime; writes the figures of each phase to args.out as it goes."""
    import torch

    import bench
    import report
    from e2esae import LossConfig, compute_loss

    device, shape = args.device, bench.TINY if args.tiny else bench.PAPER
    cuda = device == "cuda"
    model, position = bench.e2e_model(shape, args.tiny, device, torch)
    sae = model.sae(position)
    optimizer = torch.optim.Adam(model.saes.parameters(), lr=LR)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
    generator = torch.Generator(device=device).manual_seed(3)
    vocab, tokens = model.gpt.config.vocab_size, shape["batch"] * shape["seq"]
    batch = lambda: torch.randint(0, vocab, (shape["batch"], shape["seq"]), device=device, generator=generator)
    flops_per_token = report.flops_per_token(model, local=False)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        with autocast:
            loss, metrics = compute_loss(model, batch(), LossConfig(sparsity_coeff=SPARSITY_COEFF, kl_coeff=KL_COEFF),
                                         full_metrics=False)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.saes.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return metrics, norm

    result = dict(device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu", position=position,
                  n_dict=sae.n_dict, tokens_per_step=tokens, flops_per_token=flops_per_token,
                  peak_tflops=args.peak_tflops, backend=os.environ.get("E2ESAE_BACKEND", "auto"), phases=[])
    for phase, n_steps in PHASE_STEPS.items():
        if phase == "sparse":
            with torch.no_grad():
                sae.encoder.bias.fill_(bench.sparse_encoder_bias(model, position, batch(), shape["active"], torch))
        for _ in range(WARMUP_STEPS):
            step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, logs = [], []
        for i in range(n_steps):
            t0 = time.perf_counter()
            metrics, norm = step()
            sync()
            times.append(1e3 * (time.perf_counter() - t0))
            logs.append(dict(loss=metrics["loss"].item(), kl=metrics["kl"].item(),
                             l0=metrics[f"l0/{position}"].item(), norm=norm.item(), ms=times[-1]))
            print(f"{phase} step {i} | loss {logs[-1]['loss']:.4f} | kl {logs[-1]['kl']:.4f} | l0 {logs[-1]['l0']:.1f}"
                  f" | norm {logs[-1]['norm']:.2f} | {times[-1]:.0f} ms | {tokens / times[-1] * 1e3:,.0f} tok/s",
                  flush=True)
        tokens_per_s = tokens / (statistics.median(times) / 1e3)
        result["phases"].append(dict(phase=phase, steps=logs, median_ms=statistics.median(times),
                                     tokens_per_s=tokens_per_s,
                                     mfu=flops_per_token * tokens_per_s / (args.peak_tflops * 1e12),
                                     peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else None))
        with open(args.out, "w") as f:  # after every phase: a run cut short keeps what it measured
            json.dump(result, f, indent=1)


# ---- stage 4: the peers (bench.py --peers's works A and B), in its own process ----

def peers_run(args):
    """Works A and B on this device, each implementation in turn for PEER_ROUNDS rounds after two warm-up steps
    (Triton's autotuning); median ms and the peak memory of one step above what was allocated before it. Writes
    args.out after each work."""
    import tempfile

    import torch

    import bench
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    result = dict(device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                  versions=bench.versions_of("torch", "triton", "sae-lens", "eai-sparsify", "transformers"),
                  backend=os.environ.get("E2ESAE_BACKEND", "auto"), works={})

    def peak_of(step):
        if not cuda:
            return None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        return torch.cuda.max_memory_allocated() - base

    def measure(work, title, steps, skipped):
        for name, why in skipped.items():
            print(f"{work}: skipped {name}: {why}", flush=True)
        names, times = list(steps), {name: [] for name in steps}
        for name in names:
            for _ in range(2):
                steps[name]()
            sync()
        for r in range(PEER_ROUNDS):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                steps[name]()
                sync()
                times[name].append(1e3 * (time.perf_counter() - t0))
        rows = [dict(implementation=n, median_ms=statistics.median(times[n]), min_ms=min(times[n]),
                     peak_bytes=peak_of(steps[n]), times_ms=times[n]) for n in names]
        peers = [r["median_ms"] for r in rows if not r["implementation"].startswith("e2esae")]
        print(f"\n{title}\n{'implementation':<76} {'median ms':>10} {'/ fastest peer':>15} {'peak MB':>9}")
        for r in rows:
            ratio = f"{r['median_ms'] / min(peers):.2f}" if peers else "-"
            peak = f"{r['peak_bytes'] / 2**20:,.0f}" if r["peak_bytes"] is not None else "-"
            print(f"{r['implementation']:<76} {r['median_ms']:>10.2f} {ratio:>15} {peak:>9}", flush=True)
        result["works"][work] = dict(title=title, skipped=skipped, rows=rows)
        with open(args.out, "w") as f:  # after every work: a stage cut short keeps what it measured
            json.dump(result, f, indent=1)

    shape = TINY_PEERS_A if args.tiny else GPU_PEERS_A
    measure("A", f"Work A: one TopK SAE training step, {shape}", *bench.peer_steps_a(torch, shape, args.device))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model_dir = bench.save_peer_model(tmp, TINY_PEERS_MODEL if args.tiny else None)
        except ImportError as e:
            print(f"B: skipped: it needs transformers ({e})")
            return
        batch = dict(batch=2, seq=32) if args.tiny else bench.PEER_B
        measure("B", f"Work B: one e2e KL training step, GPT-2 {TINY_PEERS_MODEL if args.tiny else bench.PEER_MODEL}, "
                f"{batch['batch']} x {batch['seq']} tokens", *bench.peer_steps_b(torch, model_dir, args.device, batch))


# ---- running the stages ----

def run_stage(name, command, env, result_path, time_limit):
    """Run one stage's command within time_limit seconds (None: no limit): status, seconds, output tail, and its
    results if it wrote any.

    The stage runs in a session of its own, so that a time-out ends it with every process it started (torch.compile's
    workers, say) and frees the GPU for the next stage.
    """
    print(f"[{name}] {' '.join(command[1:])}" + (f" (at most {time_limit} s)" if time_limit else ""), flush=True)
    t0 = time.time()
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as process:
        try:
            output, _ = process.communicate(timeout=time_limit)
            status = "ok" if process.returncode == 0 else f"failed (exit code {process.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            status = f"timed out after {time_limit} s"
        except KeyboardInterrupt:  # Ctrl-C reaches this process only: end the stage's too
            os.killpg(process.pid, signal.SIGKILL)
            raise
    stage = dict(status=status, seconds=round(time.time() - t0, 1), output_tail=output[-OUTPUT_TAIL:])
    if os.path.exists(result_path):
        if result_path.endswith(".xml"):
            stage["results"] = junit_results(result_path)
        else:
            with open(result_path) as f:
                stage["results"] = json.load(f)
    print(f"[{name}] {status} in {stage['seconds']} s", flush=True)
    return stage


def junit_results(path):
    """Counts and failures from pytest's JUnit XML report."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [dict(test=f"{case.get('classname')}::{case.get('name')}", message=(problem.get("message") or "")[:2000])
              for case in suite.iter("testcase") for problem in case if problem.tag in ("failure", "error")]
    return dict(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                failed=failed)


def environment():
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return dict(python=platform.python_version(), torch=version("torch"), triton=version("triton"),
                numpy=version("numpy"), commit=commit.stdout.strip() or None, host=platform.node(),
                time=time.strftime("%Y-%m-%d %H:%M:%S"),
                variables={k: v for k, v in os.environ.items() if k.startswith(("E2ESAE_", "TRITON_"))})


def headline(name, results):
    """The figures of one stage that the summary shows."""
    if not results:
        return "-"
    if name == "tests":
        failed = results["failures"] + results["errors"]
        return f"{results['passed']} passed, {failed} failed, {results['skipped']} skipped"
    if name == "train":
        return "; ".join(f"{p['phase']}: {p['tokens_per_s']:,.0f} tok/s, mfu {100 * p['mfu']:.1f}%"
                         + (f", peak {p['peak_memory_bytes'] / 2**30:.1f} GiB" if p["peak_memory_bytes"] else "")
                         for p in results["phases"])
    if name == "peers":  # per work: this project's first row against the fastest peer's
        shown = []
        for work, w in results["works"].items():
            ours, peers = w["rows"][0], [r for r in w["rows"] if not r["implementation"].startswith("e2esae")]
            best = min(peers, key=lambda r: r["median_ms"]) if peers else None
            shown.append(f"{work}: ours {ours['median_ms']:,.1f} ms" + (
                f" vs {best['implementation'].split(' ')[0]} {best['median_ms']:,.1f} ms" if best else ", no peer"))
        return "; ".join(shown)
    rows = results["results"]
    return f"{sum('ms' in r for r in rows)} rows measured, {sum('error' in r for r in rows)} errors (table above)"


def summary(report):
    """The short table printed last."""
    lines = [f"{'stage':<7} {'status':<34} {'seconds':>8}  figures"]
    for name, stage in report["stages"].items():
        lines.append(f"{name:<7} {stage['status']:<34} {stage['seconds']:>8}  {headline(name, stage.get('results'))}")
    return "\n".join(lines)


def main(args):
    if args.stage == "train":  # inside the train stage's process
        return train_run(args)
    if args.stage == "peers":  # inside the peers stage's process
        return peers_run(args)
    env = dict(os.environ)
    if args.device == "cpu":  # the kernels can run only interpreted there; the tests set this themselves
        env.update(TRITON_INTERPRET="1", E2ESAE_BACKEND="triton")
    shape = ["--device", args.device, "--peak-tflops", str(args.peak_tflops)] + (["--tiny"] if args.tiny else [])
    no_compile = ["--no-compile"] if args.no_compile else []
    report = dict(env=environment(), args=vars(args), stages={})
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        paths = dict(tests=f"{tmp}/tests.xml", train=f"{tmp}/train.json", bench=f"{tmp}/bench.json",
                     peers=f"{tmp}/peers.json")
        commands = dict(
            tests=["-m", "pytest", "tests/test_kernels.py", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={paths['tests']}"],
            train=["gpu_check.py", "--stage", "train", "--out", paths["train"], *shape],
            bench=["bench.py", "--quick", "--out", paths["bench"], *shape, *no_compile],
            peers=["gpu_check.py", "--stage", "peers", "--out", paths["peers"], *shape])
        for name, command in commands.items():  # the time limits are the GPU's: a CPU smoke test has none
            report["stages"][name] = run_stage(name, [sys.executable, *command], env, paths[name],
                                               TIME_LIMITS[name] if args.device == "cuda" else None)
    report["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if report["stages"]["bench"].get("results"):
        import bench as bench_script
        bench_script.print_table(report["stages"]["bench"]["results"]["results"])
    print()
    print(summary(report))
    print(f"\n{report['seconds']:.0f} s in all; everything is in {args.out}")


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
