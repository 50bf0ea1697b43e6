"""
What every training script shares about a run: its learning-rate schedule, its folder and how it writes files.

    lr = get_lr(step, n_steps, warmup_steps, lr_max, min_lr_factor)   # warmup, then cosine decay
    out_dir = free_out_dir("out")            # "out", or "out-2", "out-3", ... when "out" holds a run already
    with OutDirLock(out_dir):                # a second run into the same folder is refused while this one runs
        write_atomic(path, lambda f: torch.save(obj, f))              # a reader never sees half a file
        write_json(path, obj)

A write goes to a temporary file beside its target (named after this process, so two processes never share one)
and is renamed over the target only once it is complete. If writing fails (a full disk, a folder made read-only),
the temporary file is removed and one SaveError says which file could not be written and why, and that the target,
if it existed, is left as it was.
"""

import atexit
import json
import math
import os
import socket
import time


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
    return os.path.isfile(os.path.join(out_dir, "ckpt.pt"))


def free_out_dir(out_dir):
    """out_dir if it holds no run (no ckpt.pt), else the first of out_dir-2, out_dir-3, ... that holds none: a
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
