"""Entropy definitions on hand-made attention patterns."""

import math

import numpy as np
import pytest
import torch

from analysis.extraction.entropy import pattern_entropies


def _causal_uniform(n: int) -> torch.Tensor:
    p = torch.tril(torch.ones(n, n))
    return p / p.sum(-1, keepdim=True)


def test_uniform_rows_give_log_of_visible_keys():
    n = 5
    pattern = _causal_uniform(n)[None, None]
    out = pattern_entropies(pattern, torch.ones(1, n, dtype=torch.bool))
    expected_raw = np.mean([math.log(q + 1) for q in range(n)])
    assert out["raw"].item() == pytest.approx(expected_raw, abs=1e-6)
    assert out["normalised"].item() == pytest.approx(1.0, abs=1e-6)
    # Without the first key, query q sees q keys uniformly: entropy log(q), averaged over q = 1..n-1.
    assert out["no_bos"].item() == pytest.approx(np.mean([math.log(q) for q in range(1, n)]), abs=1e-6)


def test_sink_head_raw_near_zero_but_no_bos_sees_the_rest():
    n = 4
    pattern = torch.zeros(1, 1, n, n)
    for q in range(n):
        pattern[0, 0, q, 0] = 0.97 if q else 1.0
        if q:
            pattern[0, 0, q, 1: q + 1] = 0.03 / q
    out = pattern_entropies(pattern, torch.ones(1, n, dtype=torch.bool))
    assert out["raw"].item() < 0.3
    assert out["no_bos"].item() == pytest.approx(np.mean([math.log(q) for q in range(1, n)]), abs=1e-5)


def test_hand_computed_row():
    pattern = torch.tensor([[[[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.5, 0.25, 0.25]]]])
    out = pattern_entropies(pattern, torch.ones(1, 3, dtype=torch.bool))
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    h2 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert out["raw"].item() == pytest.approx((0 + h1 + h2) / 3, abs=1e-6)
    assert out["normalised"].item() == pytest.approx((h1 / math.log(2) + h2 / math.log(3)) / 2, abs=1e-6)
    assert out["no_bos"].item() == pytest.approx((0 + math.log(2)) / 2, abs=1e-6)


def test_padding_rows_are_ignored_even_if_nan():
    n = 4
    real = _causal_uniform(3)
    pattern = torch.full((1, 1, n, n), float("nan"))
    pattern[0, 0, :3, :3] = real
    pattern[0, 0, :3, 3] = 0.0
    mask = torch.tensor([[True, True, True, False]])
    padded = pattern_entropies(pattern, mask)
    alone = pattern_entropies(real[None, None], torch.ones(1, 3, dtype=torch.bool))
    for key in padded:
        assert padded[key].item() == pytest.approx(alone[key].item(), abs=1e-7)


def test_query_mask_restricts_positions():
    pattern = _causal_uniform(6)[None, None]
    mask = torch.tensor([[False, False, True, True, False, False]])
    out = pattern_entropies(pattern, mask)
    assert out["raw"].item() == pytest.approx((math.log(3) + math.log(4)) / 2, abs=1e-6)


def test_bfloat16_input_accumulates_in_float32():
    pattern = _causal_uniform(8)[None, None].to(torch.bfloat16)
    out = pattern_entropies(pattern, torch.ones(1, 8, dtype=torch.bool))
    assert out["raw"].dtype == torch.float32
