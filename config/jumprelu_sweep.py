# JumpReLU SAEs (Rajamanoharan et al. 2024) on the 6 x 256 model, 1M tokens each: local and e2e at two L0 penalties
# far apart. The stream here is unnormalised (about 4 per dimension, pre-activations about 2.4 at initialisation), so
# the threshold starts at 2.5 with a bandwidth of 0.5 rather than the paper's 0.001 for normalised inputs; at 262k
# tokens the starting threshold, not the penalty, set the L0 (RESULTS.md). Beside the ReLU and TopK curves.
# python reproduce.py config/jumprelu_sweep.py  ->  results/jumprelu.csv, jumprelu.json, jumprelu_pareto.png
activation = "jumprelu"
types = ["local", "e2e"]
local_coeffs = [0.1, 10.0]  # sparsity_coeff: the L0 penalty, lambda x L0 / d_in
e2e_coeffs = [0.1, 10.0]
train_args = ["--jumprelu_init_threshold=2.5", "--jumprelu_bandwidth=0.5"]
compare = ["results/small_scale.csv", "results/topk.csv"]
name = "jumprelu"
