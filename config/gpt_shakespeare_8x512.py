# The GPU preset's strongest model (reproduce.py config/scaling_gpu.py): 8 layers x 512, about 5 epochs of
# Shakespeare. Minutes on one GPU; far too slow for a CPU. python train_gpt.py config/gpt_shakespeare_8x512.py
dataset = "shakespeare"  # 1,475,200 training tokens; one play in 20 held out
n_ctx = 128
n_layer = 8
n_head = 8  # head_dim 512 / 8 = 64
n_embd = 512  # 8 x 12 x 512^2 = 25.2M in the blocks, 50,257 x 512 = 25.7M in the tied embedding
n_steps = 1800
batch_size = 32  # 4,096 tokens per step; 1,800 steps = 7,372,800 tokens = 5.0 epochs
lr = 1e-3
warmup_steps = 100
min_lr_factor = 0.1
weight_decay = 0.1
max_grad_norm = 1.0
eval_n_samples = 256
eval_every_n_steps = 300
log_every_n_steps = 100
