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

Everything that can be known before training is checked before training (settings, the model, both parts of the
data, out_dir), and nothing trained is lost: a checkpoint is written before every evaluation, Ctrl-C saves at the
end of the step, and an error after a step (in evaluation, logging or wandb) saves that step before it stops.
"""

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from itertools import islice
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data
from configurator import ConfigError, check_settings, check_writable, configure, print_config
from e2esae import SAETransformer, compute_loss, evaluate, training_type
from model import GPT
from train_gpt import get_lr, small_model

# -----------------------------------------------------------------------------
# model and SAEs
init_from = "shakespeare"  # 'gpt2' (-medium, -large, -xl) | a directory with config.json + model.safetensors |
#                            'shakespeare': the small model of the embedded default, trained and cached on first use
small_model_config = ""  # with 'shakespeare': a train_gpt.py config file for that model (cached per recipe)
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
resume = False  # continue the run in out_dir
overwrite = False  # start afresh even though out_dir holds a checkpoint (it is replaced)
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
positive, non_negative, names = (lambda v: v > 0), (lambda v: v >= 0), (lambda v: all(isinstance(p, str) for p in v))
SETTINGS = [  # (key, test, what the value must be): every range, checked before anything else happens
    ("sae_positions", lambda v: bool(v) and names(v), "a non-empty list of names like ['blocks.6.hook_resid_pre']"),
    ("dict_size_to_input_ratio", positive, "positive (n_dict = ratio x the model's width)"),
    *[(k, non_negative, ">= 0") for k in ("sparsity_coeff", "kl_coeff", "in_to_orig_coeff", "out_to_in_coeff",
                                          "out_to_orig_coeff")],
    ("p_norm", positive, "positive (1 is the L1 norm)"),
    ("in_to_orig_positions", names, "a list of names like ['blocks.7.hook_resid_pre']"),
    ("n_ctx", lambda v: v >= 2, "at least 2 (a sample's tokens predict the next ones)"),
    *[(k, positive, "positive") for k in ("n_samples", "batch_size", "gradient_accumulation_steps", "lr",
                                          "max_grad_norm", "eval_every_n_samples", "eval_n_samples",
                                          "save_every_n_samples", "log_every_n_steps", "peak_flops")],
    ("warmup_samples", non_negative, ">= 0"),
    ("min_lr_factor", lambda v: 0 <= v <= 1, "between 0 and 1 (the final learning rate is min_lr_factor x lr)"),
    ("dtype", lambda v: v in ("float32", "bfloat16", "float16"), "'float32', 'bfloat16' or 'float16'"),
    ("device", lambda v: not v.startswith("cuda") or torch.cuda.is_available(), "'cpu': no CUDA GPU is available"),
]


# ---- the steps of main, in order ----

def setup_distributed(c):
    """One process per GPU under torchrun: (ddp, rank, world_size); c.device becomes this process's GPU."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1
    dist.init_process_group("nccl" if c.device.startswith("cuda") else "gloo")
    if c.device.startswith("cuda"):
        c.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(c.device)
    return True, dist.get_rank(), dist.get_world_size()


def load_model(c, config, ddp, master):
    """The frozen GPT-2 and its SAEs (the same initialisation on every rank), checked against the settings:
    positions, dictionary size, context length, and the loss's own checks on a dry run."""
    if c.init_from == "shakespeare":
        path = small_model(c.small_model_config) if master else None  # rank 0 trains it, if it must
        if ddp:
            dist.barrier()
        path = path or small_model(c.small_model_config)
    else:
        path = c.init_from
    torch.manual_seed(c.seed)  # before the GPT, whose construction draws from the generator too: the SAEs' init
    try:
        gpt = GPT.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"init_from={c.init_from!r}: {e}") from None
    if c.n_ctx > gpt.config.block_size:
        raise ConfigError(f"n_ctx={c.n_ctx} is longer than the model's context of {gpt.config.block_size} tokens: "
                          f"use --n_ctx={gpt.config.block_size} or less")
    if int(gpt.config.n_embd * c.dict_size_to_input_ratio) < 1:
        raise ConfigError(f"dict_size_to_input_ratio={c.dict_size_to_input_ratio} gives a dictionary of 0 elements "
                          f"at width {gpt.config.n_embd}: use at least {1 / gpt.config.n_embd:.2g}")
    try:
        model = SAETransformer(gpt, c.sae_positions, c.dict_size_to_input_ratio).to(c.device)
        with torch.no_grad():  # the loss's own checks, on one short sequence
            compute_loss(model, torch.zeros(1, 2, dtype=torch.long, device=c.device),
                         **{k: config[k] for k in LOSS_KEYS}, full_metrics=False)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model, path


def load_heldout(c, rank, world_size, log):
    """This rank's held-out batches, after checking that both parts of the data hold samples (and every local
    file is readable): before the model, which may have to be trained first."""
    try:
        rule = data.heldout_rule(c.dataset)
        eval_samples = list(islice(data.token_samples(c.dataset, c.n_ctx, "eval", rank, world_size, repeat=False),
                                   c.eval_n_samples // world_size))
        has_train = data.count_samples(c.dataset, c.n_ctx, "train", at_most=1) > 0
    except data.DataError as e:
        raise ConfigError(str(e)) from None
    for part, ok in (("training", has_train), ("held-out", bool(eval_samples))):
        if not ok:
            raise ConfigError(f"the {part} part of dataset {c.dataset!r} holds fewer than n_ctx={c.n_ctx} tokens "
                              f"(held out: {rule[1]}): give more text or a smaller n_ctx")
    log(f"data: {c.dataset!r}, held out: {rule[1]}; evaluating on {len(eval_samples) * world_size} samples"
        + (f" (eval_n_samples={c.eval_n_samples}: the held-out part holds no more)"
           if len(eval_samples) < c.eval_n_samples // world_size else ""))
    return [torch.stack(eval_samples[i:i + c.batch_size]) for i in range(0, len(eval_samples), c.batch_size)]


def check_out_dir(c):
    """out_dir must be writable, and a fresh run must not replace a checkpoint unless asked to."""
    check_writable(c.out_dir, "out_dir")
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    if c.resume or not os.path.exists(ckpt_path) or c.overwrite:
        return
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        cfg = ckpt["config"]
        steps = cfg["n_samples"] // ckpt.get("global_batch", cfg["batch_size"] * cfg["gradient_accumulation_steps"])
        what = "a finished run" if ckpt["step"] >= steps else f"a run stopped at step {ckpt['step']} of {steps}"
    except Exception:
        what = "a checkpoint that cannot be read"
    raise ConfigError(f"{ckpt_path} holds {what}: --resume=True continues it, --overwrite=True replaces it, or choose "
                      "another out_dir")


def estimate_flops_per_token(model, local):
    """Dense FLOPs of one training step per token (matmuls only), for MFU. The frozen GPT's backward computes
    input gradients only (one matmul per forward matmul); the SAE's backward also computes weight gradients."""
    cfg, gpt = model.gpt.config, model.gpt
    block = 2 * sum(p.numel() for p in gpt.transformer.h[0].parameters() if p.dim() == 2)  # 2 FLOPs per MAC
    head = 2 * cfg.n_embd * (model.merged.weight.shape[0] if model.merged is not None else cfg.vocab_size)
    first = min(gpt.resid_index(p) for p in model.sae_positions)
    last = max(gpt.resid_index(p) for p in model.sae_positions)
    sae = sum(6 * 2 * s.d_in * s.n_dict for s in model.saes.values())  # encode + decode, forward and backward
    if local:
        return last * block + sae
    after = (cfg.n_layer - first) * block + head
    return first * block + after + 2 * after + sae  # shared prefix, clean rest, spliced rest forward + backward


def main(argv):
    config = configure(DEFAULTS, argv)
    check_settings(config, SETTINGS)
    if config["resume"] and config["overwrite"]:
        raise ConfigError("resume=True and overwrite=True contradict each other: continue the run, or replace it")
    c = SimpleNamespace(**config)
    ddp, rank, world_size = setup_distributed(c)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device_type = "cuda" if c.device.startswith("cuda") else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c.dtype]
    autocast = torch.autocast(device_type, dtype=ptdtype) if device_type == "cuda" and c.dtype != "float32" else nullcontext()
    log("config:")
    if master:
        print_config(config)

    # every check before any work: the schedule, both parts of the data, the model, a checkpoint to resume, out_dir
    global_batch, n_steps, warmup_steps = schedule(c, world_size)
    eval_batches = load_heldout(c, rank, world_size, log)
    model, path = load_model(c, config, ddp, master)
    optimizer = torch.optim.Adam(model.saes.parameters(), lr=c.lr)
    scaler = torch.amp.GradScaler(device_type, enabled=c.dtype == "float16")
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    step = load_checkpoint(ckpt_path, model, optimizer, scaler, config, global_batch) if c.resume else 0
    if master:
        check_out_dir(c)
    per_rank_done = step * c.batch_size * c.gradient_accumulation_steps  # samples this rank has consumed
    train_batches = data.batches(data.token_samples(c.dataset, c.n_ctx, "train", rank, world_size, skip=per_rank_done),
                                 c.batch_size)
    if c.compile:
        for block in model.gpt.transformer.h:
            block.compile()
    log(f"model: {path} ({model.gpt.num_params() / 1e6:.1f}M parameters, frozen); SAEs at "
        f"{', '.join(model.sae_positions)}, {model.sae(model.sae_positions[0]).n_dict:,} elements each; training type: "
        f"{training_type(c.kl_coeff, c.in_to_orig_coeff)}")
    log(f"{n_steps:,} steps of {global_batch} samples x {c.n_ctx} tokens = {global_batch * c.n_ctx:,} tokens per step "
        f"({c.batch_size} per micro-step x {c.gradient_accumulation_steps} accumulation x {world_size} processes)"
        + (f"; resumed from {ckpt_path} at step {step}" if c.resume else ""))
    wandb = start_wandb(c, config) if c.wandb_log and master else None
    stop = stop_on_signals(log)

    saved = {"step": step if c.resume else None}  # the step of the checkpoint on disk
    def save():
        if master and saved["step"] != step:
            save_checkpoint(ckpt_path, model, optimizer, scaler, step, config, global_batch)
            saved["step"] = step
            if wandb:
                wandb.save(os.path.join(c.out_dir, "saes.safetensors"), base_path=c.out_dir)
    evaluate_now = lambda: evaluate_and_log(model, eval_batches, config, autocast, ddp, wandb, step, log)

    fpt = estimate_flops_per_token(model, c.kl_coeff == 0 and c.in_to_orig_coeff == 0)
    sums, n_logged, t_log, eval_metrics = {}, 0, time.time(), None
    try:
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
            train_step(model, optimizer, scaler, train_batches, c, lr_now, autocast, sums, world_size if ddp else 1)
            step, n_logged = step + 1, n_logged + 1

            try:  # the step is done: what follows reports it, and if that fails, the step is saved first
                if step % c.log_every_n_steps == 0 or step == n_steps:
                    figures, dt = log_step(sums, n_logged, t_log, ddp, world_size)
                    tokens_per_s = global_batch * c.n_ctx / dt
                    mfu = 100 * fpt * tokens_per_s / world_size / c.peak_flops if device_type == "cuda" else None
                    log(log_line(step, figures, model.sae_positions, lr_now, dt, tokens_per_s, mfu))
                    if wandb:
                        wandb.log({f"train/{k}": v for k, v in figures.items()} | {
                            "train/lr": lr_now, "train/tokens_per_s": tokens_per_s, "samples": step * global_batch},
                            step=step)
                    sums, n_logged, t_log = {}, 0, time.time()
                crossed = lambda every: step * global_batch // every > (step - 1) * global_batch // every
                if crossed(c.save_every_n_samples) or crossed(c.eval_every_n_samples) or step == n_steps:
                    save()  # before any evaluation, so that an evaluation that fails or is stopped loses nothing
                if crossed(c.eval_every_n_samples) or step == n_steps:
                    eval_metrics = evaluate_now()
            except Exception:
                save()
                raise

        eval_metrics = eval_metrics or evaluate_now()  # a finished run, resumed, still reports
        if master:
            print_summary(eval_metrics, model, c, path)
        if wandb:
            wandb.finish()
    except (Exception, KeyboardInterrupt) as e:
        if master and saved["step"] is not None:
            print(f"\n{type(e).__name__} at step {step}: the checkpoint of step {saved['step']} in {c.out_dir} is "
                  "complete; continue from it with --resume=True", file=sys.stderr)
        if isinstance(e, KeyboardInterrupt):
            sys.exit(130)
        raise
    if ddp:
        dist.destroy_process_group()


# ---- the pieces main uses once training runs ----

def schedule(c, world_size):
    """(global batch in samples, steps, warmup steps): the run is counted in samples, stepped in global batches."""
    global_batch = c.batch_size * c.gradient_accumulation_steps * world_size
    n_steps = c.n_samples // global_batch
    if n_steps == 0:
        raise ConfigError(f"n_samples={c.n_samples} is less than one step of {global_batch} samples")
    if c.eval_n_samples < world_size:
        raise ConfigError(f"eval_n_samples={c.eval_n_samples} gives some of the {world_size} processes nothing to evaluate")
    return global_batch, n_steps, math.ceil(c.warmup_samples / global_batch)


def start_wandb(c, config):
    import wandb
    os.makedirs(c.out_dir, exist_ok=True)
    wandb.init(project=c.wandb_project, name=c.wandb_run_name or None, config=config, dir=c.out_dir)
    return wandb


def stop_on_signals(log):
    """Ctrl-C or a scheduler's SIGTERM sets stop['requested']: the loop finishes its step, saves and stops. A second
    Ctrl-C stops at once (in a long evaluation, say): the checkpoint written before it is what --resume continues."""
    stop = {"requested": False}
    def request_stop(signum, frame):
        if stop["requested"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["requested"] = True
        log(f"\nsignal {signum}: stopping after this step and saving a checkpoint (Ctrl-C again: stop at once)")
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop


def evaluate_and_log(model, eval_batches, config, autocast, ddp, wandb, step, log):
    """Every metric on the held-out batches (e2esae.evaluate, summed over processes), one eval line, and wandb."""
    all_reduce = (lambda t: dist.all_reduce(t)) if ddp else None
    metrics, counts = evaluate(model, eval_batches, {k: config[k] for k in LOSS_KEYS}, autocast, all_reduce)
    shown = ["ce_orig", "ce_sae", "ce_increase", "kl"] + [f"{k}/{p}" for p in model.sae_positions
                                                         for k in ("l0", "alive", "explained_variance")]
    log("eval | " + " | ".join(f"{k} {fmt(metrics[k])}" for k in shown))
    if wandb:
        import numpy as np
        wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        for p, f in counts.frequencies().items():
            wandb.log({f"eval/log10_feature_frequency/{p}": wandb.Histogram(np.log10(f[f > 0].numpy()))}, step=step)
    return metrics


def train_step(model, optimizer, scaler, batches, c, lr, autocast, sums, world_size):
    """One optimiser step: gradient_accumulation_steps micro-batches of compute_loss backpropagated into the SAEs
    (averaged over processes under DDP), clipped, then Adam. The step's figures are added to `sums`, averaged
    over its micro-steps, as 0-d tensors: nothing here waits for the GPU."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    for _ in range(c.gradient_accumulation_steps):
        idx = next(batches).to(c.device)
        with autocast:
            loss, metrics = compute_loss(model, idx, **{k: getattr(c, k) for k in LOSS_KEYS}, full_metrics=False)
        scaler.scale(loss / c.gradient_accumulation_steps).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.float() / c.gradient_accumulation_steps
    params = list(model.saes.parameters())
    if world_size > 1:  # average the SAE gradients over the processes
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= world_size
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.float()


def log_step(sums, n_logged, t_log, ddp, world_size):
    """The figures since the last log line, averaged over its steps (and processes), and the seconds per step."""
    keys = sorted(sums)
    values = torch.stack([sums[k] for k in keys]) / n_logged
    if ddp:
        dist.all_reduce(values)
        values /= world_size
    return dict(zip(keys, values.tolist())), (time.time() - t_log) / n_logged


def log_line(step, figures, positions, lr, dt, tokens_per_s, mfu):
    line = [f"step {step}", f"loss {figures['loss']:.4f}"]
    line += [f"{k} {figures[k]:.4f}" for k in ("kl", "out_to_in", "out_to_orig") if k in figures]
    downstream = [v for k, v in figures.items() if k.startswith("in_to_orig/")]
    line += [f"in_to_orig {sum(downstream):.4f}"] if downstream else []
    line += ["l0 " + "/".join(f"{figures['l0/' + p]:.1f}" for p in positions)]
    line += [f"lr {lr:.1e}", f"norm {figures['grad_norm']:.2f}", f"{dt * 1000:.0f} ms", f"{tokens_per_s:,.0f} tok/s"]
    line += [f"mfu {mfu:.1f}%"] if mfu is not None else []
    return " | ".join(line)


def fmt(v):
    return f"{v:,}" if isinstance(v, int) else f"{v:.4f}"


def save_checkpoint(path, model, optimizer, scaler, step, config, global_batch):
    """Everything a resumed run needs, written atomically: a temporary file, then a rename. The SAEs alone go to
    saes.safetensors beside it (what eval.py, sample.py and SAETransformer.from_checkpoint read)."""
    out_dir = os.path.dirname(path) or "."
    os.makedirs(out_dir, exist_ok=True)
    ckpt = {"saes": model.saes.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "global_batch": global_batch, "rng": torch.get_rng_state(), "config": config}
    if torch.cuda.is_available():
        ckpt["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)
    model.save(os.path.join(out_dir, "saes.safetensors"), config=config)


def load_checkpoint(path, model, optimizer, scaler, config, global_batch):
    """Restore a run from `path` after checking that it is the same run; returns its step."""
    if not os.path.isfile(path):
        raise ConfigError(f"resume=True but there is no checkpoint at {path}; drop --resume or point out_dir at a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved = ckpt["config"]
    except Exception as e:
        raise ConfigError(f"{path} is damaged and cannot be read ({type(e).__name__}: {e}); it was left untouched. "
                          "Start a fresh run in another out_dir") from e
    for key in ("init_from", "small_model_config", "sae_positions", "dict_size_to_input_ratio", "n_ctx", "dataset"):
        if saved.get(key, DEFAULTS[key]) != config[key]:
            raise ConfigError(f"{path} was trained with {key}={saved.get(key)!r}, this run asks for {config[key]!r}; "
                              "resume with the run's own settings or use another out_dir")
    saved_batch = ckpt.get("global_batch", saved["batch_size"] * saved["gradient_accumulation_steps"])
    if saved_batch != global_batch:
        raise ConfigError(f"{path} was trained with a global batch of {saved_batch} samples, this run has {global_batch} "
                          "(batch_size x gradient_accumulation_steps x processes): resume with the same global batch, "
                          "so that the data and the schedule continue where they stopped")
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
