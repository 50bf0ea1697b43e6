"""train.py end to end on a tiny random GPT-2 and local text files: training, DDP, resume, configs, data, wandb."""
import glob
import math
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

import data
import train
from configurator import ConfigError
from conftest import ROOT
from conftest import args as run_args
from language_models import gpt2_tokenizer


@pytest.fixture(scope="module")
def gpt_dir(gpt3_dir):
    return gpt3_dir  # the 3-layer model (tests/conftest.py)


def args(gpt_dir, text_dir, out_dir, **overrides):
    """conftest's run, 24 steps long, evaluated and saved every 12."""
    return run_args(gpt_dir, text_dir, out_dir, **{"n_samples": 96, "eval_every_n_samples": 48,
                                                   "save_every_n_samples": 48, "log_every_n_steps": 2,
                                                   "sparsity_coeff": 1.0, "kl_coeff": 1.0, **overrides})


def free_port():
    """A port no other process listens on now (a fixed one clashes with other runs on a shared machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv, launcher=(sys.executable, "train.py"), **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.run([*launcher, *argv], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, **kw)


def sae_weights(out_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(out_dir, "saes.safetensors"))


def test_a_short_run_trains_and_logs_to_wandb(gpt_dir, text_dir, tmp_path):
    out = run(args(gpt_dir, text_dir, tmp_path, sparsity_coeff=3.0, wandb_log=True, wandb_project="test"),
              env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    loss = [float(re.search(r"loss ([\d.]+)", s).group(1)) for s in steps]
    l0 = [float(re.search(r"l0 ([\d.]+)", s).group(1)) for s in steps]
    assert len(steps) == 12 and loss[-1] < loss[0] and l0[-1] < l0[0]
    line = (r"^step 24 \| loss [\d.]+ \| kl [\d.]+ \| l0 [\d.]+ \| reached \d+% \| lr 1\.0e-03 \| norm [\d.]+ \| "
            r"\d+ ms \| [\d,]+ tok/s$")
    assert re.search(line, steps[-1], re.M), steps[-1]
    assert out.stdout.count("eval | ce_orig") == 2
    for row in ("CE loss increase", "KL(original || spliced)", "L0 at blocks.1.hook_resid_pre",
                "alive features at blocks.1.hook_resid_pre", "explained variance at blocks.1.hook_resid_pre"):
        assert row in out.stdout
    assert os.path.isfile(tmp_path / "ckpt.pt") and os.path.isfile(tmp_path / "saes.safetensors")
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, os.listdir(tmp_path)
    keys, files = wandb_offline_log(runs[0])
    assert {"train/loss", "train/kl", "train/l0/blocks.1.hook_resid_pre", "train/lr", "eval/ce_increase",
            "eval/alive/blocks.1.hook_resid_pre", "eval/log10_feature_frequency/blocks.1.hook_resid_pre/bins"} <= keys
    assert "saes.safetensors" in files


def wandb_offline_log(path):
    """The history keys and saved files of an offline wandb run, read from its .wandb file: a LevelDB-style log
    (a 7-byte file header, then 32 KiB blocks of records each with a 7-byte header: crc, length, type)."""
    import struct

    from wandb.proto import wandb_internal_pb2
    raw, block, pos, chunks, records = open(path, "rb").read(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # the rest of the block is padding
            pos += left
            continue
        chunks, pos = chunks + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    keys = {"/".join([i.key] if i.key else i.nested_key)
            for r in records if r.HasField("history") for i in r.history.item}
    files = {f.path for r in records if r.HasField("files") for f in r.files.files}
    return keys, files


def test_torchrun_two_processes_equals_one(gpt_dir, text_dir, tmp_path):
    one = run(args(gpt_dir, text_dir, tmp_path / "one", batch_size=4, n_samples=32))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(args(gpt_dir, text_dir, tmp_path / "two", batch_size=2, n_samples=32),
              launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "train.py"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(2 per micro-step x 1 accumulation x 2 processes)" in two.stdout
    a, b = sae_weights(tmp_path / "one"), sae_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


TIED_NORMALISED = dict(activation="topk", k=4, out_to_in_coeff=1.0, kl_coeff=0.0, sae_init="tied_median",
                       normalize_activations="expected_average_only_in")


@pytest.mark.parametrize("variant", [{}, TIED_NORMALISED], ids=["relu-e2e", "topk-local-tied-normalised"])
def test_interrupt_and_resume_equals_an_uninterrupted_run(gpt_dir, text_dir, tmp_path, variant):
    """Also with the initialisation and the input scale taken from the first batches: a resumed run keeps both (it
    does not estimate them again), and ends with the same SAEs."""
    settings = dict(n_samples=160, log_every_n_steps=1, save_every_n_samples=10_000, eval_every_n_samples=10_000,
                    **variant)
    whole = run(args(gpt_dir, text_dir, tmp_path / "whole", **settings))
    assert whole.returncode == 0, whole.stderr[-3000:]

    argv = args(gpt_dir, text_dir, tmp_path / "cut", **settings)
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith("step 3 |"):
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-3000:]
    stopped = int(re.search(r"interrupted at step (\d+)", rest).group(1))
    assert 3 <= stopped < 40
    resumed = run(argv + ["--resume=True"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'cut' / 'ckpt.pt'} at step {stopped}" in resumed.stdout
    assert ("input_scale" in whole.stdout) == bool(variant) and "input_scale" not in resumed.stdout
    a, b = sae_weights(tmp_path / "whole"), sae_weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    if variant:  # the checkpoint holds the scale; the SAEs the scripts read have it folded in
        saes = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=False)["saes"]
        key = "blocks-1-hook_resid_pre.input_scale"
        assert saes[key].item() != 1.0 and a[key].item() == 1.0


def test_damaged_or_incompatible_checkpoint_is_refused_and_kept(gpt_dir, text_dir, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="is damaged and cannot be read.*left untouched"):
        train.main(args(gpt_dir, text_dir, tmp_path, resume=True))
    assert ckpt.read_bytes() == b"not a checkpoint"
    torch.save({"config": {"init_from": gpt_dir, "sae_positions": ["blocks.2.hook_resid_pre"]}, "step": 1}, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(ConfigError, match=r"trained with sae_positions=\['blocks.2.hook_resid_pre'\]"):
        train.main(args(gpt_dir, text_dir, tmp_path, resume=True))
    assert ckpt.read_bytes() == before
    with pytest.raises(ConfigError, match="no checkpoint at"):
        train.main(args(gpt_dir, text_dir, tmp_path / "empty", resume=True))


@pytest.mark.parametrize("extra, message", [
    (["--sparsity_coef=1.0"], "unknown key 'sparsity_coef' in --sparsity_coef=1.0; did you mean 'sparsity_coeff'?"),
    (["--n_samples=many"],
     f"n_samples expects int (default {train.DEFAULTS['n_samples']}), but --n_samples=many gives str 'many'"),
    (["--sae_positions=blocks.1.hook_resid_pre"], "sae_positions expects list"),
    (["config/does_not_exist.py"], "config file config/does_not_exist.py does not exist"),
    (["--dtype=float8"], "dtype must be 'float32', 'bfloat16' or 'float16'"),
    (["--sae_positions=['blocks.7.hook_resid_pre']"], "unknown residual position 'blocks.7.hook_resid_pre'"),
    (["--kl_coeff=-1.0"], "kl_coeff must be >= 0"),
    (["--in_to_orig_coeff=1.0"], "needs in_to_orig_positions"),
    (["--batch_size=0"], "batch_size must be positive"),
])
def test_bad_config_stops_before_any_work(gpt_dir, text_dir, tmp_path, extra, message):
    out_dir = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        train.main(args(gpt_dir, text_dir, out_dir) + extra)
    assert message in str(e.value.code)
    assert not out_dir.exists()


def test_bad_config_exits_nonzero_with_the_message(tmp_path):
    out = run(["--n_layers=3", f"--out_dir={tmp_path / 'out'}"])
    assert out.returncode == 1 and "config error: unknown key 'n_layers'" in out.stderr
    assert not (tmp_path / "out").exists()


def test_config_files_override_in_order(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nlr = 1\nbatch_size = 3  # a comment\n_private = 'ignored'\n")
    from configurator import configure
    c = configure(train.DEFAULTS, [str(cfg), "--batch_size=5", "--device=cuda:1",
                                   "--sae_positions=['blocks.0.hook_resid_pre']"])
    assert c["lr"] == 1.0 and isinstance(c["lr"], float) and c["batch_size"] == 5 and c["device"] == "cuda:1"
    assert c["sae_positions"] == ["blocks.0.hook_resid_pre"]


def test_paper_configs_resolve():
    from configurator import configure
    files = sorted(glob.glob(os.path.join(ROOT, "config", "*_layer*.py")))
    assert len(files) == 9
    c = configure(train.DEFAULTS, [os.path.join(ROOT, "config", "e2e_ds_layer6.py")])
    assert (c["sparsity_coeff"], c["kl_coeff"], c["in_to_orig_coeff"]) == (50.0, 0.5, 2.5)
    assert c["in_to_orig_positions"] == [f"blocks.{i}.hook_resid_pre" for i in range(7, 12)]
    c = configure(train.DEFAULTS, [os.path.join(ROOT, "config", "local_layer2.py")])
    assert (c["sparsity_coeff"], c["kl_coeff"], c["out_to_in_coeff"], c["n_samples"]) == (0.8, 0.0, 1.0, 400_000)


def test_lr_schedule():
    lr = lambda s: train.get_lr(s, n_steps=100, warmup_steps=10, lr=1e-3, min_lr_factor=0.1)
    assert lr(0) == pytest.approx(1e-4) and lr(4) == pytest.approx(5e-4)
    assert lr(9) == pytest.approx(1e-3)  # peak at the end of warmup
    assert lr(10) == pytest.approx(1e-3)
    assert lr(99) == pytest.approx(1e-4)  # min_lr_factor x lr at the last step
    assert lr(10 + 89 // 2) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * (44 / 89))) * 9e-4)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 99))


def test_data_stream(text_dir):
    enc = gpt2_tokenizer()
    files = sorted(glob.glob(os.path.join(text_dir, "*.txt")))
    expected = {"train": [], "eval": []}
    for i, f in enumerate(files):
        tokens = enc.encode_ordinary(open(f, encoding="utf-8").read()) + [enc.eot_token]
        expected["eval" if i % 20 == 19 else "train"] += tokens
    for split in ("train", "eval"):
        samples = list(data.token_samples(text_dir, 50, split, repeat=False))
        assert all(s.shape == (50,) for s in samples)
        assert torch.cat(samples).tolist() == expected[split][:50 * len(samples)]
        assert len(expected[split]) - 50 * len(samples) < 50
    train_docs = {d for d in data.documents(text_dir, "train")}
    eval_docs = {d for d in data.documents(text_dir, "eval")}
    assert len(eval_docs) == 2 and not train_docs & eval_docs
    shards = [list(data.token_samples(text_dir, 50, "train", rank=r, world_size=3, repeat=False)) for r in range(3)]
    whole = list(data.token_samples(text_dir, 50, "train", repeat=False))
    assert [s.tolist() for s in shards[1]] == [s.tolist() for s in whole[1::3]]
    resumed = list(data.token_samples(text_dir, 50, "train", rank=1, world_size=3, skip=4, repeat=False))
    assert [s.tolist() for s in resumed] == [s.tolist() for s in shards[1][4:]]


def test_hub_dataset_offline_says_how_to_use_local_files():
    with pytest.raises(data.DataError, match="Offline, point `dataset` at local text files"):
        next(data.token_samples("no-such-owner/no-such-dataset", 32))


def test_the_embedded_default_trains_its_model_once_then_reuses_it(tmp_path):
    """`python train.py`'s path at a reduced size: the small model is trained into the cache, then reused."""
    tiny = tmp_path / "tiny_gpt.py"
    tiny.write_text("n_layer = 3\nn_head = 2\nn_embd = 32\nn_steps = 4\nbatch_size = 4\neval_n_samples = 8\n")
    argv = [f"--small_model_config={tiny}", "--n_samples=16", "--batch_size=4", "--eval_every_n_samples=16",
            "--save_every_n_samples=16", "--eval_n_samples=8", "--dict_size_to_input_ratio=2.0",
            f"--out_dir={tmp_path / 'out'}"]
    env = {"E2ESAE_CACHE": str(tmp_path / "cache")}
    first = run(argv, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no cached small model" in first.stdout and "train_gpt: saved to" in first.stdout
    (cached,) = [d for d in os.listdir(tmp_path / "cache") if d != "tokens"]  # (tokens/: data.py's token files)
    assert cached.startswith("gpt2-shakespeare-3x32-")
    weights = tmp_path / "cache" / cached / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    second = run(argv[:-1] + [f"--out_dir={tmp_path / 'out2'}"], env=env)  # (out would be refused: it holds a run)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "no cached small model" not in second.stdout and weights.stat().st_mtime_ns == stamp
    for out in (first.stdout, second.stdout):
        for row in ("CE loss of the model", "CE loss with the SAEs spliced in", "CE loss increase",
                    "KL(original || spliced)",
                    "L0 at blocks.2.hook_resid_pre", "alive features at blocks.2.hook_resid_pre",
                    "explained variance at blocks.2.hook_resid_pre", "CE loss of a unigram model",
                    "model's advantage over unigram", "advantage kept with the SAEs"):
            assert re.search(rf"^  {re.escape(row)}\s+-?[\d,.]+", out, re.M), row
