"""
Train sparse autoencoders spliced into GPT-2: local, end-to-end, end-to-end + downstream, or any mix.

    python train.py                                            # the embedded default: offline, on a CPU, minutes
    python train.py config/e2e_layer6.py                       # a run of the paper (GPT-2 small, OpenWebText)
    python train.py config/e2e_layer6.py --sparsity_coeff=5    # any setting overridden on the command line
    python train.py --activation=topk --k=16                   # a TopK SAE (also batchtopk, jumprelu)
    python train.py config/e2e_layer6.py --resume=True         # continue an interrupted run from out_dir
    torchrun --nproc_per_node=8 train.py config/e2e_layer6.py  # data parallel on 8 GPUs

The defaults below describe the embedded run: a small GPT-2 trained from scratch on Shakespeare (cached after the
first run; see train_gpt.py) gets an end-to-end SAE at its middle layer. The paper's runs live in config/.
Each step: a batch of token ids -> compute_loss (e2esae.py) -> backward into the SAEs only -> Adam.

Nothing trained is lost (class Run): every setting, the data and a checkpoint to resume are checked before any
training; a second run of the same command writes to out-2 (out-3, ...) and keeps the first; a run holds its
out_dir against a second run into it; a checkpoint is written before every evaluation; Ctrl-C saves at the end of
the step; an error after a step saves that step; a loss or gradient that is not finite stops the run before the
step is applied, with the last finite weights saved.
"""

import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data
import runs
from configurator import ConfigError, check_settings, check_writable, configure, defaults, print_config
from e2esae import DeadElements, FeatureCounts, SAETransformer, compute_loss, evaluate, training_type
from runs import get_lr
from train_gpt import load_gpt

# -----------------------------------------------------------------------------
# model and SAEs
init_from = "shakespeare"  # 'gpt2' (-medium, -large, -xl) | a directory with config.json + model.safetensors |
#                            'shakespeare': the small model of the embedded default, trained and cached on first use
small_model_config = ""  # with 'shakespeare': a train_gpt.py config file for that model (cached per recipe)
sae_positions = ["blocks.2.hook_resid_pre"]
dict_size_to_input_ratio = 16.0  # n_dict = 16 x 128 = 2,048 dictionary elements
activation = "relu"  # 'relu' (the paper's) | 'topk' | 'batchtopk' | 'jumprelu' (e2esae.py has their definitions)
k = 0  # topk and batchtopk: active codes per token (they need it; the others refuse it)
jumprelu_bandwidth = 0.001  # jumprelu: the straight-through estimator's bandwidth
jumprelu_init_threshold = 0.001  # jumprelu: every threshold's starting value
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
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
compile = False  # torch.compile the GPT's blocks (pays off on a GPU for long runs)
peak_flops = 989e12  # for MFU: an H100's dense bf16 peak
# -----------------------------------------------------------------------------

DEFAULTS = defaults(globals())
LOSS_KEYS = ("sparsity_coeff", "p_norm", "kl_coeff", "in_to_orig_coeff", "in_to_orig_positions", "out_to_in_coeff",
             "out_to_orig_coeff", "aux_k_coeff", "kl_rescale")
# settings that change how a run is watched, where it is written or on what hardware, not the SAEs it trains
NOT_THE_RUN = ("out_dir", "resume", "overwrite", "log_every_n_steps", "eval_every_n_samples", "eval_n_samples",
               "save_every_n_samples", "wandb_log", "wandb_project", "wandb_run_name", "device", "dtype", "compile",
               "peak_flops")
positive, non_negative, names = (lambda v: v > 0), (lambda v: v >= 0), (lambda v: all(isinstance(p, str) for p in v))
SETTINGS = [  # (key, test, what the value must be): every range, checked before anything else happens
    ("sae_positions", lambda v: bool(v) and names(v), "a non-empty list of names like ['blocks.6.hook_resid_pre']"),
    ("dict_size_to_input_ratio", positive, "positive (n_dict = ratio x the model's width)"),
    ("activation", lambda v: v in ("relu", "topk", "batchtopk", "jumprelu"),
     "'relu', 'topk', 'batchtopk' or 'jumprelu'"),
    ("k", non_negative, ">= 0 (the active codes per token of topk and batchtopk)"),
    *[(k, positive, "positive") for k in ("jumprelu_bandwidth", "dead_window_tokens")],
    ("jumprelu_init_threshold", non_negative, ">= 0"),
    ("pretrained_sae_paths", names, "a list of checkpoint specs like ['out-local']"),
    *[(k, non_negative, ">= 0") for k in ("sparsity_coeff", "kl_coeff", "in_to_orig_coeff", "out_to_in_coeff",
                                          "out_to_orig_coeff", "aux_k_coeff")],
    ("p_norm", positive, "positive (1 is the L1 norm)"),
    ("in_to_orig_positions", names, "a list of names like ['blocks.7.hook_resid_pre']"),
    ("finetune_fraction", lambda v: 0 <= v < 1, "in [0, 1): the share of the steps fine-tuned end to end"),
    ("n_ctx", lambda v: v >= 2, "at least 2 (a sample's tokens predict the next ones)"),
    *[(k, positive, "positive") for k in ("n_samples", "batch_size", "gradient_accumulation_steps", "lr",
                                          "max_grad_norm", "eval_every_n_samples", "eval_n_samples",
                                          "save_every_n_samples", "log_every_n_steps", "peak_flops")],
    ("warmup_samples", non_negative, ">= 0"),
    ("min_lr_factor", lambda v: 0 <= v <= 1, "between 0 and 1 (the final learning rate is min_lr_factor x lr)"),
    ("dtype", lambda v: v in ("float32", "bfloat16", "float16"), "'float32', 'bfloat16' or 'float16'"),
    ("device", lambda v: not v.startswith("cuda") or torch.cuda.is_available(), "'cpu': no CUDA GPU is available"),
]


# ---- settings ----

def settings(argv):
    """The resolved settings: config files and overrides, every range, what contradicts, and the defaults that
    depend on the activation. Returns (config, notes): notes say what was resolved, for the start-up log."""
    given = set()
    config = configure(DEFAULTS, argv, given)
    check_settings(config, SETTINGS)
    if config["resume"] and config["overwrite"]:
        raise ConfigError("resume=True and overwrite=True contradict each other: continue the run, or replace it")
    if "dtype" not in given and not config["device"].startswith("cuda"):
        config["dtype"] = "float32"  # the default dtype is the GPU's; a CPU run asked for none
    if config["dtype"] != "float32" and not config["device"].startswith("cuda"):
        raise ConfigError(f"dtype={config['dtype']!r} runs under CUDA autocast, and device={config['device']!r}: on a "
                          "CPU use dtype='float32'")
    if config["finetune_fraction"] > 0 and config["kl_coeff"] == 0 and config["in_to_orig_coeff"] == 0:
        raise ConfigError("finetune_fraction fine-tunes end to end after a local start, but kl_coeff and "
                          "in_to_orig_coeff are 0: set kl_coeff (the fine-tune's loss is the one configured)")
    return config, resolve_activation(config, given)


def resolve_activation(config, given):
    """Each activation's own defaults, and a refusal for any setting that would do nothing for it."""
    a, notes = config["activation"], []
    sets_k = a in ("topk", "batchtopk")
    if sets_k and config["k"] < 1:
        raise ConfigError(f"activation={a!r} needs k, the active codes per token: e.g. --k=32")
    if not sets_k and config["k"]:
        raise ConfigError(f"k={config['k']} is the active codes per token of topk and batchtopk; activation={a!r} "
                          "sets its sparsity with sparsity_coeff: drop k, or use --activation=topk")
    for key in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
        if key in given and a != "jumprelu":
            raise ConfigError(f"{key} is JumpReLU's; activation={a!r} has none: drop it, or use --activation=jumprelu")
    if a == "jumprelu" and "p_norm" in given:
        raise ConfigError("activation='jumprelu' is penalised by the L0 norm of its code (sparsity_coeff x L0 / d_in), "
                          "so p_norm does nothing: drop it")
    if sets_k:
        if "sparsity_coeff" not in given:
            config["sparsity_coeff"] = 0.0
        notes.append(f"activation={a}: k={config['k']} sets the sparsity; sparsity_coeff={config['sparsity_coeff']:g}"
                     + (" (an L_p term on top of it)" if config["sparsity_coeff"] else " (give it to add an L_p term)"))
        if "aux_k_coeff" not in given and config["out_to_in_coeff"] > 0:
            config["aux_k_coeff"] = 1 / 32  # it reconstructs the residual x - x_hat: where the loss asks for x too
    if sets_k and config["aux_k_coeff"] == 0 and "aux_k_coeff" not in given:
        notes.append("aux_k_coeff=0: the auxiliary-k loss reconstructs x - x_hat, which a loss without out_to_in "
                     "does not ask for (give aux_k_coeff to add it anyway)")
    if config["aux_k_coeff"] > 0:
        notes.append(f"aux_k_coeff={config['aux_k_coeff']:g}: dead elements (none of the last "
                     f"{config['dead_window_tokens']:,} tokens fired them) are trained on the residual")
    elif "dead_window_tokens" in given:
        raise ConfigError("dead_window_tokens sets when the auxiliary-k loss counts an element dead, and "
                          "aux_k_coeff is 0: drop it, or set aux_k_coeff")
    return notes


def loss_at(c, step, n_steps):
    """compute_loss's loss settings at this step: with finetune_fraction, the first steps are local (sparsity and
    out_to_in, at 1 where it is 0; no KL, no downstream term), the last share the configured loss."""
    kwargs = {k: getattr(c, k) for k in LOSS_KEYS}
    if step < local_steps(c, n_steps):
        kwargs.update(kl_coeff=0.0, in_to_orig_coeff=0.0, kl_rescale=False, out_to_in_coeff=c.out_to_in_coeff or 1.0)
    return kwargs


def local_steps(c, n_steps):
    return round((1 - c.finetune_fraction) * n_steps) if c.finetune_fraction else 0


def schedule(c, world_size):
    """(global batch in samples, steps, warmup steps): the run is counted in samples, stepped in global batches."""
    global_batch = c.batch_size * c.gradient_accumulation_steps * world_size
    n_steps = c.n_samples // global_batch
    if n_steps == 0:
        raise ConfigError(f"n_samples={c.n_samples} is less than one step of {global_batch} samples")
    if c.eval_n_samples < world_size:
        raise ConfigError(f"eval_n_samples={c.eval_n_samples} gives some of the {world_size} processes nothing to "
                          "evaluate")
    return global_batch, n_steps, math.ceil(c.warmup_samples / global_batch)


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


def load_heldout(c, rank, world_size, log):
    """This rank's held-out batches, after checking that both parts of the data hold samples (and every local
    file is readable): before the model, which may have to be trained first."""
    try:
        rule = data.heldout_rule(c.dataset)
        eval_samples = data.heldout_samples(c.dataset, c.n_ctx, c.eval_n_samples, rank, world_size)
        if data.count_samples(c.dataset, c.n_ctx, "train", at_most=world_size) < world_size:
            raise data.DataError(f"the training part of dataset {c.dataset!r} holds fewer than {world_size} samples "
                                 f"of n_ctx={c.n_ctx} tokens (held out: {rule[1]}): give more text or a smaller n_ctx")
    except data.DataError as e:
        raise ConfigError(str(e)) from None
    n_eval = len(eval_samples) * world_size
    log(f"data: {c.dataset!r}, held out: {rule[1]}; evaluating on {n_eval} samples"
        + (f" (eval_n_samples={c.eval_n_samples}: the held-out part holds no more)"
           if n_eval < c.eval_n_samples else "")
        + (f", {len(eval_samples)} on each of {world_size} processes" if world_size > 1 else ""))
    return data.in_batches(eval_samples, c.batch_size)


def load_model(c, ddp, master, log):
    """The frozen GPT-2 and its SAEs (the same initialisation on every rank), the pretrained ones in place, checked
    against the settings: positions, dictionary size, context length, and the loss's own checks on a dry run."""
    if ddp and not master:
        dist.barrier()  # rank 0 trains the small model first, if it must
    torch.manual_seed(c.seed)  # before the GPT, whose construction draws from the generator too: the SAEs' init
    try:
        gpt = load_gpt(c.init_from, c.small_model_config)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"init_from={c.init_from!r}: {e}") from None
    if ddp and master:
        dist.barrier()
    if c.n_ctx > gpt.config.block_size:
        raise ConfigError(f"n_ctx={c.n_ctx} is longer than the model's context of {gpt.config.block_size} tokens: "
                          f"use --n_ctx={gpt.config.block_size} or less")
    n_dict = int(gpt.config.n_embd * c.dict_size_to_input_ratio)
    if n_dict < 1:
        raise ConfigError(f"dict_size_to_input_ratio={c.dict_size_to_input_ratio} gives a dictionary of 0 elements "
                          f"at width {gpt.config.n_embd}: use at least {1 / gpt.config.n_embd:.2g}")
    try:
        pretrained = load_pretrained(c, gpt, n_dict, log)
        positions = list(dict.fromkeys([*c.sae_positions, *pretrained]))
        sae_kwargs = dict(activation=c.activation, k=c.k or None,
                          **(dict(bandwidth=c.jumprelu_bandwidth, init_threshold=c.jumprelu_init_threshold)
                             if c.activation == "jumprelu" else {}))
        model = SAETransformer(gpt, positions, c.dict_size_to_input_ratio, **sae_kwargs)
        for p, sae in pretrained.items():
            model.saes[p.replace(".", "-")] = sae.requires_grad_(c.retrain_saes)
        model.to(c.device).eval()  # eval: a dry run must not move BatchTopK's threshold
        with torch.no_grad():  # the loss's own checks, on one short sequence, in each phase of the run
            for step in {0, local_steps(c, 1)}:
                compute_loss(model, torch.zeros(1, 2, dtype=torch.long, device=c.device), **loss_at(c, step, 1),
                             full_metrics=False)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not any(p.requires_grad for p in model.saes.parameters()):
        raise ConfigError("every SAE is pretrained and retrain_saes=False: there is nothing to train. Add a position "
                          "to sae_positions for a new SAE, or set retrain_saes=True")
    return model.train(), gpt.name_or_path


def load_pretrained(c, gpt, n_dict, log):
    """{position: SAE} of every SAE in pretrained_sae_paths, each checked against this run's model and shape and
    marked with where it came from. Positions not in sae_positions are added (said so)."""
    from interop import load_checkpoint
    found = {}
    for spec in c.pretrained_sae_paths:
        try:
            source = load_checkpoint(spec, gpt=gpt)
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError(f"pretrained_sae_paths: {spec}: {e}") from None
        for p in source.sae_positions:
            sae = source.sae(p)
            if sae.n_dict != n_dict:
                raise ConfigError(f"pretrained_sae_paths: {spec} has an SAE of {sae.n_dict:,} elements x {sae.d_in} "
                                  f"at {p}; this run's SAEs are {n_dict:,} x {gpt.config.n_embd} "
                                  f"(dict_size_to_input_ratio={c.dict_size_to_input_ratio:g}): set "
                                  f"dict_size_to_input_ratio={sae.n_dict / gpt.config.n_embd:g}")
            if p in found:
                raise ConfigError(f"pretrained_sae_paths: two checkpoints have an SAE at {p}")
            sae.source = spec
            found[p] = sae
            log(f"pretrained SAE at {p} from {spec} ({sae.settings['activation']}, "
                f"{'trained further' if c.retrain_saes else 'kept fixed'})"
                + ("" if p in c.sae_positions else "; its position is added to sae_positions"))
    return found


def train_stream(c, rank, world_size, step, ckpt, vocab_size=None, eval_batches=()):
    """This rank's training samples (data.SampleStream), where the checkpoint left them: a position in the token
    file or the stream, never a replay (a checkpoint from before data states were saved is replayed). With the
    model's vocab_size, a token id it has no embedding for is named now (data.check_vocab: the source's start and
    the held-out batches) or as its row is drawn, not as an index error mid-run."""
    try:
        if vocab_size is not None:
            data.check_vocab(c.dataset, vocab_size, eval_batches)
        stream = data.SampleStream(c.dataset, c.n_ctx, "train", rank, world_size, vocab_size=vocab_size)
        if ckpt is None:
            return stream
        states = ckpt.get("data")
        if states is None:
            return stream.skip(step * c.batch_size * c.gradient_accumulation_steps)  # samples this rank took
        state = states[0] if states[0]["kind"] == "tokens" else states[rank]  # a token file's: one for all ranks
        if state is None:
            raise data.DataError(f"the checkpoint holds no data position for process {rank}: resume with the "
                                 f"{len(states)} processes that saved it")
        stream.load_state_dict(state)
        return stream
    except data.DataError as e:
        raise ConfigError(str(e)) from None


def check_resumable(path, config, global_batch):
    """The checkpoint to resume, read and checked against this run's settings before any model is built (the model
    may have to be trained first): it must be the same run. Returns it."""
    if not os.path.isfile(path):
        raise ConfigError(f"resume=True but there is no checkpoint at {path}; drop --resume or point out_dir at a run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved = ckpt["config"]
    except Exception as e:
        raise ConfigError(f"{path} is damaged and cannot be read ({type(e).__name__}: {e}); it was left untouched. "
                          "Start a fresh run in another out_dir") from e
    differ = [k for k in DEFAULTS if k not in (*NOT_THE_RUN, "batch_size", "gradient_accumulation_steps")
              and saved.get(k, DEFAULTS[k]) != config[k]]
    if differ:
        shown = ", ".join(f"{k}={saved.get(k, DEFAULTS[k])!r} (this run: {config[k]!r})" for k in differ)
        raise ConfigError(f"{path} was trained with {shown}: a resumed run keeps its own settings. Resume without "
                          "changing them, or train these SAEs further as a new run: "
                          f"--pretrained_sae_paths=['{os.path.dirname(path)}'] --retrain_saes=True --out_dir=...")
    saved_batch = ckpt.get("global_batch", saved["batch_size"] * saved["gradient_accumulation_steps"])
    if saved_batch != global_batch:
        raise ConfigError(f"{path} was trained with a global batch of {saved_batch} samples, this run has "
                          f"{global_batch} (batch_size x gradient_accumulation_steps x processes): resume with the "
                          "same global batch, so that the data and the schedule continue where they stopped")
    return ckpt


class Diverged(RuntimeError):
    """A loss or gradient norm that is not finite: raised before the step is applied, so the weights are intact."""


class Run:
    """A run's out_dir and checkpoints, and the machinery that loses nothing.

    - A fresh run into an out_dir that holds a run goes to out_dir-2 (-3, ...) instead; --resume=True continues
      the run there, --overwrite=True replaces it.
    - Inside `with run:` the run holds out_dir (runs.OutDirLock): a second run into it is refused at start-up.
    - save(step) writes ckpt.pt and saes.safetensors atomically; a write that fails says which file and why.
    - Ctrl-C or SIGTERM sets stop_requested: the loop saves and stops at the end of its step; a second Ctrl-C
      stops at once.
    - Leaving `with run:` by an error outside a step (evaluation, logging, wandb) or a divergence saves the last
      step first, and every error says which checkpoint is complete.
    Under DDP only rank 0 writes."""

    def __init__(self, c, config, master, log):
        self.c, self.config, self.master, self.log = c, config, master, log
        if not (c.resume or c.overwrite) and runs.holds_run(c.out_dir):
            fresh = runs.free_out_dir(c.out_dir)
            log(f"{c.out_dir} holds a run, which is kept: this run writes to {fresh} (--resume=True continues the run "
                f"in {c.out_dir}, --overwrite=True replaces it)")
            c.out_dir = config["out_dir"] = fresh
        if master:  # the only rank that writes; two ranks probing one new folder would race to make it
            check_writable(c.out_dir, "out_dir")
        self.ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
        self.lock = runs.OutDirLock(c.out_dir) if master else None
        self.saved_step, self.step, self.in_step, self.state = None, 0, False, None
        self.stop_requested, self.seconds, self.t_start, self.old_handlers = False, 0.0, time.time(), {}
        self.stream, self.ddp = None, False

    def __enter__(self):
        if self.lock:
            try:
                self.lock.acquire()
            except runs.LockedError as e:
                raise ConfigError(str(e)) from None
        self.old_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _request_stop(self, signum, frame):
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.log(f"\nsignal {signum}: stopping after this step and saving a checkpoint (Ctrl-C again: stop at once)")

    def track_data(self, stream, ddp):
        """The training stream, whose position every checkpoint records (under DDP each rank's, gathered)."""
        self.stream, self.ddp = stream, ddp

    def data_states(self):
        """Every rank's stream position; all ranks call it together. An error on rank 0 alone saves its own."""
        state = self.stream.state_dict()
        if not self.ddp or state["kind"] == "tokens":  # a token file's position is the same for every rank
            return [state]
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        return states

    def track(self, model, optimizer, scaler, dead, global_batch, step, ckpt=None):
        """What save() writes; from `ckpt` (resume), the state it restores."""
        self.state = dict(model=model, optimizer=optimizer, scaler=scaler, dead=dead, global_batch=global_batch)
        if ckpt is not None:
            model.saes.load_state_dict(ckpt["saes"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            if dead is not None and "dead" in ckpt:
                dead.load_state_dict(ckpt["dead"])
            torch.set_rng_state(ckpt["rng"])
            if "cuda_rng" in ckpt and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
            self.seconds, self.saved_step = ckpt.get("train_seconds", 0.0), ckpt["step"]
            if not os.path.isfile(os.path.join(self.c.out_dir, "saes.safetensors")):
                self.saved_step = None  # written again at the next save (a finished run, resumed: at the end)
        self.step, self.t_start = step, time.time()

    @contextmanager
    def in_progress(self):
        """Around a training step: an error inside it leaves the weights of the step before, already counted."""
        self.in_step = True
        yield
        self.in_step = False

    def save(self, step, gather=True):
        """ckpt.pt (everything a resumed run needs) and saes.safetensors beside it (what eval.py reads), once a step.
        Every rank calls it (to gather the data positions), except after an error (gather=False: rank 0's own)."""
        if self.saved_step == step:
            return
        states = (self.data_states() if gather else [self.stream.state_dict()]) if self.stream is not None else None
        if not self.master:
            self.saved_step = step
            return
        s = self.state
        ckpt = {"saes": s["model"].saes.state_dict(), "optimizer": s["optimizer"].state_dict(),
                "scaler": s["scaler"].state_dict(), "step": step, "global_batch": s["global_batch"],
                "rng": torch.get_rng_state(), "config": self.config,
                "train_seconds": self.seconds + time.time() - self.t_start,
                "sources": {p: getattr(s["model"].sae(p), "source", "trained here") for p in s["model"].sae_positions},
                "data": states}
        if s["dead"] is not None:
            ckpt["dead"] = s["dead"].state_dict()
        if torch.cuda.is_available():
            ckpt["cuda_rng"] = torch.cuda.get_rng_state_all()
        runs.write_atomic(self.ckpt_path, lambda f: torch.save(ckpt, f))
        runs.write_atomic(os.path.join(self.c.out_dir, "saes.safetensors"), lambda f: s["model"].save(f, self.config))
        self.saved_step = step

    def __exit__(self, kind, error, tb):
        try:
            if error is not None and self.state is not None and self.master and not isinstance(error, SystemExit):
                if (not self.in_step or isinstance(error, Diverged)) and not isinstance(error, runs.SaveError):
                    try:
                        self.save(self.step, gather=False)
                    except runs.SaveError as e:
                        print(f"\n{e}", file=sys.stderr)
                if self.saved_step is not None and isinstance(error, Diverged):
                    print(f"\nthe checkpoint of step {self.saved_step} in {self.c.out_dir} holds the last finite "
                          "weights: a resumed run would diverge again there. Start a new run with a lower lr, from "
                          f"scratch or from these SAEs (--pretrained_sae_paths=['{self.c.out_dir}'] "
                          "--retrain_saes=True)", file=sys.stderr)
                elif self.saved_step is not None:
                    print(f"\n{kind.__name__} at step {self.step}: the checkpoint of step {self.saved_step} in "
                          f"{self.c.out_dir} is complete; continue from it with --resume=True", file=sys.stderr)
        finally:
            if self.lock:
                self.lock.release()
            for sig, handler in self.old_handlers.items():
                signal.signal(sig, handler)
        if isinstance(error, KeyboardInterrupt):
            sys.exit(130)
        if isinstance(error, (Diverged, runs.SaveError)):
            sys.exit(f"{kind.__name__}: {error}")  # said in full already; no traceback for what is not a bug


def main(argv):
    config, notes = settings(argv)
    c = SimpleNamespace(**config)
    ddp, rank, world_size = setup_distributed(c)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device_type = "cuda" if c.device.startswith("cuda") else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c.dtype]
    autocast = torch.autocast(device_type, dtype=ptdtype) if c.dtype != "float32" else nullcontext()
    global_batch, n_steps, warmup_steps = schedule(c, world_size)
    run = Run(c, config, master, log)  # the out_dir: this run's own (see Run)
    log("config:")
    if master:
        print_config(config)
    for note in notes:
        log(note)

    with run:  # every check before any work: a checkpoint to resume, the data, the model
        ckpt = check_resumable(run.ckpt_path, config, global_batch) if c.resume else None
        eval_batches = load_heldout(c, rank, world_size, log)
        model, path = load_model(c, ddp, master, log)
        optimizer = torch.optim.Adam([p for p in model.saes.parameters() if p.requires_grad], lr=c.lr)
        scaler = torch.amp.GradScaler(device_type, enabled=c.dtype == "float16")
        dead = DeadElements(model, c.dead_window_tokens) if c.aux_k_coeff > 0 else None
        step = ckpt["step"] if ckpt else 0
        run.track(model, optimizer, scaler, dead, global_batch, step, ckpt)
        stream = train_stream(c, rank, world_size, step, ckpt)
        run.track_data(stream, ddp)
        train_batches = data.batches(stream, c.batch_size)
        if c.compile:
            for block in model.gpt.transformer.h:
                block.compile()
        log_start(model, c, path, n_steps, global_batch, world_size, ckpt, run, log)
        wandb = start_wandb(c, config) if c.wandb_log and master else None
        fpt = estimate_flops_per_token(model, c.kl_coeff == 0 and c.in_to_orig_coeff == 0)

        sums, n_logged, t_log, eval_metrics = {}, 0, time.time(), None
        while step < n_steps:
            if stop_everywhere(run.stop_requested, ddp, c.device):
                run.save(step)
                log(f"interrupted at step {step}: checkpoint saved in {c.out_dir}; continue with --resume=True")
                if ddp:
                    dist.destroy_process_group()
                sys.exit(130)
            lr = get_lr(step, n_steps, warmup_steps, c.lr, c.min_lr_factor)
            with run.in_progress():
                train_step(model, optimizer, scaler, train_batches, c, lr, loss_at(c, step, n_steps), autocast,
                           sums, world_size, dead, step)
            step, n_logged = step + 1, n_logged + 1
            run.step = step

            if step % c.log_every_n_steps == 0 or step == n_steps:
                figures, dt = log_step(sums, n_logged, t_log, ddp, world_size)
                tokens_per_s = global_batch * c.n_ctx / dt
                mfu = 100 * fpt * tokens_per_s / world_size / c.peak_flops if device_type == "cuda" else None
                log(log_line(step, figures, model.sae_positions, lr, dt, tokens_per_s, mfu))
                if wandb:
                    wandb.log({f"train/{k}": v for k, v in figures.items()} | {
                        "train/lr": lr, "train/tokens_per_s": tokens_per_s, "samples": step * global_batch}, step=step)
                sums, n_logged, t_log = {}, 0, time.time()
            save_now, eval_now = (crossed(step, global_batch, c.save_every_n_samples),
                                  crossed(step, global_batch, c.eval_every_n_samples) or step == n_steps)
            if save_now or eval_now:
                run.save(step)  # before any evaluation, so that an evaluation that fails or is stopped loses nothing
            if eval_now:
                eval_metrics = evaluate_and_log(model, eval_batches, c, autocast, ddp, wandb, step, log)

        run.save(step)  # nothing new, unless a finished run was resumed without its saes.safetensors
        eval_metrics = eval_metrics or evaluate_and_log(model, eval_batches, c, autocast, ddp, wandb, step, log)
        if master:
            print_summary(eval_metrics, model, c, path)
        if wandb:
            wandb.finish()
    if ddp:
        dist.destroy_process_group()


# ---- the pieces main uses once training runs ----

def log_start(model, c, path, n_steps, global_batch, world_size, ckpt, run, log):
    kind = training_type(c.kl_coeff, c.in_to_orig_coeff)
    if c.finetune_fraction:
        first = local_steps(c, n_steps)
        kind = f"local for steps 1-{first}, then {kind} for steps {first + 1}-{n_steps} (finetune_fraction)"
    first = model.sae(model.sae_positions[0])
    log(f"model: {path} ({model.gpt.num_params() / 1e6:.1f}M parameters, frozen); SAEs at "
        f"{', '.join(model.sae_positions)}, {first.n_dict:,} elements each, {first.activation.name}"
        + (f" k={first.activation.k}" if hasattr(first.activation, "k") else "") + f"; training type: {kind}")
    log(f"{n_steps:,} steps of {global_batch} samples x {c.n_ctx} tokens = {global_batch * c.n_ctx:,} tokens per step "
        f"({c.batch_size} per micro-step x {c.gradient_accumulation_steps} accumulation x {world_size} processes); "
        f"out_dir {c.out_dir}" + (f"; resumed from {run.ckpt_path} at step {ckpt['step']}" if ckpt else ""))


def crossed(step, global_batch, every):
    """Whether this step's samples crossed a multiple of `every` samples."""
    return step * global_batch // every > (step - 1) * global_batch // every


def stop_everywhere(requested, ddp, device):
    """Under DDP every rank must agree to stop at the same step."""
    if not ddp:
        return requested
    flag = torch.tensor([float(requested)], device=device)
    dist.all_reduce(flag)
    return flag.item() > 0


def start_wandb(c, config):
    import wandb
    os.makedirs(c.out_dir, exist_ok=True)
    wandb.init(project=c.wandb_project, name=c.wandb_run_name or None, config=config, dir=c.out_dir)
    return wandb


def evaluate_and_log(model, eval_batches, c, autocast, ddp, wandb, step, log):
    """Every metric on the held-out batches (e2esae.evaluate, summed over processes), one eval line, and wandb."""
    all_reduce = (lambda t: dist.all_reduce(t)) if ddp else None
    kwargs = {k: getattr(c, k) for k in LOSS_KEYS if k not in ("aux_k_coeff", "kl_rescale")}
    metrics, counts = evaluate(model, eval_batches, kwargs, autocast, all_reduce)
    shown = ["ce_orig", "ce_sae", "ce_increase", "kl"] + [f"{k}/{p}" for p in model.sae_positions
                                                         for k in ("l0", "alive", "explained_variance")]
    log("eval | " + " | ".join(f"{k} {fmt(metrics[k])}" for k in shown))
    if wandb:
        import numpy as np
        wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        for p, f in counts.frequencies().items():
            wandb.log({f"eval/log10_feature_frequency/{p}": wandb.Histogram(np.log10(f[f > 0].numpy()))}, step=step)
        wandb.save(os.path.join(c.out_dir, "saes.safetensors"), base_path=c.out_dir)
    return metrics


def train_step(model, optimizer, scaler, batches, c, lr, kwargs, autocast, sums, world_size, dead, step):
    """One optimiser step: gradient_accumulation_steps micro-batches of compute_loss backpropagated into the SAEs
    (averaged over processes under DDP), clipped, then Adam. The step's figures are added to `sums`, averaged
    over its micro-steps, as 0-d tensors. One host sync per step: the check that the loss and the gradient norm
    are finite, before anything is applied (Diverged otherwise)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    fired = FeatureCounts(model) if dead is not None else None
    masks = dead.masks() if dead is not None else None
    for _ in range(c.gradient_accumulation_steps):
        idx = next(batches).to(c.device)
        with autocast:
            loss, metrics = compute_loss(model, idx, **kwargs, full_metrics=False, feature_counts=fired, dead=masks)
        scaler.scale(loss / c.gradient_accumulation_steps).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.float() / c.gradient_accumulation_steps
    params = [p for p in model.saes.parameters() if p.requires_grad]
    if world_size > 1:  # average the SAE gradients (and BatchTopK's running thresholds) over the processes
        shared = [p.grad for p in params if p.grad is not None]
        shared += [b for b in model.saes.buffers() if b.is_floating_point()]
        for t in shared:
            dist.all_reduce(t)
            t /= world_size
        for counts in (fired.counts.values() if fired is not None else ()):
            dist.all_reduce(counts)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
    finite = torch.isfinite(loss) if scaler.is_enabled() else torch.isfinite(loss) & torch.isfinite(grad_norm)
    if not finite.item():  # fp16's inf gradients are the GradScaler's to skip; a non-finite loss is divergence
        optimizer.zero_grad(set_to_none=True)
        raise Diverged(f"at step {step + 1} the loss is {loss.item():.4g} and the gradient norm "
                       f"{grad_norm.item():.4g}: training diverged, and that step was not applied. Try a lower "
                       f"learning rate (lr={c.lr:g} now; e.g. --lr={c.lr / 10:g}) or a smaller max_grad_norm (now "
                       f"{c.max_grad_norm:g}) in a new run")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    for sae in model.saes.values():
        sae.activation.project_()  # JumpReLU's thresholds back to >= 0: what is saved is what SAELens computes
    sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.float()
    if dead is not None:
        if world_size > 1:
            fired.n_tokens = {p: n * world_size for p, n in fired.n_tokens.items()}
        dead.step(fired)
        for p, m in dead.masks().items():
            sums[f"dead/{p}"] = sums.get(f"dead/{p}", 0.0) + m.sum().float()


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
    if "dead/" + positions[0] in figures:
        line += ["dead " + "/".join(f"{figures['dead/' + p]:.0f}" for p in positions)]
    line += [f"lr {lr:.1e}", f"norm {figures['grad_norm']:.2f}", f"{dt * 1000:.0f} ms", f"{tokens_per_s:,.0f} tok/s"]
    line += [f"mfu {mfu:.1f}%"] if mfu is not None else []
    return " | ".join(line)


def fmt(v):
    return f"{v:,}" if isinstance(v, int) else f"{v:.4f}"


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
    saes = os.path.join(c.out_dir, "saes.safetensors")
    print(f"\nthe SAEs: {saes} (python eval.py --checkpoints=\"['{c.out_dir}']\")")


if __name__ == "__main__":
    main(sys.argv[1:])
