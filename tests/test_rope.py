"""Our real-float32 RoPE equals the released-style float64 complex RoPE (ace.reference)."""

import math

import pytest
import torch

from ace.models.rope import apply_rope, axis_pairs, rope_cos_sin
from ace.reference import apply_rope as complex_rope


@pytest.mark.parametrize("head_dim", [6, 12, 16, 72])
def test_matches_complex_float64_reference(head_dim):
    max_len = 1024
    pos = torch.stack(
        [torch.randint(0, 10, (50,)), torch.randint(0, 32, (50,)), torch.randint(0, 32, (50,))], 1
    )
    x = torch.randn(50, 3, head_dim)
    cos, sin = rope_cos_sin(pos, head_dim, max_len)
    assert cos.dtype == torch.float32 and cos.shape == (50, head_dim // 2)
    ours = apply_rope(x, cos, sin)
    ref = complex_rope(x.double(), pos, max_len)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)


def test_hand_computed_rotation():
    # D = 6: one pair per axis, each axis with n = 1 pair has frequency 1
    pos = torch.tensor([[1, 2, 3]])
    cos, sin = rope_cos_sin(pos, 6, 16)
    x = torch.tensor([[[1.0, 0.0, 0.0, 1.0, 2.0, 0.0]]])
    out = apply_rope(x, cos, sin)[0, 0]
    expected = [
        math.cos(1),
        math.sin(1),
        -math.sin(2),
        math.cos(2),
        2 * math.cos(3),
        2 * math.sin(3),
    ]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_axis_split_and_bf16_roundtrip():
    assert axis_pairs(72) == (12, 12, 12)
    assert axis_pairs(16) == (4, 2, 2)
    assert axis_pairs(6) == (1, 1, 1)
    for bad in (7, 4, 2):  # odd, or too small for a pair on each axis
        with pytest.raises(ValueError, match="even head dim of at least 6"):
            axis_pairs(bad)
    x = torch.randn(4, 2, 12).bfloat16()
    cos, sin = rope_cos_sin(torch.zeros(4, 3, dtype=torch.long), 12, 8)
    assert apply_rope(x, cos, sin).dtype == torch.bfloat16
    torch.testing.assert_close(apply_rope(x, cos, sin), x)  # position 0 rotates by nothing
