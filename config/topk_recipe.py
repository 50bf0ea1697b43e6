# Why e2e TopK loses to local at equal L0 on the 6 x 256 model, and which recipe wins: each objective at k = 16, 32,
# 64 (local; e2e; Karvonen 2025's full e2e, KL + MSE from the start with the KL rescaled; local with the last 10%
# fine-tuned KL + MSE), 1M tokens each, on the same 20,480 held-out tokens. RESULTS.md lists the variations run on top
# of it (seeds, learning rates, the tied initialisation) and the combined table, results/e2e_topk_recipe.csv.
# python reproduce.py config/topk_recipe.py  ->  results/topk_recipe.csv, .json, _pareto.png
activation = "topk"
sweep = "k"
types = ["local", "e2e", "kl+mse"]
local_coeffs = [16, 32, 64]
e2e_coeffs = [16, 32, 64]
kl_mse_coeffs = [16, 32, 64]
finetune_fractions = [0.1]  # local for 461 of 512 steps, then KL + MSE
compare = []
name = "topk_recipe"
