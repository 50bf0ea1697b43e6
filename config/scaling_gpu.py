# The scaling measurement on one GPU: a bigger model and larger SAE budgets. Offline (Shakespeare; the models are
# trained there and cached). Not yet run on a GPU: its time on an H200 is unmeasured.
# python reproduce.py config/scaling_gpu.py  ->  results/scaling_gpu*.{csv,png}
models = ["config/gpt_shakespeare_6x256.py", "config/gpt_shakespeare_8x512.py"]
sae_tokens = [1_048_576, 4_194_304, 16_777_216]
types = ["local", "e2e"]
local_coeffs = [1.0, 3.0, 10.0, 30.0]
e2e_coeffs = [0.1, 0.3, 1.0, 3.0]
train_args = ["--batch_size=64", "--log_every_n_steps=64"]  # 8,192 tokens per step: a GPU needs work per launch
eval_n_samples = 160
name = "scaling_gpu"
