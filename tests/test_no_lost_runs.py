"""Nothing a user does loses a run: held-out text for any source, every check before training (with nothing
written), checkpoints that survive a failing evaluation, and reproduce.py that continues an interrupted sweep."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import report
import train
import train_gpt
from configurator import ConfigError
from conftest import ROOT, args, play_text
from language_models import gpt2_tokenizer


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    for i in range(2):
        (d / f"part{i}.txt").write_text(play_text(i + 1, 12_000), encoding="utf-8")
    return str(d)


def run(argv, script="train.py", **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600, **kw)


def weights(out_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(out_dir, "saes.safetensors"))


# ---- held-out text for every source ----

@pytest.mark.parametrize("source", ["one_file", "two_files"])
def test_few_files_hold_out_the_tail_and_train_end_to_end(source, gpt_dir, tmp_path, request):
    dataset = request.getfixturevalue(source)
    rule, description = data.heldout_rule(dataset)
    assert rule == "tail" and "last 10% of the text" in description
    # training and held-out text are one text cut in two: no token is shared, nothing is lost
    files = data.local_files(dataset)
    whole = "".join(open(f, encoding="utf-8").read() for f in files)
    train_docs, eval_docs = list(data.documents(dataset, "train")), list(data.documents(dataset, "eval"))
    assert "".join(train_docs) + "".join(eval_docs) == whole
    assert abs(sum(map(len, eval_docs)) / len(whole) - 0.1) < 0.01
    enc = gpt2_tokenizer()
    expected = {split: [t for d in docs for t in enc.encode_ordinary(d) + [enc.eot_token]]
                for split, docs in (("train", train_docs), ("eval", eval_docs))}
    for split in ("train", "eval"):
        samples = torch.cat(list(data.token_samples(dataset, 32, split, repeat=False))).tolist()
        assert samples == expected[split][:len(samples)] and len(expected[split]) - len(samples) < 32

    out = run(args(gpt_dir, dataset, tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held out: the last 10% of the text" in out.stdout
    assert os.path.isfile(tmp_path / "out" / "ckpt.pt") and os.path.isfile(tmp_path / "out" / "saes.safetensors")
    for row in ("CE loss increase", "L0 at blocks.1.hook_resid_pre", "alive features at blocks.1.hook_resid_pre"):
        assert row in out.stdout
    # and eval.py evaluates on the same held-out part
    ev = run([f"--checkpoints=['{tmp_path / 'out'}']", f"--dataset={dataset}", "--n_ctx=32", "--eval_n_samples=8",
              "--device=cpu", f"--out_json={tmp_path / 'eval' / 'e.json'}"], script="eval.py")
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "held out: the last 10% of the text" in ev.stdout and os.path.isfile(tmp_path / "eval" / "e.json")


def test_the_embedded_corpus_keeps_its_held_out_play():
    rule, description = data.heldout_rule("shakespeare")
    assert rule == "documents" and "1 of 38 files" in description


# ---- every check before training, nothing written ----

def bad_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 ".encode("latin-1") * 2000)
    return str(path)


def short_file(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("To be, or not to be.")
    return str(path)


@pytest.mark.parametrize("overrides, message", [
    (dict(min_lr_factor=-0.5), "min_lr_factor must be between 0 and 1"),
    (dict(n_ctx=1), "n_ctx must be at least 2"),
    (dict(dict_size_to_input_ratio=0.01), "gives a dictionary of 0 elements"),
    (dict(n_ctx=65), "n_ctx=65 is longer than the model's context of 64 tokens"),
    (dict(lr=0.0), "lr must be positive"),
    (dict(warmup_samples=-1), "warmup_samples must be >= 0"),
    (dict(dataset=short_file), "holds fewer than n_ctx=32 tokens"),
    (dict(dataset=bad_file), "latin1.txt is not UTF-8 text"),
    (dict(dataset="no/such/dir/*.txt"), "matches no files"),
    (dict(resume=True, overwrite=True), "contradict each other"),
])
def test_bad_settings_fail_at_start_up_with_nothing_written(overrides, message, gpt_dir, one_file, tmp_path):
    overrides = {k: (v(tmp_path) if callable(v) else v) for k, v in overrides.items()}
    dataset = overrides.pop("dataset", one_file)
    out_dir = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        train.main(args(gpt_dir, dataset, out_dir, **overrides))
    assert message in str(e.value.code)
    assert not out_dir.exists()


def test_an_unwritable_out_dir_fails_at_start_up(gpt_dir, one_file, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="out_dir .* cannot be written"):
        train.main(args(gpt_dir, one_file, blocker / "out"))
    assert blocker.read_text() == ""


def test_a_second_run_keeps_the_first_and_resuming_needs_the_same_batch(gpt_dir, one_file, tmp_path, capsys):
    out_dir = tmp_path / "out"
    train.main(args(gpt_dir, one_file, out_dir))
    before = (out_dir / "ckpt.pt").read_bytes()
    train.main(args(gpt_dir, one_file, out_dir))  # the same command again: a run of its own, beside the first
    assert f"{out_dir} holds a run, which is kept: this run writes to {out_dir}-2" in capsys.readouterr().out
    assert (out_dir / "ckpt.pt").read_bytes() == before and (tmp_path / "out-2" / "ckpt.pt").is_file()
    train.main(args(gpt_dir, one_file, out_dir))
    assert (tmp_path / "out-3" / "saes.safetensors").is_file()
    with pytest.raises(ConfigError, match="global batch of 4 samples, this run has 8"):
        train.main(args(gpt_dir, one_file, out_dir, resume=True, batch_size=8))
    assert (out_dir / "ckpt.pt").read_bytes() == before
    train.main(args(gpt_dir, one_file, out_dir, overwrite=True, seed=1))  # told to: replaced
    assert (out_dir / "ckpt.pt").read_bytes() != before
    assert not (tmp_path / "out-4").exists()


def test_train_gpt_checks_before_training(tmp_path):
    with pytest.raises(ConfigError, match="n_steps must be positive"):
        train_gpt.train_small_gpt(str(tmp_path / "m"), n_steps=0)
    with pytest.raises(ConfigError, match="multiple of n_head"):
        train_gpt.train_small_gpt(str(tmp_path / "m"), n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="too short for one window"):
        train_gpt.train_small_gpt(str(tmp_path / "m"), dataset=short_file(tmp_path), n_ctx=32)
    assert not (tmp_path / "m").exists()


def test_eval_and_sample_check_before_loading(tmp_path):
    r = run(["--checkpoint=nowhere/saes.safetensors"], script="sample.py")
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = run(["--checkpoint=out/saes.safetensors", "--temperature=-1"], script="sample.py")
    assert r.returncode == 1 and "temperature must be >= 0" in r.stderr
    (tmp_path / "fake.safetensors").write_bytes(b"\x00" * 64)
    r = run([f"--checkpoints=['{tmp_path / 'fake.safetensors'}']", "--eval_n_samples=2", "--device=cpu",
             f"--out_json={tmp_path / 'new' / 'e.json'}"], script="eval.py")
    assert r.returncode == 1 and "is not a safetensors file" in r.stderr
    assert (tmp_path / "new" / "e.json").exists()  # the folder was made; the failure is recorded in the JSON


# ---- nothing trained is lost ----

def test_an_evaluation_that_fails_leaves_a_checkpoint_that_resumes_exactly(gpt_dir, one_file, tmp_path, monkeypatch,
                                                                          capsys):
    settings = dict(n_samples=96, eval_every_n_samples=48, save_every_n_samples=1000)
    train.main(args(gpt_dir, one_file, tmp_path / "whole", **settings))

    def broken(*a, **k):
        raise RuntimeError("an evaluation that fails")
    monkeypatch.setattr(report, "evaluate", broken)  # train.py evaluates through report.TrainingLog
    with pytest.raises(RuntimeError, match="an evaluation that fails"):
        train.main(args(gpt_dir, one_file, tmp_path / "cut", **settings))
    assert "the checkpoint of step 12 in" in capsys.readouterr().err  # saved before the evaluation, and said so
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 12
    monkeypatch.undo()
    train.main(args(gpt_dir, one_file, tmp_path / "cut", resume=True, **settings))
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_reproduce_continues_an_interrupted_run(tmp_path):
    tiny = tmp_path / "tiny_gpt.py"
    tiny.write_text("n_layer = 2\nn_head = 2\nn_embd = 32\nn_ctx = 32\nn_steps = 4\nbatch_size = 4\n"
                    "eval_n_samples = 8\n")
    argv = [f"--models=['{tiny}']", "--sae_tokens=[204800]", "--types=['e2e']", "--e2e_coeffs=[1.0]", "--n_ctx=32",
            "--eval_n_samples=8", f"--out_root={tmp_path / 'runs'}", f"--results_dir={tmp_path / 'results'}",
            "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "E2ESAE_CACHE": str(tmp_path / "cache")}
    ckpt = tmp_path / "runs" / "tiny_gpt" / "204800" / "e2e_1" / "ckpt.pt"
    # SIGINT restored in the child: a shell without job control starts a background command (a suite run with
    # `nohup ... &`) with SIGINT ignored, which Python would inherit and never turn into Ctrl-C
    proc = subprocess.Popen([sys.executable, "reproduce.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:  # the run has saved once
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "holds a checkpoint: rerun the same command to continue it" in out, out[-3000:]
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < 400  # saved part-way through its 400 steps

    again = subprocess.run([sys.executable, "reproduce.py", *argv], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"(resuming at step {step})" in again.stdout
    assert torch.load(ckpt, weights_only=True)["step"] == 400
    assert os.path.isfile(tmp_path / "results" / "small_scale.csv")


def test_hub_rules_and_a_bad_document_named(monkeypatch):
    """A hub dataset's rows as `datasets` streams them (lists of dicts stand in for the streamed splits, offline)."""
    rows = [{"text": f"document {i}"} for i in range(40)]
    hub = {"with-split": {"train": rows, "validation": [{"text": "held out"}]},
           "no-split": {"train": rows},
           "broken": {"train": rows[:5] + [{"text": None}] + rows[6:]}}
    monkeypatch.setattr(data, "_hub_splits", lambda name: hub[name.split("/")[1]])
    data.heldout_rule.cache_clear()
    assert data.heldout_rule("owner/with-split") == ("split", "its 'validation' split")
    assert list(data.documents("owner/with-split", "eval")) == ["held out"]
    assert data.heldout_rule("owner/no-split")[0] == "documents"
    assert list(data.documents("owner/no-split", "eval")) == ["document 19", "document 39"]
    with pytest.raises(data.DataError, match="document 5 of its train part: its `text` is a NoneType"):
        list(data.documents("owner/broken", "train"))
    data.heldout_rule.cache_clear()
