# The short end-to-end fine-tune (Karvonen 2025) on the 6 x 256 model, 1M tokens per SAE, TopK at fixed k: local for
# the whole budget; local, then KL + MSE (the KL rescaled to the MSE's size) for the last 5% and 10%; e2e throughout.
# The local and e2e runs are topk_sweep.py's (shared folders: trained once).
# python reproduce.py config/finetune_sweep.py  ->  results/finetune.csv, finetune.json, finetune_pareto.png
activation = "topk"
sweep = "k"
types = ["local", "e2e"]
local_coeffs = [16, 32, 64]
e2e_coeffs = [16, 32, 64]
finetune_fractions = [0.05, 0.1]  # 5% = the last 25 of 512 steps (52k tokens); 10% = 51 steps
name = "finetune"
