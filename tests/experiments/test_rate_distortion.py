"""The rate–distortion measurement on real (small) gradients: bits and errors the codecs must give."""

from __future__ import annotations

import pytest

from experiments import rate_distortion as rd


@pytest.fixture(scope="module")
def captured():
    # The embedded digits MLP: real gradients of a real model in a second, no files needed.
    return rd.capture("digits", "mlp", seed=0, warm=3, window=4, lr=0.05, batch=32)


def test_lossless_and_half_precision_points(captured):
    specs, grads = captured
    assert len(grads) == 4 and all(set(g) == {s.name for s in specs} for g in grads)
    dense = rd.measure("dense", specs, grads)
    assert dense["bits_per_entry"] == 32.0 and dense["normalized_error"] == 0.0
    fp16 = rd.measure("fp16", specs, grads)
    assert fp16["bits_per_entry"] == 16.0 and 0.0 < fp16["normalized_error"] < 1e-6


def test_more_bits_buy_less_error_and_topk_error_is_the_dropped_energy(captured):
    specs, grads = captured
    coarse, fine = rd.measure("ans:bits=3", specs, grads), rd.measure("ans:bits=6", specs, grads)
    assert coarse["bits_per_entry"] < fine["bits_per_entry"]
    assert fine["normalized_error"] < coarse["normalized_error"] < 1.0
    top = rd.measure("topk:ratio=0.1", specs, grads)
    assert 0.0 < top["normalized_error"] < 1.0 and top["mode"] == "fresh encoder per gradient"


def test_predictive_codecs_run_closed_loop_past_their_warm_up(captured):
    specs, grads = captured
    point = rd.measure("tpc:order=2", specs, grads)
    assert point["mode"] == "closed loop" and point["gradients"] == 2  # 4 captured, the first 2 skipped
    with pytest.raises(ValueError, match="needs more than 3"):
        rd.measure("tpc:order=3", specs, grads[:3])


def test_huffman_model_rows_compare_coded_bits_with_the_same_symbols_entropy(captured):
    specs, grads = captured
    rows = rd.huffman_models(specs, grads[:2], bits_list=(4,))
    assert [(r["coder"], r["model"]) for r in rows] == [
        (c, m) for c in ("huffman", "ans") for m in rd.HUFFMAN_MODELS]
    for r in rows:
        assert r["symbol_entropy_bits"] > 0 and r["coded_bits_per_symbol"] > 0
    empirical_ans = next(r for r in rows if r["coder"] == "ans" and r["model"] == "empirical")
    # ANS with the symbols' own histogram codes within a few percent of their entropy.
    assert empirical_ans["coded_bits_per_symbol"] == pytest.approx(empirical_ans["symbol_entropy_bits"], rel=0.05)
