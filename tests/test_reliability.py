"""Nothing lost, nothing silently wrong: what a careful user expects when a run diverges, when two runs share a
folder, when the disk fills, when a setting would do nothing, when a sweep is rerun with other settings, when a
check could come before expensive work, and when a model and an SAE do not fit. One section per class of the
project's issue 22, each test on the tiny model and text of conftest.py."""
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import analysis
import data
import eval as eval_script
import mlp
import reproduce
import runs
import sample
import train
from configurator import ConfigError, configure
from conftest import ROOT, args, tiny_gpt
from e2esae import SAE, SAETransformer
from interop import checkpoint_kind, read_checkpoint, save_saelens
from language_models import save_pretrained
from model import GPT, GPTConfig

POSITION = "blocks.1.hook_resid_pre"  # where args() puts the SAE


@pytest.fixture(scope="module")
def finished(gpt_dir, one_file, tmp_path_factory):
    """A finished train.py run on one local text file (the tests that change it work on a copy)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    train.main(args(gpt_dir, one_file, out))
    return out


@pytest.fixture(scope="module")
def wide_gpt_dir(tmp_path_factory):
    """A model twice as wide as gpt_dir's: 64 against 32."""
    return tiny_gpt(tmp_path_factory, n_embd=64)


def all_finite(tensors):
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def eval_args(checkpoints, out_json, **overrides):
    settings = dict(checkpoints=[str(c) for c in checkpoints], n_ctx=32, eval_n_samples=8, device="cpu",
                    out_json=str(out_json), **overrides)
    return [f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}" for k, v in settings.items()]


# ---- 1. divergence ----

def nan_checkpoint(gpt_dir, one_file, path):
    """saes.safetensors of a run whose SAE weights went NaN, with the config train.py records."""
    model = SAETransformer(GPT.from_pretrained(gpt_dir), [POSITION], dict_size_to_input_ratio=4.0)
    with torch.no_grad():
        model.sae(POSITION).encoder.weight.fill_(float("nan"))
    os.makedirs(path.parent, exist_ok=True)
    model.save(str(path), config=train.settings(args(gpt_dir, one_file, path.parent))[0])
    return path


def test_a_diverging_run_stops_saying_where_and_keeps_finite_weights(gpt_dir, one_file, tmp_path, capsys):
    # local SAEs at lr=1e20: the first step's update makes the decoder bias ~1e20, so the second step's MSE is inf
    # (the terms whose coefficient is 0 are not computed, so no 0 x inf = nan)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main(args(gpt_dir, one_file, out, lr=1e20, kl_coeff=0.0, out_to_in_coeff=1.0))
    message = str(e.value.code)
    assert message.startswith("Diverged: at step 2 the loss is inf") and "that step was not applied" in message
    assert "Try a lower learning rate (lr=1e+20 now; e.g. --lr=1e+19)" in message
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 1 and all_finite(ckpt["saes"])  # the last finite step, saved
    assert all_finite(load_file(out / "saes.safetensors"))
    printed = capsys.readouterr().out
    assert "held-out results" not in printed and "alive features" not in printed  # no table of a broken model


def test_eval_analysis_and_sample_report_a_nan_model_as_broken(gpt_dir, one_file, tmp_path, capsys):
    broken = nan_checkpoint(gpt_dir, one_file, tmp_path / "nan" / "saes.safetensors")
    with pytest.raises(SystemExit, match="1 of 1 checkpoints failed"):
        eval_script.main(eval_args([broken], tmp_path / "e.json"))
    err = capsys.readouterr().err
    assert f"{broken}: FAILED (ValueError: its SAE weights are not finite" in err and "the run diverged" in err
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["rows"] == [] and "not finite" in result["failed"][0]["error"]  # no row of L0 0, alive 0
    with pytest.raises(ConfigError, match="its SAE weights are not finite .* the run diverged"):
        analysis.main([f"--checkpoints=['{broken}']", f"--dataset={one_file}", "--n_ctx=32", "--eval_n_samples=8",
                       "--device=cpu", f"--out_dir={tmp_path / 'analysis'}"])
    with pytest.raises(ConfigError, match="its SAE weights are not finite .* the run diverged"):
        sample.main([f"--checkpoint={broken}", "--max_new_tokens=2", "--device=cpu"])


def test_a_diverging_mlp_sae_stops_instead_of_printing_nan(capsys):
    with pytest.raises(SystemExit) as e:
        mlp.main(["--hidden_sizes=[16, 16]", "--mlp_epochs=2", "--dict_size_to_input_ratio=2.0", "--n_steps=12",
                  "--batch_size=16", "--warmup_steps=2", "--log_every_n_steps=6", "--lr=1e20"])
    message = str(e.value.code)
    assert message.startswith("Diverged: the local SAE at step ") and "the loss is nan" in message
    assert "--lr=1e+19" in message
    assert "held-out results" not in capsys.readouterr().out


# ---- 2. two runs, one out_dir ----

def held(lock):
    return lock.exists() and lock.stat().st_size > 0  # created, and its owner written


def test_a_running_run_holds_its_out_dir(gpt_dir, one_file, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(  # long enough to be running while the second starts; no checkpoint until stopped
        [sys.executable, "train.py", *args(gpt_dir, one_file, out, n_samples=100_000, eval_every_n_samples=10**6,
                                           save_every_n_samples=10**6, log_every_n_steps=1000)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not held(out / ".lock") and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert json.loads((out / ".lock").read_text())["pid"] == first.pid
        before = sorted(os.listdir(out))
        with pytest.raises(ConfigError) as e:
            train.main(args(gpt_dir, one_file, out))
        assert f"{out} is in use by another run: process {first.pid} on {socket.gethostname()}" in str(e.value.code)
        assert sorted(os.listdir(out)) == before  # the second run wrote nothing
    finally:
        first.send_signal(signal.SIGINT)
        printed, _ = first.communicate(timeout=120)
    assert first.returncode == 130, printed[-3000:]
    assert not (out / ".lock").exists() and (out / "ckpt.pt").is_file()  # released; the first run saved on Ctrl-C


def dead_pid():
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_lock_left_by_a_crash_is_taken_over(gpt_dir, one_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    pid = dead_pid()
    (out / ".lock").write_text(json.dumps(dict(pid=pid, host=socket.gethostname(), started="yesterday")))
    train.main(args(gpt_dir, one_file, out, n_samples=8))
    assert f"was left by process {pid}, which is no longer running: taking the folder over" in capsys.readouterr().out
    assert (out / "ckpt.pt").is_file() and not (out / ".lock").exists()


def test_the_lock_names_its_holder_and_tells_stale_from_live(tmp_path):
    d = tmp_path / "new" / "out"
    with runs.OutDirLock(str(d)):
        assert json.loads((d / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(runs.LockedError, match=f"is in use by another run: process {os.getpid()}"):
            runs.OutDirLock(str(d)).acquire()
    assert not (tmp_path / "new").exists()  # released, and the folders made for the lock alone removed
    d.mkdir(parents=True)
    lock = d / ".lock"
    lock.write_text(json.dumps(dict(pid=os.getpid(), host="another-machine", started="now")))
    with pytest.raises(runs.LockedError, match="process .* on another-machine"):  # no telling: assumed to run
        runs.OutDirLock(str(d)).acquire()
    lock.write_text("")  # a lock whose writer died while writing it: in use for a moment, then stale
    with pytest.raises(runs.LockedError, match=r"in use by another run: a process that is taking it at this moment"):
        runs.OutDirLock(str(d)).acquire()
    os.utime(lock, (time.time() - 60, time.time() - 60))
    with runs.OutDirLock(str(d)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


# ---- 3. faults while saving: a real full disk through /dev/full ----

def full_disk(path):
    """Make this process's next write_atomic(path) write to /dev/full: its temporary file is a link there."""
    if not stat.S_ISCHR(os.stat("/dev/full").st_mode):  # never write into a regular file that took its place
        pytest.skip("/dev/full is not the full-disk device on this machine")
    tmp = f"{path}.tmp-{os.getpid()}"
    os.symlink("/dev/full", tmp)
    return tmp


def test_write_atomic_on_a_full_disk_keeps_the_old_file_and_says_why(tmp_path):
    target = tmp_path / "ckpt.pt"
    runs.write_atomic(str(target), lambda f: f.write(b"the old checkpoint"))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    tmp = full_disk(target)
    with pytest.raises(runs.SaveError) as e:
        runs.write_atomic(str(target), lambda f: f.write(b"x" * 1_000_000))
    assert str(e.value).startswith(f"could not write {target}: No space left on device")
    assert e.value.__cause__ is None and e.value.__suppress_context__  # one message, no chained tracebacks
    assert not os.path.lexists(tmp) and target.read_bytes() == b"the old checkpoint"
    assert f"{target} is kept as it was" in str(e.value)
    full_disk(tmp_path / "new.json")
    with pytest.raises(runs.SaveError, match="No space left on device$"):
        runs.write_json(str(tmp_path / "new.json"), {"a": 1})
    assert os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.parametrize("error", [ValueError("not picklable"), KeyboardInterrupt()])
def test_write_atomic_leaves_no_temporary_file_whatever_stops_it(tmp_path, error):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")

    def write(f):
        f.write(b"half a checkpoint")
        raise error
    with pytest.raises(type(error)):
        runs.write_atomic(str(target), write)
    assert os.listdir(tmp_path) == ["ckpt.pt"] and target.read_bytes() == b"old"


def test_a_full_disk_stops_the_run_with_one_message_and_keeps_the_checkpoint(finished, gpt_dir, one_file, tmp_path,
                                                                             capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = (out / "ckpt.pt").read_bytes()
    full_disk(out / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        train.main(args(gpt_dir, one_file, out, overwrite=True, seed=1))
    message = f"could not write {out / 'ckpt.pt'}: No space left on device"
    assert e.value.code.startswith(f"SaveError: {message}")
    assert (out / "ckpt.pt").read_bytes() == before  # the last complete checkpoint, untouched
    assert sorted(os.listdir(out)) == ["ckpt.pt", "saes.safetensors"]  # no temporary file, no lock
    assert message not in capsys.readouterr().err  # said once, in the exit message


def test_a_checkpoint_that_cannot_be_replaced_stops_the_run_naming_the_file(finished, gpt_dir, one_file, tmp_path):
    """A file the system will not let anyone replace (chattr +i: refused to root too, where chmod is not) in place
    of a folder made read-only during the run: the rename onto it fails, one message names the file and why."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = (out / "ckpt.pt").read_bytes()
    if subprocess.run(["chattr", "+i", str(out / "ckpt.pt")], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not allowed on this file system")
    try:
        with pytest.raises(SystemExit) as e:
            train.main(args(gpt_dir, one_file, out, overwrite=True, seed=1))
    finally:
        subprocess.run(["chattr", "-i", str(out / "ckpt.pt")], check=True)
    assert e.value.code.startswith(f"SaveError: could not write {out / 'ckpt.pt'}: Operation not permitted; "
                                   f"{out / 'ckpt.pt'} is kept as it was")
    assert (out / "ckpt.pt").read_bytes() == before
    assert not [f for f in os.listdir(out) if ".tmp-" in f or f == ".lock"]


@contextmanager
def small_disk(path, size="400k"):
    """A real file system of `size` at `path`, a tmpfs (mounting one needs root), unmounted again afterwards."""
    path.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command on this machine: the test needs a small tmpfs")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.strip()}): the test needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(disk, leave):
    """Fill the file system of `disk` up to `leave` bytes with one file, disk/filler."""
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(bytes(max(st.f_bavail * st.f_frsize - leave, 0)))


def test_write_atomic_on_a_really_full_file_system_keeps_the_old_file_and_says_why(tmp_path):
    """torch.save on a full disk raises its own RuntimeError ("unexpected pos"), not an OSError: one SaveError."""
    with small_disk(tmp_path / "disk") as disk:
        target = disk / "ckpt.pt"
        runs.write_atomic(str(target), lambda f: torch.save(torch.zeros(10), f))
        before = target.read_bytes()
        with pytest.raises(runs.SaveError) as e:
            runs.write_atomic(str(target), lambda f: torch.save(torch.zeros(200_000), f))  # 800 kB on 400 kB
        assert str(e.value) == f"could not write {target}: No space left on device; {target} is kept as it was"
        assert e.value.__cause__ is None and e.value.__suppress_context__
        assert os.listdir(disk) == ["ckpt.pt"] and target.read_bytes() == before


def test_a_really_full_disk_stops_the_run_with_one_message_and_keeps_the_checkpoint(finished, gpt_dir, one_file,
                                                                                   tmp_path, capsys):
    with small_disk(tmp_path / "disk", size="1m") as disk:
        out = disk / "out"
        shutil.copytree(finished, out)
        before = (out / "ckpt.pt").read_bytes()
        fill(disk, leave=16_384)  # room for the lock and the probe of out_dir, not for a checkpoint
        with pytest.raises(SystemExit) as e:
            train.main(args(gpt_dir, one_file, out, overwrite=True, seed=1))
        assert e.value.code.startswith(f"SaveError: could not write {out / 'ckpt.pt'}: No space left on device; "
                                       f"{out / 'ckpt.pt'} is kept as it was")
        assert (out / "ckpt.pt").read_bytes() == before
        assert sorted(os.listdir(out)) == ["ckpt.pt", "saes.safetensors"]  # no temporary file, no lock
        assert "Traceback" not in capsys.readouterr().err


# ---- 4. settings that would do nothing ----

@pytest.mark.parametrize("overrides, message", [
    (dict(kl_coeff=1.0, in_to_orig_coeff=1.0, in_to_orig_positions=[POSITION]),
     f"in_to_orig position {POSITION} is not after the first SAE"),
    (dict(kl_coeff=0.0), "kl_coeff, in_to_orig_coeff, out_to_in_coeff and out_to_orig_coeff are all 0, so nothing "
                         "asks the SAEs to reconstruct anything"),  # sparsity alone
    (dict(dtype="float16"), "dtype='float16' runs under CUDA autocast, and device='cpu': on a CPU use dtype='float32'"),
])
def test_a_setting_that_would_do_nothing_is_refused_before_any_work(overrides, message, gpt_dir, one_file, tmp_path):
    with pytest.raises(ConfigError) as e:
        train.main(args(gpt_dir, one_file, tmp_path / "out", **overrides))
    assert message in str(e.value.code)
    assert not (tmp_path / "out").exists()


def test_a_cpu_run_on_a_gpu_machine_trains_in_float32_unasked(monkeypatch):
    monkeypatch.setitem(train.DEFAULTS, "dtype", "bfloat16")  # train.py's default where CUDA supports bfloat16
    assert train.settings(["--device=cpu"])[0]["dtype"] == "float32"
    with pytest.raises(ConfigError, match="on a CPU use dtype='float32'"):  # asked for, it is refused
        train.settings(["--device=cpu", "--dtype=bfloat16"])


def test_resuming_with_another_loss_is_refused_and_the_record_kept(finished, gpt_dir, one_file):
    before = (finished / "ckpt.pt").read_bytes()
    with pytest.raises(ConfigError) as e:
        train.main(args(gpt_dir, one_file, finished, resume=True, kl_coeff=2.0))
    assert "was trained with kl_coeff=1.0 (this run: 2.0): a resumed run keeps its own settings" in str(e.value.code)
    assert (finished / "ckpt.pt").read_bytes() == before
    assert torch.load(finished / "ckpt.pt", weights_only=True)["config"]["kl_coeff"] == 1.0


def test_mlp_refuses_a_loss_of_sparsity_alone(capsys):
    with pytest.raises(ConfigError, match="local: out_to_in_coeff=0 leaves only the sparsity term"):
        mlp.main(["--out_to_in_coeff=0"])
    with pytest.raises(ConfigError, match="e2e: kl_coeff=0 leaves only the sparsity term"):
        mlp.main(["--kl_coeff=0"])
    assert capsys.readouterr().out == ""


# ---- 5. sweeps: a run is every setting that changes it ----

def sweep(tmp_path, *extra):
    return SimpleNamespace(**configure(reproduce.DEFAULTS, [
        "--models=['']", "--sae_tokens=[4096]", "--types=['local', 'e2e']", "--local_coeffs=[1.0]",
        "--e2e_coeffs=[1.0]", f"--out_root={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}",
        *extra]))


def fake_finished_run(run, **changed):
    """The ckpt.pt train.py leaves for a finished run of `run` (its config as train.py resolves and records it),
    without training it; `changed` settings as if it had been trained with them."""
    config = dict(train.settings(run["argv"])[0], **changed)
    os.makedirs(run["out_dir"], exist_ok=True)
    torch.save({"config": config, "step": config["n_samples"] // 16, "global_batch": 16},
               os.path.join(run["out_dir"], "ckpt.pt"))
    return config


def test_a_sweep_with_other_train_args_uses_other_run_folders(tmp_path, capsys):
    old = sweep(tmp_path, "--train=False")
    for run in reproduce.plan(old):
        fake_finished_run(run)
    assert len(reproduce.train_all(reproduce.plan(old), old)) == 2
    assert capsys.readouterr().out.count("done already") == 2
    plans = [reproduce.plan(sweep(tmp_path, "--train=False", f"--train_args={a}"))
             for a in (["--lr=1e-3"], ["--lr=1e-3", "--seed=1"])]
    folders = {r["out_dir"] for p in [reproduce.plan(old), *plans] for r in p}
    assert len(folders) == 6 and all(os.path.basename(f).startswith(("local_1-", "e2e_1-")) for p in plans
                                      for f in (r["out_dir"] for r in p))
    new = sweep(tmp_path, "--train=False", "--train_args=['--lr=1e-3']")
    assert reproduce.train_all(plans[0], new) == []  # none of the old runs is reported as this sweep's
    printed = capsys.readouterr().out
    assert "done already" not in printed and printed.count("not finished, left out") == 2


def test_a_run_folder_trained_with_other_settings_is_refused(tmp_path):
    c = sweep(tmp_path, "--train=False")
    planned = reproduce.plan(c)
    fake_finished_run(planned[1], lr=1e-3, seed=3)
    with pytest.raises(ConfigError) as e:
        reproduce.train_all(planned, c)
    assert (f"{planned[1]['out_dir']} holds a run trained with other settings (lr=0.001 there, 0.003 here, seed=3 "
            "there, 0 here): its results are not this sweep's") in str(e.value.code)


def test_a_finished_topk_run_or_an_older_record_is_recognised_as_done(tmp_path, capsys):
    """The stored config is train.py's resolved one (topk's aux_k_coeff=1/32 set for it); a record written before
    a setting existed holds that setting's default."""
    c = sweep(tmp_path, "--train=False", "--activation=topk", "--sweep=k", "--local_coeffs=[8]", "--e2e_coeffs=[8]")
    planned = reproduce.plan(c)
    assert fake_finished_run(planned[0])["aux_k_coeff"] == 1 / 32
    older = fake_finished_run(planned[1])
    ckpt = torch.load(os.path.join(planned[1]["out_dir"], "ckpt.pt"), weights_only=True)
    for key in ("finetune_fraction", "kl_rescale", "dead_window_tokens"):
        assert older[key] == train.DEFAULTS[key]
        del ckpt["config"][key]
    torch.save(ckpt, os.path.join(planned[1]["out_dir"], "ckpt.pt"))
    assert [reproduce.stored_mismatch(r) for r in planned] == [{}, {}]
    assert len(reproduce.train_all(planned, c)) == 2 and capsys.readouterr().out.count("done already") == 2


def test_a_run_evaluated_on_other_samples_is_evaluated_again(finished, one_file, tmp_path):
    run = {"out_dir": str(tmp_path / "run")}
    shutil.copytree(finished, run["out_dir"])
    kept = tmp_path / "run" / "eval.json"
    samples = data.heldout_samples(one_file, 32, 8)
    first = reproduce.evaluate_run(run, samples, "cpu")
    written = kept.stat().st_mtime_ns
    assert first["eval_samples"] == 8 and reproduce.evaluate_run(run, samples, "cpu") == first
    assert kept.stat().st_mtime_ns == written  # the same weights on the same samples: the kept figures
    fewer = reproduce.evaluate_run(run, samples[:4], "cpu")  # e.g. a rerun with another eval_n_samples
    assert fewer["eval_samples"] == 4 and json.loads(kept.read_text())["eval_samples"] == 4


@pytest.mark.parametrize("arg", ["--dataset=notes.txt", "--init_from=gpt2", "--kl_coeff=2.0"])
def test_train_args_that_would_change_what_the_sweep_reports_are_refused(tmp_path, arg):
    with pytest.raises(ConfigError, match=f"train_args sets {arg[2:].split('=')[0]}, which reproduce.py sets"):
        reproduce.main([f"--train_args=['{arg}']", f"--out_root={tmp_path / 'runs'}",
                        f"--results_dir={tmp_path / 'results'}"])
    assert os.listdir(tmp_path) == []


# ---- 6. every cheap check before expensive work ----

@pytest.mark.parametrize("checkpoint", ["none", "damaged", "other settings"])
def test_a_resume_that_cannot_work_is_refused_before_the_model_is_trained(checkpoint, one_file, tmp_path,
                                                                          monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "out"
    monkeypatch.setenv("E2ESAE_CACHE", str(cache))  # the small model is not cached: it would be trained first
    tiny = tmp_path / "tiny_gpt.py"
    tiny.write_text("n_layer = 2\nn_head = 2\nn_embd = 32\nn_ctx = 32\nn_steps = 4\nbatch_size = 4\n"
                    "eval_n_samples = 8\n")
    argv = args("shakespeare", one_file, out, small_model_config=str(tiny), resume=True)
    expected = "resume=True but there is no checkpoint at"
    if checkpoint != "none":
        out.mkdir()
        if checkpoint == "damaged":
            (out / "ckpt.pt").write_bytes(b"half a checkpoint")
            expected = "is damaged and cannot be read"
        else:
            torch.save({"config": dict(train.settings(argv)[0], kl_coeff=2.0), "step": 1}, out / "ckpt.pt")
            expected = "was trained with kl_coeff=2.0 (this run: 1.0)"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        train.main(argv)
    assert not cache.exists()  # refused before the model was trained
    assert (os.listdir(out) == ["ckpt.pt"]) if checkpoint != "none" else not out.exists()  # and left as it was


def test_eval_refuses_a_directory_as_out_json_before_evaluating(finished, tmp_path, capsys):
    with pytest.raises(ConfigError, match=f"out_json '{tmp_path}' is a directory: give a file name"):
        eval_script.main(eval_args([finished], tmp_path))
    assert capsys.readouterr().out == ""  # not even the config: nothing was loaded or evaluated


def test_an_mlp_sweep_into_a_file_is_refused_before_training(tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("kept")
    with pytest.raises(ConfigError, match=f"out_dir '{a_file}' cannot be written"):
        mlp.main(["--sweep=True", f"--out_dir={a_file}"])
    assert capsys.readouterr().out == "" and a_file.read_text() == "kept"


# ---- 7. mismatches and the messages that name them ----

def test_a_model_of_another_width_is_named_with_both_widths(finished, gpt_dir, wide_gpt_dir, one_file, tmp_path,
                                                          capsys):
    widths = (f"the SAE at {POSITION} reads activations of width 32, but the model is 64 wide: give the model it was "
              "trained on")
    with pytest.raises(SystemExit, match="1 of 1 checkpoints failed"):
        eval_script.main(eval_args([finished], tmp_path / "e.json", init_from=wide_gpt_dir))
    err = capsys.readouterr().err
    assert widths in err and "init_from=" in err
    with pytest.raises(ConfigError, match=widths):
        sample.main([f"--checkpoint={finished}", f"--init_from={wide_gpt_dir}", "--max_new_tokens=2", "--device=cpu"])
    with pytest.raises(ConfigError, match=widths):
        analysis.main([f"--checkpoints=['{finished}']", f"--init_from={wide_gpt_dir}", f"--dataset={one_file}",
                       "--n_ctx=32", "--eval_n_samples=8", "--device=cpu", f"--out_dir={tmp_path / 'analysis'}"])
    save_saelens(SAE(64, 128), str(tmp_path / "saelens"), hook_name=POSITION)  # a SAELens SAE of a 64-wide model
    with pytest.raises(ValueError, match="reads activations of width 64, but the model is 32 wide.*--init_from"):
        SAETransformer.from_checkpoint(str(tmp_path / "saelens"), GPT.from_pretrained(gpt_dir))


def test_a_typo_in_a_local_path_is_named_as_a_missing_path(finished, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    typo = finished.parent / "otu"
    for spec, missing in ((str(typo), str(typo)), ("saelens:./typo", "./typo"),
                          (f"saelens:{finished.parent}/sae/typo", f"{finished.parent}/sae/typo")):
        with pytest.raises(ConfigError) as e:
            eval_script.main([f"--checkpoints=['{spec}']", f"--out_json={tmp_path / 'e.json'}"])
        message = str(e.value.code)
        assert missing in message and "does not exist (a local path" in message and "Hugging Face" not in message


def test_a_lone_ckpt_pt_gives_its_saes_and_an_older_one_is_named(finished, tmp_path, capsys):
    """ckpt.pt holds its SAEs' tensors and metadata: without saes.safetensors beside it, they are read from it (and
    said so); a ckpt.pt from before it held them is named as train.py's without its SAEs."""
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(finished / "ckpt.pt", lone / "ckpt.pt")
    whole = read_checkpoint(str(finished)).saes[POSITION]
    for spec in (lone / "ckpt.pt", lone):
        assert checkpoint_kind(str(spec)) == ("ours", str(lone / "saes.safetensors"))
        read = read_checkpoint(str(spec)).saes[POSITION]
        assert {k: v for k, v in read.items() if k != "state"} == {k: v for k, v in whole.items() if k != "state"}
        assert all(torch.equal(read["state"][k], v) for k, v in whole["state"].items())
        assert (f"note: {lone / 'saes.safetensors'} is missing: reading the SAEs of step 12 from {lone / 'ckpt.pt'} "
                "instead") in capsys.readouterr().err
    older = torch.load(lone / "ckpt.pt", weights_only=True)
    del older["saes_metadata"]
    torch.save(older, lone / "ckpt.pt")
    for spec in (lone / "ckpt.pt", lone):
        with pytest.raises(ValueError, match="train.py's ckpt.pt without the saes.safetensors written beside it "
                                             r"\(the SAEs the scripts read\), and from before ckpt.pt held them"):
            read_checkpoint(str(spec))


def test_a_saelens_config_without_hook_name_says_to_add_it(tmp_path):
    save_saelens(SAE(32, 64), str(tmp_path), hook_name=POSITION)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["hook_name"], cfg["metadata"]["hook_name"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='names no position.*Add "hook_name": "blocks.6.hook_resid_pre"'):
        SAE.from_saelens(str(tmp_path))


def short_text(tmp_path, chars):
    """One file whose last 10% (the held-out part) holds few samples of 32 tokens: 1,500 characters hold one."""
    path = tmp_path / f"short{chars}.txt"
    path.write_text(open(data.shakespeare_files()[0], encoding="utf-8").read()[:chars], encoding="utf-8")
    return str(path)


def heldout(dataset, rank, world_size):
    batches, line = data.heldout_batches(dataset, 32, 8, 4, rank, world_size)
    return sum(len(b) for b in batches), line


def test_held_out_samples_are_counted_over_every_process(one_file):
    assert heldout(one_file, 0, 2) == (4, f"data: {one_file!r}, held out: the last 10% of the text, read as one (1 "
                                          "file(s)); evaluating on 8 samples, 4 on each of 2 processes")


def test_too_little_held_out_text_for_the_processes_says_how_much_there_is(tmp_path):
    dataset = short_text(tmp_path, 1500)
    assert data.count_samples(dataset, 32, "eval", at_most=10) == 1
    for rank in (0, 1):
        with pytest.raises(data.DataError, match=r"holds 1 sample.* 2 processes"):
            heldout(dataset, rank, 2)


def test_the_start_up_line_counts_the_samples_every_process_evaluates(tmp_path):
    dataset = short_text(tmp_path, 3500)  # 3 held-out samples: 1 on each rank, the same number everywhere
    (n0, line0), (n1, _) = heldout(dataset, 0, 2), heldout(dataset, 1, 2)
    assert n0 == n1 == 1 and f"evaluating on {n0 + n1} samples" in line0


def test_token_ids_outside_the_models_vocabulary_are_refused_before_training(gpt_dir, one_file, tmp_path):
    """train.py checks the data against the model's vocabulary once the model is loaded, before the first step."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = tmp_path / "tokens"
    folder.mkdir()
    rows = [[(7 * i + j) % 50257 for j in range(40)] for i in range(30)]
    rows[5][3] = 50_300
    pq.write_table(pa.table({"input_ids": rows}), folder / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"input_ids": rows[:10]}), folder / "test-00000-of-00001.parquet")
    small_vocab = tmp_path / "small_vocab_gpt"
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=64, vocab_size=1000)), str(small_vocab))
    for model, dataset, message in (
            (gpt_dir, str(folder), "document 5 of its train part holds token id 50,300, outside the model's "
                                   "vocabulary of 50,257 ids"),
            (str(small_vocab), one_file, "holds token id 50,256, outside the model's vocabulary of 1,000 ids")):
        out = tmp_path / f"out-{os.path.basename(model)}"
        with pytest.raises(ConfigError, match=re.escape(message)):
            train.main(args(model, dataset, out, eval_n_samples=4))
        assert not (out / "ckpt.pt").exists()  # refused before the first step


def test_eval_uses_the_checkpoints_own_data_and_says_so(finished, one_file, tmp_path, capsys):
    eval_script.main(eval_args([finished], tmp_path / "e.json"))
    printed = capsys.readouterr().out
    assert f"data: {one_file!r}, held out: the last 10% of the text" in printed
    assert f"{finished}: SAEs at {POSITION}; evaluated on {one_file!r}" in printed and "shakespeare" not in printed
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["checkpoints"][0]["dataset"] == one_file and result["rows"][0]["dataset"] == one_file
