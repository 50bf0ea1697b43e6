"""reproduce.py's comparison at matched CE increase, and its plan of runs."""
import math

import pytest

import reproduce
from configurator import configure


def curve(kind, l0_scale, alive_scale):
    """Runs on one power-law frontier: L0 = l0_scale x ce^-0.5, alive = alive_scale x ce^-0.2."""
    return [dict(type=kind, ce_increase=ce, l0=l0_scale * ce ** -0.5, alive=alive_scale * ce ** -0.2)
            for ce in (0.01, 0.03, 0.1, 0.3)]


def test_matched_ratios_on_known_frontiers():
    rows = curve("local", 10.0, 500.0) + curve("e2e", 4.0, 400.0)  # e2e: 0.4x the L0, 0.8x the alive everywhere
    m = reproduce.matched(rows, "e2e")
    assert m["ce_lo"] == 0.01 and m["ce_hi"] == 0.3 and len(m["points"]) == 5
    assert m["l0_ratio"] == pytest.approx(0.4) and m["alive_ratio"] == pytest.approx(0.8)
    # log-log interpolation is exact on a power law, between the runs too
    mid = m["points"][2]
    assert mid["local_l0"] == pytest.approx(10.0 * mid["ce_increase"] ** -0.5)


def test_curves_that_do_not_overlap_give_no_ratio():
    rows = curve("local", 10.0, 500.0)[:2] + curve("e2e", 4.0, 400.0)[2:]
    assert reproduce.matched(rows, "e2e") is None
    assert reproduce.interpolate([(0.1, 5.0), (0.2, 2.5)], 0.3) is None
    assert reproduce.interpolate([(0.1, 5.0), (0.4, 2.5)], 0.2) == pytest.approx(5.0 * 2 ** (-0.5))


def test_plan_places_each_model_at_its_middle_and_shares_runs():
    c = type("C", (), configure(reproduce.DEFAULTS, ["config/scaling_cpu.py"]))
    runs = reproduce.plan(c)
    assert len(runs) == 2 * 4 * 8  # models x budgets x (4 local + 4 e2e)
    positions = {r["model"]: r["position"] for r in runs}
    assert positions == {"gpt_shakespeare": "blocks.2.hook_resid_pre",
                         "gpt_shakespeare_6x256": "blocks.3.hook_resid_pre"}
    first = runs[0]
    assert first["out_dir"] == "out/scaling/gpt_shakespeare/65536/local_1"  # the cheapest budget first
    assert "--n_samples=512" in first["argv"] and "--kl_coeff=0.0" in first["argv"]
    e2e_ds = reproduce.plan(type("C", (), configure(reproduce.DEFAULTS, [])))[-1]
    assert e2e_ds["type"] == "e2e+ds" and e2e_ds["position"] == "blocks.3.hook_resid_pre"  # the 6 x 256 model
    assert "--in_to_orig_positions=['blocks.4.hook_resid_pre', 'blocks.5.hook_resid_pre']" in e2e_ds["argv"]
    assert math.isclose(float(e2e_ds["sparsity_coeff"]), 30.0) and e2e_ds["sae_tokens"] == 1_048_576


def test_the_grid_plots_draw_every_model_and_budget(tmp_path):
    rows = []
    for model, scale in (("weak", 1.0), ("strong", 0.5)):
        for tokens in (262_144, 1_048_576):
            for r in curve("local", 10.0, 500.0) + curve("e2e", 4.0 * scale, 400.0):
                rows.append(dict(r, model=model, model_ce=5.0 * scale, sae_tokens=tokens))
    ratios = []
    for model in ("weak", "strong"):
        for tokens in (262_144, 1_048_576):
            m = reproduce.matched([r for r in rows if r["model"] == model and r["sae_tokens"] == tokens], "e2e")
            ratios.append(dict(model=model, model_ce=5.0, sae_tokens=tokens, l0_ratio=m["l0_ratio"],
                               alive_ratio=m["alive_ratio"], l0_ratio_common=None, alive_ratio_common=None))
    assert [round(r["l0_ratio"], 6) for r in ratios] == [0.4, 0.4, 0.2, 0.2]
    reproduce.plot_ratios(ratios, str(tmp_path / "ratio.png"))
    reproduce.plot_ratio_curves(rows, "e2e", str(tmp_path / "vs_ce.png"))
    reproduce.plot_grid(rows, str(tmp_path / "grid.png"))
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ("ratio.png", "vs_ce.png", "grid.png"))


def test_the_finetune_report_measures_the_cut_and_the_gap_only_where_there_is_one(capsys):
    def run(kind, k, ce):
        return dict(type=kind, k=k, sparsity_coeff=0.0, ce_increase=ce, train_seconds=100.0)
    rows = [run("local", 16, 0.10), run("local+ft 10%", 16, 0.08), run("e2e", 16, 0.06),  # e2e better: half closed
            run("local", 32, 0.04), run("local+ft 10%", 32, 0.03), run("e2e", 32, 0.05)]  # e2e worse: no gap
    reproduce.report_finetune(rows, [0.1])
    k16, k32 = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  k=")]
    assert "local+ft 10% +0.0800 (cut 20%, 50% of the gap to e2e; 100 s)" in k16
    assert "local+ft 10% +0.0300 (cut 25%; 100 s)" in k32 and "of the gap" not in k32
    assert k32.endswith("e2e +0.0500 (100 s; no better than local: no gap to close)")


def test_the_recipe_study_combines_sweeps_into_one_table_with_spreads(tmp_path, capsys):
    """combine=: the rows of several sweeps' CSVs (one per seed here) become one table with each run's recipe, a run
    listed by two sweeps once; a cell's mean and spread are over its seeds; its plot is written."""
    columns = reproduce.SMALL_SCALE_COLUMNS
    paths = []
    for seed, ce in ((0, 0.030), (1, 0.034), (2, 0.038)):
        rows = [dict(type="e2e", sparsity_coeff=0.0, l0=32.0, ce_increase=ce, alive=1000 + seed, kl=0.05,
                     explained_variance=0.7, activation="topk", k=32, train_seconds=600.0, sae_tokens=1048576,
                     lr=0.003, sae_init="orthogonal", normalize_activations="none", seed=seed),
                dict(type="local", sparsity_coeff=0.0, l0=32.0, ce_increase=0.02, alive=700, kl=0.04,
                     explained_variance=0.96, activation="topk", k=32, train_seconds=300.0, sae_tokens=1048576,
                     lr=0.003, sae_init="orthogonal", normalize_activations="none", seed=seed)]
        paths.append(str(tmp_path / f"seed{seed}.csv"))
        reproduce.write_csv(paths[-1], rows, columns)
        if seed == 0:  # seed 0's local run, evaluated again by a later sweep that listed it: one run, counted once
            paths.append(str(tmp_path / "again.csv"))
            reproduce.write_csv(paths[-1], rows[1:], columns)
    reproduce.main([f"--combine={paths!r}", f"--results_dir={tmp_path}", "--name=recipe"])
    with open(tmp_path / "recipe.csv") as f:
        table = f.read().splitlines()
    assert table[0].split(",") == reproduce.RECIPE_COLUMNS and len(table) == 7
    assert "e2e,topk,32" in table[1] and table[1].endswith(",10.0,seed0.csv")  # 600 s: 10 minutes
    printed = capsys.readouterr().out
    assert "0.0340 ± 0.0040" in printed  # e2e's mean over three seeds and half their range
    assert (tmp_path / "recipe.png").read_bytes()[:4] == b"\x89PNG"
