"""Benchmarks: each kernel and one e2e SAE training step, eager PyTorch vs torch.compile vs Triton.

Times are medians (triton.testing.do_bench on a GPU); memory is the peak allocated during one call above
what was allocated before it (inputs, weights), i.e. what the operation itself adds. Paper shapes: 8 x 1024 =
8,192 tokens, d_in 768, n_dict 46,080 (ratio 60), vocab 50,257, bf16. The targets are in BENCHMARKS.md.

    python bench.py                           # on a GPU: everything, prints a table
    python bench.py --quick --out results.json
    python bench.py --device cpu --tiny       # a smoke test of this script through Triton's interpreter
    python bench.py --data                    # the data path alone (data.py), on the CPU: no CUDA, no Triton
    python bench.py --peers                   # this project against SAELens and sparsify on the CPU (works A-C)
    python bench.py --peers --work A B        # some of them: A, B, C, eval (BENCHMARKS.md, "Peers")
    python bench.py --memory                  # the memory one e2e step needs, per model family (computed)

`python gpu_check.py` runs this with --quick, after the kernel tests and a short training run (BENCHMARKS.md).
--peers compares with `sae-lens` and `eai-sparsify` where they are installed (neither is a dependency of this
project; a missing one is skipped and said so): A, one local TopK SAE training step on given activations; B, one
end-to-end (KL) training step through a 6 x 384 GPT-2; C, a whole local training run on the embedded Shakespeare
(train.py's, SAELens's runner, sparsify's trainer, each in its own process), with train.py's end-of-run
evaluation; eval, e2esae.evaluate's cost per token against a training step's. B and C need `transformers`, C
also `datasets` for the peers.

No `datasets` or `wandb` needed; GPT-2 runs on random weights (speed does not depend on their values). --data
needs `datasets` and pyarrow, and tokenises the embedded corpus into a temporary cache (yours is not touched).
"""
import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, fp32 (for --device cpu)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and cases")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200: 989)")
    p.add_argument("--out", default=None, help="write every result to this JSON file")
    p.add_argument("--data", action="store_true", help="benchmark the data path (data.py) instead, on the CPU")
    p.add_argument("--peers", action="store_true",
                   help="this project against SAELens and sparsify on the CPU (--work: which comparisons)")
    p.add_argument("--memory", action="store_true", help="the memory of one e2e step per model family (computed)")
    p.add_argument("--ratio", type=float, default=16.0, help="--memory: dict_size_to_input_ratio (GPT-2: 60)")
    p.add_argument("--repeats", type=int, default=9, help="--peers: rounds of every implementation in turn")
    p.add_argument("--threads", type=int, default=None, help="--peers: torch.set_num_threads (default: torch's)")
    p.add_argument("--work", nargs="+", choices=["A", "B", "C", "eval"], default=None,
                   help="--peers: which works (default: all)")
    p.add_argument("--runs", type=int, default=3, help="--peers, work C: runs of each tool, in turn")
    p.add_argument("--steps", type=int, default=PEER_C["steps"], help="--peers, work C: training steps per run")
    p.add_argument("--peer-run", choices=["e2esae", "saelens", "sparsify"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- shapes ----

# active: ReLU codes per token, set through the encoder bias; topk: TopK's k (the first alone under --quick)
PAPER = dict(batch=8, seq=1024, d_in=768, ratio=60, vocab=50257, active=40, topk=[32, 64, 128], dtype="bfloat16")
TINY = dict(batch=2, seq=32, d_in=48, ratio=2, vocab=301, active=4, topk=[4, 9], dtype="float32")


# ---- measuring ----

def measure(fn, args, torch, rep_ms):
    """(median ms, extra peak bytes or None) of fn(), warmed up first (autotuning, compilation)."""
    fn()
    if args.device == "cuda":
        from triton.testing import do_bench
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = do_bench(fn, warmup=rep_ms // 4, rep=rep_ms // 4 if args.quick else rep_ms, return_mode="median")
        return ms, peak
    times = []
    for _ in range(2 if args.quick else 3):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), None


def run_case(results, op, variant, fn, args, torch, rep_ms=200, **extra):
    """Measure one (op, variant) for about rep_ms, recording failures (OOM, compile errors) instead of stopping."""
    row = dict(op=op, variant=variant, **extra)
    try:
        row["ms"], row["peak_bytes"] = measure(fn, args, torch, rep_ms)
    except Exception as e:  # noqa: BLE001 - a benchmark reports what broke and goes on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if args.device == "cuda":
            torch.cuda.empty_cache()
    results.append(row)
    shown = f"{row['ms']:9.3f} ms" if "ms" in row else row["error"]
    print(f"  {op:<22} {variant:<26} {shown}", flush=True)


def set_backend(name):
    os.environ["E2ESAE_BACKEND"] = name  # read by sae_kernels at every call


# ---- the operations ----

def sae_tensors(args, shape, torch):
    """Tokens x (N, d_in) and the SAE's weights but the encoder bias: enc_weight, dec_weight, dec_bias (0)."""
    dtype, device = getattr(torch, shape["dtype"]), args.device
    tokens, d_in = shape["batch"] * shape["seq"], shape["d_in"]
    n_dict = d_in * shape["ratio"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d_in, device=device, generator=g).to(dtype)
    enc_weight = (torch.randn(n_dict, d_in, device=device, generator=g) / d_in**0.5).to(dtype)
    dec_weight = torch.randn(d_in, n_dict, device=device, generator=g).to(dtype)
    dec_bias = torch.zeros(d_in, device=device, dtype=dtype)
    return x, enc_weight, dec_weight, dec_bias


def sae_loss(sae, x, params, torch, k=None):
    """The SAE's training loss mse(x_hat, x) + 1e-3 ||c||_1 through sae (sae_forward or its reference)."""
    def loss():
        x_hat, c = sae(x, *params, k=k)
        # c >= 0, so its L1 norm is its sum: a gradient of c.sum() is a broadcast, never an (N, n) tensor
        return (x_hat.float() - x.float()).square().mean() + 1e-3 * c.sum(dtype=torch.float32)
    return loss


def bench_sae(results, args, shape, torch, sae_kernels):
    """SAE forward + backward (weight gradients; x is frozen as in training) at several code densities."""
    from sae_kernels.sae import sae_forward_torch
    x, enc_weight, dec_weight, dec_bias = sae_tensors(args, shape, torch)
    (tokens, d_in), n_dict = x.shape, enc_weight.shape[0]
    pre_sample = (x[:64].float() @ enc_weight.float().t()).flatten()  # (64 * n_dict,) pre-activations
    params = [enc_weight, None, dec_weight, dec_bias]
    loss_of = lambda sae: sae_loss(sae, x, params, torch)

    compiled = None if args.no_compile else torch.compile(loss_of(sae_forward_torch))
    actives = [shape["active"]] if args.quick else [shape["active"], 4 * shape["active"], 16 * shape["active"]]
    for active in actives + ["dense"]:
        if active == "dense":  # as initialised: about half the codes fire
            enc_bias = torch.zeros(n_dict, device=x.device, dtype=x.dtype)
            label = "dense (~50% active)"
        else:  # a threshold that lets `active` codes per token fire on average
            q = torch.quantile(pre_sample[: 2**24], 1 - active / n_dict)
            enc_bias = torch.full((n_dict,), -q.item(), device=x.device, dtype=x.dtype)
            label = f"sparse ({active}/token)"
        params[1] = enc_bias
        for t in params:
            t.requires_grad_(True)
        with torch.no_grad():
            measured = (sae_kernels.sae.sae_forward_torch(x, *params)[1] > 0).sum().item() / tokens
        print(f"SAE {tokens} x {d_in} -> {n_dict}, {label}: {measured:.1f} active codes per token")
        grad = lambda loss: (lambda: torch.autograd.grad(loss(), params))
        op = f"sae fwd+bwd {label}"
        run_case(results, op, "eager", grad(loss_of(sae_forward_torch)), args, torch, active=measured)
        if compiled is not None:
            run_case(results, op, "torch.compile", grad(compiled), args, torch, active=measured)
        set_backend("triton")
        run_case(results, op, "triton", grad(loss_of(sae_kernels.sae_forward)), args, torch, active=measured)
        # The sparse path at any density, on either device: where it crosses eager (the dense reference, the path
        # above the threshold) checks SPARSE_MAX_DENSITY
        sae = sae_kernels.sae
        defaults = sae.SPARSE_MAX_DENSITY, sae.CPU_SPARSE_MAX_DENSITY
        sae.SPARSE_MAX_DENSITY = sae.CPU_SPARSE_MAX_DENSITY = 1.0
        run_case(results, op, "triton, sparse path forced", grad(loss_of(sae_kernels.sae_forward)), args, torch,
                 active=measured)
        sae.SPARSE_MAX_DENSITY, sae.CPU_SPARSE_MAX_DENSITY = defaults


def bench_sae_topk(results, args, shape, torch, sae_kernels):
    """The TopK SAE's forward + backward (x frozen, the ReLU rows' loss) for each k, the encoder bias at 0."""
    from sae_kernels.sae import sae_forward_torch
    x, enc_weight, dec_weight, dec_bias = sae_tensors(args, shape, torch)
    (tokens, d_in), n_dict = x.shape, enc_weight.shape[0]
    enc_bias = torch.zeros(n_dict, device=x.device, dtype=x.dtype)
    params = [enc_weight, enc_bias, dec_weight, dec_bias]
    for t in params:
        t.requires_grad_(True)
    grad = lambda loss: (lambda: torch.autograd.grad(loss(), params))
    for k in shape["topk"][:1] if args.quick else shape["topk"]:
        with torch.no_grad():
            positive = (sae_forward_torch(x, *params, k=k)[1] > 0).sum().item() / tokens
        print(f"SAE {tokens} x {d_in} -> {n_dict}, TopK k = {k}: {positive:.1f} of the k codes per token > 0")
        op = f"sae fwd+bwd topk (k={k})"
        run_case(results, op, "eager", grad(sae_loss(sae_forward_torch, x, params, torch, k)), args, torch,
                 active=positive)
        if not args.no_compile:
            compiled = torch.compile(sae_loss(sae_forward_torch, x, params, torch, k))
            run_case(results, op, "torch.compile", grad(compiled), args, torch, active=positive)
        set_backend("triton")
        run_case(results, op, "triton", grad(sae_loss(sae_kernels.sae_forward, x, params, torch, k)), args, torch,
                 active=positive)


def bench_kl(results, args, shape, torch, sae_kernels):
    """kl_div on whole logits, and linear_kl_div against the unfused eager lm_head + KL."""
    from sae_kernels.kl import kl_div_torch
    dtype, device = getattr(torch, shape["dtype"]), args.device
    tokens, d_in, vocab = shape["batch"] * shape["seq"], shape["d_in"], shape["vocab"]
    g = torch.Generator(device=device).manual_seed(1)
    new = (3 * torch.randn(tokens, vocab, device=device, generator=g)).to(dtype).requires_grad_()
    orig = (3 * torch.randn(tokens, vocab, device=device, generator=g)).to(dtype)
    grad = lambda loss, wrt: (lambda: torch.autograd.grad(loss(), [wrt]))
    op = f"kl_div fwd+bwd {tokens}x{vocab}"
    run_case(results, op, "eager", grad(lambda: kl_div_torch(new, orig), new), args, torch)
    if not args.no_compile:
        compiled = torch.compile(kl_div_torch)
        run_case(results, op, "torch.compile", grad(lambda: compiled(new, orig), new), args, torch)
    set_backend("triton")
    run_case(results, op, "triton", grad(lambda: sae_kernels.kl_div(new, orig), new), args, torch)
    new = orig = None  # the logits are freed before the next case

    h_new = torch.randn(tokens, d_in, device=device, generator=g).to(dtype).requires_grad_()
    h_orig = (h_new.detach() + 0.3 * torch.randn(tokens, d_in, device=device, generator=g)).to(dtype)
    weight = (torch.randn(vocab, d_in, device=device, generator=g) / d_in**0.5).to(dtype)
    unfused = lambda: kl_div_torch(h_new @ weight.t(), h_orig @ weight.t())
    op = f"linear_kl_div fwd+bwd {tokens}x{d_in}x{vocab}"
    run_case(results, op, "eager (unfused)", grad(unfused, h_new), args, torch)
    if not args.no_compile:
        compiled = torch.compile(lambda h, h0, w: kl_div_torch(h @ w.t(), h0 @ w.t()))
        run_case(results, op, "torch.compile (unfused)", grad(lambda: compiled(h_new, h_orig, weight), h_new),
                 args, torch)
    set_backend("torch")
    chunked = grad(lambda: sae_kernels.linear_kl_div(h_new, h_orig, weight), h_new)
    run_case(results, op, "chunked torch reference", chunked, args, torch)
    set_backend("triton")
    run_case(results, op, "triton", grad(lambda: sae_kernels.linear_kl_div(h_new, h_orig, weight), h_new), args, torch)


def e2e_model(shape, tiny, device, torch):
    """GPT-2 small (random weights) with an SAE at blocks.6.hook_resid_pre; tiny: a 4-layer GPT, at blocks.2."""
    from e2esae import SAETransformer
    from model import GPT, GPTConfig
    if tiny:
        config, position = GPTConfig(block_size=shape["seq"], vocab_size=shape["vocab"], n_layer=4, n_head=2,
                                     n_embd=shape["d_in"]), "blocks.2.hook_resid_pre"
    else:
        config, position = GPTConfig(), "blocks.6.hook_resid_pre"  # GPT-2 small
    torch.manual_seed(2)
    return SAETransformer(GPT(config), [position], dict_size_to_input_ratio=shape["ratio"]).to(device), position


def sparse_encoder_bias(model, position, idx, active, torch):
    """An encoder bias under which about `active` codes per token fire on idx: a quantile of the pre-activations."""
    sae = model.sae(position)
    with torch.no_grad():
        x = model.gpt.run_blocks(model.gpt.embed(idx[:1]), 0, model.gpt.resid_index(position))  # (1, T, d)
        pre = (x[0, :64].float() @ sae.encoder.weight.float().t()).flatten()  # (64 * n_dict,)
        return -torch.quantile(pre[: 2**24], 1 - active / sae.n_dict).item()


def bench_train_step(results, args, shape, torch, sae_kernels):
    """One step of e2e training (sparsity 3, KL 1, fused KL path): loss, backward, Adam, under bf16 autocast."""
    import report
    from e2esae import LossConfig, compute_loss
    device = args.device
    model, position = e2e_model(shape, args.tiny, device, torch)
    sae = model.sae(position)
    # A tiny learning rate: every step does Adam's full work without moving the SAE out of its regime.
    optimizer = torch.optim.Adam(model.saes.parameters(), lr=1e-9)
    idx = torch.randint(0, model.gpt.config.vocab_size, (shape["batch"], shape["seq"]), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    tokens = idx.numel()
    flops_per_token = report.flops_per_token(model, local=False)
    loss_config = LossConfig(sparsity_coeff=3.0, kl_coeff=1.0)

    def step_with(loss_fn):
        def step():
            with autocast:
                loss, _ = loss_fn(model, idx, loss_config, full_metrics=False)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    init_bias = sae.encoder.bias.detach().clone()
    sparse_bias = sparse_encoder_bias(model, position, idx, shape["active"], torch)
    for regime in ("as initialised", f"sparse ({shape['active']}/token)"):
        with torch.no_grad():
            if regime == "as initialised":
                sae.encoder.bias.copy_(init_bias)
            else:
                sae.encoder.bias.fill_(sparse_bias)
        op = f"e2e train step, {regime}"
        variants = [("eager", "torch", compute_loss)]
        if not args.no_compile:
            variants.append(("torch.compile", "torch", torch.compile(compute_loss)))
        variants.append(("triton", "triton", compute_loss))
        for variant, backend, loss_fn in variants:
            set_backend(backend)
            run_case(results, op, variant, step_with(loss_fn), args, torch, rep_ms=2000)
            row = results[-1]
            if "ms" in row:
                row["tokens_per_s"] = tokens / (row["ms"] / 1e3)
                row["mfu"] = flops_per_token * row["tokens_per_s"] / (args.peak_tflops * 1e12)
                print(f"  {'':<22} {'':<26} {row['tokens_per_s']:,.0f} tok/s, mfu {100 * row['mfu']:.1f}%")

# ---- the data path (--data): data.SampleStream's tokens/s in one process, on the CPU ----

def best_of(repeats, fn):
    """(tokens, wall seconds, CPU seconds) of the fastest of `repeats` calls of fn() -> tokens. The CPU time is
    this process's (all its threads): on a machine that other jobs share, tokens per CPU-second is what one core
    gives, while the wall clock also counts the time the process waited for a core."""
    best = None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        tokens = fn()
        run = (tokens, time.perf_counter() - t0, time.process_time() - c0)
        best = run if best is None or run[1] < best[1] else best
    return best


def stream_tokens(dataset, n_ctx, n_samples=None, skip=0, **kwargs):
    """The tokens of data.SampleStream(dataset, n_ctx, **kwargs), from its construction to its n_samples-th
    sample after `skip` (or to its end: repeat=False)."""
    from itertools import islice

    import data
    stream = data.SampleStream(dataset, n_ctx, **kwargs).skip(skip)
    return sum(s.numel() for s in (stream if n_samples is None else islice(stream, n_samples)))


def write_rows(folder, column, rows, n_shards):
    """rows as a hub-style parquet dataset: train-0000k-of-0000n.parquet, shard k holding rows k, k + n, ..., and
    a test split of 4 rows (so the held-out rule is 'split', and whole shards can go to each rank)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(folder)
    rows = rows if isinstance(rows, pa.Array) else pa.array(rows)
    for k in range(n_shards):
        path = os.path.join(folder, f"train-{k:05d}-of-{n_shards:05d}.parquet")
        pq.write_table(pa.table({column: rows.take(pa.array(range(k, len(rows), n_shards)))}), path)
    pq.write_table(pa.table({column: rows.slice(0, 4)}), os.path.join(folder, "test-00000-of-00001.parquet"))
    return folder


def bench_data(args):
    """Every row of BENCHMARKS.md's Data section: the token cache, pre-tokenised and raw-text parquet streams at
    1 and 8 ranks (rank 0), the cache's first build, resuming, and one long document. Each row is the fastest of
    3 runs (1 under --quick)."""
    import tempfile

    import numpy as np
    import torch
    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="e2esae-bench-data-")
    os.environ["E2ESAE_CACHE"] = os.path.join(tmp, "cache")  # not yours: the first build is timed
    import data
    n_ctx, copies, repeats = 1024, 2 if args.quick else 8, 1 if args.quick else 3
    data.load_tokenizer()  # loaded once per process: not part of any row
    rows = []

    def row(source, ranks, measured, note=""):
        (tokens, wall, cpu), ranks = measured, f"{ranks} (rank 0)" if ranks != 1 else "1"
        rows.append(dict(source=source, ranks=ranks, tokens=tokens, seconds=wall, cpu_seconds=cpu,
                         tokens_per_s=tokens / wall, tokens_per_cpu_s=tokens / cpu, note=note))
        print(f"  {source:<62} {ranks:<10} {tokens:>11,} tokens {wall:7.3f} s {tokens / wall:>12,.0f} tokens/s"
              f" {tokens / cpu:>12,.0f} per CPU-s  {note}", flush=True)

    def first_build(dataset):  # in a new cache folder, as a new process would
        os.environ["E2ESAE_CACHE"] = tempfile.mkdtemp(dir=tmp)
        data.check_source.cache_clear()
        data.heldout_rule.cache_clear()
        return sum(len(data.token_file(dataset, split)) for split in ("train", "eval"))

    row("raw text: the token cache's first build ('shakespeare')", 1, best_of(repeats, lambda: first_build(
        "shakespeare")))
    train = data.token_file("shakespeare", "train")
    n = copies * 8 * (len(train) // n_ctx)  # samples: several epochs of the cached corpus
    for ranks in (1, 8):
        row("cached token file", ranks, best_of(repeats, lambda r=ranks: stream_tokens(
            "shakespeare", n_ctx, n // r, rank=0, world_size=r)))

    import pyarrow as pa
    ids = np.tile(np.asarray(train[:len(train) // n_ctx * n_ctx], dtype=np.int64), 2 * copies)
    chunks = pa.ListArray.from_arrays(np.arange(0, len(ids) + 1, n_ctx, dtype=np.int32), ids)  # rows of n_ctx tokens
    texts = []  # the plays in documents of about 4,000 characters, cut at a newline
    for play in data.documents("shakespeare", "train"):
        while play:
            cut = play.find("\n", 4000) + 1 or len(play)
            texts, play = texts + [play[:cut]], play[cut:]
    texts *= max(copies // 2, 1)
    sources = [(f"pre-tokenised parquet stream, {k} shards", write_rows(f"{tmp}/ids{k}", "input_ids", chunks, k), k)
               for k in (8, 7)]
    sources += [(f"raw-text parquet stream, {k} shards", write_rows(f"{tmp}/text{k}", "text", texts, k), k)
                for k in (8, 7)]
    for name, folder, shards in sources:
        data.heldout_rule(folder)  # opens the dataset once (datasets' start-up is not the stream's speed)
        for ranks in (1, 8) if shards == 8 else (8,):
            how = "" if ranks == 1 else ("its own shard" if shards % ranks == 0 else "every 8th row")
            row(name, ranks, best_of(repeats, lambda f=folder, r=ranks: stream_tokens(
                f, n_ctx, rank=0, world_size=r, repeat=False)), how)

    def resume(dataset, state, **kwargs):  # a new stream, from the state to its first batch of 8 samples
        stream = data.SampleStream(dataset, n_ctx, **kwargs)
        stream.load_state_dict(state)
        return next(data.batches(stream, 8)).numel()

    far = 400_000_000 // n_ctx  # resume 400M tokens in: arithmetic on the token file
    for ranks in (1, 8):
        state = {"kind": "tokens", "samples": far // ranks, "world_size": ranks}
        measured = best_of(repeats, lambda s=state, r=ranks: resume("shakespeare", s, rank=0, world_size=r))
        row("resume: cached token file, 400M tokens in", ranks, measured,
            f"first batch after {1e3 * measured[1]:.1f} ms")
    for name, folder, _ in (sources[0], sources[2]):
        stream = data.SampleStream(folder, n_ctx)
        done = sum(1 for _ in zip(range(len(chunks) * 9 // 10 if "pre" in name else 2000), stream))
        state = stream.state_dict()
        measured = best_of(repeats, lambda f=folder, s=state: resume(f, s))
        _, replay, _ = best_of(1, lambda f=folder, d=done: stream_tokens(f, n_ctx, 8, skip=d))
        row(f"resume: {name.split(',')[0]}, {done * n_ctx / 1e6:.1f}M tokens in", 1, measured,
            f"first batch after {1e3 * measured[1]:.0f} ms; replaying instead: {replay:.2f} s")

    plays = "\n".join(data.documents("shakespeare", "train"))
    n_ctx = 128  # train.py's default: with short samples, the old quadratic cut was at its worst
    for chars in (700_000, 2_800_000):  # about 200k and 800k tokens
        path = os.path.join(tmp, f"one_document_{chars}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(plays[:chars])
        measured = best_of(repeats, lambda p=path: first_build(p))
        size = f"{measured[0] / 1e3:,.0f}k"
        row(f"one document of {size} tokens: first build", 1, measured)
        row(f"one document of {size} tokens: cached token file, n_ctx 128", 1, best_of(
            repeats, lambda p=path: stream_tokens(p, n_ctx, repeat=False)))
        one = data.token_file(path, "train")
        folder = write_rows(os.path.join(tmp, f"one_row_{chars}"), "input_ids", [np.asarray(one).tolist()], 1)
        data.heldout_rule(folder)
        row(f"one row of {len(one) / 1e3:,.0f}k tokens: pre-tokenised parquet stream, n_ctx 128", 1, best_of(
            repeats, lambda f=folder: stream_tokens(f, n_ctx, repeat=False)))
    return rows


def data_environment():
    import datasets
    import numpy
    import pyarrow
    import tiktoken
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return dict(python=platform.python_version(), torch=torch.__version__, numpy=numpy.__version__,
                datasets=datasets.__version__, tiktoken=tiktoken.__version__, pyarrow=pyarrow.__version__,
                cpu=cpu, cores=os.cpu_count(), load_before=os.getloadavg())


def main_data(args):
    env = data_environment()
    print(json.dumps(env))
    rows = bench_data(args)
    env["load_after"] = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) before {env['load_before']}, after {env['load_after']}\n")
    print("| source | ranks | tokens (rank 0) | s | tokens/s | tokens per CPU-s | |\n|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['source']} | {r['ranks']} | {r['tokens']:,} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_cpu_s']:,.0f} | {r['note']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env=env, results=rows), f, indent=1)
        print(f"wrote {args.out}")


# ---- peers (--peers): this project against SAELens and sparsify on the CPU, works A, B, C and eval ----
#
# A: one local TopK SAE training step on given activations. B: one end-to-end (KL) training step through a model.
# C: a whole small local training run, each tool's own loop in a process of its own. eval: e2esae.evaluate's cost
# per token against a training step's. Within A, B and eval every implementation runs in turn, round after round
# (on a shared machine the load drifts: alternating keeps the comparison fair); C's runs alternate the same way.

# A: N activations of width d_in into n_dict latents, k per token, fp32: SAE forward + MSE + backward + Adam
PEERS = dict(tokens=2048, d_in=768, n_dict=12288, k=32)
# B and C: a 6-layer x 384-wide GPT-2 (random weights, GPT-2's vocabulary) with a TopK SAE (k = 32, 384 x 16 =
# 6,144 latents) at blocks.3.hook_resid_pre, the output of block 2 (sparsify's hookpoint h.2)
PEER_MODEL = dict(n_layer=6, n_embd=384, n_head=6, vocab_size=50257, n_positions=1024)
PEER_SAE = dict(layer=3, ratio=16, k=32)
PEER_B = dict(batch=8, seq=128)  # one e2e step: 8 x 128 tokens
PEER_C = dict(batch=16, seq=128, steps=64, eval_samples=160)  # the run: 64 steps of 16 x 128 tokens
# eval: e2esae.evaluate on one batch of 16 x 128 tokens against training steps on it, on two models
EVAL_MODELS = {"4 x 128 (the embedded default's shape)": (4, 128, 4), "6 x 384": (6, 384, 6)}
EVAL_STEPS = ("local training step", "e2e (KL) training step", "evaluate, a local run's", "evaluate, an e2e run's")


def versions_of(*dists):
    import importlib.metadata
    found = {}
    for dist in dists:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def adam_trainer(torch, params, loss_fn, before_step=None, after_step=None, autocast=None):
    """step(): loss_fn().backward() (the loss under `autocast`, a function returning the context, where given),
    before_step, torch.optim.Adam's step (lr 1e-9: nothing drifts), zero_grad, after_step."""
    optimizer = torch.optim.Adam(params, lr=1e-9)

    def step():
        with autocast() if autocast else contextlib.nullcontext():
            loss = loss_fn()
        loss.backward()
        if before_step:
            before_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step:
            after_step()
    return step


def train_py_step(torch, model, idx, loss_config, max_grad_norm=10.0, dead_window_tokens=131_072, autocast=None):
    """step(): what train.py's loop does in one step of a local TopK run with one micro-step, in the same order
    (read it there): compute_loss with the firing counts and dead masks (the auxiliary-k loss is on by default for
    topk with out_to_in), backward, the step's figures, gradient clipping, the finiteness check, the share of the
    dictionary the gradient reached, Adam, the projection, the dead-element update. Logging every 16 steps and
    checkpoints are left out. autocast: a function returning the context (train.py's bf16 on a GPU)."""
    from e2esae import DeadElements, FeatureCounts, compute_loss
    params = [p for p in model.saes.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-9)
    dead, sums = DeadElements(model, dead_window_tokens), {}

    def step():
        fired, masks = FeatureCounts(model), dead.masks()
        with autocast() if autocast else contextlib.nullcontext():
            loss, metrics = compute_loss(model, idx, loss_config, full_metrics=False, feature_counts=fired,
                                         dead=masks)
        loss.backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.float()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        assert (torch.isfinite(loss) & torch.isfinite(grad_norm)).item()
        for p in model.sae_positions:
            grad = model.sae(p).encoder.weight.grad
            sums[f"reached/{p}"] = sums.get(f"reached/{p}", 0.0) + (grad != 0).any(1).float().mean()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for sae in model.saes.values():
            sae.activation.project_()
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.float()
        dead.step(fired)
        for p, m in dead.masks().items():
            sums[f"dead/{p}"] = sums.get(f"dead/{p}", 0.0) + m.sum().float()
    return step


def peer_steps_a(torch, shape, device="cpu"):
    """Work A. {name: step()} of one training step per implementation, each with its own weights and Adam, on one
    shared batch x; and {name: why} for those skipped. On a GPU (gpu_check.py) every loss runs under bf16 autocast,
    as train.py runs it there (sparsify's forward casts itself), the SAEs' weights in fp32; sparsify's decoder is its
    Triton kernel there, embedding_bag on a CPU."""
    import torch.nn.functional as F

    import sae_kernels
    from e2esae import SAE, LossConfig, SAETransformer
    from model import GPT, GPTConfig
    N, d, n, k = shape["tokens"], shape["d_in"], shape["n_dict"], shape["k"]
    x = torch.randn(N, d, generator=torch.Generator().manual_seed(0)).to(device)
    steps, skipped = {}, {}
    cuda = device == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None
    path = "Triton path" if cuda else "sparse path"

    def own(fused=True, column_major=False):
        torch.manual_seed(1)
        sae = SAE(d, n, activation="topk", k=k).to(device)
        if column_major:  # the same values, stored so that W_dec.t() is contiguous
            sae.decoder.weight = torch.nn.Parameter(sae.decoder.weight.detach().t().contiguous().t())
        if not fused:
            sae.activation.fused = None  # the module path: topk, a dense scatter, a dense decoder matmul
        return sae

    for name, sae in ((f"e2esae SAE(topk), {path} (sae_forward)", own()),
                      (f"e2esae SAE(topk), {path}, W_dec stored column-major", own(column_major=True)),
                      ("e2esae SAE(topk), dense module path (the reference)", own(fused=False))):
        steps[name] = adam_trainer(torch, sae.parameters(), lambda s=sae: F.mse_loss(s(x)[0].float(), x),
                                   autocast=autocast)
    sae = own()
    code_only = lambda: F.mse_loss(sae_kernels.sae_forward_sparse(x, sae.encoder.weight, sae.encoder.bias,
                                                                  sae.decoder.weight, sae.decoder.bias,
                                                                  k=k)[0].float(), x)
    steps["e2esae sae_forward_sparse (PyTorch, no dense c)"] = adam_trainer(torch, sae.parameters(), code_only,
                                                                            autocast=autocast)
    # The same SAE as train.py runs it: the stream at blocks.0.hook_resid_pre of a one-block model of width d_in
    # (the embedding alone runs before it) on 16 x 128 tokens, the loss train.py resolves for --activation=topk
    # --k=32 --kl_coeff=0 --out_to_in_coeff=1 (sparsity 0, aux_k 1/32)
    gpt = GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=1, n_head=12, n_embd=d))
    torch.manual_seed(1)
    model = SAETransformer(gpt, ["blocks.0.hook_resid_pre"], n / d, activation="topk", k=k).to(device).train()
    seq = min(N, 128)
    idx = torch.randint(0, 50257, (N // seq, seq), generator=torch.Generator().manual_seed(0)).to(device)
    steps["e2esae, as train.py's step (compute_loss, aux-k, counts, clipping, ...)"] = train_py_step(
        torch, model, idx, LossConfig(out_to_in_coeff=1.0, aux_k_coeff=1 / 32), autocast=autocast)

    try:
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    except ImportError as e:
        skipped["SAELens"] = f"not installed ({e}): pip install sae-lens"
    else:
        # SAELens's trainer: training_forward_pass (its MSE; no auxiliary loss without a dead-latent mask), backward,
        # then (not timed here) grad-norm clipping and firing statistics, and its optimizer's step. Its sparse option
        # fails in backward with the default rescale_acts_by_decoder_norm=True (sae-lens 6.54, torch 2.13:
        # "Could not run 'aten::view' with arguments from the 'SparseCPU' backend"), so it runs with rescaling off.
        for label, sparse, rescale in (("dense", False, True), ("use_sparse_activations, rescale off", True, False)):
            torch.manual_seed(1)
            cfg = TopKTrainingSAEConfig(d_in=d, d_sae=n, k=k, use_sparse_activations=sparse,
                                        rescale_acts_by_decoder_norm=rescale, dtype="float32", device=device)
            lens = TopKTrainingSAE(cfg).to(device)
            batch = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0,
                                   is_logging_step=False)
            steps[f"SAELens TopKTrainingSAE ({label})"] = adam_trainer(
                torch, lens.parameters(), lambda s=lens, b=batch: s.training_forward_pass(b).loss, autocast=autocast)
    if not cuda:
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU: embedding_bag here
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as e:
        skipped["sparsify"] = f"not installed ({e}): pip install eai-sparsify"
    else:
        # sparsify's trainer (fvu loss): backward, drop the gradient along each decoder row, step, renormalise rows
        torch.manual_seed(1)
        coder = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device)
        decoder = "Triton decoder" if cuda and "SPARSIFY_DISABLE_TRITON" not in os.environ else "eager embedding_bag"
        steps[f"sparsify SparseCoder ({decoder} decoder)"] = adam_trainer(
            torch, coder.parameters(), lambda: coder(x).fvu, coder.remove_gradient_parallel_to_decoder_directions,
            coder.set_decoder_norm_to_unit_norm)
    return steps, skipped


def save_peer_model(path, config=None):
    """PEER_MODEL (or `config`) as a Hugging Face GPT-2 directory (config.json + model.safetensors, random weights,
    seed 0): what model.py, transformers (sparsify) and TransformerLens (SAELens) all load, so that every tool runs
    the same weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**(config or PEER_MODEL))).save_pretrained(path)
    return path


def sparsify_kl_step(torch, hf_model, idx, n_dict, k):
    """step() of sparsify's Trainer.fit with loss_fn='kl' (sparsify 1.3.3, trainer.py), one step of it as fit runs
    it, reproduced here because fit runs whole epochs: the clean logits' softmax over the whole vocabulary; the
    spliced forward pass, the SAE's output written into the hooked layer's output by a forward hook (which first
    renormalises the decoder rows, and records which latents fired); -sum(p_clean log_softmax(spliced logits)),
    averaged over tokens, backward (into the SAE: the model is frozen), the gradient along each decoder row removed,
    Adam, the learning-rate schedule, the dead-latent counts. Its defaults otherwise: no auxiliary loss
    (auxk_alpha 0), no excluded tokens, fp32 on a CPU. (fit initialises b_dec to the batch's mean on its first
    step; the warm-up step stands in for it.)"""
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup
    layer = PEER_SAE["layer"] - 1  # the output of block layer - 1 is the stream entering block `layer`
    module = hf_model.transformer.h[layer]
    torch.manual_seed(1)
    device = idx.device
    coder = SparseCoder(hf_model.config.n_embd, SparseCoderConfig(num_latents=n_dict, k=k), device,
                        dtype=torch.float32)
    optimizer = torch.optim.Adam(coder.parameters(), lr=1e-9)
    scheduler = get_linear_schedule_with_warmup(optimizer, 1000, 10_000)
    since_fired = torch.zeros(n_dict, dtype=torch.long, device=device)
    did_fire = torch.zeros(n_dict, dtype=torch.bool, device=device)
    exclude = torch.tensor([], dtype=torch.long, device=device)
    state = {}

    def hook(module, inputs, outputs):
        aux_out = None
        if isinstance(outputs, tuple):
            outputs, *aux_out = outputs
        out_shape = outputs.shape
        outputs = outputs.flatten(0, 1)
        mask = state["mask"].flatten(0, 1)
        all_outputs = outputs.detach().clone()
        outputs = outputs[mask]
        coder.set_decoder_norm_to_unit_norm()
        out = coder(x=outputs, y=outputs, dead_mask=None)
        did_fire[out.latent_indices.flatten()] = True
        output = all_outputs.clone()
        output[mask] = out.sae_out.type_as(output)
        output = output.reshape(out_shape)
        return (output, *aux_out) if aux_out is not None else output

    def step():
        state["mask"] = torch.isin(idx, exclude, invert=True)
        n_tokens = state["mask"].sum().item()
        clean_probs = hf_model(idx).logits.softmax(dim=-1)
        handle = module.register_forward_hook(hook)
        try:
            dirty_lps = hf_model(idx).logits.log_softmax(dim=-1)
            kl = -torch.sum(clean_probs * dirty_lps, dim=-1).mean()
            kl.backward()
            float(kl.detach())
        finally:
            handle.remove()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        with torch.no_grad():
            since_fired.add_(n_tokens)
            since_fired[did_fire] = 0
            did_fire.zero_()
    return step


def peer_steps_b(torch, model_dir, device="cpu", batch=None):
    """Work B. {name: step()} of one e2e KL training step, this project's and sparsify's, on the same model weights
    and tokens (batch: PEER_B unless given); {name: why} for those skipped. On a GPU (gpu_check.py) each runs as
    its own training does: ours under bf16 autocast (the model's weights in fp32), sparsify's model loaded in bf16
    as its CLI loads it there."""
    from e2esae import LossConfig, SAETransformer, compute_loss
    from model import GPT
    position, k, batch = f"blocks.{PEER_SAE['layer']}.hook_resid_pre", PEER_SAE["k"], batch or PEER_B
    steps, skipped = {}, {}
    cuda = device == "cuda"
    torch.manual_seed(1)
    model = SAETransformer(GPT.from_pretrained(model_dir), [position], PEER_SAE["ratio"], activation="topk", k=k)
    model.to(device).train()
    n_dict = model.sae(position).n_dict
    idx = torch.randint(0, model.gpt.config.vocab_size, (batch["batch"], batch["seq"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    loss_config = LossConfig(kl_coeff=1.0)
    steps["e2esae compute_loss (kl_coeff 1, fused chunked KL), backward, Adam"] = adam_trainer(
        torch, model.saes.parameters(), lambda: compute_loss(model, idx, loss_config, full_metrics=False)[0],
        autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None)
    if not cuda:
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        import sparsify  # noqa: F401
        from transformers import GPT2LMHeadModel
    except ImportError as e:
        skipped["sparsify"] = f"not installed ({e}): pip install eai-sparsify"
    else:
        hf_model = GPT2LMHeadModel.from_pretrained(model_dir).to(device, torch.bfloat16 if cuda else torch.float32)
        hf_model = hf_model.eval().requires_grad_(False)  # fit freezes it too
        steps["sparsify Trainer.fit's step, loss_fn='kl' (whole logits), Adam"] = sparsify_kl_step(
            torch, hf_model, idx, n_dict, k)
    return steps, skipped


def eval_steps(torch, layers, width, heads):
    """Work eval. {name: step()}: a local and an e2e training step (compute_loss, backward, Adam) and
    e2esae.evaluate (of a local and of an e2e run) on the same 16 x 128 random tokens, a GPT-2 of `layers` x
    `width` (random weights, GPT-2's vocabulary), a TopK SAE (k 32, ratio 16) at the middle layer."""
    from e2esae import LossConfig, SAETransformer, compute_loss, evaluate
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=layers, n_head=heads, n_embd=width))
    model = SAETransformer(gpt, [f"blocks.{layers // 2}.hook_resid_pre"], 16, activation="topk", k=32).train()
    idx = torch.randint(0, 50257, (PEER_C["batch"], PEER_C["seq"]), generator=torch.Generator().manual_seed(0))
    local, e2e = LossConfig(out_to_in_coeff=1.0), LossConfig(kl_coeff=1.0)

    def train(loss_config):
        return adam_trainer(torch, model.saes.parameters(),
                            lambda: compute_loss(model, idx, loss_config, full_metrics=False)[0])
    return {"local training step": train(local), "e2e (KL) training step": train(e2e),
            "evaluate, a local run's": lambda: evaluate(model, [idx], local),
            "evaluate, an e2e run's": lambda: evaluate(model, [idx], e2e)}


def fresh_peak(layers, width, heads, name, threads=None):
    """In a process of its own (spawned): the bytes by which two calls of eval_steps(...)[name] raise its peak
    resident memory above its resident memory once the model is built: what that step needs, with no memory the
    allocator kept from another step."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    set_backend("torch")
    step = eval_steps(torch, layers, width, heads)[name]
    return peak_rss_of(lambda: (step(), step()))


def fresh_peaks(names, layers, width, heads, threads=None):
    """{name: fresh_peak(...)}, one spawned process each, one after the other."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    peaks = {}
    for name in names:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            peaks[name] = pool.submit(fresh_peak, layers, width, heads, name, threads).result()
    return peaks


def peak_rss_of(fn):
    """Bytes by which one call of fn raises this process's peak resident memory above its resident memory before
    (Linux: /proc/self/clear_refs resets the peak); None elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = proc_status("VmRSS:")
    fn()
    return proc_status("VmHWM:") - before


def proc_status(key):
    """A figure of /proc/self/status in bytes (VmRSS: resident now, VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def in_rounds(steps, repeats):
    """{name: [ms]}: every step once to warm up (optimizer state, first allocations), then `repeats` rounds of every
    one in turn, each round starting one further along."""
    names = list(steps)
    for name in names:
        steps[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(1e3 * (time.perf_counter() - t0))
        print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{times[n][-1]:,.0f}" for n in names), flush=True)
    return times


def step_rows(steps, times, peaks=None):
    """One row per implementation: min and median ms, every time, and the peak memory of one more step (or
    `peaks`' figure)."""
    return [dict(implementation=n, min_ms=min(times[n]), median_ms=statistics.median(times[n]),
                 peak_bytes=peaks[n] if peaks else peak_rss_of(steps[n]), times_ms=times[n]) for n in steps]


def print_step_table(title, rows, env, baselines=None, peak_label="peak MB above the step's start"):
    """A markdown table of step rows, each median also as a ratio: to each of `baselines` (names of rows), or by
    default to the fastest row not of this project (the fastest peer)."""
    if baselines:
        bases = [(f"{name}'s", next(r["median_ms"] for r in rows if r["implementation"] == name)) for name in baselines]
    else:
        peers = [r["median_ms"] for r in rows if not r["implementation"].startswith("e2esae")]
        bases = [("fastest peer's", min(peers) if peers else rows[0]["median_ms"])]
    print(f"\n{title}; {len(rows[0]['times_ms'])} rounds, CPU ({env['cores']} cores, {env['threads']} threads); "
          f"load average before {fmt_load(env['load_before'])}, after {fmt_load(env['load_after'])}\n")
    print("| implementation | min ms | median ms | " + " | ".join(f"median / {b}" for b, _ in bases)
          + f" | {peak_label} |")
    print("|---|---:|---:|" + "---:|" * len(bases) + "---:|")
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:,.0f}" if r["peak_bytes"] is not None else "-"
        print(f"| {r['implementation']} | {r['min_ms']:,.0f} | {r['median_ms']:,.0f} | "
              + " | ".join(f"{r['median_ms'] / ms:.2f}" for _, ms in bases) + f" | {peak} |")


def fmt_load(load):
    return " ".join(f"{v:.2f}" for v in load)


# ---- work C: whole runs, each in a process of its own ----

def peer_run(args):
    """Inside the process of one of work C's runs (--peer-run NAME): train, then write what was measured to
    args.out. Every tool's optimiser is torch.optim.Adam: a global post-step hook records when each step ends."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    if args.threads:
        torch.set_num_threads(args.threads)
    steps_end, result = [], dict(tool=args.peer_run)
    register_optimizer_step_post_hook(lambda *_: steps_end.append(time.perf_counter()))
    t0 = time.perf_counter()
    n_steps, batch, seq = args.steps, PEER_C["batch"], PEER_C["seq"]
    position, k = f"blocks.{PEER_SAE['layer']}.hook_resid_pre", PEER_SAE["k"]
    n_dict = PEER_MODEL["n_embd"] * PEER_SAE["ratio"]
    work = os.path.dirname(args.out)
    if args.peer_run == "e2esae":
        import train
        evaluate = train.evaluate

        def timed_evaluate(*a, **kw):  # the evaluation's time, and its own peak (the training's recorded first)
            result["train_peak_bytes"] = proc_status("VmHWM:")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            e0 = time.perf_counter()
            out = evaluate(*a, **kw)
            result["eval_s"] = result.get("eval_s", 0.0) + time.perf_counter() - e0
            result["eval_peak_bytes"] = proc_status("VmHWM:")
            return out
        train.evaluate = timed_evaluate
        train.main([f"--init_from={args.model_dir}", "--dataset=shakespeare", f"--sae_positions=['{position}']",
                    f"--dict_size_to_input_ratio={float(PEER_SAE['ratio'])}", "--activation=topk", f"--k={k}",
                    "--kl_coeff=0.0", "--out_to_in_coeff=1.0", f"--n_samples={n_steps * batch}",
                    f"--batch_size={batch}", f"--n_ctx={seq}", f"--eval_n_samples={PEER_C['eval_samples']}",
                    f"--eval_every_n_samples={n_steps * batch}", f"--save_every_n_samples={n_steps * batch}",
                    f"--out_dir={work}/e2esae-out", "--overwrite=True", "--device=cpu"])
    else:
        from itertools import islice

        import datasets

        import data
        samples = [s.tolist() for s in islice(data.SampleStream("shakespeare", seq, "train"), n_steps * batch)]
        if args.peer_run == "saelens":
            from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
            from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
            cfg = LanguageModelSAERunnerConfig(
                sae=TopKTrainingSAEConfig(d_in=PEER_MODEL["n_embd"], d_sae=n_dict, k=k), model_name="peer-gpt2",
                hook_name=position, dataset_path="local", is_dataset_tokenized=True, streaming=False,
                context_size=seq, training_tokens=n_steps * batch * seq, train_batch_size_tokens=batch * seq,
                store_batch_size_prompts=batch, prepend_bos=False, device="cpu",
                logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
                output_path=f"{work}/saelens-out")
            runner = LanguageModelSAETrainingRunner(cfg, override_dataset=datasets.Dataset.from_dict(
                {"input_ids": samples}), override_model=hooked_transformer(args.model_dir))
            runner.run()
        else:
            os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
            from sparsify import SparseCoderConfig, TrainConfig, Trainer
            from transformers import GPT2Model  # sparsify's CLI loads AutoModel, no LM head, for loss_fn='fvu'
            cfg = TrainConfig(SparseCoderConfig(num_latents=n_dict, k=k), batch_size=batch,
                              layers=[PEER_SAE["layer"] - 1], loss_fn="fvu", optimizer="adam", log_to_wandb=False,
                              save_dir=f"{work}/sparsify-out")
            dataset = datasets.Dataset.from_dict({"input_ids": samples}).with_format("torch")
            Trainer(cfg, dataset, GPT2Model.from_pretrained(args.model_dir)).fit()
    result.update(run_s=time.perf_counter() - t0, steps_end=[t - t0 for t in steps_end],
                  peak_bytes=max(proc_status("VmHWM:"), result.get("train_peak_bytes", 0)))
    with open(args.out, "w") as f:
        json.dump(result, f)


def hooked_transformer(model_dir):
    """The GPT-2 directory as a TransformerLens HookedTransformer (what SAELens trains on), built offline from its
    config and weights, unprocessed (no folded layer norms or centred weights): the same function as the others."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(model_dir)
    c = hf.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
                                  d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
                                  normalization_type="LN", eps=c.layer_norm_epsilon, default_prepend_bos=False)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False)
    return model.eval()


def peer_runs_c(args, tmp, model_dir):
    """Work C: every tool's run in turn, args.runs rounds, each run a fresh process (`bench.py --peer-run`).
    Returns one row per tool and {tool: why} for those skipped."""
    import subprocess
    tools, skipped = {"e2esae": "e2esae train.py (local TopK, with its end-of-run evaluation)"}, {}
    for tool, module, label in (("saelens", "sae_lens", "SAELens LanguageModelSAETrainingRunner (no evaluation)"),
                                ("sparsify", "sparsify", "sparsify Trainer.fit, loss_fn='fvu' (no evaluation)")):
        if importlib.util.find_spec(module) is None or importlib.util.find_spec("datasets") is None:
            skipped[tool] = f"{module} or datasets not installed"
        else:
            tools[tool] = label
    runs = {tool: [] for tool in tools}
    names = list(tools)
    for r in range(args.runs):
        for tool in names[r % len(names):] + names[:r % len(names)]:
            out, log = f"{tmp}/{tool}-{r}.json", f"{tmp}/{tool}-{r}.log"
            command = [sys.executable, os.path.abspath(__file__), "--peers", "--peer-run", tool, "--model-dir",
                       model_dir, "--steps", str(args.steps), "--out", out]
            command += ["--threads", str(args.threads)] if args.threads else []
            t0 = time.perf_counter()
            with open(log, "w") as f:
                done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
            wall = time.perf_counter() - t0
            if done.returncode != 0 or not os.path.exists(out):
                with open(log) as f:
                    tail = f.read()[-3000:]
                sys.exit(f"work C: the {tool} run failed (exit code {done.returncode}); its output ends:\n{tail}")
            with open(out) as f:
                run = json.load(f)
            run["wall_s"] = wall
            runs[tool].append(run)
            print(f"  run {r + 1}/{args.runs} {tool}: {wall:.1f} s in all, {run_summary(run)}", flush=True)
    return [dict(implementation=tools[t], **run_figures(runs[t])) for t in names], skipped


def run_summary(run):
    ends = run["steps_end"]
    gaps = [1e3 * (b - a) for a, b in zip(ends, ends[1:])]
    return (f"{len(ends)} steps, median {statistics.median(gaps):,.0f} ms"
            + (f", evaluation {run['eval_s']:.1f} s" if "eval_s" in run else "")
            + f", peak {run['peak_bytes'] / 2**30:.2f} GiB")


def run_figures(runs):
    """The medians over a tool's runs: step time (each run's median and mean gap between consecutive optimiser steps,
    so steps 2..n; the first step also carries the start), the training loop (first step's start to last step's
    end, the first step counted at the mean), the evaluation, the whole process, and its peak memory."""
    per_run = []
    for run in runs:
        ends = run["steps_end"]
        gaps = [b - a for a, b in zip(ends, ends[1:])]
        mean = statistics.mean(gaps)
        per_run.append(dict(step_median_ms=1e3 * statistics.median(gaps), step_mean_ms=1e3 * mean,
                            steps=len(ends), loop_s=ends[-1] - ends[0] + mean, eval_s=run.get("eval_s"),
                            wall_s=run["wall_s"], peak_bytes=run["peak_bytes"],
                            eval_peak_bytes=run.get("eval_peak_bytes"), train_peak_bytes=run.get("train_peak_bytes")))
    figures = {k: (statistics.median(r[k] for r in per_run) if per_run[0][k] is not None else None)
               for k in per_run[0]}
    return dict(figures, runs=per_run)


def busy_processes(seconds=1.0):
    """The other processes that used at least half a core over `seconds` (Linux /proc): [(pid, share of a core,
    command)], what shares the machine with the benchmark."""
    def cpu_ticks():
        ticks = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                ticks[int(pid)] = int(fields[11]) + int(fields[12])  # utime + stime
            except (OSError, IndexError):
                pass
        return ticks
    if not os.path.isdir("/proc"):
        return []
    before = cpu_ticks()
    time.sleep(seconds)
    after, hz, busy = cpu_ticks(), os.sysconf("SC_CLK_TCK"), []
    for pid, t in after.items():
        share = (t - before.get(pid, t)) / hz / seconds
        if pid != os.getpid() and share >= 0.5:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
            except OSError:
                command = "?"
            busy.append((pid, round(share, 2), command))
    return busy


def main_peers(args):
    """Works A, B, eval and C (args.work), each printed as a markdown table when done; everything to args.out."""
    import tempfile

    import torch
    set_backend("torch")  # the PyTorch path over the selected pairs, as on any CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    env = dict(python=platform.python_version(), **versions_of("torch", "sae-lens", "eai-sparsify", "transformers",
                                                               "transformer-lens"),
               cores=os.cpu_count(), threads=torch.get_num_threads(), others=busy_processes(),
               load_before=os.getloadavg())
    print(json.dumps(env))
    print(f"{len(env['others'])} other processes busy (>= half a core each) at the start:")
    for pid, share, command in env["others"]:
        print(f"  {pid} {share:.2f} {command}")
    works = args.work or ["A", "B", "eval", "C"]
    repeats, results = 3 if args.quick else args.repeats, {}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(env=env, results=results), f, indent=1)

    def run_steps(title, steps, skipped, baselines=None, peaks=None):
        for name, why in skipped.items():
            print(f"skipped {name}: {why}")
        load_before = os.getloadavg()
        times = in_rounds(steps, repeats)
        rows = step_rows(steps, times, peaks() if peaks else None)
        work_env = dict(env, load_before=load_before, load_after=os.getloadavg())
        print_step_table(title, rows, work_env, baselines, "peak MB above the model's (a process each)" if peaks
                         else "peak MB above the step's start")
        return dict(load_before=load_before, load_after=work_env["load_after"], skipped=skipped, rows=rows)

    with tempfile.TemporaryDirectory(prefix="e2esae-peers-") as tmp:
        model_dir = None
        if {"B", "C"} & set(works):
            try:
                model_dir = save_peer_model(os.path.join(tmp, "gpt2-6x384"))
            except ImportError as e:
                print(f"skipped works B and C: they need transformers ({e})")
        if "A" in works:
            print(f"\nwork A: one TopK SAE training step, {PEERS}")
            steps, skipped = peer_steps_a(torch, PEERS)
            results["A"] = run_steps(
                f"Work A: one TopK SAE training step, {PEERS['tokens']:,} x {PEERS['d_in']} activations, "
                f"{PEERS['n_dict']:,} latents, k = {PEERS['k']}, fp32", steps, skipped)
            del steps
            save()
        if "B" in works and model_dir:
            print(f"\nwork B: one e2e KL training step, GPT-2 {PEER_MODEL}, SAE {PEER_SAE}, {PEER_B}")
            steps, skipped = peer_steps_b(torch, model_dir)
            results["B"] = run_steps(
                f"Work B: one e2e (KL) training step, GPT-2 {PEER_MODEL['n_layer']} x {PEER_MODEL['n_embd']} "
                f"(vocabulary {PEER_MODEL['vocab_size']:,}), TopK SAE (k = {PEER_SAE['k']}, "
                f"{PEER_MODEL['n_embd'] * PEER_SAE['ratio']:,} latents) at blocks.{PEER_SAE['layer']}.hook_resid_pre, "
                f"{PEER_B['batch']} x {PEER_B['seq']} tokens, fp32", steps, skipped)
            del steps
            save()
        if "eval" in works:
            results["eval"] = {}
            for label, (layers, width, heads) in EVAL_MODELS.items():
                print(f"\nwork eval: e2esae.evaluate against training steps, GPT-2 {label}")
                results["eval"][label] = run_steps(
                    f"Evaluation against training, GPT-2 {label} (vocabulary 50,257, random weights), TopK SAE "
                    f"(k = 32, {16 * width:,} latents) at blocks.{layers // 2}.hook_resid_pre, one batch of "
                    f"{PEER_C['batch']} x {PEER_C['seq']} tokens, fp32", eval_steps(torch, layers, width, heads), {},
                    baselines=["local training step", "e2e (KL) training step"],
                    peaks=lambda n=layers, w=width, h=heads: fresh_peaks(EVAL_STEPS, n, w, h, args.threads))
                save()
        if "C" in works and model_dir:
            print(f"\nwork C: whole local runs, {args.runs} of each tool, {args.steps} steps of "
                  f"{PEER_C['batch']} x {PEER_C['seq']} tokens")
            load_before = os.getloadavg()
            rows, skipped = peer_runs_c(args, tmp, model_dir)
            results["C"] = dict(load_before=load_before, load_after=os.getloadavg(), skipped=skipped, rows=rows)
            for name, why in skipped.items():
                print(f"skipped {name}: {why}")
            print_run_table(args, rows, dict(env, **results["C"]))
            save()
    if args.out:
        print(f"wrote {args.out}")


def print_run_table(args, rows, env):
    peers = [r for r in rows if not r["implementation"].startswith("e2esae")] or rows
    fastest_step = min(r["step_median_ms"] for r in peers)
    fastest_run = min(r["wall_s"] for r in peers)
    print(f"\nWork C: a local TopK training run, GPT-2 {PEER_MODEL['n_layer']} x {PEER_MODEL['n_embd']} (random "
          f"weights), SAE (k = {PEER_SAE['k']}, {PEER_MODEL['n_embd'] * PEER_SAE['ratio']:,} latents) at "
          f"blocks.{PEER_SAE['layer']}.hook_resid_pre, {args.steps} steps of {PEER_C['batch']} x {PEER_C['seq']} "
          f"tokens of the embedded Shakespeare; medians of {args.runs} runs per tool, alternated; CPU "
          f"({env['cores']} cores); load average before {fmt_load(env['load_before'])}, after "
          f"{fmt_load(env['load_after'])}\n")
    print("| run | step, median ms | step, mean ms | training loop s | evaluation s | whole run s | peak GiB | "
          "step / fastest peer's | whole run / fastest peer's |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        evaluation = f"{r['eval_s']:.1f}" if r["eval_s"] is not None else "none"
        print(f"| {r['implementation']} | {r['step_median_ms']:,.0f} | {r['step_mean_ms']:,.0f} | {r['loop_s']:.1f} | "
              f"{evaluation} | {r['wall_s']:.1f} | {r['peak_bytes'] / 2**30:.2f} | "
              f"{r['step_median_ms'] / fastest_step:.2f} | {r['wall_s'] / fastest_run:.2f} |")


# ---- report ----

def print_table(results):
    eager = {}
    for r in results:
        if r["variant"].startswith("eager") and "ms" in r:
            eager[r["op"]] = r
    print(f"\n{'operation':<52} {'variant':<28} {'ms':>9} {'x eager':>8} {'peak MB':>9} {'/ eager':>8}")
    for r in results:
        base = eager.get(r["op"])
        if "ms" not in r:
            print(f"{r['op']:<52} {r['variant']:<28} {r['error']}")
            continue
        speedup = f"{base['ms'] / r['ms']:.2f}" if base else "-"
        mb = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") is not None else "-"
        mem = (f"{r['peak_bytes'] / base['peak_bytes']:.2f}"
               if base and r.get("peak_bytes") is not None and base.get("peak_bytes") else "-")
        extra = f"  {r['tokens_per_s']:,.0f} tok/s, mfu {100 * r['mfu']:.1f}%" if "tokens_per_s" in r else ""
        print(f"{r['op']:<52} {r['variant']:<28} {r['ms']:9.3f} {speedup:>8} {mb:>9} {mem:>8}{extra}")


# ---- the memory of one e2e+ds step (--memory): computed from the models' published configs, not measured ----

# hub id: (layers, width, vocabulary, parameters) as each model's config.json and model card give them
MEMORY_MODELS = {
    "gpt2": (12, 768, 50_257, 124e6),
    "EleutherAI/pythia-160m": (12, 768, 50_304, 162e6),
    "HuggingFaceTB/SmolLM2-135M": (30, 576, 49_152, 135e6),
    "meta-llama/Llama-3.2-1B": (16, 2048, 128_256, 1.24e9),
    "Qwen/Qwen3-0.6B": (28, 1024, 151_936, 0.60e9),
    "google/gemma-3-1b-pt": (26, 1152, 262_144, 1.00e9),
    "google/gemma-2-2b": (26, 2304, 256_000, 2.61e9),
    "mistralai/Mistral-7B-v0.1": (32, 4096, 32_000, 7.24e9),
}


def step_memory(layers, width, vocab, params, ratio, tokens=8 * 1024, chunk_logits=2**25):
    """GB of one e2e+ds training step with the SAE at the middle layer: the frozen model in bf16 (2 bytes a
    parameter); the SAE's parameters, gradients and Adam's two moments in fp32 (16 bytes a parameter); its
    pre-activations and their gradient (2 x tokens x n_dict, bf16); the activations kept for the backward pass
    through the spliced layers after the SAE (about 34 x width bytes per token and layer in bf16, attention
    without its T x T matrix, as with FlashAttention); the KL's chunk of logits for both models and the gradient
    of the final stream. The clean pass runs without gradients: it keeps nothing."""
    n_dict = int(ratio * width)
    parts = dict(model=2 * params, sae_and_adam=16 * (2 * n_dict * width + n_dict + width),
                 sae_codes=2 * 2 * tokens * n_dict, kept_for_backward=34 * width * tokens * (layers - layers // 2),
                 logits=2 * 2 * chunk_logits + 2 * tokens * width)
    return {k: v / 1e9 for k, v in parts.items()}, n_dict


def main_memory(args):
    print("one e2e+ds training step of 8 samples x 1,024 tokens, the SAE at the middle layer, bf16 (GB, computed)")
    print(f"{'model':<28} {'n_dict':>8} {'model':>6} {'SAE+Adam':>9} {'codes':>6} {'backward':>9} {'logits':>7}"
          f" {'total':>6}")
    for name, (layers, width, vocab, params) in MEMORY_MODELS.items():
        ratio = 60.0 if name == "gpt2" else args.ratio  # the paper's for GPT-2 small
        parts, n_dict = step_memory(layers, width, vocab, params, ratio)
        print(f"{name:<28} {n_dict:>8,} {parts['model']:>6.1f} {parts['sae_and_adam']:>9.1f} "
              f"{parts['sae_codes']:>6.1f} {parts['kept_for_backward']:>9.1f} {parts['logits']:>7.2f} "
              f"{sum(parts.values()):>6.1f}")


def main(args):
    import torch  # imported here, after TRITON_INTERPRET is settled (see the bottom of the file)
    import triton

    import sae_kernels
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run `python bench.py --device cpu --tiny` for a smoke test")
    shape = TINY if args.tiny else PAPER
    env = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
               device=torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
               shape=shape, quick=args.quick, autotune=sae_kernels.backend.AUTOTUNE)
    print(json.dumps(env))
    results = []
    for section in (bench_sae, bench_sae_topk, bench_kl, bench_train_step):
        section(results, args, shape, torch, sae_kernels)
        if args.out:  # after every section: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(dict(env=env, results=results), f, indent=1)
    print_table(results)
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    if args.data:  # no kernels, no Triton, no CUDA
        main_data(args)
        sys.exit()
    if args.peers:  # the PyTorch path on the CPU: no CUDA, no Triton
        set_backend("torch")
        peer_run(args) if args.peer_run else main_peers(args)
        sys.exit()
    if args.memory:  # arithmetic only
        main_memory(args)
        sys.exit()
    if args.device == "cpu":  # the kernels can only run interpreted; this must precede importing triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    main(args)
