"""gpu_check.py's stages on the CPU at tiny shapes: GPU time is lent for minutes, so the script that spends it must
not be found broken on the GPU. The same code runs (the CUDA-only parts, the timings' meaning and the time limits
apart); the timings themselves are not checked."""
import json
import subprocess
import sys

from conftest import ROOT


def run_stage(stage, tmp_path):
    out = tmp_path / f"{stage}.json"
    proc = subprocess.run([sys.executable, "gpu_check.py", "--stage", stage, "--device", "cpu", "--tiny", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_the_train_stage_times_both_phases(tmp_path):
    result, _ = run_stage("train", tmp_path)
    assert [p["phase"] for p in result["phases"]] == ["as initialised", "sparse"]
    for phase in result["phases"]:
        assert phase["tokens_per_s"] > 0 and phase["median_ms"] > 0 and phase["steps"]
        assert all(step["loss"] == step["loss"] for step in phase["steps"])  # no NaN


def test_the_peers_stage_times_works_a_and_b_with_every_installed_peer(tmp_path):
    result, out = run_stage("peers", tmp_path)
    assert set(result["works"]) == {"A", "B"}
    for work in result["works"].values():
        rows = {r["implementation"]: r for r in work["rows"]}
        assert any(name.startswith("e2esae") for name in rows)
        assert all(r["median_ms"] > 0 and len(r["times_ms"]) == 10 for r in rows.values())
    # SAELens is a test requirement, so work A measures it (sparsify, where it is not installed, is skipped)
    a = [r["implementation"] for r in result["works"]["A"]["rows"]]
    assert any(name.startswith("SAELens") for name in a), out[-2000:]
    assert "e2esae compute_loss (kl_coeff 1, fused chunked KL), backward, Adam" in \
        [r["implementation"] for r in result["works"]["B"]["rows"]]
