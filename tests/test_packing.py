"""PackedBatch structure, written out by hand for a small batch."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from ace.packing import PackedBatch


def build(sizes, text_lengths, **kw):
    args = dict(patch_size=2, head_dim=12, rope_max_len=64, num_indicators=10)
    return PackedBatch.build(sizes, text_lengths, **{**args, **kw})


def test_positions_indices_and_segments_by_hand():
    # sample 0: target 4x4 latent (2x2 tokens) + condition 2x6 (1x3 tokens); sample 1: target 2x2 (1 token)
    pb = build([[(4, 4), (2, 6)], [(2, 2)]], [[3, 2], [4]])
    assert pb.num_tokens == 8 and pb.num_text_tokens == 9 and pb.num_samples == 2
    assert pb.positions.tolist() == [
        [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1],  # sample 0 target, row-major
        [1, 0, 0], [1, 0, 1], [1, 0, 2],  # sample 0 condition frame 1
        [0, 0, 0],  # sample 1 target
    ]  # fmt: skip
    assert pb.token_sample.tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    # indicator rows: target of a 2-frame sample -> 1, its condition -> 0; lone target -> 0
    assert pb.token_indicator.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert pb.text_indicator.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert pb.target_index.tolist() == [0, 1, 2, 3, 7]
    assert pb.target_sample.tolist() == [0, 0, 0, 0, 1]
    assert pb.self_attn.cu_q.tolist() == [0, 7, 8] and pb.self_attn.cu_k.tolist() == [0, 7, 8]
    assert pb.cross_attn.cu_q.tolist() == [0, 4, 7, 8] and pb.cross_attn.cu_k.tolist() == [
        0,
        3,
        5,
        9,
    ]
    assert pb.rope_cos.shape == (8, 6) and pb.rope_cos.dtype == torch.float32


def test_pack_frames_equals_patch_convolution_and_unpack_inverts():
    pb = build([[(4, 6), (2, 2)], [(6, 2)]], [[1, 1], [1]])
    frames = [[torch.randn(4, 4, 6), torch.randn(4, 2, 2)], [torch.randn(4, 6, 2)]]
    masks = [[torch.rand(1, 4, 6), None], [None]]
    tokens = pb.pack_frames(frames, masks)  # (T, 5*2*2)
    weight, bias = torch.randn(7, 5, 2, 2), torch.randn(7)
    conv = []
    for fs, ms in zip(frames, masks):
        for x, m in zip(fs, ms):
            m = torch.ones(1, *x.shape[1:]) if m is None else m
            y = F.conv2d(torch.cat([x, m])[None], weight, bias, stride=2)[0]  # (7, gh, gw)
            conv.append(y.flatten(1).T)  # (gh*gw, 7) row-major
    torch.testing.assert_close(F.linear(tokens, weight.flatten(1), bias), torch.cat(conv))
    # unpack_target reads (row in patch, column in patch, channel) vectors of the target tokens
    targets = [frames[0][0], frames[1][0]]
    packed = torch.cat([rearrange(t, "c (h p) (w q) -> (h w) (p q c)", p=2, q=2) for t in targets])
    for a, b in zip(pb.unpack_target(packed), targets):
        assert torch.equal(a, b)


def test_bad_layouts_raise():
    with pytest.raises(ValueError, match="at least one sample"):
        build([], [])
    with pytest.raises(ValueError, match="sample 0 has no frames"):
        build([[]], [[]])
    with pytest.raises(ValueError, match="sample 0: 1 texts for 2 frames"):
        build([[(4, 4), (4, 4)]], [[2]])
    with pytest.raises(ValueError, match="latent size 4x3 is not divisible by patch size 2"):
        build([[(4, 3)]], [[2]])
    with pytest.raises(ValueError, match="larger than rope_max_len=4"):
        build([[(6, 4)]], [[2]], rope_max_len=4)
    with pytest.raises(ValueError, match="3 frames but the model has 2 indicator rows"):
        build([[(2, 2)] * 3], [[1] * 3], num_indicators=2)
    pb = build([[(4, 4)]], [[2]])
    with pytest.raises(ValueError, match=r"latent shape \(4, 4, 2\), expected \(C, 4, 4\)"):
        pb.pack_frames([[torch.randn(4, 4, 2)]])
    with pytest.raises(ValueError, match=r"text 0: shape \(3, 8\), expected \(2, text_dim\)"):
        pb.pack_texts([[torch.randn(3, 8)]])
    with pytest.raises(ValueError, match="got texts for 2 samples, the layout has 1"):
        pb.pack_texts([[torch.randn(2, 8)], [torch.randn(2, 8)]])  # zip dropped the second
