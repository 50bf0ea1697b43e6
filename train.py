"""
Train sparse autoencoders spliced into a language model: local, end-to-end, end-to-end + downstream, or any mix.

    python train.py                                            # the embedded default: offline, on a CPU, minutes
    python train.py config/e2e_layer6.py                       # a run of the paper (GPT-2 small, OpenWebText)
    python train.py config/e2e_layer6.py --sparsity_coeff=5    # any setting overridden on the command line
    python train.py --activation=topk --k=16                   # a TopK SAE (also batchtopk, jumprelu)
    python train.py config/e2e_layer6.py --resume=True         # continue an interrupted run from out_dir
    torchrun --nproc_per_node=8 train.py config/e2e_layer6.py  # data parallel on 8 GPUs

The defaults below describe the embedded run: a small GPT-2 trained from scratch on Shakespeare (cached after the
first run; see train_gpt.py) gets an end-to-end SAE at its middle layer. The paper's runs live in config/.
Each step: a batch of token ids -> compute_loss (e2esae.py) -> backward into the SAEs only -> Adam.

Nothing trained is lost (runs.Run): every setting, the data and a checkpoint to resume are checked before any
training; a second run of the same command writes to out-2 (out-3, ...) and keeps the first; a checkpoint is
written before every evaluation; Ctrl-C saves at the end of the step; a loss or gradient that is not finite stops
the run before the step is applied, with the last finite weights saved.
"""

import sys
from contextlib import nullcontext
from itertools import islice
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data
from configurator import ConfigError, check_settings, configure, default_device, defaults, device_rule, print_config
from e2esae import (
    ACTIVATIONS,
    DeadElements,
    FeatureCounts,
    LossConfig,
    SAETransformer,
    compute_loss,
    make_activation,
    prepare_saes,
)
from language_models import check_context, load_model, tokenizer_of
from report import TrainingLog
from runs import Run, average_over_processes, check_finite, get_lr, setup_distributed
from train_gpt import small_model, unigram_cross_entropy

# -----------------------------------------------------------------------------
# model and SAEs
init_from = "shakespeare"  # 'gpt2' (-medium, -large, -xl) | any causal LM's hub id or directory (language_models.py)
#                            | 'shakespeare': the small model of the embedded default, trained and cached on first use
small_model_config = ""  # with 'shakespeare': a train_gpt.py config file for that model (cached per recipe)
sae_positions = ["blocks.2.hook_resid_pre"]
dict_size_to_input_ratio = 16.0  # n_dict = 16 x 128 = 2,048 dictionary elements
activation = "relu"  # 'relu' (the paper's) | 'topk' | 'batchtopk' | 'jumprelu' (e2esae.py has their definitions)
k = 0  # topk and batchtopk: active codes per token (they need it; the others refuse it)
jumprelu_bandwidth = 0.001  # jumprelu: the straight-through estimator's bandwidth
jumprelu_init_threshold = 0.001  # jumprelu: every threshold's starting value
sae_init = "orthogonal"  # 'orthogonal' (a random orthogonal dictionary) | 'tied_mean' | 'tied_median': the encoder as
#                          the dictionary's transpose, the decoder bias at the first batches' mean or geometric median
normalize_activations = "none"  # or "expected_average_only_in": inputs scaled to a mean squared norm of d_in,
#                                 estimated on the first batches (SAELens's); folded back into the saved SAEs
include_bos = False  # False: BOS positions (where the tokenizer adds one) are left out of the SAEs' terms and metrics
pretrained_sae_paths = []  # checkpoint specs (interop.py: ours, e2e_sae's, SAELens's) of SAEs placed at their positions
retrain_saes = False  # False: the pretrained SAEs stay as they are, spliced in, while the others train
# loss: sum of coefficient x term (e2esae.py's docstring has the formulas)
sparsity_coeff = 1.0  # topk and batchtopk: 0 unless given (k sets their sparsity); jumprelu: the L0 penalty's
p_norm = 1.0
kl_coeff = 1.0
in_to_orig_coeff = 0.0
in_to_orig_positions = []  # e.g. every later blocks.{i}.hook_resid_pre; the coefficient is split evenly over them
out_to_in_coeff = 0.0
out_to_orig_coeff = 0.0
aux_k_coeff = 0.0  # the auxiliary loss on dead elements (Gao et al.): unless given, 1/32 for topk and batchtopk
#                   where out_to_in_coeff > 0 (a loss that reconstructs x; on a KL loss it hurt: RESULTS.md)
dead_window_tokens = 131_072  # dead: not fired by any of the last this many training tokens
kl_rescale = False  # KL scaled to the local MSE's size, alpha = (mse / kl) detached, both halved (Karvonen 2025)
finetune_fraction = 0.0  # > 0: train locally (sparsity + out_to_in) first, the loss above only for this last share
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
out_dir = "out"  # a fresh run where a run is already: out-2, out-3, ...
resume = False  # continue the run in out_dir
overwrite = False  # start afresh in out_dir itself, replacing the run there
wandb_log = False
wandb_project = "e2esae"
wandb_run_name = ""
# system
seed = 0
device = default_device()  # 'cuda' where there is a GPU, else 'cpu'
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
compile = False  # torch.compile the model's blocks (pays off on a GPU for long runs)
peak_flops = 989e12  # for MFU: an H100's dense bf16 peak
# -----------------------------------------------------------------------------

DEFAULTS = defaults(globals())
# how a run is watched, where it is written and on what hardware: a resumed run may change these, not the others
HOW_IT_RUNS = ("out_dir", "resume", "overwrite", "log_every_n_steps", "eval_every_n_samples", "eval_n_samples",
               "save_every_n_samples", "wandb_log", "wandb_project", "wandb_run_name", "device", "dtype", "compile",
               "peak_flops", "batch_size", "gradient_accumulation_steps")
positive = lambda v: v > 0
all_strings = lambda v: all(isinstance(p, str) for p in v)
one_of = lambda key, options: (key, lambda v: v in options, ", ".join(map(repr, options[:-1])) + f" or {options[-1]!r}")
RULES = [  # (key, test, what the value must be): every range, checked before anything else happens
    ("sae_positions", lambda v: bool(v) and all_strings(v), "a non-empty list like ['blocks.6.hook_resid_pre']"),
    ("dict_size_to_input_ratio", positive, "positive (n_dict = ratio x the model's width)"),
    one_of("activation", list(ACTIVATIONS)),
    one_of("sae_init", ["orthogonal", "tied_mean", "tied_median"]),
    one_of("normalize_activations", ["none", "expected_average_only_in"]),
    *[(key, positive, "positive") for key in ("jumprelu_bandwidth", "dead_window_tokens", "n_samples",
                                              "batch_size", "gradient_accumulation_steps", "lr", "max_grad_norm",
                                              "eval_every_n_samples", "eval_n_samples", "save_every_n_samples",
                                              "log_every_n_steps", "peak_flops")],
    *[(key, lambda v: v >= 0, ">= 0") for key in ("k", "jumprelu_init_threshold", "warmup_samples")],
    ("pretrained_sae_paths", all_strings, "a list of checkpoint specs like ['out-local']"),
    ("in_to_orig_positions", all_strings, "a list of names like ['blocks.7.hook_resid_pre']"),
    ("finetune_fraction", lambda v: 0 <= v < 1, "in [0, 1): the share of the steps fine-tuned end to end"),
    ("n_ctx", lambda v: v >= 2, "at least 2 (a sample's tokens predict the next ones)"),
    ("min_lr_factor", lambda v: 0 <= v <= 1, "between 0 and 1 (the final learning rate is min_lr_factor x lr)"),
    one_of("dtype", ["float32", "bfloat16", "float16"]),
    device_rule,
]


def settings(argv):
    """The resolved settings: config files and overrides, every range, what contradicts or would do nothing, and the
    defaults that depend on the activation. Returns (config, notes): notes say what was resolved, for the log."""
    given = set()
    c = configure(DEFAULTS, argv, given)
    check_settings(c, RULES)
    if "dtype" not in given and not c["device"].startswith("cuda"):
        c["dtype"] = "float32"  # the default dtype is the GPU's; a CPU run asked for none
    refuse = [  # (contradiction or no effect, what to do)
        (c["resume"] and c["overwrite"], "resume=True and overwrite=True contradict each other: continue the run, or "
                                         "replace it"),
        (c["dtype"] != "float32" and not c["device"].startswith("cuda"),
         f"dtype={c['dtype']!r} runs under CUDA autocast, and device={c['device']!r}: on a CPU use dtype='float32'"),
        (c["finetune_fraction"] > 0 and c["kl_coeff"] == 0 and c["in_to_orig_coeff"] == 0,
         "finetune_fraction fine-tunes end to end after a local start, but kl_coeff and in_to_orig_coeff are 0: set "
         "kl_coeff (the fine-tune's loss is the one configured)"),
        (c["retrain_saes"] and not c["pretrained_sae_paths"],
         "retrain_saes=True trains pretrained SAEs further, and pretrained_sae_paths is empty: give it, or drop it"),
        (c["activation"] == "jumprelu" and "p_norm" in given,
         "activation='jumprelu' is penalised by the L0 norm of its code, so p_norm does nothing: drop it"),
        ("p_norm" in given and c["sparsity_coeff"] == 0, "p_norm shapes the sparsity term, whose sparsity_coeff is 0"),
        *[(key in given and c["activation"] != "jumprelu", f"{key} is JumpReLU's; activation={c['activation']!r} has "
           "none: drop it, or use --activation=jumprelu") for key in ("jumprelu_bandwidth", "jumprelu_init_threshold")],
    ]
    for bad, message in refuse:
        if bad:
            raise ConfigError(message)
    try:  # the loss's own rules, and the settings the activation takes (the dictionary's size waits for the model)
        LossConfig.of(c).check()
        make_activation(n_dict=max(c["k"], 1), **sae_settings(c))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return c, activation_defaults(c, given)


def sae_settings(c):
    """What every new SAE is built with: its activation and the settings it takes (SAE's keyword arguments)."""
    extra = {"k": c["k"] or None} if c["k"] or c["activation"] in ("topk", "batchtopk") else {}
    if c["activation"] == "jumprelu":
        extra.update(bandwidth=c["jumprelu_bandwidth"], init_threshold=c["jumprelu_init_threshold"])
    return {"activation": c["activation"], **extra}


def activation_defaults(c, given):
    """TopK and BatchTopK take their sparsity from k: sparsity_coeff 0 unless given, and the auxiliary-k loss where
    the loss reconstructs x. Returns the notes that say what was chosen."""
    notes, a = [], c["activation"]
    if a in ("topk", "batchtopk"):
        c["sparsity_coeff"] = c["sparsity_coeff"] if "sparsity_coeff" in given else 0.0
        notes.append(f"activation={a}: k={c['k']} sets the sparsity; sparsity_coeff={c['sparsity_coeff']:g}"
                     + (" (an L_p term on top of it)" if c["sparsity_coeff"] else " (give it to add an L_p term)"))
        if "aux_k_coeff" not in given:
            c["aux_k_coeff"] = 1 / 32 if c["out_to_in_coeff"] > 0 else 0.0  # it reconstructs the residual x - x_hat
            if not c["aux_k_coeff"]:
                notes.append("aux_k_coeff=0: the auxiliary-k loss reconstructs x - x_hat, which a loss without "
                             "out_to_in does not ask for (give aux_k_coeff to add it anyway)")
    if c["aux_k_coeff"] > 0:
        notes.append(f"aux_k_coeff={c['aux_k_coeff']:g}: dead elements (none of the last {c['dead_window_tokens']:,} "
                     "tokens fired them) are trained on the residual")
    elif "dead_window_tokens" in given:
        raise ConfigError("dead_window_tokens sets when the auxiliary-k loss counts an element dead, and aux_k_coeff "
                          "is 0: drop it, or set aux_k_coeff")
    return notes


def schedule(c, world_size):
    """(global batch in samples, steps, warmup steps, local steps): the run is counted in samples, stepped in global
    batches; with finetune_fraction the first steps are local."""
    global_batch = c.batch_size * c.gradient_accumulation_steps * world_size
    n_steps = c.n_samples // global_batch
    local = round((1 - c.finetune_fraction) * n_steps) if c.finetune_fraction else 0
    for bad, message in [
        (n_steps == 0, f"n_samples={c.n_samples} is less than one step of {global_batch} samples"),
        (c.eval_n_samples < world_size, f"eval_n_samples={c.eval_n_samples} leaves some of the {world_size} "
                                        "processes nothing to evaluate"),
        (c.finetune_fraction and local == n_steps, f"finetune_fraction={c.finetune_fraction:g} of {n_steps} steps "
                                                   "rounds to no end-to-end step: use a larger share or more samples"),
    ]:
        if bad:
            raise ConfigError(message)
    return global_batch, n_steps, -(-c.warmup_samples // global_batch), local


def loss_at(c, step, local_steps):
    """The loss of this step: with finetune_fraction, the first steps are local (sparsity and out_to_in, at 1 where
    it is 0; no KL, no downstream term), the last share the configured loss."""
    loss = LossConfig.of(vars(c))
    if step < local_steps:
        loss.kl_coeff, loss.in_to_orig_coeff, loss.kl_rescale = 0.0, 0.0, False
        loss.out_to_in_coeff = c.out_to_in_coeff or 1.0
    return loss


# ---- the steps of main, in order ----

def build_model(c, phases, log):
    """The frozen model and its SAEs (initialised alike on every process), the pretrained ones in place, checked
    against the settings: the context, the dictionary's size, the loss of each phase of the run (`phases`)."""
    torch.manual_seed(c.seed)  # the SAEs' initialisation
    dtype = None if c.dtype == "float32" else getattr(torch, c.dtype)  # another family's weights in the run's dtype
    try:
        gpt = load_model(small_model(c.small_model_config) if c.init_from == "shakespeare" else c.init_from, dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"init_from={c.init_from!r}: {e}") from None
    check_context(gpt, c.n_ctx)
    n_dict, pretrained = int(gpt.config.n_embd * c.dict_size_to_input_ratio), {}
    for spec in c.pretrained_sae_paths:
        try:
            source = SAETransformer.from_checkpoint(spec, gpt)
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"pretrained_sae_paths: {spec}: {e}") from None
        for p in source.sae_positions:
            sae = source.sae(p)
            if sae.n_dict != n_dict:
                raise ConfigError(f"pretrained_sae_paths: {spec} has an SAE of {sae.n_dict:,} elements x {sae.d_in} at "
                                  f"{p}; this run's SAEs are {n_dict:,} x {gpt.config.n_embd} (dict_size_to_input_ratio"
                                  f"={c.dict_size_to_input_ratio:g}): set dict_size_to_input_ratio="
                                  f"{sae.n_dict / gpt.config.n_embd:g}")
            if p in pretrained:
                raise ConfigError(f"pretrained_sae_paths: two checkpoints have an SAE at {p}")
            sae.source, pretrained[p] = spec, sae.requires_grad_(c.retrain_saes)
            log(f"pretrained SAE at {p} from {spec} ({sae.settings['activation']}, "
                f"{'trained further' if c.retrain_saes else 'kept fixed'})"
                + ("" if p in c.sae_positions else "; its position is added to sae_positions"))
    try:
        model = SAETransformer(gpt, list(dict.fromkeys([*c.sae_positions, *pretrained])), c.dict_size_to_input_ratio,
                               saes=pretrained, **sae_settings(vars(c)))
        model.bos_token_id = None if c.include_bos else data.bos_token_id(c.tokenizer)  # BOS left to the model
        model.to(c.device).eval()  # eval: a dry run must not move BatchTopK's threshold
        with torch.no_grad():
            for loss in phases:  # one short sequence through the loss of each phase of the run
                compute_loss(model, torch.zeros(1, 2, dtype=torch.long, device=c.device), loss, full_metrics=False)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not any(p.requires_grad for p in model.saes.parameters()):
        raise ConfigError("every SAE is pretrained and retrain_saes=False: there is nothing to train. Add a position "
                          "to sae_positions for a new SAE, or set retrain_saes=True")
    return model.train()


def main(argv):
    config, notes = settings(argv)
    c = SimpleNamespace(**config, tokenizer=tokenizer_of(config["init_from"]))  # the model's own, for the data
    ddp, rank, world_size, c.device = setup_distributed(c.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device_type = "cuda" if c.device.startswith("cuda") else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device_type, dtype=getattr(torch, c.dtype)) if c.dtype != "float32" else nullcontext()
    global_batch, n_steps, warmup_steps, local_steps = schedule(c, world_size)
    log("config:")
    if master:
        print_config(config)
    if c.aux_k_coeff and c.dead_window_tokens >= n_steps * global_batch * c.n_ctx:
        notes.append(f"note: dead_window_tokens={c.dead_window_tokens:,} is as long as the whole run ("
                     f"{n_steps * global_batch * c.n_ctx:,} tokens): no element can be counted dead, so the "
                     "auxiliary-k loss will not act (a shorter --dead_window_tokens lets it)")
    for note in notes:
        log(note)

    # every check before any work: a checkpoint to resume, the data, the model
    with Run(config, master, log, bad_data=[data.DataError]) as run:
        c.out_dir = config["out_dir"]
        ckpt = run.resume_checkpoint(DEFAULTS, HOW_IT_RUNS, global_batch) if c.resume else None
        with data.as_config_error():  # this process's held-out batches; both parts checked before the model is made
            eval_batches, line = data.heldout_batches(c.dataset, c.n_ctx, c.eval_n_samples, c.batch_size, rank,
                                                      world_size, c.tokenizer)
        log(line)
        if ddp and not master:
            dist.barrier()  # the master trains the small model first, if it must
        model = build_model(c, [loss_at(c, s, local_steps) for s in {0, local_steps}], log)
        if ddp and master:
            dist.barrier()
        params = [p for p in model.saes.parameters() if p.requires_grad]  # the SAEs (pretrained ones may be fixed)
        optimizer = torch.optim.Adam(params, lr=c.lr)
        scaler = torch.amp.GradScaler(device_type, enabled=c.dtype == "float16")
        dead = DeadElements(model, c.dead_window_tokens) if c.aux_k_coeff > 0 else None
        step = ckpt["step"] if ckpt else 0
        # this process's training samples, where a checkpoint left them (never replayed); ids the model has no
        # embedding for are named now (the source's first rows, the held-out batches) or as their row is drawn
        with data.as_config_error():
            vocab_size = model.gpt.config.vocab_size
            data.check_vocab(c.dataset, vocab_size, eval_batches, tokenizer=c.tokenizer)
            stream = data.SampleStream(c.dataset, c.n_ctx, "train", rank, world_size, vocab_size=vocab_size,
                                       tokenizer=c.tokenizer)
            if ckpt:
                stream.resume(ckpt.get("data"), replay=step * c.batch_size * c.gradient_accumulation_steps)
        new = [p for p in model.sae_positions if not hasattr(model.sae(p), "source")]
        if new and not ckpt and (c.sae_init != "orthogonal" or c.normalize_activations != "none"):
            first = data.SampleStream(c.dataset, c.n_ctx, "train", tokenizer=c.tokenizer)  # the same on every process
            read = prepare_saes(model, new, islice(data.batches(first, c.batch_size), 8), c.sae_init,
                                c.normalize_activations)
            for p, n in read.items():
                log(f"{p}: input_scale {model.sae(p).input_scale.item():.4g}, initialisation {c.sae_init}, from "
                    f"{n:,} tokens")
        run.track(model, optimizer, scaler, dead, global_batch, step, stream, ddp, ckpt)
        train_batches = data.batches(stream, c.batch_size)
        if c.compile:
            for block in model.gpt.layers:
                block.compile()
        progress = TrainingLog(model, c, config, world_size, global_batch, master, log)
        progress.start(step, n_steps, local_steps, run.ckpt_path if ckpt else None)

        eval_metrics = None
        while step < n_steps:
            run.stop_if_requested(step, c.device)  # Ctrl-C or SIGTERM: a checkpoint of this step, then exit 130
            lr = get_lr(step, n_steps, warmup_steps, c.lr, c.min_lr_factor)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_config = loss_at(c, step, local_steps)
            fired = FeatureCounts(model) if dead is not None else None
            masks = dead.masks() if dead is not None else None
            with run.in_step():
                for _ in range(c.gradient_accumulation_steps):
                    idx = next(train_batches).to(c.device)
                    with autocast:
                        loss, metrics = compute_loss(model, idx, loss_config, full_metrics=False,
                                                     feature_counts=fired, dead=masks)
                    scaler.scale(loss / c.gradient_accumulation_steps).backward()
                    progress.add(metrics, 1 / c.gradient_accumulation_steps)  # the step's: the mean of its micro-steps
                if ddp:  # the SAE gradients (and BatchTopK's running thresholds) averaged, the firing counts summed
                    average_over_processes([p.grad for p in params if p.grad is not None]
                                           + [b for b in model.saes.buffers() if b.is_floating_point()], world_size)
                    if fired is not None:
                        fired.sum_over_processes(dist.all_reduce)
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                check_finite(loss, grad_norm, c.lr, c.max_grad_norm, step, fp16=scaler.is_enabled())
                progress.gradient_reach(step + 1)  # at a step that logs: the share of elements the gradient reached
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                for sae in model.saes.values():
                    sae.activation.project_()  # JumpReLU's thresholds back to >= 0: what is saved is what runs
                progress.add({"grad_norm": grad_norm})
                if dead is not None:
                    dead.step(fired)
                    progress.add({f"dead/{p}": m.sum() for p, m in dead.masks().items()})
            step = run.step = step + 1

            if progress.logs_at(step):
                progress.line(step, lr, ddp)
            save_now = crossed(step, global_batch, c.save_every_n_samples)
            eval_now = crossed(step, global_batch, c.eval_every_n_samples) or step == n_steps
            if save_now or eval_now:
                run.save(step)  # before any evaluation, so that an evaluation that fails or is stopped loses nothing
            if eval_now:
                eval_metrics = progress.evaluate(eval_batches, autocast, ddp, step)

        run.save(step)  # nothing new, unless a finished run was resumed without its saes.safetensors
        eval_metrics = eval_metrics or progress.evaluate(eval_batches, autocast, ddp, step)
        unigram = unigram_cross_entropy(c.dataset, c.n_ctx, c.eval_n_samples) if master and \
            c.init_from == "shakespeare" and c.dataset == "shakespeare" else None  # a unigram model's, beside it
        progress.finish(eval_metrics, unigram)
    if ddp:
        dist.destroy_process_group()


def crossed(step, global_batch, every):
    """Whether this step's samples crossed a multiple of `every` samples."""
    return step * global_batch // every > (step - 1) * global_batch // every


if __name__ == "__main__":
    main(sys.argv[1:])
