# The short end-to-end fine-tune (Karvonen 2025) as one run: a TopK SAE trained locally (sparsity from k, MSE) for
# the first 90% of the steps, then with KL + MSE, the KL rescaled to the MSE's size, for the last 10%.
# python train.py config/finetune_topk.py        (the embedded default's model; add a GPT-2 config for the real thing)
activation = "topk"
k = 16
kl_coeff = 1.0
out_to_in_coeff = 1.0
kl_rescale = True  # alpha = (mse / kl) detached; loss = 0.5 (mse + alpha kl)
finetune_fraction = 0.1  # 2,048 samples / 16 = 128 steps: 115 local, then 13 end to end
