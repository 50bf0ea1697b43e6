# The scaling measurement on one GPU: a stronger model (8 layers x 512, trained there in about a minute and cached)
# and larger SAE budgets, offline (Shakespeare). Sized for about 8 minutes of one H200 (BENCHMARKS.md says what is
# measured). The CPU grid (config/scaling_cpu.py) covers the two smaller models.
# python reproduce.py config/scaling_gpu.py  ->  results/scaling_gpu*.{csv,png}
models = ["config/gpt_shakespeare_8x512.py"]
sae_tokens = [1_048_576, 4_194_304, 16_777_216]  # 4x apart, up to 64x the CPU grid's smallest
types = ["local", "e2e"]
local_coeffs = [1.0, 3.0, 10.0, 30.0]
e2e_coeffs = [0.1, 0.3, 1.0, 3.0]
train_args = ["--batch_size=64", "--log_every_n_steps=64"]  # 8,192 tokens per step: a GPU needs work per launch
eval_n_samples = 160
name = "scaling_gpu"
