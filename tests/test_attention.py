"""Every attention backend equals the dense block-diagonal oracle, forward and backward."""

import importlib.util

import pytest
import torch

from ace.models.attention import SegmentLayout, segment_attention, select_backend, varlen_available


def naive(q, k, v, q_lens, k_lens):
    """Loop over segments, attention written out by hand."""
    out, qs, ks = [], 0, 0
    for lq, lk in zip(q_lens, k_lens):
        qi, ki, vi = q[qs : qs + lq], k[ks : ks + lk], v[ks : ks + lk]  # (l, H, D)
        s = torch.einsum("qhd,khd->hqk", qi, ki) / qi.shape[-1] ** 0.5
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), vi))
        qs, ks = qs + lq, ks + lk
    return torch.cat(out)


LAYOUTS = {
    "uniform": ([6, 6, 6], [6, 6, 6]),  # one contiguous group: plain view
    "ragged_self": ([6, 10, 6, 3], [6, 10, 6, 3]),  # groups that are not consecutive
    "cross": ([16, 16, 12, 4, 12], [5, 2, 7, 1, 7]),  # ragged keys inside a query group
    "single": ([9], [4]),
}


HAS_VARLEN = varlen_available(torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("backend", ["sdpa", "dense", "flex"])
def test_backend_matches_naive_and_oracle(name, backend):
    q_lens, k_lens = LAYOUTS[name]
    layout = SegmentLayout.build(q_lens, k_lens, "cpu")
    H, D = 3, 8
    q = torch.randn(sum(q_lens), H, D, dtype=torch.float64)
    k, v = torch.randn(2, sum(k_lens), H, D, dtype=torch.float64)
    ref = naive(q, k, v, q_lens, k_lens)
    with torch.no_grad():
        dense = segment_attention(q, k, v, layout, "dense")
        out = segment_attention(q.float(), k.float(), v.float(), layout, backend)
    torch.testing.assert_close(dense, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_VARLEN, reason="varlen_attn needs a CUDA GPU (sm80+) and bf16")
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_varlen_matches_naive_in_bf16(name):
    q_lens, k_lens = LAYOUTS[name]
    layout = SegmentLayout.build(q_lens, k_lens, "cuda")
    q = torch.randn(sum(q_lens), 3, 64, dtype=torch.float64)
    k, v = torch.randn(2, sum(k_lens), 3, 64, dtype=torch.float64)
    ref = naive(q, k, v, q_lens, k_lens)
    with torch.no_grad():
        out = segment_attention(*(x.cuda().bfloat16() for x in (q, k, v)), layout, "varlen")
    assert out.dtype == torch.bfloat16
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < 2e-2, err


@pytest.mark.skipif(
    importlib.util.find_spec("torch.nn.attention.varlen") is None,
    reason="varlen_attn is in PyTorch >= 2.10",
)
def test_varlen_needs_an_ampere_gpu(monkeypatch):
    """FlashAttention-2 refuses a T4 or V100: auto must not pick varlen there."""
    layout = SegmentLayout.build([4, 2], [3, 1], "cpu")
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in [((7, 5), "sdpa"), ((8, 0), "varlen"), ((9, 0), "varlen")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert varlen_available(cuda, torch.bfloat16) == (expected == "varlen")
        assert select_backend(layout, cuda, torch.float16) == expected
        assert select_backend(layout, cuda, torch.float32) == "sdpa"
        assert select_backend(layout, cuda, torch.bfloat16, head_dim=512) == "sdpa"
        # mha_varlen_fwd needs a head size that is a multiple of 8 (the tiny preset's is 12)
        assert select_backend(layout, cuda, torch.bfloat16, head_dim=12) == "sdpa"
        assert select_backend(layout, cuda, torch.bfloat16, head_dim=72) == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_backend(layout, cuda, torch.bfloat16) == "sdpa"


def test_sdpa_output_takes_the_autocast_dtype():
    """Ragged groups gathered by index under bf16 autocast: the output buffer is bf16 like
    SDPA's result (it was q's fp32, and index_copy_ refused the mix)."""
    q_lens, k_lens = [4, 6, 4], [3, 2, 5]
    layout = SegmentLayout.build(q_lens, k_lens, "cpu")
    q = torch.randn(sum(q_lens), 2, 8)
    k, v = torch.randn(2, sum(k_lens), 2, 8)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        outs = {b: segment_attention(q, k, v, layout, b) for b in ("sdpa", "dense")}
    assert outs["sdpa"].dtype == outs["dense"].dtype == torch.bfloat16
    ref = naive(q.double(), k.double(), v.double(), q_lens, k_lens)
    torch.testing.assert_close(outs["sdpa"].double(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sdpa_gradients_match_naive(name):
    q_lens, k_lens = LAYOUTS[name]
    layout = SegmentLayout.build(q_lens, k_lens, "cpu")
    q = torch.randn(sum(q_lens), 2, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(k_lens), 2, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(k_lens), 2, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(sum(q_lens), 2, 4, dtype=torch.float64)
    grads = []
    for fn in (
        lambda: naive(q, k, v, q_lens, k_lens),
        lambda: segment_attention(q, k, v, layout, "sdpa"),
    ):
        grads.append(torch.autograd.grad((fn() * w).sum(), (q, k, v)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_auto_choice_on_cpu_is_sdpa_and_bad_names_raise():
    layout = SegmentLayout.build([4, 2], [3, 1], "cpu")
    assert select_backend(layout, torch.device("cpu"), torch.float32) == "sdpa"
    q = torch.randn(6, 1, 4)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        segment_attention(q, q[:4], q[:4], layout, "fast")
    with pytest.raises(ValueError, match=r"varlen.*needs a CUDA GPU"):
        segment_attention(q, q[:4], q[:4], layout, "varlen")


def test_layout_rejects_bad_segments():
    with pytest.raises(ValueError, match="one key length per query segment"):
        SegmentLayout.build([3, 3], [3], "cpu")
    with pytest.raises(ValueError, match="at least one query and one key"):
        SegmentLayout.build([3, 3], [3, 0], "cpu")


def test_layout_offsets_are_int32_and_groups_cover_every_query():
    layout = SegmentLayout.build([6, 10, 6, 3], [1, 2, 3, 4], "cpu")
    assert layout.cu_q.dtype == torch.int32 and layout.cu_q.tolist() == [0, 6, 16, 22, 25]
    assert layout.cu_k.tolist() == [0, 1, 3, 6, 10]
    assert (layout.max_q, layout.max_k) == (10, 4)
    assert sum(g.n * g.lq for g in layout.groups) == 25
    assert sorted(g.lq for g in layout.groups) == [3, 6, 10]


def test_compiled_flex_matches_the_dense_oracle():
    """flex_attention under torch.compile (its fast path; eager flex is for checking):
    Inductor failed to lower the (1, H, T, D) views made inside the compiled region on CPU
    until they were made contiguous."""
    q_lens, k_lens = [40, 24], [30, 10]
    layout = SegmentLayout.build(q_lens, k_lens, "cpu")
    q = torch.randn(sum(q_lens), 2, 16)
    k, v = torch.randn(2, sum(k_lens), 2, 16)
    compiled = torch.compile(lambda q, k, v: segment_attention(q, k, v, layout, "flex"))
    with torch.no_grad():
        out = compiled(q, k, v)
    ref = naive(q.double(), k.double(), v.double(), q_lens, k_lens)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5
