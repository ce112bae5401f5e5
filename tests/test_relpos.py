"""The decomposed relative-position attention the models call (reference path
on the CPU) against an independent per-(i, j) loop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mmt_fast.kernels.relpos_attention import relpos_attention
from mmt_fast.layers import resize_rel_table


def coords(grid):
    return list(itertools.product(*[range(n) for n in grid]))


def loop_attention(q, k, v, tables, q_grid, k_grid, has_cls, scale, residual):
    """Written from MViTv2's definition, one (query, key) pair at a time."""
    B, H, Nq, _D = q.shape
    Nk = k.shape[2]
    sp = int(has_cls)
    qc, kc = coords(q_grid), coords(k_grid)
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(Nq):
                scores = []
                for j in range(Nk):
                    s = float(q[b, h, i] @ k[b, h, j]) * scale
                    if i >= sp and j >= sp:
                        for a, table in enumerate(tables):
                            qa, ka = q_grid[a], k_grid[a]
                            x, y = qc[i - sp][a], kc[j - sp][a]
                            d = (
                                x * max(ka / qa, 1.0)
                                - y * max(qa / ka, 1.0)
                                + (ka - 1) * max(qa / ka, 1.0)
                            )
                            s += float(q[b, h, i] @ table[int(d)])
                    scores.append(s)
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                z = sum(w)
                for j in range(Nk):
                    out[b, h, i] += w[j] / z * v[b, h, j]
                if residual:
                    out[b, h, i] += q[b, h, i]
    return out


CASES = [
    # q_grid, k_grid, has_cls, heads
    ((4, 6), (2, 3), True, 2),
    ((3, 5), (3, 5), False, 1),
    ((2, 4), (2, 2), True, 1),  # time-only pooled keys (1x2 stride)
    ((1, 7), (1, 4), False, 1),
    ((2, 3, 3), (1, 2, 2), True, 2),  # 3-D video grid
]


@pytest.mark.parametrize("q_grid, k_grid, has_cls, heads", CASES)
@pytest.mark.parametrize("residual", [True, False])
def test_relpos_attention_matches_loop(q_grid, k_grid, has_cls, heads, residual):
    torch.manual_seed(0)
    D = 5
    nq = int(has_cls) + math.prod(q_grid)
    nk = int(has_cls) + math.prod(k_grid)
    q = torch.randn(2, heads, nq, D, dtype=torch.float64)
    k = torch.randn(2, heads, nk, D, dtype=torch.float64)
    v = torch.randn(2, heads, nk, D, dtype=torch.float64)
    tables = [
        torch.randn(2 * max(a, b) - 1, D, dtype=torch.float64) for a, b in zip(q_grid, k_grid)
    ]
    got = relpos_attention(q, k, v, tables, q_grid, k_grid, has_cls, D**-0.5, residual)
    want = loop_attention(q, k, v, tables, q_grid, k_grid, has_cls, D**-0.5, residual)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_resize_rel_table():
    t = torch.randn(7, 3)
    assert resize_rel_table(t, 4, 2) is t
    r = resize_rel_table(t, 8, 8)
    assert r.shape == (15, 3)
    # linear interpolation keeps a constant table constant
    c = torch.ones(7, 3) * 2.5
    torch.testing.assert_close(resize_rel_table(c, 6, 6), torch.full((11, 3), 2.5))
