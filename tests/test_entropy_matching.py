"""Entropy-matched calibration: the closed form against bisection, the scales, the tools."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lln.analysis import attention_matrix, mean_entropy
from lln.analysis.calibrate import (
    calibrate_entropy,
    lln_norm_entropy,
    match_entropy,
    softmax_norm_entropy,
    standard_draws,
)
from lln.analysis.sweep import temperature_sweep
from lln.ops.entropy_matching import (
    DEFAULT_FORM,
    ENTROPY_COEFFICIENTS,
    ENTROPY_FORMS,
    entropy_match,
    entropy_scales_from_variances,
    entropy_sigma_tilde,
    form_features,
)
from lln.ops.naive import lln_attention_matrix

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_form_has_committed_coefficients():
    for form, features in ENTROPY_FORMS.items():
        for causal in (False, True):
            coef = ENTROPY_COEFFICIENTS.get((form, causal))
            if coef is not None:
                assert len(coef) == len(features), (form, causal)
    assert (DEFAULT_FORM, False) in ENTROPY_COEFFICIENTS
    assert (DEFAULT_FORM, True) in ENTROPY_COEFFICIENTS


def test_form_features_floats_and_tensors_agree():
    for form in ENTROPY_FORMS:
        floats = form_features(form, 1.7, 32, 300)
        tensors = form_features(form, torch.tensor([1.7], dtype=F64), 32,
                                torch.tensor([300.0], dtype=F64))
        assert len(floats) == len(ENTROPY_FORMS[form])
        for a, b in zip(floats, tensors, strict=True):
            assert float(b) == pytest.approx(a, rel=1e-12)
    s, d, n = 1.5, 64, 1024
    assert form_features("linear_n", s, d, n) == [1.0, 6.0, 1.5, 10.0, 15.0]


def test_lln_entropy_of_the_bisection_is_the_oracle_entropy():
    """The bisection's fast matrix (lln_attention on the identity) is the float64 oracle."""
    z_q, z_k = standard_draws(16, 37, 3, seed=5)
    for causal in (False, True):
        fast = lln_norm_entropy(z_q, z_k, 1.3, is_causal=causal)
        p = lln_attention_matrix(z_q, z_k, alpha=1.3, beta=1.3, is_causal=causal)
        oracle = mean_entropy(p, normalize=True, is_causal=causal).reshape(-1)
        torch.testing.assert_close(fast, oracle, rtol=0, atol=1e-12)


def test_bisection_equates_the_entropies():
    z_q, z_k = standard_draws(32, 64, 2, seed=0)
    target = float(softmax_norm_entropy(z_q, z_k, 2.0, is_causal=False).mean())
    sigma, evals = match_entropy(z_q, z_k, target, is_causal=False, tol=1e-6)
    assert evals > 10
    h = float(lln_norm_entropy(z_q, z_k, sigma, is_causal=False).mean())
    assert h == pytest.approx(target, abs=1e-5)
    # a wrong lower bound (above the answer) falls back to 0 and still finds it
    again, _ = match_entropy(z_q, z_k, target, is_causal=False, tol=1e-6, lower=sigma + 1)
    assert again == pytest.approx(sigma, abs=2e-6)


@pytest.mark.parametrize(("dim", "product", "causal"), [
    (32, 0.5, False), (64, 2.0, False), (64, 4.0, False), (32, 1.0, True), (64, 4.0, True),
])
def test_closed_form_against_bisection(dim, product, causal):
    """The committed closed form at N = 256 lands near the bisected sigma_tilde (float64,
    8 fresh draws, not the calibration's), and so LLN's entropy near softmax's."""
    n = 256
    z_q, z_k = standard_draws(dim, n, 8, seed=123)
    target = float(softmax_norm_entropy(z_q, z_k, product, is_causal=causal).mean())
    bisected, _ = match_entropy(z_q, z_k, target, is_causal=causal, tol=1e-4)
    closed = entropy_sigma_tilde(math.sqrt(product), dim=dim, n=n, is_causal=causal)
    assert closed == pytest.approx(bisected, abs=0.1)
    h = float(lln_norm_entropy(z_q, z_k, closed, is_causal=causal).mean())
    assert abs(h - target) <= 0.03


def test_scales_from_variances():
    var_q = torch.tensor([[0.5], [2.0]], dtype=F64)
    var_k = torch.tensor([[3.0], [0.25]], dtype=F64)
    alpha, beta = entropy_scales_from_variances(var_q, var_k, dim=64, n=512)
    sigma_tilde = entropy_sigma_tilde((var_q * var_k).sqrt(), dim=64, n=512)
    torch.testing.assert_close(alpha * var_q.sqrt(), sigma_tilde)
    torch.testing.assert_close(beta * var_k.sqrt(), sigma_tilde)
    assert alpha.dtype == F64 and alpha.shape == (2, 1)
    hot, _ = entropy_scales_from_variances(var_q, var_k, dim=64, n=512, temperature=2.0)
    torch.testing.assert_close(hot, alpha / 2)
    # per-sequence counts broadcast (padding)
    n = torch.tensor([[300.0], [600.0]], dtype=F64)
    a_seq, _ = entropy_scales_from_variances(var_q, var_k, dim=64, n=n, is_causal=True)
    assert a_seq.shape == (2, 1)
    one, _ = entropy_scales_from_variances(var_q[1:], var_k[1:], dim=64, n=600, is_causal=True)
    torch.testing.assert_close(a_seq[1:], one)
    # a constant q (variance 0) gives a large finite scale, not inf / NaN
    a0, _ = entropy_scales_from_variances(torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64),
                                          dim=64, n=512)
    assert torch.isfinite(a0).all()


def test_sigma_tilde_grows_with_sigma_qk_and_dim_and_falls_with_n():
    s = entropy_sigma_tilde(torch.tensor([0.5, 1.0, 2.0], dtype=F64), dim=64, n=256)
    assert (s.diff() > 0).all()
    assert entropy_sigma_tilde(1.0, dim=64, n=256) > entropy_sigma_tilde(1.0, dim=32, n=256)
    # the calibration: at D = 64, product 4, the matched sigma_tilde is 2.825 at N = 256 and
    # 2.748 at N = 1024 (non-causal); 2.956 and 2.825 causal
    for causal in (False, True):
        at_256 = entropy_sigma_tilde(2.0, dim=64, n=256, is_causal=causal)
        at_1024 = entropy_sigma_tilde(2.0, dim=64, n=1024, is_causal=causal)
        assert 0.02 < at_256 - at_1024 < 0.2
    assert entropy_sigma_tilde(2.0, dim=64, n=1024, form="linear") == entropy_sigma_tilde(
        2.0, dim=64, n=256, form="linear")


def test_entropy_match_uses_moment_matching_statistics():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 40, 16, generator=gen, dtype=F64) * 1.7
    k = torch.randn(2, 3, 40, 16, generator=gen, dtype=F64) * 0.6
    alpha, beta = entropy_match(q, k)
    var_q = q.var(dim=(2, 3), keepdim=True)
    var_k = k.var(dim=(2, 3), keepdim=True)
    ref_a, ref_b = entropy_scales_from_variances(var_q, var_k, dim=16, n=40)
    torch.testing.assert_close(alpha, ref_a)
    torch.testing.assert_close(beta, ref_b)
    assert alpha.shape == (2, 3, 1, 1)
    # padding: the statistics and N leave padded keys out
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    a_pad, _ = entropy_match(q, k, key_padding_mask=mask)
    ref_pad, _ = entropy_scales_from_variances(
        q[1:, :, :30].var(dim=(2, 3), keepdim=True), k[1:, :, :30].var(dim=(2, 3), keepdim=True),
        dim=16, n=30)
    torch.testing.assert_close(a_pad[1:], ref_pad)
    # causal: prefix statistics per token, N = the sequence length
    a_c, b_c = entropy_match(q, k, is_causal=True)
    assert a_c.shape == (2, 3, 40, 1)
    t = 25
    ref_c, _ = entropy_scales_from_variances(
        q[:, :, : t + 1].var(dim=(2, 3), keepdim=True),
        k[:, :, : t + 1].var(dim=(2, 3), keepdim=True), dim=16, n=40, is_causal=True)
    torch.testing.assert_close(a_c[:, :, t : t + 1], ref_c)
    # float32 inputs give float32 scales equal to the float64 ones to float32 precision
    a32, _ = entropy_match(q.float(), k.float())
    assert a32.dtype == torch.float32
    torch.testing.assert_close(a32.double(), alpha, rtol=1e-5, atol=1e-6)


def test_lln_entropy_matrix_and_causality():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 33, 8, generator=gen, dtype=F64)
    k = torch.randn(1, 2, 33, 8, generator=gen, dtype=F64)
    p = attention_matrix("lln_entropy", q, k)
    alpha, beta = entropy_match(q, k)
    torch.testing.assert_close(p, lln_attention_matrix(q, k, alpha=alpha, beta=beta))
    lin = attention_matrix("lln_entropy_linear", q, k)
    a_lin, b_lin = entropy_match(q, k, form="linear")
    torch.testing.assert_close(lin, lln_attention_matrix(q, k, alpha=a_lin, beta=b_lin))
    causal = attention_matrix("lln_entropy", q, k, is_causal=True)
    nc_fit = attention_matrix("lln_entropy_noncausal_fit", q, k, is_causal=True)
    a_nc, b_nc = entropy_match(q, k, is_causal=True, fit="noncausal")
    torch.testing.assert_close(nc_fit, lln_attention_matrix(q * a_nc, k * b_nc, alpha=1.0,
                                                            beta=1.0, is_causal=True))
    assert not torch.allclose(nc_fit, causal)
    torch.testing.assert_close(causal.sum(-1), torch.ones(1, 2, 33, dtype=F64))
    assert causal.triu(1).abs().max() == 0
    q2, k2 = q.clone(), k.clone()
    q2[..., 20:, :] += 3.0
    k2[..., 20:, :] -= 2.0
    changed = attention_matrix("lln_entropy", q2, k2, is_causal=True)
    torch.testing.assert_close(changed[..., :20, :], causal[..., :20, :], rtol=0, atol=1e-14)


@pytest.mark.parametrize(("call", "word"), [
    (lambda: entropy_sigma_tilde(1.0, dim=0, n=10), "dim"),
    (lambda: entropy_sigma_tilde(1.0, dim=64, n=0), "n"),
    (lambda: entropy_sigma_tilde(-1.0, dim=64, n=10), "sigma_qk"),
    (lambda: entropy_sigma_tilde(1.0, dim=64, n=10, form="cubic"), "form"),
    (lambda: entropy_sigma_tilde(1.0, dim=64, n=10, is_causal=1), "is_causal"),
    (lambda: entropy_scales_from_variances(torch.ones(1), torch.ones(1), dim=8, n=4,
                                           temperature=0.0), "temperature"),
    (lambda: entropy_match(torch.ones(1, 1, 4, 8), torch.ones(1, 1, 4, 8), stats="batch"),
     "stats"),
    (lambda: entropy_match(torch.ones(1, 1, 4, 8), torch.ones(1, 1, 4, 8), fit="both"), "fit"),
])
def test_errors_name_the_argument(call, word):
    with pytest.raises((ValueError, TypeError), match=word):
        call()


def test_calibrate_entropy_small():
    result = calibrate_entropy([8, 16], [24, 48], [0.25, 1.0, 4.0], seeds=[3, 2], seed=2)
    points = result["points"]
    assert len(points) == 12
    for p in points:
        assert abs(p["lln_entropy_at_match"] - p["softmax_entropy"]) < 2e-3
        assert set(p["forms"]) >= {f"fit:{f}" for f in ENTROPY_FORMS}
    # matched sigma_tilde grows with the product for every (D, N)
    for d in (8, 16):
        for n in (24, 48):
            s = [p["sigma_tilde"] for p in points if p["dim"] == d and p["n"] == n]
            assert s == sorted(s)
    for fit in result["fits"].values():
        assert 0.9 < fit["r2"] <= 1.0
    # a richer form fits at least as well as the N-free line (nested least squares)
    assert result["fits"]["linear_n"]["rms_residual"] <= result["fits"]["linear"][
        "rms_residual"] + 1e-12
    with pytest.raises(ValueError, match="seeds"):
        calibrate_entropy([8], [24, 48], [1.0], seeds=[3])


def test_sweep_causal_with_entropy_matching():
    result = temperature_sweep(dim=8, n=24, products=[0.5, 2.0], seeds=3, is_causal=True,
                               methods=["softmax", "lln", "lln_entropy"])
    assert result["config"]["is_causal"] is True
    acc = result["acceptance"]
    assert acc["entropy_tolerance"] == 0.03
    paired = acc["vs_softmax"]["lln_entropy"]["gap_paired_diff"]
    values = result["methods"]["lln_entropy"]["gap"]["values"]
    soft = result["methods"]["softmax"]["gap"]["values"]
    assert paired["mean"][1] == pytest.approx(
        sum(a - b for a, b in zip(values[1], soft[1], strict=True)) / 3)
    ent = result["methods"]["softmax"]["norm_entropy"]["mean"]
    assert 0 < ent[1] < ent[0] < 1


def test_cli_calibrate_entropy_and_usage_errors(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from lln.cli import main

    out = tmp_path / "ent"
    main(["calibrate", "--target", "entropy", "--dims", "8", "16", "--n", "24", "40",
          "--seeds", "2", "--products", "0.5", "1", "2", "--out", str(out)])
    data = json.loads((out / "entropy.json").read_text())
    assert data["config"]["seeds"] == [2, 2] and len(data["points"]) == 12
    assert "| linear_n |" in (out / "entropy.md").read_text()
    assert (out / "entropy.png").stat().st_size > 0
    for argv in (
        ["calibrate", "--causal", "--out", str(tmp_path / "x")],
        ["calibrate", "--n", "24", "48", "--out", str(tmp_path / "x")],
        ["calibrate", "--target", "entropy", "--n", "24", "48", "--seeds", "1", "2", "3",
         "--out", str(tmp_path / "x")],
        ["calibrate", "--target", "entropy", "--products", "0", "--out", str(tmp_path / "x")],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "error" in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
