# A stronger small GPT-2 for the scaling experiment (reproduce.py config/scaling_cpu.py): deeper, 2x wider and
# trained for about 3 epochs of Shakespeare. 113 min on 2 CPU cores shared with other jobs (held-out CE 4.51); cached.
# python train_gpt.py config/gpt_shakespeare_6x256.py
dataset = "shakespeare"  # 1,475,200 training tokens; one play in 20 held out
n_ctx = 128
n_layer = 6
n_head = 8  # head_dim 256 / 8 = 32
n_embd = 256  # 6 x 12 x 256^2 = 4.7M in the blocks, 50,257 x 256 = 12.9M in the tied embedding
n_steps = 2000
batch_size = 16  # 2,048 tokens per step; 2,000 steps = 4,096,000 tokens = 2.8 epochs
lr = 2e-3
warmup_steps = 100
min_lr_factor = 0.1
weight_decay = 0.1
max_grad_norm = 1.0
eval_n_samples = 256  # 32,512 held-out tokens
eval_every_n_steps = 250  # the held-out curve: does it overfit?
log_every_n_steps = 50
