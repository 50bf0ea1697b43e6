# The e2e/local comparison as a function of model quality and SAE budget, on 2 CPU cores (several hours).
# python reproduce.py config/scaling_cpu.py  ->  results/scaling.csv, scaling_ratio.csv, scaling.png, scaling_vs_ce.png,
#                                               scaling_pareto.png, scaling.json
models = ["", "config/gpt_shakespeare_6x256.py"]  # the default 4 x 128 (CE ~5.3), and 6 x 256 trained ~3 epochs
sae_tokens = [65_536, 262_144, 1_048_576, 4_194_304]  # 512 / 2,048 / 8,192 / 32,768 samples of 128 tokens per run
types = ["local", "e2e"]
local_coeffs = [1.0, 3.0, 10.0, 30.0]  # x3 apart: brackets CE increases of about 0.01 to 0.3
e2e_coeffs = [0.1, 0.3, 1.0, 3.0]
eval_n_samples = 160  # 20,480 held-out tokens for every run
name = "scaling"
