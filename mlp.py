"""
SAEs on a small MLP that reads handwritten digits: local, end-to-end and e2e + downstream, offline in a minute.

Besides GPT-2, the original library (`e2e_sae`, Braun et al. 2024) trains SAEs on the hidden layers of an MLP
classifier, the simplest place to see what end-to-end training changes. Here the MLP classifies 8 x 8 images of digits
(digits/digits.csv.gz, 1,797 images, CC BY 4.0; see digits/README.md), small enough to train in seconds:

    pixels (64) -> Linear + ReLU -> hidden layer 0 (64) -> Linear + ReLU -> hidden layer 1 (64) -> Linear -> 10 logits

Then, for each training type, an SAE (e2esae.SAE) reads hidden layer `sae_layer` and its output replaces that layer
for the rest of the MLP, which stays frozen. The terms are e2esae.py's, with "token" read as "image":

    local  = sparsity_coeff x ||c||_p / d_in + out_to_in_coeff x MSE(x_hat, x)
    e2e    = sparsity_coeff x ||c||_p / d_in + kl_coeff x KL(p_orig || p_spliced)
    e2e+ds = sparsity_coeff x ||c||_p / d_in + kl_coeff x KL + in_to_orig_coeff x mean over later hidden layers of
             MSE(spliced activation, original activation)   (the coefficient split evenly over those layers)

where p is the MLP's distribution over the 10 classes (the config names each type's coefficients: local_sparsity_coeff,
e2e_ds_kl_coeff, ...). Every figure of the final table is measured on held-out images (one in five, never trained on):
L0, alive dictionary elements, accuracy and cross-entropy of the MLP without and with the SAE, the KL, and the
explained variance at the SAE and at the later hidden layers.

    python mlp.py                                   # the three types, one table (seconds on a CPU)
    python mlp.py --sweep=True                      # each type at several sparsity coefficients + a Pareto plot
    python mlp.py --hidden_sizes="[64, 64, 64]" --sae_layer=1 --e2e_sparsity_coeff=2
"""

import gzip
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import sae_kernels
from configurator import ConfigError, check_settings, configure, defaults, print_config
from e2esae import SAE, explained_variance
from runs import Diverged, check_writable, get_lr, nonfinite_parameters, write_json

# -----------------------------------------------------------------------------
# the MLP
hidden_sizes = [64, 64]  # 64 pixels -> 64 -> 64 -> 10 classes, a ReLU after each hidden layer
mlp_epochs = 40
mlp_batch_size = 64
mlp_lr = 3e-3
# the SAEs
sae_layer = 0  # the SAE reads and replaces hidden layer 0; the hidden layers after it are the downstream ones
dict_size_to_input_ratio = 8.0  # n_dict = 8 x 64 = 512 dictionary elements
training_types = ["local", "e2e", "e2e+ds"]
p_norm = 1.0
local_sparsity_coeff = 0.5  # local: sparsity + out_to_in
out_to_in_coeff = 1.0
e2e_sparsity_coeff = 1.0  # e2e: sparsity + KL
kl_coeff = 1.0
e2e_ds_sparsity_coeff = 10.0  # e2e+ds: sparsity + KL + in_to_orig at every later hidden layer
e2e_ds_kl_coeff = 0.5
in_to_orig_coeff = 1.0
n_steps = 2_000  # 2,000 steps x 64 images = 128,000 images, about 89 passes over the 1,437 training images
batch_size = 64
lr = 3e-3
warmup_steps = 100
min_lr_factor = 0.1  # cosine decay to 0.1 x lr
log_every_n_steps = 500
# the sweep
sweep = False  # train each type at its sparsity coefficient times each factor; write a Pareto plot and JSON
sweep_factors = [0.25, 0.5, 1.0, 2.0]
out_dir = "out-mlp"
seed = 0
# -----------------------------------------------------------------------------

DEFAULTS = defaults(globals())
DIGITS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits", "digits.csv.gz")
TEST_EVERY = 5  # image i is held out when i % 5 == 0: 360 test images, 1,437 training images


# ---- the data ----

def load_digits(path=DIGITS_PATH):
    """The 1,797 digits: pixels (1797, 64) scaled from 0..16 to [0, 1], and labels (1797,) in 0..9."""
    with gzip.open(path, "rt") as f:
        table = torch.tensor([[int(v) for v in line.split(",")] for line in f])  # (1797, 65)
    return table[:, :64].float() / 16, table[:, 64]


def split(pixels, labels):
    """(train pixels, train labels), (test pixels, test labels): every fifth image is held out."""
    test = torch.arange(len(labels)) % TEST_EVERY == 0
    return (pixels[~test], labels[~test]), (pixels[test], labels[test])


# ---- the MLP ----

class MLP(nn.Module):
    """sizes[0] inputs -> a Linear + ReLU per hidden size -> sizes[-1] class logits."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x, start=0):
        """Run layers start, start + 1, ... on x, the input of layer `start`: the pixels (N, 64) if start is 0, else
        hidden layer start - 1's activation. Returns the logits (N, 10) and a list of the hidden activations it
        computed, (N, hidden size) each: hidden layers start, start + 1, ..."""
        hidden = []
        for layer in self.layers[start:-1]:
            x = F.relu(layer(x))
            hidden.append(x)
        return self.layers[-1](x), hidden


def train_mlp(pixels, labels, c):
    """The classifier, trained with cross-entropy and Adam, then frozen: only SAEs train after this."""
    torch.manual_seed(c.seed)
    mlp = MLP([pixels.shape[1], *c.hidden_sizes, 10])
    optimizer = torch.optim.Adam(mlp.parameters(), lr=c.mlp_lr)
    generator = torch.Generator().manual_seed(c.seed)
    for epoch in range(c.mlp_epochs):
        t0, total = time.time(), 0.0
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), c.mlp_batch_size):
            batch = order[start:start + c.mlp_batch_size]
            loss = F.cross_entropy(mlp(pixels[batch])[0], labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        if not math.isfinite(total) or nonfinite_parameters(mlp):  # before any SAE is blamed for it
            raise Diverged(f"the MLP itself diverged in epoch {epoch + 1} (its loss is {total / len(labels):.4g}), "
                           f"before any SAE trained: lower its learning rate (mlp_lr={c.mlp_lr:g} now; e.g. "
                           f"--mlp_lr={c.mlp_lr / 10:g})")
        if (epoch + 1) % 10 == 0 or epoch + 1 == c.mlp_epochs:
            print(f"mlp epoch {epoch + 1} | loss {total / len(labels):.4f} | {(time.time() - t0) * 1000:.0f} ms")
    mlp.zero_grad(set_to_none=True)
    return mlp.requires_grad_(False).eval()


# ---- the SAE spliced in, its loss and its metrics ----

def spliced_run(mlp, sae, sae_layer, pixels):
    """The MLP on pixels (N, 64) as it is, and with the SAE's output in place of hidden layer sae_layer. A dict:
    x, x_hat (N, d_in) the SAE's input and output; c (N, n_dict) its code; logits_orig, logits_sae (N, 10);
    later_orig, later_sae: the activations of the hidden layers after the SAE, without and with it."""
    with torch.no_grad():  # the clean run is a constant target
        logits_orig, hidden = mlp(pixels)
    x = hidden[sae_layer]
    x_hat, c = sae(x)
    logits_sae, later_sae = mlp(x_hat, start=sae_layer + 1)
    return dict(x=x, x_hat=x_hat, c=c, logits_orig=logits_orig, logits_sae=logits_sae,
                later_orig=hidden[sae_layer + 1:], later_sae=later_sae)


def sae_loss(run, sae, *, sparsity_coeff, p_norm=1.0, kl_coeff=0.0, in_to_orig_coeff=0.0, out_to_in_coeff=0.0):
    """The training loss of a spliced_run (the sum of coefficient x term, as in the module docstring) and its terms,
    detached: sparsity, out_to_in, kl, in_to_orig (the mean over later hidden layers) and l0. Every term is computed
    for every type (each costs little here, and the log shows them all); the coefficients alone pick the type."""
    if in_to_orig_coeff > 0 and not run["later_orig"]:
        raise ValueError("in_to_orig_coeff > 0 needs a hidden layer after the SAE's")
    terms = {"sparsity": sae.activation.penalty(run["c"], None, p_norm).mean() / sae.d_in,
             "out_to_in": F.mse_loss(run["x_hat"], run["x"]),
             "kl": sae_kernels.kl_div(run["logits_sae"], run["logits_orig"])}
    downstream = [F.mse_loss(new, orig) for new, orig in zip(run["later_sae"], run["later_orig"])]
    terms["in_to_orig"] = torch.stack(downstream).mean() if downstream else torch.zeros(())  # coefficient split evenly
    loss = (sparsity_coeff * terms["sparsity"] + out_to_in_coeff * terms["out_to_in"] + kl_coeff * terms["kl"]
            + in_to_orig_coeff * terms["in_to_orig"])
    terms = {k: v.detach() for k, v in terms.items()}
    terms["l0"] = (run["c"] > 0).sum(-1).float().mean()
    return loss, terms


@torch.no_grad()
def evaluate_sae(mlp, sae, sae_layer, pixels, labels):
    """Every figure of the table, on all the given images at once."""
    run = spliced_run(mlp, sae, sae_layer, pixels)
    active = run["c"] > 0  # (N, n_dict)
    ce_orig, ce_sae = F.cross_entropy(run["logits_orig"], labels), F.cross_entropy(run["logits_sae"], labels)
    return dict(
        l0=active.sum(-1).float().mean().item(), alive=int(active.any(0).sum()), n_dict=sae.n_dict,
        acc_orig=(run["logits_orig"].argmax(-1) == labels).float().mean().item(),
        acc_sae=(run["logits_sae"].argmax(-1) == labels).float().mean().item(),
        ce_orig=ce_orig.item(), ce_sae=ce_sae.item(), ce_increase=(ce_sae - ce_orig).item(),
        kl=sae_kernels.kl_div(run["logits_sae"], run["logits_orig"]).item(),
        explained_variance=explained_variance(run["x_hat"], run["x"]).mean().item(),
        downstream_explained_variance=[explained_variance(new, orig).mean().item()
                                       for new, orig in zip(run["later_sae"], run["later_orig"])])


# ---- training an SAE ----

def loss_coeffs(c, kind):
    """The loss coefficients of a training type; the terms it does not name get 0."""
    return {"local": dict(sparsity_coeff=c.local_sparsity_coeff, out_to_in_coeff=c.out_to_in_coeff),
            "e2e": dict(sparsity_coeff=c.e2e_sparsity_coeff, kl_coeff=c.kl_coeff),
            "e2e+ds": dict(sparsity_coeff=c.e2e_ds_sparsity_coeff, kl_coeff=c.e2e_ds_kl_coeff,
                           in_to_orig_coeff=c.in_to_orig_coeff)}[kind]


def train_sae(mlp, pixels, coeffs, c, name="sae"):
    """An SAE at hidden layer c.sae_layer, trained on the pixels' activations with loss coefficients `coeffs`.
    Every SAE starts from the same initial weights and sees the same batches, whatever its type. A loss or
    gradient that is not finite stops the script (Diverged): a NaN SAE would pass for a dead dictionary."""
    d_in = mlp.layers[c.sae_layer].out_features
    torch.manual_seed(c.seed)
    sae = SAE(d_in, int(d_in * c.dict_size_to_input_ratio))
    optimizer = torch.optim.Adam(sae.parameters(), lr=c.lr)  # the SAE's parameters only; the MLP is frozen
    generator = torch.Generator().manual_seed(c.seed)
    window, t0 = {}, time.time()
    for step in range(c.n_steps):
        lr = get_lr(step, c.n_steps, c.warmup_steps, c.lr, c.min_lr_factor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = torch.randint(0, len(pixels), (c.batch_size,), generator=generator)
        loss, terms = sae_loss(spliced_run(mlp, sae, c.sae_layer, pixels[batch]), sae, **coeffs, p_norm=c.p_norm)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in sae.parameters() if p.grad is not None]
        if not (torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)):  # checked before the step
            raise Diverged(f"the {name} SAE at step {step + 1}: the loss is {loss.item():.4g}, so training diverged "
                           f"(that step was not applied). Try a lower learning rate (lr={c.lr:g} now; e.g. "
                           f"--lr={c.lr / 10:g})")
        optimizer.step()
        for k, v in {"loss": loss.detach(), **terms}.items():
            window[k] = window.get(k, 0.0) + v.item()
        n = (step % c.log_every_n_steps) + 1  # steps in this logging window
        if n == c.log_every_n_steps or step + 1 == c.n_steps:
            m = {k: v / n for k, v in window.items()}
            print(f"{name} step {step + 1} | loss {m['loss']:.4f} | kl {m['kl']:.4f} | "
                  f"out_to_in {m['out_to_in']:.4f} | in_to_orig {m['in_to_orig']:.4f} | l0 {m['l0']:.1f} | "
                  f"lr {lr:.1e} | {(time.time() - t0) * 1000 / n:.1f} ms")
            window, t0 = {}, time.time()
    if nonfinite_parameters(sae):  # a last step that overflowed the weights themselves
        raise Diverged(f"the {name} SAE's weights are not finite after its last step: try a lower learning rate "
                       f"(lr={c.lr:g} now; e.g. --lr={c.lr / 10:g})")
    return sae


# ---- the script ----

TRAINING_TYPES = ("local", "e2e", "e2e+ds")
RECONSTRUCTION_KEYS = {"local": ["out_to_in_coeff"], "e2e": ["kl_coeff"],  # each type's terms besides sparsity
                       "e2e+ds": ["e2e_ds_kl_coeff", "in_to_orig_coeff"]}


positive = lambda v: v > 0
SETTINGS = [  # (key, test, what the value must be): checked before any work
    ("hidden_sizes", lambda v: bool(v) and all(isinstance(h, int) and h > 0 for h in v),
     "a non-empty list of positive ints"),
    ("training_types", lambda v: bool(v) and set(v) <= set(TRAINING_TYPES) and len(set(v)) == len(v),
     f"some of {list(TRAINING_TYPES)}, each once"),
    *[(k, positive, "positive") for k in ("mlp_epochs", "mlp_batch_size", "mlp_lr", "dict_size_to_input_ratio",
                                          "p_norm", "n_steps", "batch_size", "lr", "log_every_n_steps")],
    *[(k, lambda v: v >= 0, ">= 0") for k in ("warmup_steps", "local_sparsity_coeff", "out_to_in_coeff",
                                              "e2e_sparsity_coeff", "kl_coeff", "e2e_ds_sparsity_coeff",
                                              "e2e_ds_kl_coeff", "in_to_orig_coeff")],
    ("min_lr_factor", lambda v: 0 <= v <= 1, "between 0 and 1 (the final learning rate is min_lr_factor x lr)"),
    ("sweep_factors", lambda v: bool(v) and all(isinstance(f, (int, float)) and f > 0 for f in v),
     "a non-empty list of positive numbers"),
]


def check(c):
    """Refuse a bad setting before any work, saying what to change."""
    check_settings(vars(c), SETTINGS)
    if not 0 <= c.sae_layer < len(c.hidden_sizes):
        raise ConfigError(f"sae_layer must name a hidden layer, 0 to {len(c.hidden_sizes) - 1} for hidden_sizes="
                          f"{c.hidden_sizes}, got {c.sae_layer}")
    if int(c.hidden_sizes[c.sae_layer] * c.dict_size_to_input_ratio) < 1:
        raise ConfigError(f"dict_size_to_input_ratio={c.dict_size_to_input_ratio} leaves no dictionary element")
    for kind in c.training_types:
        keys = RECONSTRUCTION_KEYS[kind]
        if not any(getattr(c, k) for k in keys):
            raise ConfigError(f"{kind}: {' and '.join(f'{k}=0' for k in keys)} leaves only the sparsity term, so "
                              f"nothing asks the SAE to reconstruct anything: set {' or '.join(keys)}")
    if c.sweep:  # the sweep's JSON and plot go there: a folder that cannot take them must not cost the sweep
        check_writable(c.out_dir, "out_dir")
    if "e2e+ds" in c.training_types and c.in_to_orig_coeff > 0 and c.sae_layer == len(c.hidden_sizes) - 1:
        raise ConfigError(f"e2e+ds reconstructs the hidden layers after the SAE's, but sae_layer={c.sae_layer} is the "
                          f"last of hidden_sizes={c.hidden_sizes}: use an earlier sae_layer or add a hidden layer")


def print_results(rows, file=None):
    """One line per SAE, the figures of evaluate: numbers right-aligned under their column names."""
    table = [["type", "lambda", "L0", "alive", "acc", "acc+SAE", "CE", "CE+SAE", "dCE", "KL", "EV", "EV later"]]
    for r in rows:
        table.append([r["type"], f"{r['sparsity_coeff']:g}", f"{r['l0']:.1f}", f"{r['alive']}/{r['n_dict']}",
                      f"{r['acc_orig']:.1%}", f"{r['acc_sae']:.1%}", f"{r['ce_orig']:.4f}", f"{r['ce_sae']:.4f}",
                      f"{r['ce_increase']:.4f}", f"{r['kl']:.4f}", f"{r['explained_variance']:.3f}",
                      " ".join(f"{v:.3f}" for v in r["downstream_explained_variance"]) or "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        print(" | ".join(cells), file=file)


def main(argv):
    """Train the MLP, then an SAE of each type (at each sweep factor); print the table and return its rows. A loss
    that is not finite stops the script with what diverged and what to change."""
    try:
        return run(argv)
    except Diverged as e:
        sys.exit(f"Diverged: {e}")


def run(argv):
    config = configure(DEFAULTS, argv)
    c = SimpleNamespace(**config)
    check(c)
    print("config:")
    print_config(config)
    t_start = time.time()
    (train_x, train_y), (test_x, test_y) = split(*load_digits())
    print(f"data: {len(train_y):,} training and {len(test_y):,} held-out 8x8 digits")
    mlp = train_mlp(train_x, train_y, c)
    with torch.no_grad():
        logits = mlp(test_x)[0]
    print(f"mlp {' -> '.join(map(str, [train_x.shape[1], *c.hidden_sizes, 10]))}: held-out accuracy "
          f"{(logits.argmax(-1) == test_y).float().mean():.1%}, CE {F.cross_entropy(logits, test_y):.4f}")

    factors = c.sweep_factors if c.sweep else [1.0]
    rows = []
    for kind in c.training_types:
        for factor in factors:
            coeffs = loss_coeffs(c, kind)
            coeffs["sparsity_coeff"] *= factor
            print(f"{kind}: " + ", ".join(f"{k} {v:g}" for k, v in coeffs.items()))
            sae = train_sae(mlp, train_x, coeffs, c, name=kind)
            rows.append(dict(type=kind, sparsity_coeff=coeffs["sparsity_coeff"], position=f"hidden.{c.sae_layer}",
                             **evaluate_sae(mlp, sae, c.sae_layer, test_x, test_y)))

    later = list(range(c.sae_layer + 1, len(c.hidden_sizes)))
    where = f"; EV later: explained variance at hidden layer{'s' * (len(later) > 1)} {', '.join(map(str, later))}"
    print(f"\nheld-out results ({len(test_y)} images, SAE of {rows[0]['n_dict']} elements at hidden layer "
          f"{c.sae_layer}{where if later else ''}):")
    print_results(rows)
    if c.sweep:
        from report import plot_pareto
        os.makedirs(c.out_dir, exist_ok=True)
        json_path, plot_path = os.path.join(c.out_dir, "mlp_sweep.json"), os.path.join(c.out_dir, "mlp_pareto.png")
        write_json(json_path, dict(config=config, rows=rows), indent=1)
        plot_pareto(rows, plot_path, title=f"SAEs at hidden layer {c.sae_layer} of an MLP on 8x8 digits "
                                           f"({rows[0]['n_dict']} elements, {len(test_y)} held-out images)",
                    y="kl", per="image")  # KL, not CE increase: see README (held-out CE is mostly noise here)
        print(f"wrote {json_path} and {plot_path}")
    print(f"total {time.time() - t_start:.1f} s")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)  # the matmuls are tiny: a second thread costs more in synchronisation than it saves
    main(sys.argv[1:])
