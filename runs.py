"""
Runs that lose nothing: what every training script shares about a run, behind a small interface.

    lr = get_lr(step, n_steps, warmup_steps, lr_max, min_lr_factor)   # warmup, then cosine decay
    with Run(config, master=True, log=print) as run:    # out_dir chosen (out-2, ... if taken) and held (a lock)
        ckpt = run.resume_checkpoint(defaults, ...)     # --resume=True: the checkpoint, checked to be this run's
        run.track(model, optimizer, ...)                # what save() writes; on resume, what the run depends on
                                                        # (pretrained SAEs, data) checked, the state restored
        while step < n_steps:
            run.stop_if_requested(step, device)         # after Ctrl-C or SIGTERM: save this step and exit
            with run.in_step(): ...                     # an error inside a step leaves the step before intact
            run.save(step)                              # ckpt.pt, then saes.safetensors, each written atomically

    write_atomic(path, lambda f: torch.save(obj, f))    # a reader never sees half a file
    write_json(path, obj)

A write goes to a temporary file beside its target (named after this process, so two processes never share one)
and is renamed over the target only once it is complete. If writing fails (a full disk, a folder made read-only),
the temporary file is removed and one SaveError says which file could not be written and why, and that the target,
if it existed, is left as it was.

The two files of a save are one unit: ckpt.pt holds saes.safetensors's tensors and metadata (the step among them)
and is renamed into place first, so whatever stops a save, ckpt.pt is a whole save and the truth. A resume writes
saes.safetensors again from it where that file is missing, damaged or of another save; the scripts that read an
out_dir read the SAEs from ckpt.pt then, and say so (interop.read_run). A checkpoint is read as tensors and plain
data only (interop.load_pt), never unpickled in full: a ckpt.pt from a shared folder cannot run code.
"""

import atexit
import json
import math
import os
import signal
import socket
import sys
import time
from contextlib import contextmanager

from configurator import ConfigError


def check_writable(directory, what):
    """Raise ConfigError unless `directory` exists or can be created, and a file can be written in it. Leaves
    nothing behind: a directory created for the test is removed again."""
    created, d = [], os.path.abspath(directory)
    while not os.path.exists(d):
        created.append(d)
        d = os.path.dirname(d)
    try:
        for d in created[::-1]:
            try:
                os.mkdir(d)
            except FileExistsError:  # made by another process meanwhile: not ours to remove
                created.remove(d)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{what} {directory!r} cannot be written ({e.strerror or e}): choose another") from None
    finally:
        for d in created:
            try:
                os.rmdir(d)
            except OSError:
                pass


def get_lr(step, n_steps, warmup_steps, lr, min_lr_factor):
    """Linear warmup over warmup_steps, then cosine decay to min_lr_factor x lr at the last step (the paper's
    schedule; train.py, train_gpt.py and mlp.py all use it)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, n_steps - 1 - warmup_steps))
    min_lr = lr * min_lr_factor
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class SaveError(OSError):
    """A file that could not be written: the message names it and the cause."""


def _os_error(e):
    """The OSError that `e` is or that led to it, or None. A library's writer may report a failed write as its own
    error: torch.save on a full disk raises "RuntimeError: [enforce fail at inline_container.cc] unexpected pos"
    while handling the OSError (No space left on device) of the file's write."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_atomic(path, write):
    """Call write(f) on a temporary binary file beside `path`, then rename it to `path`. Whatever stops the write,
    an error of `write` itself or Ctrl-C included, the temporary file is removed. A failure of the disk (an OSError,
    or a writer's own error raised because of one) is one SaveError naming the file and the cause."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        cause = _os_error(e)
        if cause is None:
            raise  # not the disk's fault: the caller's own error, with nothing left behind
        kept = f"; {path} is kept as it was" if os.path.exists(path) else ""
        raise SaveError(f"could not write {path}: {cause.strerror or cause}{kept}") from None


def write_json(path, obj, indent=2):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


# ---- a run's folder ----

def holds_run(out_dir):
    """Whether out_dir holds trained weights: a checkpoint, or SAEs alone."""
    return any(os.path.isfile(os.path.join(out_dir, name)) for name in ("ckpt.pt", "saes.safetensors"))


def free_out_dir(out_dir):
    """out_dir if it holds no run (holds_run), else the first of out_dir-2, out_dir-3, ... that holds none: a
    second run of the same command keeps the first."""
    n, candidate = 1, out_dir
    while holds_run(candidate):
        n += 1
        candidate = f"{out_dir.rstrip(os.sep)}-{n}"
    return candidate


class LockedError(OSError):
    """A folder that another running process holds."""


class OutDirLock:
    """Hold a run's out_dir for as long as the run: a lock file in it names this process, so that a second run
    into the same folder is refused at start-up. Released when the run ends (also on an error or at exit); a
    lock whose process no longer runs on this machine (a crash, a killed job) is stale and is taken over.
    Folders made for the lock alone are removed again if nothing else was written in them."""

    NAME = ".lock"

    def __init__(self, out_dir):
        self.out_dir, self.path, self.held, self.created = out_dir, os.path.join(out_dir, self.NAME), False, []

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        d = os.path.abspath(self.out_dir)
        while not os.path.exists(d):
            self.created.append(d)
            d = os.path.dirname(d)
        os.makedirs(self.out_dir, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                being_written = owner is None and time.time() - os.path.getmtime(self.path) < 5
                if being_written or (owner is not None and self._running(owner)):
                    who = (f"process {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
                           if owner else "a process that is taking it at this moment (its lock is still empty)")
                    raise LockedError(f"{self.out_dir} is in use by another run: {who}. Wait for it to finish, or "
                                      f"choose another out_dir (if no such run exists, delete {self.path})") from None
                print(f"note: {self.path} was left by process {(owner or {}).get('pid', '?')}, which is no longer "
                      "running: taking the folder over")
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                started = time.strftime("%Y-%m-%d %H:%M:%S")
                json.dump(dict(pid=os.getpid(), host=socket.gethostname(), started=started), f)
            self.held = True
            atexit.register(self.release)
            return
        raise LockedError(f"could not take the lock {self.path}")

    def release(self):
        if not self.held:
            return
        self.held = False
        try:
            os.remove(self.path)
        except OSError:
            pass
        for d in self.created:  # innermost first
            try:
                os.rmdir(d)
            except OSError:
                break

    def _owner(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # an empty or half-written lock: its writer died while writing it

    @staticmethod
    def _running(owner):
        if owner.get("host") != socket.gethostname():
            return True  # another machine's process: there is no telling, so assume it runs
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, KeyError, ValueError):
            return True
        return True


# ---- a checkpoint, read ----

def load_checkpoint(path, advice):
    """train.py's ckpt.pt, read as tensors and plain data only (interop.load_pt: a file from a shared folder cannot
    run code), with its config and step. A file that cannot be read so is a ConfigError that names it and ends with
    `advice`, what to do instead."""
    import interop
    try:
        ckpt = interop.load_pt(path)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "step" not in ckpt:
            raise ValueError(f"{path} is damaged and cannot be read: it holds no training config and step")
    except ValueError as e:
        raise ConfigError(f"{e}; it was left untouched. {advice}") from None
    return ckpt


# ---- what a run depends on: checked when it is resumed ----

def fingerprint(tensors):
    """sha256 over named tensors (each name, dtype, shape and bytes): which weights these are."""
    import hashlib

    import torch
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _within_folder(sizes):
    """{path: size} with each path named within the folder the files share (a moved copy is the same data)."""
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in sizes]) if sizes else ""
    return {os.path.relpath(os.path.abspath(f), root): n for f, n in sizes.items()}


def data_identity(dataset, tokenizer="gpt2"):
    """What a run's data is: its held-out rule; for local text each file with its length in characters and each
    part's tokens (their number, and the token cache's checksum); for local parquet/arrow files each file's size
    in bytes. A hub dataset is its name (a setting) and its rule."""
    import data
    identity = {"held_out": data.heldout_rule(dataset)[1]}
    kind = data.source_kind(dataset)
    if kind in ("shakespeare", "text"):
        meta = data.token_cache(dataset, tokenizer)[1]
        identity.update(files=_within_folder(dict(zip(meta["files"], meta["lengths"]))), tokens=meta["tokens"],
                        checksum=meta["checksum"])
    elif kind == "table":
        identity["files"] = _within_folder({f: os.path.getsize(f) for f in data.local_files(dataset)})
    return identity


def data_changes(saved, now):
    """What differs between two data_identity's, in words ([] if nothing)."""
    changes, old, new = [], saved.get("files", {}), now.get("files", {})
    for what, names in (("added", [f for f in new if f not in old]), ("removed", [f for f in old if f not in new]),
                        ("changed in size", [f for f in new if f in old and new[f] != old[f]])):
        if names:
            changes.append(f"{len(names)} file(s) {what}: {', '.join(names[:4])}" + (", ..." if len(names) > 4 else ""))
    if not changes and (saved.get("tokens"), saved.get("checksum")) != (now.get("tokens"), now.get("checksum")):
        changes.append("the text of its files changed (its tokens differ)")
    if saved.get("held_out") != now.get("held_out"):
        changes.append(f"held out: {saved.get('held_out')} then, {now.get('held_out')} now")
    return changes


def dependencies(model, dataset, tokenizer="gpt2"):
    """What a run's result depends on besides its settings: each pretrained SAE's spec and the fingerprint of its
    weights as loaded (before any training), and the data's identity."""
    pretrained = {p: {"spec": model.sae(p).source, "fingerprint": fingerprint(model.sae(p).state_dict())}
                  for p in model.sae_positions if hasattr(model.sae(p), "source")}
    return {"pretrained": pretrained, "data": data_identity(dataset, tokenizer)}


# ---- a training run ----

class Diverged(RuntimeError):
    """A loss or gradient norm that is not finite: raised before the step is applied, so the weights are intact."""


class Run:
    """A run's out_dir and checkpoints, and the machinery that loses nothing.

    - A fresh run into an out_dir that holds a run goes to out_dir-2 (-3, ...) instead; resume=True continues the
      run there, overwrite=True replaces it.
    - Inside `with run:` the run holds out_dir (OutDirLock): a second run into it is refused at start-up.
    - save(step) writes ckpt.pt (everything a resume needs) and saes.safetensors (the SAEs alone) atomically; a write
      that fails says which file and why. A resume checks what the run depends on besides its settings (each
      pretrained SAE's weights, the data's files and held-out rule) and repairs saes.safetensors from ckpt.pt.
    - Ctrl-C or SIGTERM sets stop_requested: the loop saves and stops at the end of its step; a second Ctrl-C
      stops at once.
    - Leaving `with run:` by an error outside a step (evaluation, logging, wandb) or a divergence saves the last
      step first, and every error says which checkpoint is complete.
    - bad_data: the exception classes of data found unusable mid-run (a row with an id outside the vocabulary): the
      run stops with their message alone, and does not advise a resume that would meet them again.
    Under DDP only the master process writes; every process calls save (the data positions are gathered)."""

    def __init__(self, config, master=True, log=print, bad_data=()):
        self.config, self.master, self.log, self.bad_data = config, master, log, tuple(bad_data)
        out_dir = config["out_dir"]
        if not (config["resume"] or config["overwrite"]) and holds_run(out_dir):
            fresh = free_out_dir(out_dir)
            log(f"{out_dir} holds a run, which is kept: this run writes to {fresh} (--resume=True continues the run in "
                f"{out_dir}, --overwrite=True replaces it)")
            config["out_dir"] = out_dir = fresh
        if master:  # the only process that writes; two probing one new folder would race to make it
            check_writable(out_dir, "out_dir")
        self.out_dir, self.ckpt_path = out_dir, os.path.join(out_dir, "ckpt.pt")
        self.saes_path, self.dependencies = os.path.join(out_dir, "saes.safetensors"), None
        self.lock = OutDirLock(out_dir) if master else None
        self.saved_step, self.step, self.in_a_step, self.state, self.stream = None, 0, False, None, None
        self.stop_requested, self.seconds, self.t_start, self.old_handlers = False, 0.0, time.time(), {}

    def __enter__(self):
        if self.lock:
            try:
                self.lock.acquire()
            except LockedError as e:
                raise ConfigError(f"{e}") from None
        self.old_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _request_stop(self, signum, frame):
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_requested = True
        self.log(f"\nsignal {signum}: stopping after this step and saving a checkpoint (Ctrl-C again: stop at once)")

    def resume_checkpoint(self, defaults, free, global_batch):
        """The checkpoint to resume, read and checked before any model is built (the model may have to be trained
        first): every setting of `defaults` but those in `free` (how the run is watched, where and on what) must be
        the saved one (a default where the checkpoint has none), and the global batch (samples per step, over every
        process) the same, for the data and the schedule. It is read as tensors and plain data only (a shared run
        folder's ckpt.pt that holds anything else is refused)."""
        if not os.path.isfile(self.ckpt_path):
            lone = os.path.isfile(self.saes_path)
            raise ConfigError(f"resume=True but there is no checkpoint at {self.ckpt_path}" + (
                f": {self.out_dir} holds trained SAEs alone (saes.safetensors), not the state of their run. Train "
                f"them further as a new run: --pretrained_sae_paths=['{self.out_dir}'] --retrain_saes=True "
                "--out_dir=..." if lone else "; drop --resume or point out_dir at a run"))
        ckpt = load_checkpoint(self.ckpt_path, "Start a fresh run in another out_dir")
        differ = [(k, ckpt["config"].get(k, v), self.config[k]) for k, v in defaults.items()
                  if k not in free and ckpt["config"].get(k, v) != self.config[k]]
        if differ:
            shown = ", ".join(f"{k}={was!r} (this run: {now!r})" for k, was, now in differ)
            raise ConfigError(f"{self.ckpt_path} was trained with {shown}: a resumed run keeps its own "
                              "settings. Resume without changing them, or train these SAEs further as a new run: "
                              f"--pretrained_sae_paths=['{self.out_dir}'] --retrain_saes=True --out_dir=...")
        saved = ckpt["config"]
        saved_batch = ckpt.get("global_batch", saved["batch_size"] * saved["gradient_accumulation_steps"])
        if saved_batch != global_batch:
            raise ConfigError(f"{self.ckpt_path} was trained with a global batch of {saved_batch} samples, this run "
                              f"has {global_batch} (batch_size x gradient_accumulation_steps x processes): resume with "
                              "the same global batch, so that the data and the schedule continue where they stopped")
        return ckpt

    def track(self, model, optimizer, scaler, dead, global_batch, step, stream, ddp, ckpt=None):
        """What save() writes, the training stream's position and what the run depends on included (data.SampleStream;
        under DDP every process's position, gathered; dependencies). From `ckpt` (a resume): what it depends on,
        checked to be what it was, then the state it restores; saes.safetensors is written again from it where it is
        not the file of ckpt.pt's save (missing, damaged, or a save behind after a run stopped between the two)."""
        import torch
        # what the run depends on, before a checkpoint's weights are loaded
        self.dependencies = dependencies(model, self.config["dataset"], stream.tokenizer)
        if ckpt is not None:
            self._check_dependencies(ckpt)
        self.state = dict(model=model, optimizer=optimizer, scaler=scaler, dead=dead, global_batch=global_batch)
        self.stream, self.ddp = stream, ddp
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
            if "saes_metadata" not in ckpt:  # (a checkpoint from before ckpt.pt held its SAEs' file)
                if not os.path.isfile(self.saes_path):
                    self.saved_step = None  # written again at the next save (a finished run, resumed: at the end)
            elif self.master:
                self._repair_saes(ckpt, model)
        self.step, self.t_start = step, time.time()

    def _check_dependencies(self, ckpt):
        """ConfigError, saying what changed, if a pretrained SAE or the data is not what the checkpoint was trained
        on: the run would go on with a mix (a replaced SAE's weights under the old one's settings; held-out text
        that became training text)."""
        saved, now = ckpt.get("dependencies"), self.dependencies
        if saved is None:
            self.log(f"note: {self.ckpt_path} records no fingerprint of its data and pretrained SAEs (it is older than "
                     "that record): they are not checked against it")
            return
        problems = []
        was, new = saved["pretrained"], now["pretrained"]
        if set(was) != set(new):
            problems.append(f"its pretrained SAEs were at {sorted(was) or 'no position'}, they are now at "
                            f"{sorted(new) or 'no position'}")
        for p in sorted(set(was) & set(new)):
            if was[p]["fingerprint"] != new[p]["fingerprint"]:
                problems.append(f"the pretrained SAE at {p} ({new[p]['spec']}) holds other weights than when the run "
                                f"began (fingerprint {was[p]['fingerprint'][:12]} then, {new[p]['fingerprint'][:12]} "
                                "now)")
        changes = data_changes(saved["data"], now["data"])
        if changes:
            problems.append(f"dataset {self.config['dataset']!r} changed: {'; '.join(changes)}")
        if problems:
            raise ConfigError(f"{self.ckpt_path} cannot be resumed: {'; '.join(problems)}. A resumed run would "
                              "continue on a mix of the old and the new. Restore what changed, or train these SAEs "
                              f"further as a new run: --pretrained_sae_paths=['{self.out_dir}'] --retrain_saes=True "
                              "--out_dir=...")

    def _repair_saes(self, ckpt, model):
        """saes.safetensors as ckpt.pt's save wrote it, where it is not: from the model, its SAEs just loaded from
        ckpt.pt (the file holds them as the scripts read them, any input scale folded in)."""
        import interop
        problem = interop.saes_file_problem(self.saes_path, ckpt["saes_metadata"])
        if problem:
            self.log(f"{problem}: writing it again from {self.ckpt_path} (step {ckpt['step']})")
            tensors, _ = model.contents(self.config, step=ckpt["step"])
            write_atomic(self.saes_path, lambda f: interop.write_file(f, tensors, ckpt["saes_metadata"]))

    def stop_if_requested(self, step, device):
        """At the start of a step: where a stop was requested (on any process, under DDP), save this step and exit
        with 130."""
        if stop_everywhere(self.stop_requested, self.ddp, device):
            self.save(step)
            self.log(f"interrupted at step {step}: checkpoint saved in {self.out_dir}; continue with --resume=True")
            if self.ddp:
                import torch.distributed as dist
                dist.destroy_process_group()
            sys.exit(130)

    @contextmanager
    def in_step(self):
        """Around a training step: an error inside it leaves the weights of the step before, already counted."""
        self.in_a_step = True
        yield
        self.in_a_step = False

    def data_states(self, gather):
        """Every process's position in the training data; all call it together (gather=False: this one's own)."""
        import torch.distributed as dist
        state = self.stream.state_dict()
        if not (gather and self.ddp) or state["kind"] == "tokens":  # a token file's is the same for every process
            return [state]
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        return states

    def save(self, step, gather=True):
        """ckpt.pt and saes.safetensors, once a step. Every process calls it (to gather the data positions),
        except after an error (gather=False: the master's own)."""
        import torch
        if self.saved_step == step:
            return
        states = self.data_states(gather)
        if not self.master:
            self.saved_step = step
            return
        import interop
        s = self.state
        tensors, metadata = s["model"].contents(self.config, step=step)  # saes.safetensors: what the scripts read
        # ckpt.pt: the SAEs as they train (their input scales apart), and saes.safetensors's metadata
        ckpt = {"saes": s["model"].saes.state_dict(), "saes_metadata": metadata,
                "optimizer": s["optimizer"].state_dict(), "scaler": s["scaler"].state_dict(), "step": step,
                "global_batch": s["global_batch"],
                "rng": torch.get_rng_state(), "config": self.config,
                "train_seconds": self.seconds + time.time() - self.t_start,
                "sources": {p: getattr(s["model"].sae(p), "source", "trained here") for p in s["model"].sae_positions},
                "dependencies": self.dependencies, "data": states}
        if s["dead"] is not None:
            ckpt["dead"] = s["dead"].state_dict()
        if torch.cuda.is_available():
            ckpt["cuda_rng"] = torch.cuda.get_rng_state_all()
        write_atomic(self.ckpt_path, lambda f: torch.save(ckpt, f))  # first: the truth, should the second not follow
        write_atomic(self.saes_path, lambda f: interop.write_file(f, tensors, metadata))
        self.saved_step = step

    def __exit__(self, kind, error, tb):
        try:
            if error is not None and self.state is not None and self.master and not isinstance(error, SystemExit):
                if (not self.in_a_step or isinstance(error, Diverged)) and not isinstance(error, SaveError):
                    try:
                        self.save(self.step, gather=False)
                    except SaveError as e:
                        print(f"\n{e}", file=sys.stderr)
                if self.saved_step is not None and isinstance(error, Diverged):
                    print(f"\nthe checkpoint of step {self.saved_step} in {self.out_dir} holds the last finite "
                          "weights: a resumed run would diverge again there. Start a new run with a lower lr, from "
                          f"scratch or from these SAEs (--pretrained_sae_paths=['{self.out_dir}'] "
                          "--retrain_saes=True)", file=sys.stderr)
                elif self.saved_step is not None and isinstance(error, self.bad_data):
                    print(f"\nthe checkpoint of step {self.saved_step} in {self.out_dir} is complete, but a resumed "
                          "run would read the same data again: mend the data first", file=sys.stderr)
                elif self.saved_step is not None:
                    print(f"\n{kind.__name__} at step {self.step}: the checkpoint of step {self.saved_step} in "
                          f"{self.out_dir} is complete; continue from it with --resume=True", file=sys.stderr)
        finally:
            if self.lock:
                self.lock.release()
            for sig, handler in self.old_handlers.items():
                signal.signal(sig, handler)
        if isinstance(error, KeyboardInterrupt):
            sys.exit(130)
        if isinstance(error, (Diverged, SaveError, *self.bad_data)):
            sys.exit(f"{kind.__name__}: {error}")  # said in full already; no traceback for what is not a bug


# ---- many processes (torchrun): one per GPU, every one in step ----

def setup_distributed(device):
    """(ddp, rank, world_size, device) of this process: under torchrun its GPU, else (False, 0, 1, device)."""
    import torch
    import torch.distributed as dist
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, device
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return True, dist.get_rank(), dist.get_world_size(), device


def stop_everywhere(requested, ddp, device):
    """Whether to stop now: under DDP every process must agree to stop at the same step."""
    import torch
    import torch.distributed as dist
    if not ddp:
        return requested
    flag = torch.tensor([float(requested)], device=device)
    dist.all_reduce(flag)
    return flag.item() > 0


def average_over_processes(tensors, world_size):
    """Average each tensor in place over the processes (the SAEs' gradients and floating buffers)."""
    import torch.distributed as dist
    for t in tensors:
        dist.all_reduce(t)
        t /= world_size


def nonfinite_parameters(module):
    """The names of a module's parameters and buffers that hold a NaN or an infinity: a diverged run's."""
    import torch
    named = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, t in named if t.is_floating_point() and not torch.isfinite(t).all()]


def check_finite(loss, grad_norm, lr, max_grad_norm, step, fp16=False):
    """Raise Diverged unless the step's loss and gradient norm are finite (fp16's inf gradients are the GradScaler's
    to skip): before the step is applied, so the weights stay as they were. The one host sync of a step."""
    import torch
    finite = torch.isfinite(loss) if fp16 else torch.isfinite(loss) & torch.isfinite(grad_norm)
    if not finite.item():
        raise Diverged(f"at step {step + 1} the loss is {loss.item():.4g} and the gradient norm "
                       f"{grad_norm.item():.4g}: training diverged, and that step was not applied. Try a lower "
                       f"learning rate (lr={lr:g} now; e.g. --lr={lr / 10:g}) or a smaller max_grad_norm (now "
                       f"{max_grad_norm:g}) in a new run")
