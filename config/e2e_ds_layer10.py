# End-to-end + downstream SAE at GPT-2 small's blocks.10.hook_resid_pre: sparsity + KL + MSE at every later
# hook_resid_pre.
# The paper's run at similar CE increase: L0 70.2, 25k alive elements, CE increase 0.144.
# python train.py config/e2e_ds_layer10.py
sae_positions = ["blocks.10.hook_resid_pre"]
sparsity_coeff = 1.75
kl_coeff = 0.5
in_to_orig_coeff = 0.05  # split evenly: 0.05 / 1 = 0.05 per position
in_to_orig_positions = ["blocks.11.hook_resid_pre"]
init_from = "gpt2"  # GPT-2 small, OpenAI's weights from the Hugging Face hub
dataset = "apollo-research/Skylion007-openwebtext-tokenizer-gpt2"  # OpenWebText, pre-tokenised
n_ctx = 1024
dict_size_to_input_ratio = 60.0  # 60 x 768 = 46,080 dictionary elements
n_samples = 400_000  # 400k samples x 1,024 tokens = 410M tokens
batch_size = 8
gradient_accumulation_steps = 2  # 8 samples x 2 accumulation = 16 samples = 16,384 tokens per step (per process)
lr = 5e-4
warmup_samples = 20_000  # 1,250 steps of 16 samples
min_lr_factor = 0.1
max_grad_norm = 10.0
eval_every_n_samples = 40_000
eval_n_samples = 500  # 500 x 1,024 = 512,000 held-out tokens, over which alive features are counted
save_every_n_samples = 20_000
log_every_n_steps = 50
compile = True
out_dir = "out/e2e_ds_layer10"
wandb_run_name = "e2e_ds_layer10"
