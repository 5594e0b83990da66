"""The kernels' telemetry statistics (``sink_stats``) against the fp64 reference and the PyTorch path.

Per (batch row, query head): the stock sink mass (before sink scaling, zero-value logits counted)
summed over the query rows that see at least one non-sink key, and that row count
(docs/monitoring.md). The prefill kernel adds one (mass, rows) pair per query tile (16-row tiles
here, so every head gets several programs and a ragged last tile); the decode reduction adds one
per row. The cases are the awkward ones: GQA, causal with Q < K, a padded batch given as key
ranges, several sink columns with an unused slot, a dense mask, a window that drops the sink,
softcap, beta != 1, zero-value and virtual logits, rows that see only the sink or nothing.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ..conftest import require_triton_kernels

require_triton_kernels()

import sinkfix  # noqa: E402
import sinkfix.kernels as kernels  # noqa: E402
from sinkfix.kernels.attention_decode import sink_attention_decode  # noqa: E402
from sinkfix.kernels.attention_prefill import sink_attention_prefill  # noqa: E402
from sinkfix.ops.attention import sink_attention  # noqa: E402
from sinkfix.ops.reference import reference_sink_attention, sink_key_mask, visibility_mask  # noqa: E402

from ..conftest import tiny_model  # noqa: E402
from .conftest import DEVICE  # noqa: E402

# per counted row, the kernels' fp32 sink mass is ~1e-7 from fp64 (the scores of 16-bit inputs are
# exact products with fp32 sums, and the mass never goes through the 16-bit P); 1e-5 per row leaves
# margin without hiding a wrong formula (a wrong row set or a missing zero-value term is off by 1e-2+)
ROW_ATOL = 1e-5


def _reference_stats(q, k, v, *, sink_cols, attn_mask=None, key_padding=None, causal=False, causal_offset=0,
                     sliding_window=None, softcap=None, extra_logits=None, virtual_sink_logit=None,
                     **_policy) -> torch.Tensor:
    """(B, Hq, 2) fp64: the reference's beta = 1 probabilities on the sink columns summed over the
    rows that see a non-sink key, and the number of those rows (beta never enters: stock mass)."""
    if key_padding is not None:
        padding = key_padding[:, None, None, :]
        attn_mask = padding if attn_mask is None else attn_mask & padding
    rules = dict(attn_mask=attn_mask, causal=causal, causal_offset=causal_offset, sliding_window=sliding_window)
    _, probs, _ = reference_sink_attention(q, k, v, **rules, softcap=softcap, sink_cols=sink_cols,
                                           extra_logits=extra_logits, virtual_sink_logit=virtual_sink_logit)
    batch, q_heads, q_len, _ = q.shape
    k_len = k.shape[2]
    is_sink = sink_key_mask(sink_cols, batch, k_len, q.device)[:, None, None, :]
    visible = visibility_mask(batch, q_len, k_len, **rules, device=q.device)
    has_n = (visible & ~is_sink).any(-1).expand(batch, q_heads, q_len)
    mass = torch.where(has_n, (probs.double() * is_sink).sum(-1), 0.0).sum(-1)
    return torch.stack((mass, has_n.sum(-1).double()), dim=-1).cpu()


def _check(kt, launcher, q, k, v, label, launch=None, **kw):
    """Run ``launcher`` with and without the statistics: the same output bit for bit, and the
    statistics against the reference (row counts exact, masses to ROW_ATOL per row)."""
    launch = launch or {}
    stats = torch.zeros(q.shape[0], q.shape[1], 2, dtype=torch.float32, device=q.device)
    out, lse = launcher(q, k, v, sink_stats=stats, **launch, **kw)
    plain_out, plain_lse = launcher(q, k, v, **launch, **kw)
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse), f"{label}: the statistics changed the output"
    kt.check_attention(out, lse, q, k, v, label=label, **_dense(kw))
    expected = _reference_stats(q, k, v, **kw)
    got = stats.double().cpu()
    assert torch.equal(got[..., 1], expected[..., 1]), f"{label}: counted rows {got[..., 1]} vs {expected[..., 1]}"
    torch.testing.assert_close(got[..., 0], expected[..., 0], atol=ROW_ATOL * q.shape[2], rtol=0, msg=label)
    return expected


def _dense(kw: dict) -> dict:
    """The kernel arguments as check_attention's reference takes them (key padding as a mask)."""
    kw = dict(kw)
    padding = kw.pop("key_padding", None)
    if padding is not None:
        padding = padding[:, None, None, :]
        kw["attn_mask"] = padding if kw.get("attn_mask") is None else kw["attn_mask"] & padding
    return kw


def _mixed_padding(batch: int, k_len: int) -> torch.Tensor:
    """Row 1 left-padded by 5 (generation), row 2 right-padded by 3 (evaluation), row 0 unpadded."""
    ok = torch.ones(batch, k_len, dtype=torch.bool)
    ok[1, :5] = False
    ok[2, k_len - 3:] = False
    return ok.to(DEVICE)


def _first_real(key_ok: torch.Tensor) -> torch.Tensor:
    return key_ok.to(torch.int32).argmax(-1, keepdim=True).long()


# -- prefill: one atomic pair per query tile ------------------------------------------------------
PREFILL_TILES = dict(block_m=16, block_n=16)


def test_prefill_gqa_causal_several_sinks_every_policy_term(kt):
    # 37 rows in tiles of 16 (the last one ragged: rows past Q must not count), GQA 3, sink columns
    # 0 and 5 plus an unused slot, beta per head, s_aux and a virtual logit. Row 0 sees only the
    # sink and is left out; row 5 sees column 5 as a sink.
    q, k, v = kt.make_qkv(1, 6, 2, 37, 37, 64, torch.float32, sink_cols=torch.tensor([[0, 5]]), sink_boost=3.0)
    kw = kt.policy_kwargs("combined", 6, 1)
    expected = _check(kt, sink_attention_prefill, q, k, v, "prefill gqa combined", PREFILL_TILES, causal=True, **kw)
    assert expected[..., 1].eq(36).all()  # guards the test: row 0 is not counted
    assert (expected[..., 0] / 36).min() > 0.2  # the sink carries real mass


def test_prefill_chunk_with_fewer_queries_than_keys_bf16(kt):
    # chunked prefill: 9 queries at the end of 30 keys (bottom-right causal), beta != 1, bf16
    q, k, v = kt.make_qkv(2, 4, 2, 9, 30, 64, torch.bfloat16, sink_cols=torch.zeros(2, 1, dtype=torch.long),
                          sink_boost=3.0, seed=1)
    kw = kt.policy_kwargs("scaling", 4, 2)
    _check(kt, sink_attention_prefill, q, k, v, "prefill chunk bf16", PREFILL_TILES, causal=True, causal_offset=21,
           **kw)


def test_prefill_padded_batch_as_key_ranges(kt):
    # the sink at each row's first real key; left-padded query rows see nothing, the first real row
    # sees only the sink: neither counts
    key_ok = _mixed_padding(3, 24)
    sinks = _first_real(key_ok)
    q, k, v = kt.make_qkv(3, 4, 2, 24, 24, 64, torch.float32, sink_cols=sinks.cpu(), sink_boost=3.0, seed=2)
    kw = kt.policy_kwargs("combined", 4, 3) | dict(sink_cols=sinks)
    expected = _check(kt, sink_attention_prefill, q, k, v, "prefill key ranges", PREFILL_TILES, causal=True,
                      key_padding=key_ok, **kw)
    assert expected[1, :, 1].eq(24 - 5 - 1).all() and expected[0, :, 1].eq(23).all()


def test_prefill_window_drops_the_sink_with_softcap_and_s_aux(kt):
    # rows >= 7 no longer see key 0: counted with mass 0 (the s_aux mass is not sink mass)
    q, k, v = kt.make_qkv(1, 2, 1, 40, 40, 32, torch.float32, sink_cols=torch.zeros(1, 1, dtype=torch.long),
                          sink_boost=2.0, seed=3)
    kw = dict(sink_cols=torch.zeros(1, 1, dtype=torch.long, device=DEVICE),
              extra_logits=torch.tensor([[0.5], [-1.0]], device=DEVICE))
    expected = _check(kt, sink_attention_prefill, q, k, v, "prefill window softcap", PREFILL_TILES, causal=True,
                      sliding_window=7, softcap=5.0, **kw)
    assert expected[..., 1].eq(39).all()


def test_prefill_dense_mask_rows_with_only_the_sink_or_nothing(kt):
    q, k, v = kt.make_qkv(1, 2, 2, 20, 20, 64, torch.float32, sink_cols=torch.tensor([[2]]), sink_boost=3.0, seed=4)
    mask = torch.rand(1, 1, 20, 20, generator=torch.Generator().manual_seed(0)) > 0.4
    mask[..., 3, :] = False
    mask[..., 3, 2] = True  # row 3: only the sink
    mask[..., 7, :] = False  # row 7: nothing
    kw = dict(sink_cols=torch.tensor([[2]], device=DEVICE), virtual_sink_logit=torch.tensor([0.3, -0.7], device=DEVICE),
              beta=torch.tensor([0.5, 0.0], device=DEVICE))
    expected = _check(kt, sink_attention_prefill, q, k, v, "prefill dense mask", PREFILL_TILES,
                      attn_mask=mask.to(DEVICE), **kw)
    sees_n = (mask[0, 0] & (torch.arange(20) != 2)).any(-1)
    assert expected[0, :, 1].eq(sees_n.sum()).all() and not sees_n[3] and not sees_n[7]


def test_prefill_without_sinks_counts_rows_with_zero_mass(kt):
    q, k, v = kt.make_qkv(1, 2, 1, 17, 17, 32, torch.float32, seed=5)
    expected = _check(kt, sink_attention_prefill, q, k, v, "prefill no sinks", PREFILL_TILES, causal=True,
                      sink_cols=None, **kt.policy_kwargs("s_aux", 2, 1))
    assert expected[..., 0].eq(0).all() and expected[..., 1].eq(17).all()


# -- decode: the reduction adds each row ---------------------------------------------------------
def test_decode_speculative_gqa_every_policy_term(kt):
    # 3 new tokens x GQA 4 = 12 rows of 4 heads in one reduction tile; 3 splits
    q, k, v = kt.make_qkv(2, 8, 2, 3, 50, 64, torch.float32, sink_cols=torch.tensor([[0, 5]] * 2), sink_boost=3.0,
                          seed=6)
    kw = kt.policy_kwargs("combined", 8, 2)
    expected = _check(kt, sink_attention_decode, q, k, v, "decode speculative", dict(num_splits=3), causal=True,
                      causal_offset=47, **kw)
    assert expected[..., 1].eq(3).all() and (expected[..., 0] / 3).min() > 0.2


def test_decode_padded_batch_as_key_ranges_bf16(kt):
    key_ok = _mixed_padding(3, 40)
    sinks = _first_real(key_ok)
    q, k, v = kt.make_qkv(3, 4, 2, 1, 40, 64, torch.bfloat16, sink_cols=sinks.cpu(), sink_boost=3.0, seed=7)
    kw = kt.policy_kwargs("scaling", 4, 3) | dict(sink_cols=sinks, virtual_sink_logit=torch.ones(4, device=DEVICE))
    _check(kt, sink_attention_decode, q, k, v, "decode key ranges", dict(num_splits=3), causal=True, causal_offset=39,
           key_padding=key_ok, **kw)


def test_decode_window_evicts_the_sink_and_a_row_sees_only_the_sink(kt):
    q, k, v = kt.make_qkv(1, 4, 1, 2, 60, 32, torch.float32, sink_cols=torch.zeros(1, 1, dtype=torch.long),
                          sink_boost=3.0, seed=8)
    kw = dict(sink_cols=torch.zeros(1, 1, dtype=torch.long, device=DEVICE), beta=torch.full((4,), 0.3, device=DEVICE),
              extra_logits=torch.zeros(4, 1, device=DEVICE))
    expected = _check(kt, sink_attention_decode, q, k, v, "decode window", dict(num_splits=3), causal=True,
                      causal_offset=58, sliding_window=16, **kw)
    assert expected[..., 0].eq(0).all() and expected[..., 1].eq(2).all()
    # a dense mask whose second row sees only the sink (column 0): it is left out
    mask = torch.ones(1, 1, 2, 60, dtype=torch.bool)
    mask[..., 1, 1:] = False
    kw["extra_logits"] = None
    expected = _check(kt, sink_attention_decode, q, k, v, "decode sink-only row", dict(num_splits=3),
                      attn_mask=mask.to(DEVICE), **kw)
    assert expected[..., 1].eq(1).all() and expected[..., 0].gt(0.1).all()


# -- the launcher's contract ----------------------------------------------------------------------
def test_statistics_are_added_into_the_given_tensor_and_checked(kt):
    q, k, v = kt.make_qkv(1, 2, 1, 5, 9, 16, torch.float32, seed=9)
    kw = dict(causal=True, causal_offset=4, sink_cols=torch.zeros(1, 1, dtype=torch.long, device=DEVICE))
    fresh = torch.zeros(1, 2, 2, device=DEVICE)
    sink_attention_prefill(q, k, v, sink_stats=fresh, **kw)
    running = torch.full((1, 2, 2), 0.5, device=DEVICE)
    sink_attention_prefill(q, k, v, sink_stats=running, **kw)
    torch.testing.assert_close(running, fresh + 0.5, atol=1e-6, rtol=0)
    bad = [torch.zeros(1, 2, 3, device=DEVICE), torch.zeros(1, 2, 2, dtype=torch.float64, device=DEVICE),
           torch.zeros(2, 2, 1, device=DEVICE).permute(2, 1, 0), torch.zeros(2, 2, 2, device=DEVICE)]
    for launcher in (sink_attention_prefill, sink_attention_decode):
        for stats in bad:
            with pytest.raises(ValueError, match="sink_stats must be a contiguous fp32 tensor"):
                launcher(q, k, v, sink_stats=stats, **kw)


# -- through sinkfix: the dispatch, the custom op, a monitored model ------------------------------
def test_dispatch_runs_the_kernels_with_key_ranges_and_matches_the_torch_path(kt, monkeypatch):
    """need_sink_stats on the Triton backend: the kernels' statistics variant, key padding kept as
    ranges (no dense mask), no fallback warning, the PyTorch path's numbers."""
    launched = []
    real = kernels.sink_attention_triton

    def spy(q, k, v, **kw):
        launched.append(kw)
        return real(q, k, v, **kw)

    monkeypatch.setattr(kernels, "sink_attention_triton", spy)
    key_ok = _mixed_padding(3, 21)
    sinks = _first_real(key_ok)
    q, k, v = kt.make_qkv(3, 4, 2, 21, 21, 32, torch.float32, sink_cols=sinks.cpu(), sink_boost=3.0, seed=10)
    policy = dict(sink_cols=sinks, beta=torch.tensor([0.2, 0.9, 0.5, 1.0], device=DEVICE),
                  virtual_sink_logit=torch.zeros(4, device=DEVICE))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sink_attention(q, k, v, backend="triton", key_padding=key_ok, causal=True, need_sink_stats=True,
                             **policy)
    assert not [w for w in caught if "PyTorch path" in str(w.message) or "telemetry" in str(w.message)]
    (call,) = launched
    assert call["sink_stats"] is not None and call["key_padding"] is not None and call["attn_mask"] is None
    expected = sink_attention(q.cpu(), k.cpu(), v.cpu(), backend="torch", key_padding=key_ok.cpu(), causal=True,
                              need_sink_stats=True, **{n: t.cpu() for n, t in policy.items()})
    torch.testing.assert_close(got.sink_stats.cpu(), expected.sink_stats, atol=ROW_ATOL * 21, rtol=0)
    assert torch.equal(got.sink_stats[..., 1].cpu(), expected.sink_stats[..., 1])
    real_rows = key_ok.cpu()[:, None, :, None]
    torch.testing.assert_close(torch.where(real_rows, got.out.cpu(), 0), torch.where(real_rows, expected.out, 0),
                               atol=1e-5, rtol=0)
    # the registered op (what torch.compile sees) on the Triton backend
    args = (q, k, v, None, key_ok, None, sinks, policy["beta"], None, policy["virtual_sink_logit"], True, 0, None,
            32 ** -0.5, None, False, "triton")
    _, _, stats = torch.ops.sinkfix.sink_attention_stats(*args)
    torch.testing.assert_close(stats, got.sink_stats, atol=ROW_ATOL * 21, rtol=0)


def test_monitored_model_on_the_triton_backend_matches_the_torch_backend(monkeypatch):
    """A monitored request on a model patched with backend='triton' takes its sink shares from the
    kernels' statistics variant and records what the PyTorch backend records."""
    launched = []
    real = kernels.sink_attention_triton
    monkeypatch.setattr(kernels, "sink_attention_triton", lambda *a, **kw: launched.append(kw) or real(*a, **kw))
    model = tiny_model("llama").to(DEVICE)
    ids = torch.randint(2, 97, (1, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    policy = sinkfix.Policy(sink_scale=0.6, virtual_sink_logit=0.5)
    records = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: much faster on one thread
    try:
        for backend in ("torch", "triton"):
            with sinkfix.patch(model, policy, backend=backend), sinkfix.monitor(model) as monitor, torch.no_grad():
                # the request's calls only: patch()'s discovery forward runs the kernels too on a GPU
                launched.clear()
                with monitor.request():
                    model(input_ids=ids, use_cache=False)
                (records[backend],) = monitor.records
    finally:
        torch.set_num_threads(threads)
    assert launched and all(kw["sink_stats"] is not None for kw in launched)
    share = {b: torch.tensor(r["sink_share_unscaled"], dtype=torch.float64) for b, r in records.items()}
    assert records["triton"]["rows"] == records["torch"]["rows"]
    torch.testing.assert_close(share["triton"], share["torch"], atol=1e-5, rtol=0)
    # guards the comparison: real shares (about 0.14 on this random model) that differ between
    # heads and layers by far more than the tolerance
    assert 0.05 < share["torch"].mean() < 0.95 and share["torch"].std() > 100 * 1e-5


def test_monitored_compiled_decoding_on_the_triton_backend(monkeypatch):
    """transformers' compiled decoding (static cache, fullgraph) of a model patched with
    backend='triton' and monitored: the attention is the opaque statistics op (its fake
    implementation gives dynamo the shapes), the decode step compiles once, and the record equals
    the eager one. Under the interpreter the compiled graph runs as traced (a counting backend);
    on a GPU the same test runs the kernels natively."""
    from transformers import CompileConfig

    model = tiny_model("llama").to(DEVICE)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kwargs = dict(input_ids=ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, eos_token_id=None,
                  cache_implementation="static")
    graphs = []

    def counting_backend(graph, example_inputs, **options):
        graphs.append(graph)
        return graph.forward

    config = CompileConfig(fullgraph=True, dynamic=False, backend=counting_backend)
    config._compile_all_devices = True
    torch._dynamo.reset()
    launched = []
    real = kernels.sink_attention_triton
    monkeypatch.setattr(kernels, "sink_attention_triton", lambda *a, **kw: launched.append(kw) or real(*a, **kw))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sinkfix.patch(model, sinkfix.Policy(sink_scale=0.8), backend="triton"), \
                sinkfix.monitor(model) as monitor, torch.no_grad():
            launched.clear()  # patch()'s discovery forward runs the kernels too on a GPU
            with monitor.request():
                # disable_compile: on a GPU a static cache would otherwise make generate compile
                # the decode step itself (inductor, CUDA graphs), and this request is the eager one
                eager_tokens = model.generate(**kwargs, disable_compile=True)
            (eager,) = monitor.records
            eager_launches = len(launched)
            with monitor.request():
                compiled_tokens = model.generate(**kwargs, compile_config=config)
            (compiled,) = monitor.records
    finally:
        torch.set_num_threads(threads)
    assert len(graphs) == 1 and torch.equal(compiled_tokens, eager_tokens)
    # every call of both requests ran the kernels' statistics variant (2 layers x 10 forwards each)
    assert eager_launches == 20 and len(launched) == 40 and all(kw["sink_stats"] is not None for kw in launched)
    assert compiled["tokens"] == eager["tokens"] == 18 and compiled["rows"] == eager["rows"]
    torch.testing.assert_close(torch.tensor(compiled["sink_share"]), torch.tensor(eager["sink_share"]),
                               atol=1e-5, rtol=0)
    assert compiled["residual_peak"] == pytest.approx(eager["residual_peak"], rel=1e-4)
