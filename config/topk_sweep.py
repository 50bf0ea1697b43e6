# TopK SAEs (Gao et al. 2024) on the 6 x 256 model, 1M tokens each: k fixes L0 exactly, so local and e2e compare at
# equal L0 with no interpolation; e2e+ds at two of the k. Beside the ReLU headline's curves (results/small_scale.csv)
# and the JumpReLU runs (config/jumprelu_sweep.py).
# python reproduce.py config/topk_sweep.py  ->  results/topk.csv, topk.json, topk_pareto.png
activation = "topk"
sweep = "k"  # the lists below are k per run; sparsity_coeff 0; aux_k_coeff 1/32 for local, 0 for e2e (train.py's
# TopK defaults: the auxiliary loss reconstructs x, which only local's loss asks for)
local_coeffs = [8, 16, 32, 64]
e2e_coeffs = [8, 16, 32, 64]
e2e_ds_coeffs = [16, 32]
compare = ["results/small_scale.csv", "results/jumprelu.csv"]
name = "topk"
