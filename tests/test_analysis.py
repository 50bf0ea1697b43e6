"""analysis.py as a user runs it (its command line, offline, on a small random GPT-2, local text and three SAEs, one of
them twice), and its geometry and HTML pieces against direct computations."""
import json
import os
import random
from html.parser import HTMLParser

import pytest
import torch

import analysis
from analysis import context_html, firing_share, max_similarities
from configurator import ConfigError
from e2esae import SAE, SAETransformer
from language_models import save_pretrained
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D_IN, N_CTX, N_SAMPLES = 32, 32, 6
WORDS = ("the king & queen of a <land> far away spoke to their people about bread war peace and the sea while "
         'children played in "fields" of gold under a grey sky').split()


def exact_sae(d_in):
    """An SAE that reconstructs every input exactly: the elements e_1..e_d and -e_1..-e_d, c = (ReLU(x), ReLU(-x)),
    x_hat = ReLU(x) - ReLU(-x) = x. Each element's nearest other element is orthogonal to it (similarity 0)."""
    sae = SAE(d_in, 2 * d_in)
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))  # (2d, d)
        sae.encoder.bias.zero_()
        sae.decoder.weight.copy_(torch.cat([eye, -eye], dim=1))  # (d, 2d)
        sae.decoder.bias.zero_()
    return sae


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3-layer random GPT-2, 40 text documents (two held out) and three checkpoints at blocks.1.hook_resid_pre:
    a local SAE, an e2e SAE (another seed) and an exact e2e+ds SAE."""
    root = tmp_path_factory.mktemp("analysis")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=3, n_embd=D_IN, n_head=4, vocab_size=50257, block_size=64)).eval()
    save_pretrained(gpt, str(root / "gpt"))
    rng = random.Random(0)
    os.makedirs(root / "text")
    for i in range(40):
        (root / "text" / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(200)))
    base = dict(init_from=str(root / "gpt"), p_norm=1.0, out_to_orig_coeff=0.0)
    recipes = {"local": dict(sparsity_coeff=1.0, out_to_in_coeff=1.0, kl_coeff=0.0, in_to_orig_coeff=0.0, seed=0),
               "e2e": dict(sparsity_coeff=2.0, out_to_in_coeff=0.0, kl_coeff=1.0, in_to_orig_coeff=0.0, seed=1),
               "exact": dict(sparsity_coeff=3.0, out_to_in_coeff=0.0, kl_coeff=0.5, in_to_orig_coeff=1.0, seed=0,
                             in_to_orig_positions=["blocks.2.hook_resid_pre"])}
    for name, recipe in recipes.items():
        torch.manual_seed(recipe["seed"])
        model = SAETransformer(gpt, ["blocks.1.hook_resid_pre"], dict_size_to_input_ratio=2.0)
        if name == "exact":
            model.saes["blocks-1-hook_resid_pre"] = exact_sae(D_IN)
        model.save(str(root / f"{name}.safetensors"), config={**base, **recipe})
    return root


def run_analysis(root, checkpoints, *extra, out="out"):
    """analysis.py's main, as the command line calls it (in this process: the imports are already paid for)."""
    analysis.main([f"--checkpoints={[str(root / f'{c}.safetensors') for c in checkpoints]!r}",
                   f"--dataset={root / 'text'}", f"--n_ctx={N_CTX}", f"--eval_n_samples={N_SAMPLES}", "--batch_size=4",
                   "--device=cpu", f"--out_dir={root / out}", *extra])


class Page(HTMLParser):
    """What the tests read from features.html: sections, the elements in each, the <mark>ed tokens, every tag and
    every URL-like attribute."""

    def __init__(self):
        super().__init__()
        self.sections, self.marks, self.tags, self.urls, self.styles, self._in = [], [], set(), [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href", "srcset", "action", "data") and v]
        if tag == "section" and attrs.get("class") == "sae":
            self.sections.append(dict(position=attrs["data-position"], elements=[], marks=[]))
        if tag == "div" and attrs.get("class") == "feature":
            self.sections[-1]["elements"].append(int(attrs["data-element"]))
        self._in = tag

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, text):
        if self._in == "mark":
            self.sections[-1]["marks"].append(text)
        if self._in == "style":
            self.styles.append(text)


def test_analysis_writes_every_figure_and_sane_numbers(setup):
    root = setup
    run_analysis(root, ["local", "e2e", "exact", "local"], "--features=[5]", "--chunk_size=24", "--n_frequent=2",
                 "--n_random=3", "--n_contexts=3")
    out = root / "out"
    for name in ("within_similarity.png", "cross_similarity.png", "downstream.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(out / name) > 5000
    result = json.loads((out / "analysis.json").read_text())
    saes = result["saes"]
    assert [s["label"] for s in saes] == ["local λ=1 seed 0", "e2e λ=2 seed 1", "e2e+ds λ=3 seed 0",
                                          "local λ=1 seed 0 #2"]
    n_tokens = N_SAMPLES * N_CTX
    for s in saes:
        assert s["n_dict"] == 2 * D_IN and s["n_tokens"] == n_tokens
        assert s["alive"] == sum(n > 0 for n in s["counts"]) == len(s["alive_elements"])
        within = s["within_similarity"]
        assert within["n"] == s["alive"] and all(-1 <= v <= 1 for v in within["values"])
        assert within["q05"] <= within["median"] <= within["q95"]
        assert list(s["downstream_explained_variance"]) == ["blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"]
        for f in s["features"]:
            assert f["frequency"] == pytest.approx(s["counts"][f["element"]] / n_tokens)
            assert len(f["promoted"]) == len(f["suppressed"]) == 8
            assert f["promoted"][0][1] >= f["promoted"][-1][1] > f["suppressed"][-1][1] >= f["suppressed"][0][1]
            acts = [ctx["activation"] for ctx in f["contexts"]]
            assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
            if acts:
                assert acts[0] == pytest.approx(f["max_activation"])
            for ctx in f["contexts"]:
                assert ctx["activations"][ctx["highlight"]] == pytest.approx(ctx["activation"])
        # the given element, the 2 most frequent others, 3 random others: all different
        elements, whys = [f["element"] for f in s["features"]], [f["why"] for f in s["features"]]
        assert elements[0] == 5 and whys == ["given"] + ["most frequent"] * 2 + ["random"] * 3
        assert len(set(elements)) == len(elements)
        frequent = [f["count"] for f in s["features"] if f["why"] == "most frequent"]
        assert frequent == sorted(frequent, reverse=True) and frequent[0] == max(s["counts"][:5] + s["counts"][6:])

    # the exact SAE: the spliced stream is the original one at the SAE and everywhere after it
    exact = saes[2]
    assert exact["explained_variance"] == pytest.approx(1.0, abs=1e-4)
    assert all(v == pytest.approx(1.0, abs=1e-4) for v in exact["downstream_explained_variance"].values())
    assert exact["ce_increase"] == pytest.approx(0.0, abs=1e-4)
    assert saes[1]["explained_variance"] < 0.9  # a random SAE does not
    # ... and its elements are e_i and -e_i: each one's nearest other element is orthogonal to it
    assert exact["within_similarity"]["values"] == pytest.approx([0.0] * exact["alive"], abs=1e-6)
    assert exact["within_similarity"]["share_above_near"] == exact["near_duplicate_firings"] == 0

    # every pair at the position, once; a dictionary against itself: similarity 1 both ways
    pairs = {(p["a"], p["b"]): p for p in result["cross_similarity"]}
    assert len(pairs) == 6
    same = pairs[("local λ=1 seed 0", "local λ=1 seed 0 #2")]
    for side in ("a_to_b", "b_to_a"):
        assert same[side]["n"] == saes[0]["alive"] and same[side]["values"] == pytest.approx([1.0] * saes[0]["alive"])
        assert same[side]["share_above_near"] == 1
        assert pairs[("local λ=1 seed 0", "e2e λ=2 seed 1")][side]["median"] < 0.99

    # the reference: two untrained dictionaries of the same shape, every element counted
    untrained = result["untrained"]["32x64"]
    assert untrained["within"]["n"] == untrained["cross"]["n"] == 64 and 0 < untrained["cross"]["median"] < 0.99

    page = (out / "features.html").read_text(encoding="utf-8")
    parsed = Page()
    parsed.feed(page)
    assert [s["position"] for s in parsed.sections] == ["blocks.1.hook_resid_pre"] * 4
    for section, s in zip(parsed.sections, saes):
        assert section["elements"] == [f["element"] for f in s["features"]]
        assert section["marks"] == [ctx["tokens"][ctx["highlight"]].replace("\n", "↵")
                                    for f in s["features"] for ctx in f["contexts"]]
    # offline: nothing fetched from elsewhere
    assert not parsed.tags & {"script", "link", "img", "iframe", "object", "embed"}
    assert all(u.startswith("#") for u in parsed.urls)
    assert not any("url(" in css or "@import" in css for css in parsed.styles)
    # every token escaped: the text's "<land>" and "&" never reach the page as markup
    assert "<land>" not in page and "& " not in page.split("<style>")[0] + page.split("</style>")[1]
    tokens = {t for s in saes for f in s["features"] for ctx in f["contexts"] for t in ctx["tokens"]}
    assert {"<", "&"} & {ch for t in tokens for ch in t}, "the held-out contexts should hold the characters to escape"
    assert 50_000 < len(page.encode()) < 1_000_000


def test_similarities_in_blocks_equal_the_whole_matrix_and_firing_shares():
    torch.manual_seed(0)
    A = torch.nn.functional.normalize(torch.randn(8, 50), dim=0)
    B = torch.nn.functional.normalize(torch.randn(8, 33), dim=0)
    S = A.T @ B  # (50, 33): small enough to hold whole here
    a_to_b, b_to_a = max_similarities(A, B, chunk_size=7)
    assert torch.allclose(a_to_b, S.max(1).values) and torch.allclose(b_to_a, S.max(0).values)
    within = A.T @ A
    within.fill_diagonal_(-torch.inf)  # nearest *other* element
    nearest, _ = max_similarities(A, A, chunk_size=7, same=True)
    assert torch.allclose(nearest, within.max(1).values)
    assert (nearest < 0.999).all()  # an element is never its own nearest neighbour
    assert firing_share(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 3])) == pytest.approx(5 / 10)


def test_context_tokens_are_escaped_and_the_top_one_marked():
    ctx = dict(tokens=["<script>", " &", "amp;", "\n", "x"], activations=[0.0, 0.5, 2.0, 0.0, 0.0], highlight=2,
               activation=2.0, cut_before=False, cut_after=True)
    out = context_html(ctx, max_activation=2.0)
    assert "<script>" not in out and "&lt;script&gt;" in out and " &amp;" in out
    assert '<mark title="2.000">amp;</mark>' in out and "↵" in out
    assert out.startswith("&lt;script&gt;") and out.endswith("x…")  # "…" only where the window cuts the sample
    parsed = Page()
    parsed.sections.append(dict(elements=[], marks=[]))
    parsed.feed(out)
    assert parsed.sections[0]["marks"] == ["amp;"]


@pytest.mark.parametrize("args, message", [
    (["--checkpoints=['nothing_here']"], "does not exist"),
    (["--features=[-1]"], "features must be"),
    (["--n_contexts=0"], "n_contexts must be"),
])
def test_analysis_refuses_bad_settings_before_any_work(setup, capsys, args, message):
    root = setup
    with pytest.raises(ConfigError, match=message):
        run_analysis(root, ["local"], *args, out="refused")
    assert "data:" not in capsys.readouterr().out and not (root / "refused").exists()


def test_labels_name_the_activation_and_k():
    """A TopK or BatchTopK SAE is labelled by its k, a JumpReLU by its activation and penalty, the paper's ReLU by
    its sparsity coefficient alone (its sparsity_coeff is 0 for TopK: 'e2e λ=0' would say nothing)."""
    label_of = analysis.label_of
    assert label_of(dict(type="e2e", activation="topk", k=32, sparsity_coeff=0.0), {}) == "e2e topk k=32"
    assert label_of(dict(type="local", activation="batchtopk", k=16, sparsity_coeff=0.0), {"seed": 1}) == \
        "local batchtopk k=16 seed 1"
    assert label_of(dict(type="e2e", activation="jumprelu", k=None, sparsity_coeff=10.0), {}) == "e2e jumprelu λ=10"
    assert label_of(dict(type="e2e", activation="relu", k=None, sparsity_coeff=3.0), {}) == "e2e λ=3"
