"""
Train sparse autoencoders spliced into GPT-2: local, end-to-end, end-to-end + downstream, or any mix.

    python train.py                                            # the embedded default: offline, on a CPU, minutes
    python train.py config/e2e_layer6.py                       # a run of the paper (GPT-2 small, OpenWebText)
    python train.py config/e2e_layer6.py --sparsity_coeff=5    # any setting overridden on the command line
    python train.py config/e2e_layer6.py --resume=True         # continue an interrupted run from out_dir
    torchrun --nproc_per_node=8 train.py config/e2e_layer6.py  # data parallel on 8 GPUs

The defaults below describe the embedded run: a small GPT-2 trained from scratch on Shakespeare (cached after the
first run; see train_gpt.py) gets an end-to-end SAE at its middle layer. The paper's runs live in config/.
Each step: a batch of token ids -> compute_loss (e2esae.py) -> backward into the SAEs only -> Adam.
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from itertools import islice

import torch
import torch.distributed as dist

import data
from configurator import ConfigError, configure, print_config
from e2esae import FeatureCounts, SAETransformer, compute_loss, training_type
from model import GPT
from train_gpt import get_lr, small_model

# -----------------------------------------------------------------------------
# model and SAEs
init_from = "shakespeare"  # 'gpt2' (-medium, -large, -xl) | a directory with config.json + model.safetensors |
#                            'shakespeare': the small model of the embedded default, trained and cached on first use
small_model_config = ""  # with 'shakespeare': a train_gpt.py config file for that model, if it must be trained
sae_positions = ["blocks.2.hook_resid_pre"]
dict_size_to_input_ratio = 16.0  # n_dict = 16 x 128 = 2,048 dictionary elements
# loss: sum of coefficient x term (e2esae.py's docstring has the formulas)
sparsity_coeff = 1.0
p_norm = 1.0
kl_coeff = 1.0
in_to_orig_coeff = 0.0
in_to_orig_positions = []  # e.g. every later blocks.{i}.hook_resid_pre; the coefficient is split evenly over them
out_to_in_coeff = 0.0
out_to_orig_coeff = 0.0
# data
dataset = "shakespeare"  # 'shakespeare' | a file, directory or glob of text files | a Hugging Face dataset name
n_ctx = 128
# optimisation: counted in samples (sequences of n_ctx tokens), as the paper counts them
n_samples = 2_048  # 2,048 samples x 128 tokens = 262,144 training tokens
batch_size = 16  # per process and micro-step
gradient_accumulation_steps = 1
lr = 3e-3
warmup_samples = 128
min_lr_factor = 0.1  # cosine decay to 0.1 x lr
max_grad_norm = 10.0
# evaluation, logging, checkpoints
eval_every_n_samples = 1_024
eval_n_samples = 160  # held-out samples; alive features are counted over these tokens
save_every_n_samples = 1_024
log_every_n_steps = 16
out_dir = "out"
resume = False
wandb_log = False
wandb_project = "e2esae"
wandb_run_name = ""
# system
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
compile = False  # torch.compile the GPT's blocks (pays off on a GPU for long runs)
peak_flops = 989e12  # for MFU: an H100's dense bf16 peak
# -----------------------------------------------------------------------------

DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, list))}
LOSS_KEYS = ("sparsity_coeff", "p_norm", "kl_coeff", "in_to_orig_coeff", "in_to_orig_positions", "out_to_in_coeff",
             "out_to_orig_coeff")


def check_config(c):
    """What can be checked before loading anything."""
    if c.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {c.dtype!r}")
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={c.device!r} but no CUDA GPU is available; use --device=cpu")
    for key in ("n_ctx", "n_samples", "batch_size", "gradient_accumulation_steps", "eval_n_samples",
                "eval_every_n_samples", "save_every_n_samples", "log_every_n_steps"):
        if getattr(c, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {getattr(c, key)}")
    for key in ("sae_positions", "in_to_orig_positions"):
        if not all(isinstance(p, str) for p in getattr(c, key)):
            raise ConfigError(f"{key} must be a list of position names like 'blocks.6.hook_resid_pre'")
    if not c.sae_positions:
        raise ConfigError("sae_positions is empty: name at least one position, e.g. ['blocks.6.hook_resid_pre']")


def estimate_flops_per_token(model, local):
    """Dense FLOPs of one training step per token (matmuls only), for MFU. The frozen GPT's backward computes
    input gradients only (one matmul per forward matmul); the SAE's backward also computes weight gradients."""
    cfg, gpt = model.gpt.config, model.gpt
    block = 2 * sum(p.numel() for p in gpt.transformer.h[0].parameters() if p.dim() == 2)  # 2 FLOPs per MAC
    head = 2 * cfg.n_embd * cfg.vocab_size
    first = min(gpt.resid_index(p) for p in model.sae_positions)
    last = max(gpt.resid_index(p) for p in model.sae_positions)
    sae = sum(6 * 2 * s.d_in * s.n_dict for s in model.saes.values())  # encode + decode, forward and backward
    if local:
        return last * block + sae
    after = (cfg.n_layer - first) * block + head
    return first * block + after + 2 * after + sae  # shared prefix, clean rest, spliced rest forward + backward


def main(argv):
    c = type("Config", (), {})()
    config = configure(DEFAULTS, argv)
    c.__dict__.update(config)
    check_config(c)

    # distributed data parallel: one process per GPU under torchrun, each reading its own shard of the data
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world_size = 0, 1
    if ddp:
        dist.init_process_group("nccl" if c.device.startswith("cuda") else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if c.device.startswith("cuda"):
            c.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(c.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device_type = "cuda" if c.device.startswith("cuda") else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c.dtype]
    autocast = torch.autocast(device_type, dtype=ptdtype) if device_type == "cuda" and c.dtype != "float32" else nullcontext()

    log("config:")
    if master:
        print_config(config)

    # the model: a frozen GPT-2 and the SAEs (the same initialisation on every rank)
    if c.init_from == "shakespeare":
        path = small_model(c.small_model_config) if master else None  # rank 0 trains it, if it must
        if ddp:
            dist.barrier()
        path = path or small_model(c.small_model_config)
    else:
        path = c.init_from
    torch.manual_seed(c.seed)
    gpt = GPT.from_pretrained(path)
    try:
        model = SAETransformer(gpt, c.sae_positions, c.dict_size_to_input_ratio).to(c.device)
    except ValueError as e:
        raise ConfigError(str(e))
    loss_kwargs = {k: config[k] for k in LOSS_KEYS}
    try:  # the loss's own checks, on a dry run of one short sequence, before any work that counts
        with torch.no_grad():
            compute_loss(model, torch.zeros(1, 2, dtype=torch.long, device=c.device), **loss_kwargs, full_metrics=False)
    except ValueError as e:
        raise ConfigError(str(e))
    if c.compile:
        for block in gpt.transformer.h:
            block.compile()
    params = list(model.saes.parameters())
    optimizer = torch.optim.Adam(params, lr=c.lr)
    scaler = torch.amp.GradScaler(device_type, enabled=c.dtype == "float16")
    local = c.kl_coeff == 0 and c.in_to_orig_coeff == 0
    log(f"model: {path} ({gpt.num_params() / 1e6:.1f}M parameters, frozen); SAEs at {', '.join(model.sae_positions)}, "
        f"{model.sae(model.sae_positions[0]).n_dict:,} elements each; training type: "
        f"{training_type(c.kl_coeff, c.in_to_orig_coeff)}")

    # resume: the SAEs, the optimiser, the counters and the RNG, after checking the checkpoint fits this run
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    step = 0
    if c.resume:
        step = load_checkpoint(ckpt_path, model, optimizer, scaler, config)
        log(f"resumed from {ckpt_path} at step {step}")
    elif os.path.exists(ckpt_path):
        log(f"note: {ckpt_path} exists and will be overwritten by this fresh run (--resume=True continues it)")

    global_batch = c.batch_size * c.gradient_accumulation_steps * world_size
    n_steps = c.n_samples // global_batch
    if n_steps == 0:
        raise ConfigError(f"n_samples={c.n_samples} is less than one step of {global_batch} samples")
    warmup_steps = math.ceil(c.warmup_samples / global_batch)
    log(f"{n_steps:,} steps of {global_batch} samples x {c.n_ctx} tokens = {global_batch * c.n_ctx:,} tokens per step "
        f"({c.batch_size} per micro-step x {c.gradient_accumulation_steps} accumulation x {world_size} processes)")
    per_rank_done = step * c.batch_size * c.gradient_accumulation_steps  # samples this rank has consumed
    train_batches = data.batches(data.token_samples(c.dataset, c.n_ctx, "train", rank, world_size, skip=per_rank_done),
                                 c.batch_size)
    eval_batches = None  # read on first use

    wandb = None
    if c.wandb_log and master:
        import wandb
        os.makedirs(c.out_dir, exist_ok=True)
        wandb.init(project=c.wandb_project, name=c.wandb_run_name or None, config=config, dir=c.out_dir)

    # Ctrl-C or a scheduler's SIGTERM: finish the step, save, and stop; resume=True continues from there
    stop = {"requested": False}
    def request_stop(signum, frame):
        stop["requested"] = True
        log(f"\nsignal {signum}: stopping after this step and saving a checkpoint")
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    def save():
        if master:
            save_checkpoint(ckpt_path, model, optimizer, scaler, step, config)
            if wandb:
                wandb.save(os.path.join(c.out_dir, "saes.safetensors"), base_path=c.out_dir)

    def run_eval():
        nonlocal eval_batches
        if eval_batches is None:
            samples = list(islice(data.token_samples(c.dataset, c.n_ctx, "eval", rank, world_size, repeat=False),
                                  c.eval_n_samples // world_size))
            eval_batches = [torch.stack(samples[i:i + c.batch_size]) for i in range(0, len(samples), c.batch_size)]
        metrics, counts = evaluate(model, eval_batches, loss_kwargs, autocast, c.device, ddp)
        shown = ["ce_orig", "ce_sae", "ce_increase", "kl"] + [f"{k}/{p}" for p in model.sae_positions
                                                             for k in ("l0", "alive", "explained_variance")]
        log("eval | " + " | ".join(f"{k} {fmt(metrics[k])}" for k in shown))
        if wandb:
            wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            import numpy as np
            for p, f in counts.frequencies().items():
                wandb.log({f"eval/log10_feature_frequency/{p}": wandb.Histogram(np.log10(f[f > 0].numpy()))}, step=step)
        return metrics

    fpt = estimate_flops_per_token(model, local)
    sums, n_logged, t_log = {}, 0, time.time()
    eval_metrics = None
    while step < n_steps:
        if ddp:  # every rank must agree to stop at the same step
            flag = torch.tensor([float(stop["requested"])], device=c.device)
            dist.all_reduce(flag)
            stop["requested"] = flag.item() > 0
        if stop["requested"]:
            save()
            log(f"interrupted at step {step}: checkpoint saved in {c.out_dir}; continue with --resume=True")
            if ddp:
                dist.destroy_process_group()
            sys.exit(130)

        lr_now = get_lr(step, n_steps, warmup_steps, c.lr, c.min_lr_factor)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        for _ in range(c.gradient_accumulation_steps):
            idx = next(train_batches).to(c.device)
            with autocast:
                loss, metrics = compute_loss(model, idx, **loss_kwargs, full_metrics=False)
            scaler.scale(loss / c.gradient_accumulation_steps).backward()
            for k, v in metrics.items():  # the step's figures average over its micro-steps (no sync: 0-d tensors)
                sums[k] = sums.get(k, 0.0) + v.float() / c.gradient_accumulation_steps
        if ddp:  # average the SAE gradients over the processes
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= world_size
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n_logged += 1
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.float()

        if step % c.log_every_n_steps == 0 or step == n_steps:
            keys = sorted(sums)
            values = torch.stack([sums[k] for k in keys]) / n_logged
            if ddp:
                dist.all_reduce(values)
                values /= world_size
            figures = dict(zip(keys, values.tolist()))
            dt = (time.time() - t_log) / n_logged
            tokens_per_s = global_batch * c.n_ctx / dt
            line = [f"step {step}", f"loss {figures['loss']:.4f}"]
            line += [f"{k} {figures[k]:.4f}" for k in ("kl", "out_to_in", "out_to_orig") if k in figures]
            line += [f"in_to_orig {sum(v for k, v in figures.items() if k.startswith('in_to_orig/')):.4f}"] if c.in_to_orig_positions else []
            line += ["l0 " + "/".join(f"{figures['l0/' + p]:.1f}" for p in model.sae_positions)]
            line += [f"lr {lr_now:.1e}", f"norm {figures['grad_norm']:.2f}", f"{dt * 1000:.0f} ms", f"{tokens_per_s:,.0f} tok/s"]
            if device_type == "cuda":
                line += [f"mfu {100 * fpt * tokens_per_s / world_size / c.peak_flops:.1f}%"]
            log(" | ".join(line))
            if wandb:
                wandb.log({f"train/{k}": v for k, v in figures.items()} | {"train/lr": lr_now, "train/tokens_per_s": tokens_per_s,
                                                                          "samples": step * global_batch}, step=step)
            sums, n_logged, t_log = {}, 0, time.time()

        samples_seen = step * global_batch
        crossed = lambda every: samples_seen // every > (samples_seen - global_batch) // every
        if crossed(c.eval_every_n_samples) or step == n_steps:
            eval_metrics = run_eval()
        if crossed(c.save_every_n_samples) or step == n_steps:
            save()

    if eval_metrics is None:  # nothing left to train (a finished run resumed): still report
        eval_metrics = run_eval()
    if master:
        print_summary(eval_metrics, model, c, path)
    if wandb:
        wandb.finish()
    if ddp:
        dist.destroy_process_group()


@torch.no_grad()
def evaluate(model, batches, loss_kwargs, autocast, device, ddp):
    """Every metric of compute_loss, averaged over the held-out samples (and processes), plus alive features."""
    counts = FeatureCounts(model)
    sums, n = {}, 0
    for idx in batches:
        idx = idx.to(device)
        with autocast:
            _, metrics = compute_loss(model, idx, **loss_kwargs, full_metrics=True, feature_counts=counts)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.float() * len(idx)
        n += len(idx)
    keys = sorted(sums)
    values = torch.stack([sums[k] for k in keys] + [torch.tensor(float(n), device=device)])
    if ddp:
        dist.all_reduce(values)
        for p in counts.counts:
            dist.all_reduce(counts.counts[p])
    figures = {k: v / values[-1].item() for k, v in zip(keys, values.tolist())}
    figures |= {f"alive/{p}": a for p, a in counts.alive().items()}
    figures["eval_tokens"] = int(values[-1].item()) * batches[0].shape[1]
    return figures, counts


def fmt(v):
    return f"{v:,}" if isinstance(v, int) else f"{v:.4f}"


def save_checkpoint(path, model, optimizer, scaler, step, config):
    """Everything a resumed run needs, written atomically: a temporary file, then a rename. The SAEs alone go to
    saes.safetensors beside it (what eval.py, sample.py and SAETransformer.from_checkpoint read)."""
    out_dir = os.path.dirname(path) or "."
    os.makedirs(out_dir, exist_ok=True)
    ckpt = {"saes": model.saes.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "rng": torch.get_rng_state(), "config": config}
    if torch.cuda.is_available():
        ckpt["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)
    model.save(os.path.join(out_dir, "saes.safetensors"), config=config)


def load_checkpoint(path, model, optimizer, scaler, config):
    if not os.path.isfile(path):
        raise ConfigError(f"resume=True but there is no checkpoint at {path}; drop --resume or point out_dir at a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved = ckpt["config"]
    except Exception as e:
        raise ConfigError(f"{path} is damaged and cannot be read ({type(e).__name__}: {e}); it was left untouched. "
                          "Start a fresh run in another out_dir") from e
    for key in ("init_from", "sae_positions", "dict_size_to_input_ratio", "n_ctx", "dataset"):
        if saved.get(key) != config[key]:
            raise ConfigError(f"{path} was trained with {key}={saved.get(key)!r}, this run asks for {config[key]!r}; "
                              "resume with the run's own settings or use another out_dir")
    model.saes.load_state_dict(ckpt["saes"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"])
    if "cuda_rng" in ckpt and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return ckpt["step"]


def print_summary(m, model, c, path):
    """The paper's figures for the finished run, on held-out text."""
    rows = [("CE loss of the model", f"{m['ce_orig']:.4f}"), ("CE loss with the SAEs spliced in", f"{m['ce_sae']:.4f}"),
            ("CE loss increase", f"{m['ce_increase']:.4f}"), ("KL(original || spliced)", f"{m['kl']:.4f}")]
    for p in model.sae_positions:
        n_dict = model.sae(p).n_dict
        rows += [(f"L0 at {p}", f"{m['l0/' + p]:.1f}"), (f"alive features at {p}", f"{m['alive/' + p]:,} / {n_dict:,}"),
                 (f"explained variance at {p}", f"{m['explained_variance/' + p]:.3f} (after layer norm "
                                                  f"{m['explained_variance_ln/' + p]:.3f})")]
    if c.init_from == "shakespeare" and c.dataset == "shakespeare":
        from train_gpt import unigram_cross_entropy
        unigram = unigram_cross_entropy(c.dataset, c.n_ctx, c.eval_n_samples)
        gap = unigram - m["ce_orig"]
        rows += [("CE loss of a unigram model", f"{unigram:.4f}"), ("model's advantage over unigram", f"{gap:.4f}"),
                 ("advantage kept with the SAEs", f"{100 * (gap - m['ce_increase']) / gap:.1f}%")]
    width = max(len(r[0]) for r in rows)
    print(f"\nheld-out results ({m['eval_tokens']:,} tokens of {c.dataset!r}, model {path}):")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main(sys.argv[1:])
