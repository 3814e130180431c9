"""ACETransformer against the independent per-sample reference (ace.reference)."""

import re

import pytest
import torch

from ace.convert import official_dit_to_ace
from ace.models import ACETransformer
from ace.models.attention import varlen_available
from ace.reference import ReferenceDiT

# head dim 16 -> RoPE pairs 4 / 2 / 2 (frame / row / column): an uneven split on purpose
CFG = dict(
    in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4, mlp_ratio=2.0,
    text_dim=24, rope_max_len=64, qk_norm=True, pred_sigma=True, num_indicators=10,
)  # fmt: skip


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_pair(**overrides):
    """A random reference model and our model loaded from its (converted) state dict."""
    cfg = {**CFG, **overrides}
    torch.manual_seed(1)
    ref = ReferenceDiT(**cfg).eval()
    ours = ACETransformer(**cfg).eval()
    ours.load_state_dict(official_dit_to_ace(ref.state_dict()), strict=True)
    return ref, ours


def make_sample(sizes, text_lens, masked=(), text_dim=24):
    frames = [torch.randn(4, h, w) for h, w in sizes]
    masks = [
        (torch.rand(1, h, w) > 0.5).float() if i in masked else None
        for i, (h, w) in enumerate(sizes)
    ]
    texts = [torch.randn(n, text_dim) for n in text_lens]
    return frames, masks, texts


def batch(*samples):
    return [list(x) for x in zip(*samples)]  # -> frames, masks, texts lists over samples


CASES = {
    "one_frame": [make_sample([(8, 6)], [5])],
    "two_frames_masked": [make_sample([(6, 8), (4, 10)], [3, 7], masked=(0, 1))],
    # equal lengths: the modulation broadcasts per sample (packing.per_sample_rows), and
    # the two timesteps differ, so a row read for the wrong sample shows
    "two_equal_samples": [
        make_sample([(6, 8), (4, 4)], [3, 5]),
        make_sample([(6, 8), (4, 4)], [2, 7], masked=(1,)),
    ],
    "three_frames_mixed": [
        make_sample([(4, 4), (8, 8), (6, 4)], [2, 9, 1], masked=(1,)),
        make_sample([(10, 6)], [4]),
        make_sample([(6, 6), (6, 6)], [6, 6]),
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("with_indicators", [True, False])
def test_matches_reference(case, with_indicators):
    ref, ours = make_pair()
    frames, masks, texts = batch(*CASES[case])
    t = torch.tensor([999.0, 1.0, 500.0][: len(frames)])
    ind = torch.randn(10, 24) if with_indicators else None
    with torch.no_grad():
        expected = ref(frames, masks, texts, t, ind)
        got = ours.predict(frames, masks, texts, t, ind)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert rel_err(g, e) <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "flex", "dense"])
def test_every_backend_matches_reference(backend):
    ref, ours = make_pair()
    frames, masks, texts = batch(*CASES["three_frames_mixed"])
    t, ind = torch.tensor([3.0, 300.0, 900.0]), torch.randn(10, 24)
    with torch.no_grad():
        expected = ref(frames, masks, texts, t, ind)
        ours.set_attention_backend(backend)
        got = ours.predict(frames, masks, texts, t, ind)
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= 1e-5


@pytest.mark.parametrize(
    "overrides",
    [
        {"qk_norm": False},
        {"pred_sigma": False},
        {"in_channels": 8},
        {"patch_size": 1},
        {"patch_size": 4},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_other_configurations_match_reference(overrides):
    """The released configuration above; the toy preset's 8 channels, no q/k norm, no learned
    sigma and other patch sizes here (latent sides multiples of every patch, and at most 64 tokens
    a frame: rope_max_len)."""
    ref, ours = make_pair(**overrides)
    c = overrides.get("in_channels", 4)
    g = torch.Generator().manual_seed(5)
    frames = [[torch.randn(c, 8, 8, generator=g), torch.randn(c, 4, 8, generator=g)]]
    masks = [[None, (torch.rand(1, 4, 8, generator=g) > 0.5).float()]]
    texts = [[torch.randn(4, 24, generator=g), torch.randn(7, 24, generator=g)]]
    t, ind = torch.tensor([400.0]), torch.randn(10, 24, generator=g)
    with torch.no_grad():
        expected = ref(frames, masks, texts, t, ind)[0]
        got = ours.predict(frames, masks, texts, t, ind)[0]
    assert got.shape == expected.shape == (c, 8, 8)
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.skipif(
    not torch.cuda.is_available() or not varlen_available(torch.device("cuda"), torch.bfloat16),
    reason="needs CUDA varlen_attn",
)
def test_varlen_matches_dense_on_cuda():
    _, ours = make_pair()
    ours = ours.to("cuda", torch.bfloat16)
    frames, masks, texts = batch(*CASES["three_frames_mixed"])
    cuda = lambda xs: [[None if x is None else x.cuda() for x in s] for s in xs]  # noqa: E731
    t, ind = torch.tensor([3.0, 300.0, 900.0], device="cuda"), torch.randn(10, 24, device="cuda")
    with torch.no_grad():
        ours.set_attention_backend("dense")
        oracle = ours.predict(cuda(frames), cuda(masks), cuda(texts), t, ind)
        ours.set_attention_backend("varlen")
        got = ours.predict(cuda(frames), cuda(masks), cuda(texts), t, ind)
    for g, e in zip(got, oracle):
        assert rel_err(g.float(), e.float()) <= 2e-2


def test_sample_alone_equals_sample_in_batch():
    _, ours = make_pair()
    a, b, c = CASES["three_frames_mixed"]
    ind = torch.randn(10, 24)
    with torch.no_grad():
        together = ours.predict(*batch(a, b, c), torch.tensor([10.0, 20.0, 30.0]), ind)
        alone = ours.predict(*batch(b), torch.tensor([20.0]), ind)
    torch.testing.assert_close(alone[0], together[1], rtol=1e-6, atol=1e-6)


def test_changing_one_frame_text_changes_only_that_frame_in_cross_attention():
    _, ours = make_pair()
    frames, _masks, texts = batch(CASES["three_frames_mixed"][0])
    packed = ours.pack([[f.shape[-2:] for f in frames[0]]], [[t.shape[0] for t in texts[0]]])
    block = ours.blocks[0]
    x = torch.randn(packed.num_tokens, 64)
    y = torch.randn(packed.num_text_tokens, 64)
    with torch.no_grad():
        base = block.cross_attn(x, y, packed.cross_attn, "sdpa")
        y2 = y.clone()
        k0, k1 = packed.cross_attn.cu_k[1].item(), packed.cross_attn.cu_k[2].item()
        y2[k0:k1] += 1.0  # frame 1's text
        changed = block.cross_attn(x, y2, packed.cross_attn, "sdpa")
    q0, q1 = packed.cross_attn.cu_q[1].item(), packed.cross_attn.cu_q[2].item()
    diff = (changed - base).abs().amax(-1)  # (T,)
    assert diff[q0:q1].min() > 0
    assert diff[:q0].max() == 0 and diff[q1:].max() == 0


@pytest.mark.parametrize("backend", ["sdpa", "dense"])  # flex: no backward on CPU
def test_bf16_autocast_forward_and_backward_run_and_follow_fp32(backend):
    """Mixed precision as the trainer runs it (fp32 weights, autocast bf16): qk-norm keeps
    q and k in the compute dtype, so attention sees one dtype; the result is the fp32 one
    to bf16 accuracy."""
    _, ours = make_pair()
    ours.set_attention_backend(backend)
    # samples 0 and 2 share a length, with sample 1 between them: one attention call
    # gathers them by index (the path that failed, writing bf16 into a float32 output)
    samples = [make_sample([(4, 4)], [3]), make_sample([(6, 6)], [2]), make_sample([(4, 4)], [5])]
    frames, masks, texts = batch(*samples)
    t, ind = torch.tensor([400.0, 30.0, 900.0]), torch.randn(10, 24)
    with torch.no_grad():
        want = torch.cat([o.flatten() for o in ours.predict(frames, masks, texts, t, ind)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours.predict(frames, masks, texts, t, ind)
    got = torch.cat([o.float().flatten() for o in out])
    got.square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters() if p.requires_grad)  # fmt: skip
    assert rel_err(got.detach(), want) < 2e-2


def test_gradient_checkpointing_gives_same_gradients():
    """The same gradients, and checkpointing really on: each block runs twice per step
    (forward, then again in backward), not once."""
    _, ours = make_pair()
    ours.train()
    frames, masks, texts = batch(*CASES["two_frames_masked"])
    t, ind = torch.tensor([400.0]), torch.randn(10, 24)
    grads, runs = [], []
    # a pre-hook: the recompute stops once it has what backward needs, before post-hooks
    ours.blocks[0].register_forward_pre_hook(lambda *_: runs.append(1))
    for ckpt in (False, True):
        ours.zero_grad()
        if ckpt:
            ours.enable_gradient_checkpointing()
        runs.clear()
        out = ours.predict(frames, masks, texts, t, ind)
        sum(o.square().sum() for o in out).backward()
        assert len(runs) == (2 if ckpt else 1)
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_regional_compile_traces_every_block_and_matches_eager():
    """compile_repeated_blocks() (diffusers) compiles each ACEBlock; the graphs dynamo
    captures, run by aot_eager (no codegen: seconds, not minutes, on CPU), give the eager
    outputs and gradients. Inductor's kernels on top are torch's to test."""
    _, ours = make_pair()
    ours.train()
    frames, masks, texts = batch(*CASES["three_frames_mixed"])
    t, ind = torch.tensor([400.0, 10.0, 999.0]), torch.randn(10, 24)

    def run():
        ours.zero_grad()
        out = ours.predict(frames, masks, texts, t, ind)
        sum(o.square().sum() for o in out).backward()
        return [o.detach() for o in out], {n: p.grad.clone() for n, p in ours.named_parameters()}

    eager_out, eager_grads = run()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    ours.compile_repeated_blocks(backend="aot_eager")
    try:
        assert all(b._compiled_call_impl is not None for b in ours.blocks)
        out, grads = run()
        assert not counters["graph_break"]  # whole blocks, segment attention included
        assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the blocks
    finally:
        torch._dynamo.reset()
    for a, b in zip(out, eager_out):
        assert rel_err(a, b) <= 1e-5
    for n in eager_grads:
        torch.testing.assert_close(grads[n], eager_grads[n], rtol=1e-5, atol=1e-7)


def test_new_model_is_zero_initialised_and_presets_exist():
    model = ACETransformer.from_preset("tiny")
    frames, masks, texts = batch(make_sample([(8, 8)], [3], text_dim=32))
    with torch.no_grad():
        (out,) = model.predict(frames, masks, texts, torch.tensor([5.0]))
    assert torch.count_nonzero(out) == 0  # final layer starts at zero (PixArt)
    for name in ("ace-0.6b-512", "ace-0.6b-1024"):
        with torch.device("meta"):
            m = ACETransformer.from_preset(name)
        n = sum(p.numel() for p in m.parameters())
        assert 605e6 < n < 615e6, n  # ACE_REFERENCE: 611M
    with pytest.raises(ValueError, match="unknown preset"):
        ACETransformer.from_preset("huge")
    with pytest.raises(ValueError, match=r"unknown ACETransformer argument\(s\) \['hidden'\]"):
        ACETransformer.from_preset("tiny", hidden=64)  # a typo in model.overrides
    assert ACETransformer.from_preset("tiny", depth=1).config.depth == 1


def test_save_and_load_pretrained(tmp_path):
    _, ours = make_pair()
    ours.save_pretrained(tmp_path / "dit")
    assert (tmp_path / "dit" / "diffusion_pytorch_model.safetensors").exists()
    loaded = ACETransformer.from_pretrained(tmp_path / "dit")
    frames, masks, texts = batch(*CASES["one_frame"])
    with torch.no_grad():
        a = ours.predict(frames, masks, texts, torch.tensor([7.0]))[0]
        b = loaded.predict(frames, masks, texts, torch.tensor([7.0]))[0]
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------- bad input


def _predict(model, sizes, text_lens, masks=None, n_texts=None):
    frames = [torch.randn(4, h, w) for h, w in sizes]
    texts = [torch.randn(n, 24) for n in text_lens][: n_texts or len(text_lens)]
    return model.predict(
        [frames], [masks or [None] * len(sizes)], [texts], torch.tensor([1.0]), torch.randn(10, 24)
    )


def test_bad_input_raises_value_error_naming_the_problem():
    _, ours = make_pair()
    with pytest.raises(ValueError, match=r"2 texts for 3 frames"):
        _predict(ours, [(4, 4)] * 3, [2, 2])
    with pytest.raises(ValueError, match=r"latent size 5x4 is not divisible by patch size 2"):
        _predict(ours, [(4, 4), (5, 4)], [2, 2])
    with pytest.raises(ValueError, match=r"11 frames but the model has 10 indicator rows"):
        _predict(ours, [(4, 4)] * 11, [2] * 11)
    with pytest.raises(ValueError, match=r"mask shape \(1, 4, 2\), expected \(1, 4, 4\)"):
        _predict(ours, [(4, 4)], [2], masks=[torch.ones(1, 4, 2)])
    with pytest.raises(
        ValueError, match=r"9x9 token grid \(81 tokens\) is larger than rope_max_len=64"
    ):
        _predict(ours, [(18, 18)], [2])
    with pytest.raises(ValueError, match=r"its text has no tokens"):
        _predict(ours, [(4, 4)], [0])
    with pytest.raises(ValueError, match=r"latent shape \(3, 4, 4\), expected \(4, h, w\)"):
        ours.predict([[torch.randn(3, 4, 4)]], None, [[torch.randn(2, 24)]], torch.tensor([1.0]))
    one, text, t = [[torch.randn(4, 4, 4)]], [[torch.randn(2, 24)]], torch.tensor([1.0])
    for table in (torch.randn(3, 24), torch.randn(10, 16), torch.randn(10)):
        shape = re.escape(str(tuple(table.shape)))
        with pytest.raises(ValueError, match=rf"indicator table shape {shape}, the model expects \(10, 24\)"):  # fmt: skip
            ours.predict(one, None, text, t, table)
    with pytest.raises(ValueError, match=r"sample 0 frame 0: text shape \(2, 16\), expected \(L, 24\)"):  # fmt: skip
        ours.predict(one, None, [[torch.randn(2, 16)]], t)
    with pytest.raises(ValueError, match=r"sample 0: frames and texts must be lists .* got Tensor and list"):  # fmt: skip
        ours.predict([torch.randn(4, 4, 4)], None, text, t)
    with pytest.raises(ValueError, match=r"sample 0 frame 1: latent size 0x4 is empty"):
        _predict(ours, [(4, 4), (0, 4)], [2, 2])
    packed = ours.pack([[(4, 4)]], [[2]])
    x, y = torch.randn(4, 20), torch.randn(2, 24)
    with pytest.raises(ValueError, match=r"x shape \(4, 19\), expected \(T, 20\): \(C\+1\)\*p\*p"):
        ours(torch.randn(4, 19), y, t, packed)
    with pytest.raises(ValueError, match=r"text shape \(2, 16\), expected \(Tt, 24\)"):
        ours(x, torch.randn(2, 16), t, packed)
    with pytest.raises(ValueError, match=r"x on cpu, text on meta, .* put them where the model is \(cpu\)"):  # fmt: skip
        ours(x, y.to("meta"), t, packed)
    # timesteps are moved to the model: a CPU tensor or a list of numbers is fine
    got = ours.predict(one, None, text, [1.0])[0]
    torch.testing.assert_close(got, ours.predict(one, None, text, t)[0])
    with pytest.raises(ValueError, match=r"heads of an even dim"):
        ACETransformer(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match=r"at least 6"):  # head dim 4: no row or column RoPE
        ACETransformer(hidden_size=16, num_heads=4)
    with pytest.raises(ValueError, match=r"masks for 1 samples but frames for 2"):
        frames = [[torch.randn(4, 4, 4)], [torch.randn(4, 4, 4)]]
        texts = [[torch.randn(2, 24)], [torch.randn(2, 24)]]
        ours.predict(frames, [[None]], texts, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"unknown attention backend"):
        ours.set_attention_backend("xformers")


def test_backward_is_bitwise_reproducible_on_ragged_batches():
    """Per-sample modulation and indicator rows reach tokens without a scatter-add, so two
    identical backward passes give identical gradients (exact training resume needs it)."""
    _, ours = make_pair()
    frames, masks, texts = batch(*CASES["three_frames_mixed"])
    t, ind = torch.tensor([10.0, 500.0, 900.0]), torch.randn(10, 24)
    grads = []
    for _ in range(2):
        ours.zero_grad()
        out = ours.predict(frames, masks, texts, t, ind)
        sum(o.square().sum() for o in out).backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_host_syncs_sees_the_ops_that_wait_and_not_those_that_do_not():
    from ace.testing import host_syncs

    x, m = torch.randn(6), torch.tensor([True, False] * 3)
    idx = torch.tensor([0, 2, 2])
    waits = {
        "item": lambda: x.sum().item(),
        "equal": lambda: torch.equal(x, x),
        "bincount": lambda: torch.bincount(idx),
        "nonzero": lambda: m.nonzero(),
        "bool index": lambda: x[m],
        "bool index_put": lambda: x.clone().index_put_((m,), torch.ones(3)),
        "unique": lambda: torch.unique(idx),
        "repeat_interleave": lambda: torch.repeat_interleave(x[:3], idx),
    }
    for name, op in waits.items():
        with host_syncs() as syncs:
            op()
        assert syncs, name
    for name, op in {
        "nonzero_static": lambda: torch.nonzero_static(m, size=3),
        "int index": lambda: x[idx],
        "masked_fill": lambda: x.masked_fill(m, 0.0),
        "repeat_interleave by int": lambda: torch.repeat_interleave(x, 2),
    }.items():
        with host_syncs() as syncs:
            op()
        assert not syncs, (name, dict(syncs))


@pytest.mark.parametrize("backend", ["sdpa", "dense"])
def test_forward_and_backward_make_no_host_sync(backend):
    """Once the batch is packed, the model's forward and backward never make the host wait
    for the device (ace.testing.host_syncs sees the ops that would on CUDA). The indicator
    one-hot used F.one_hot, whose range check read a value back on every training step."""
    from ace.testing import host_syncs

    _, ours = make_pair()
    ours.set_attention_backend(backend)
    frames, masks, texts = batch(*CASES["three_frames_mixed"])
    t, ind = torch.tensor([10.0, 500.0, 900.0]), torch.randn(10, 24)
    packed = ours.pack(
        [[f.shape[-2:] for f in fs] for fs in frames], [[x.shape[0] for x in ts] for ts in texts]
    )
    tokens, text = packed.pack_frames(frames, masks), packed.pack_texts(texts)
    with host_syncs() as syncs:
        out = ours(tokens, text, t, packed, ind)
        out.square().mean().backward()
    assert not syncs, dict(syncs)
