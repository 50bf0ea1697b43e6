"""Nothing lost, nothing run, nothing silently wrong, round three (issue 30): a checkpoint from a shared folder never
runs code, whichever script opens it; the two files of a run stay one unit whatever stops a save; a resume checks
the pretrained SAEs and the data it depends on; a BatchTopK run too short for its threshold says so; and every
damaged checkpoint is one message naming the file, in every script. Each on the tiny model and text of conftest.py."""
import os
import re
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import analysis
import data
import eval as eval_script
import interop
import reproduce
import runs
import sample
import train
from configurator import ConfigError
from conftest import args, play_text
from e2esae import SAE, SAETransformer

POSITION = "blocks.1.hook_resid_pre"  # where args() puts the SAE
OTHER = "blocks.0.hook_resid_pre"  # where a run with a pretrained SAE at POSITION trains its own


@pytest.fixture(scope="module")
def finished(gpt_dir, one_file, tmp_path_factory):
    """A finished train.py run of 12 steps (saved at steps 6 and 12); tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("finished") / "out"
    train.main(args(gpt_dir, one_file, out))
    return out


def copy_of(run, tmp_path, name="out"):
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


def equal_tensors(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def eval_args(checkpoint, tmp_path, gpt_dir):
    return [f"--checkpoints=['{checkpoint}']", f"--init_from={gpt_dir}", "--n_ctx=32", "--eval_n_samples=8",
            "--device=cpu", f"--out_json={tmp_path / 'eval.json'}"]


def sample_args(checkpoint, gpt_dir):
    return [f"--checkpoint={checkpoint}", f"--init_from={gpt_dir}", "--max_new_tokens=2", "--device=cpu"]


# ---- 1. a checkpoint never runs code ----

class RunsCode:
    """Unpickled in full, it leaves a file: a stand-in for whatever code a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def crafted_ckpt(run, path, marker):
    """train.py's ckpt.pt of `run`, with an object added whose unpickling leaves `marker`."""
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    torch.save(dict(ckpt, extra=RunsCode(marker)), path)


def unsafe_yaml(path, marker):
    """A reference-library config whose full YAML load (yaml.unsafe_load) would leave `marker`."""
    path.write_text(f"tlens_model_name: !!python/object/apply:builtins.exec [\"open('{marker}', 'w').close()\"]\n"
                    f"saes:\n  sae_positions: [{POSITION}]\n  dict_size_to_input_ratio: 4.0\n")


def reference_run(directory, n_dict=128, d_in=32):
    """The reference library's run directory: final_config.yaml and samples_5.pt (an SAE of n_dict x d_in)."""
    os.makedirs(directory, exist_ok=True)
    sae, key = SAE(d_in, n_dict), interop.sae_key(POSITION)
    state = {f"{key}.encoder.0.weight": sae.encoder.weight, f"{key}.encoder.0.bias": sae.encoder.bias,
             f"{key}.decoder.weight": sae.decoder.weight, f"{key}.decoder.bias": sae.decoder.bias}
    torch.save({k: v.detach().clone() for k, v in state.items()}, os.path.join(directory, "samples_5.pt"))
    with open(os.path.join(directory, "final_config.yaml"), "w") as f:
        yaml.safe_dump({"tlens_model_name": "", "saes": {"sae_positions": [POSITION],
                                                         "dict_size_to_input_ratio": n_dict / d_in},
                        "loss": {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}}, f)
    return directory


def test_the_crafted_files_run_code_when_loaded_in_full(finished, tmp_path):
    """What the tests below guard against is real: the full loaders would run the crafted files' code."""
    crafted_ckpt(finished, tmp_path / "ckpt.pt", tmp_path / "by_torch")
    torch.load(tmp_path / "ckpt.pt", weights_only=False)
    unsafe_yaml(tmp_path / "final_config.yaml", tmp_path / "by_yaml")
    yaml.unsafe_load((tmp_path / "final_config.yaml").read_text())
    assert (tmp_path / "by_torch").exists() and (tmp_path / "by_yaml").exists()


def test_a_crafted_ckpt_pt_runs_nothing_whichever_script_opens_it(finished, gpt_dir, one_file, tmp_path, capsys):
    shared, marker = copy_of(finished, tmp_path, "shared"), tmp_path / "marker"
    crafted_ckpt(finished, shared / "ckpt.pt", marker)
    refused = f"{shared / 'ckpt.pt'} holds Python objects other than tensors and plain data (it names exec): it was " \
              "not loaded, since unpickling them would run code"
    attempts = {
        "train.py --resume=True": lambda: train.main(args(gpt_dir, one_file, shared, resume=True)),
        "train.py pretrained_sae_paths": lambda: train.main(args(gpt_dir, one_file, tmp_path / "new", sae_positions=[
            OTHER], pretrained_sae_paths=[str(shared)])),
        "reproduce.py progress": lambda: reproduce.progress(str(shared)),
        "reproduce.py stored_mismatch": lambda: reproduce.stored_mismatch(
            {"out_dir": str(shared), "argv": args(gpt_dir, one_file, shared)}),
        "sample.py": lambda: sample.main(sample_args(shared, gpt_dir)),
        "analysis.py": lambda: analysis.main([f"--checkpoints=['{shared}']", f"--init_from={gpt_dir}",
                                              f"--dataset={one_file}", "--n_ctx=32", "--eval_n_samples=8",
                                              "--device=cpu", f"--out_dir={tmp_path / 'analysis'}"]),
    }
    for where, attempt in attempts.items():
        with pytest.raises(ConfigError) as e:
            attempt()
        assert refused in str(e.value.code) and "\n" not in str(e.value.code), where
    with pytest.raises(SystemExit, match="1 of 1 checkpoints failed"):
        eval_script.main(eval_args(shared, tmp_path, gpt_dir))
    assert f"{shared}: FAILED (ValueError: {refused}" in capsys.readouterr().err
    for spec in (shared, shared / "ckpt.pt", shared / "saes.safetensors"):
        with pytest.raises(ValueError, match="holds Python objects other than tensors and plain data"):
            SAETransformer.from_checkpoint(str(spec))
    assert not marker.exists()
    assert not (tmp_path / "new").exists()  # refused before anything was written


def test_crafted_reference_library_files_run_nothing(gpt_dir, one_file, tmp_path, capsys):
    marker = tmp_path / "marker"
    pt = reference_run(tmp_path / "crafted_pt")
    torch.save({"blocks-1-hook_resid_pre.decoder.bias": RunsCode(marker)}, os.path.join(pt, "samples_5.pt"))
    tag = reference_run(tmp_path / "crafted_yaml")
    unsafe_yaml(tmp_path / "crafted_yaml" / "final_config.yaml", marker)
    for directory, refused in ((pt, "holds Python objects other than tensors and plain data (it names exec)"),
                               (tag, "cannot be read as plain settings: could not determine a constructor for the tag "
                                     "'tag:yaml.org,2002:python/object/apply:builtins.exec'")):
        with pytest.raises(ValueError, match=re.escape(refused)):
            SAETransformer.from_local_path(checkpoint_dir=str(directory))
        with pytest.raises(ValueError, match=re.escape(refused)):
            SAETransformer.from_local_path(checkpoint_file=str(directory / "samples_5.pt"),
                                           config_file=str(directory / "final_config.yaml"))
        with pytest.raises(ConfigError, match=re.escape(refused)):
            train.main(args(gpt_dir, one_file, tmp_path / "new", sae_positions=[OTHER],
                            pretrained_sae_paths=[str(directory)]))
        with pytest.raises(ConfigError, match=re.escape(refused)):
            sample.main(sample_args(directory, gpt_dir))
        with pytest.raises(SystemExit, match="1 of 1 checkpoints failed"):
            eval_script.main(eval_args(directory, tmp_path, gpt_dir))
        assert refused in capsys.readouterr().err
    assert not marker.exists()


# ---- 2. the two files of a run are one unit ----

class Killed(BaseException):
    """The process dies here: nothing after it runs (a kill -9, a power cut)."""


def kill_at_rename(monkeypatch, out, n):
    """The n-th rename of a file into `out` kills the run: that file, and every later one, is never renamed."""
    real, renames = os.replace, []

    def replace(src, dst, *a, **k):
        if os.path.dirname(os.path.abspath(dst)) == os.path.abspath(out):
            renames.append(os.path.basename(dst))
            if len(renames) >= n:
                raise Killed
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", replace)
    return renames


@pytest.mark.parametrize("n, left", [
    (2, "ckpt.pt of step 6 alone"),
    (3, "both files of step 6"),
    (4, "ckpt.pt of step 12, saes.safetensors of step 6"),
])
def test_a_run_killed_at_any_point_of_a_save_resumes_to_the_same_saes(n, left, finished, gpt_dir, one_file, tmp_path,
                                                                      monkeypatch, capsys):
    out = tmp_path / "out"
    renames = kill_at_rename(monkeypatch, out, n)
    with pytest.raises(Killed):
        train.main(args(gpt_dir, one_file, out))
    monkeypatch.undo()
    assert renames[:n] == ["ckpt.pt", "saes.safetensors", "ckpt.pt", "saes.safetensors"][:n]
    steps = {name: interop.load_pt(out / name)["step"] if name == "ckpt.pt" else
             int(interop.read_metadata(str(out / name))["step"]) for name in os.listdir(out) if name != ".lock"}
    assert steps == {2: {"ckpt.pt": 6}, 3: {"ckpt.pt": 6, "saes.safetensors": 6},
                     4: {"ckpt.pt": 12, "saes.safetensors": 6}}[n], left
    capsys.readouterr()
    if n == 4:  # the scripts read the SAEs of ckpt.pt's save, and say so
        read = SAETransformer.from_checkpoint(str(out))
        assert equal_tensors(read.saes.state_dict(), SAETransformer.from_checkpoint(str(finished)).saes.state_dict())
        assert (f"note: {out / 'saes.safetensors'} holds the SAEs of step 6, and ckpt.pt beside it those of step 12: "
                f"reading the SAEs of step 12 from {out / 'ckpt.pt'} instead") in capsys.readouterr().err

    train.main(args(gpt_dir, one_file, out, resume=True))
    printed = capsys.readouterr().out
    assert equal_tensors(load_file(out / "saes.safetensors"), load_file(finished / "saes.safetensors"))
    assert interop.read_metadata(str(out / "saes.safetensors"))["step"] == "12"
    repaired = {2: f"{out / 'saes.safetensors'} is missing: writing it again from {out / 'ckpt.pt'} (step 6)",
                4: f"{out / 'saes.safetensors'} holds the SAEs of step 6, and ckpt.pt beside it those of step 12: "
                   f"writing it again from {out / 'ckpt.pt'} (step 12)"}
    if n in repaired:
        assert repaired[n] in printed
    assert "writing it again" not in printed if n == 3 else True


def test_a_damaged_saes_safetensors_is_read_past_and_repaired_on_resume(finished, gpt_dir, one_file, tmp_path,
                                                                        capsys):
    out = copy_of(finished, tmp_path)
    weights = out / "saes.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk or an interrupted copy
    model = SAETransformer.from_checkpoint(str(out))
    assert equal_tensors(model.saes.state_dict(), load_file(finished / "saes.safetensors"))
    assert f"note: {weights} is damaged (" in capsys.readouterr().err
    train.main(args(gpt_dir, one_file, out, resume=True))
    assert f"{weights} is damaged (" in capsys.readouterr().out
    assert equal_tensors(load_file(weights), load_file(finished / "saes.safetensors"))
    assert interop.read_metadata(str(weights)) == interop.load_pt(out / "ckpt.pt")["saes_metadata"]


def test_a_folder_of_saes_alone_is_a_run_and_is_kept(finished, gpt_dir, one_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(finished / "saes.safetensors", out / "saes.safetensors")
    before = (out / "saes.safetensors").read_bytes()
    assert runs.holds_run(str(out)) and runs.free_out_dir(str(out)) == f"{out}-2"
    with pytest.raises(ConfigError, match=r"holds trained SAEs alone \(saes.safetensors\), not the state of their "
                                          r"run. Train them further as a new run: --pretrained_sae_paths="):
        train.main(args(gpt_dir, one_file, out, resume=True))
    train.main(args(gpt_dir, one_file, out, n_samples=8))
    assert f"{out} holds a run, which is kept: this run writes to {out}-2" in capsys.readouterr().out
    assert os.listdir(out) == ["saes.safetensors"] and (out / "saes.safetensors").read_bytes() == before


def test_every_part_of_a_checkpoint_loads_as_tensors_and_plain_data(finished):
    ckpt = torch.load(finished / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 12 and ckpt["rng"].dtype == torch.uint8
    assert {"saes", "saes_metadata", "optimizer", "scaler", "config", "data", "dependencies"} <= set(ckpt)
    assert ckpt["saes_metadata"] == interop.read_metadata(str(finished / "saes.safetensors"))


# ---- 3. a resume checks what it depends on ----

def test_a_resume_with_a_replaced_pretrained_sae_is_refused(finished, gpt_dir, one_file, tmp_path, capsys):
    first, second = copy_of(finished, tmp_path, "first"), tmp_path / "second"
    argv = args(gpt_dir, one_file, second, sae_positions=[OTHER], pretrained_sae_paths=[str(first)])
    train.main(argv)
    train.main(argv + ["--resume=True"])  # the same SAE: resumed (a finished run reports again)
    train.main(args(gpt_dir, one_file, first, overwrite=True, seed=1))  # another SAE at the same path
    before = {name: (second / name).read_bytes() for name in ("ckpt.pt", "saes.safetensors")}
    capsys.readouterr()
    with pytest.raises(ConfigError) as e:
        train.main(argv + ["--resume=True"])
    message = str(e.value.code)
    assert (f"{second / 'ckpt.pt'} cannot be resumed: the pretrained SAE at {POSITION} ({first}) holds other weights "
            "than when the run began (fingerprint ") in message
    assert "held-out" not in message and "dataset" not in message  # only what changed
    assert {name: (second / name).read_bytes() for name in before} == before
    assert "step " not in capsys.readouterr().out  # refused before any step


def forget_files():
    """What data.py caches of a source for the life of a process (a new train.py reads it afresh)."""
    for cached in (data.source_kind, data.check_source, data.heldout_rule):
        cached.cache_clear()


def test_a_resume_on_data_added_or_removed_is_refused(gpt_dir, tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(2):
        (folder / f"part{i}.txt").write_text(play_text(i + 1, 12_000), encoding="utf-8")
    out = tmp_path / "out"
    train.main(args(gpt_dir, str(folder), out))
    before = (out / "ckpt.pt").read_bytes()

    (folder / "part2.txt").write_text(play_text(3, 12_000), encoding="utf-8")
    forget_files()
    with pytest.raises(ConfigError) as e:
        train.main(args(gpt_dir, str(folder), out, resume=True))
    message = str(e.value.code)
    assert f"{out / 'ckpt.pt'} cannot be resumed: dataset {str(folder)!r} changed: 1 file(s) added: part2.txt; " \
           "held out: the last 10% of the text, read as one (2 file(s)) then, the last 10% of the text, read as one " \
           "(3 file(s)) now" in message
    assert "pretrained SAE" not in message
    os.remove(folder / "part2.txt")
    os.remove(folder / "part1.txt")
    forget_files()
    with pytest.raises(ConfigError, match="changed: 1 file\\(s\\) removed: part1.txt; held out: "):
        train.main(args(gpt_dir, str(folder), out, resume=True))
    (folder / "part1.txt").write_text(play_text(2, 12_000), encoding="utf-8")  # the same text again: the same data
    forget_files()
    train.main(args(gpt_dir, str(folder), out, resume=True))
    assert (out / "ckpt.pt").read_bytes() == before  # a finished run, resumed: nothing new to save


# ---- 4. a BatchTopK run too short for its threshold ----

def test_a_batchtopk_run_too_short_for_its_threshold_says_so(gpt_dir, one_file, tmp_path, capsys):
    out = tmp_path / "out"
    train.main(args(gpt_dir, one_file, out, activation="batchtopk", k=4))
    printed = capsys.readouterr().out
    assert f"warning: the BatchTopK SAE at {POSITION} keeps " in printed and "x its k=4: its inference threshold" \
        in printed and "has not settled" in printed
    eval_script.main(eval_args(out, tmp_path, gpt_dir))
    assert f"warning: the BatchTopK SAE at {POSITION} of {out} keeps " in capsys.readouterr().out
    row = dict(checkpoint="x", position=POSITION, activation="batchtopk", k=4)
    assert report_warning(row, l0=5.0) is None and report_warning(row, l0=1.5) is not None
    assert report_warning(dict(row, activation="topk"), l0=40.0) is None


def report_warning(row, l0):
    from report import threshold_warning
    return threshold_warning(row["position"], row, l0)


# ---- 5. every way of opening a checkpoint fails with a message ----

def saelens_sae(directory):
    from interop import save_saelens
    save_saelens(SAE(32, 128), str(directory), hook_name=POSITION)
    return directory, directory / "sae_weights.safetensors", directory / "cfg.json"


def ours_sae(directory, finished):
    directory.mkdir()
    shutil.copy(finished / "saes.safetensors", directory / "saes.safetensors")  # without its ckpt.pt
    return directory, directory / "saes.safetensors", None


def e2e_sae(directory):
    reference_run(directory)
    return directory, directory / "samples_5.pt", directory / "final_config.yaml"


def rewrite(path, change):
    """A weights file with `change` applied to its {name: tensor} (the metadata kept)."""
    if path.suffix == ".pt":
        torch.save(change(torch.load(path, weights_only=True)), path)
    else:
        save_file(change(load_file(path)), path, metadata=interop.read_metadata(str(path)) if path.name ==
                  "saes.safetensors" else None)


def damage(kind, weights, config):
    """Damage one file of a checkpoint; returns the damaged file and what the message must say."""
    key = interop.sae_key(POSITION)
    decoder = {"sae_weights.safetensors": "W_dec", "samples_5.pt": f"{key}.decoder.weight",
               "saes.safetensors": f"{key}.decoder.weight"}[weights.name]
    bias = {"sae_weights.safetensors": "b_dec"}.get(weights.name, f"{key}.decoder.bias")
    if kind == "cut short":
        weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
        return weights, "is damaged and cannot be read" if weights.suffix == ".pt" else "not a safetensors file"
    if kind == "a tensor missing":
        rewrite(weights, lambda t: {k: v for k, v in t.items() if k != bias})
        return weights, "has no " + ("b_dec" if bias == "b_dec" else "decoder.bias")
    if kind == "a wrong shape":
        rewrite(weights, lambda t: dict(t, **{decoder: t[decoder][:, :-1].contiguous()}))
        return weights, "of shape"
    if kind == "a config that is not a mapping":
        config.write_text("[1, 2]" if config.suffix == ".json" else "- 1\n- 2\n")
        return config, "holds a list, not a mapping of settings"
    unsafe_yaml(config, weights.parent / "marker")
    return config, "cannot be read as plain settings: could not determine a constructor for the tag"


@pytest.mark.parametrize("fmt, kind", [
    *[("saelens", k) for k in ("cut short", "a tensor missing", "a wrong shape", "a config that is not a mapping")],
    *[("e2e_sae", k) for k in ("cut short", "a tensor missing", "a wrong shape", "a config that is not a mapping",
                               "an unsafe YAML tag")],
    *[("ours", k) for k in ("cut short", "a tensor missing", "a wrong shape")],
])
def test_a_damaged_checkpoint_is_one_message_naming_the_file_in_every_script(fmt, kind, finished, gpt_dir, one_file,
                                                                             tmp_path, capsys):
    made = {"saelens": lambda d: saelens_sae(d), "e2e_sae": lambda d: e2e_sae(d),
            "ours": lambda d: ours_sae(d, finished)}[fmt](tmp_path / fmt)
    spec = made[0]
    path, says = damage(kind, *made[1:])
    for script, attempt in (
            ("sample.py", lambda: sample.main(sample_args(spec, gpt_dir))),
            ("train.py", lambda: train.main(args(gpt_dir, one_file, tmp_path / "new", sae_positions=[OTHER],
                                                 pretrained_sae_paths=[str(spec)])))):
        with pytest.raises(ConfigError) as e:
            attempt()
        message = str(e.value.code)
        assert str(path) in message and says in message and "\n" not in message, (script, message)
    with pytest.raises(SystemExit, match="1 of 1 checkpoints failed"):
        eval_script.main(eval_args(spec, tmp_path, gpt_dir))
    failed = [line for line in capsys.readouterr().err.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "FAILED (ValueError: " in failed[0] and str(path) in failed[0] and says in failed[0]
    assert not (tmp_path / "new").exists() and not (spec / "marker").exists()
