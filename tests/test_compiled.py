"""torch.compile: a patched model compiles into one graph, gives the eager patched model's outputs,
and generates with a compiled static cache without recompiling.

The per-layer path has no host synchronisation and no data-dependent branch (the sink-aware
attention and the residual clip are torch.library custom ops with fake implementations), so
``torch._dynamo.explain`` must report zero graph breaks. Inductor compiles take tens of seconds on
a CPU: those tests are marked slow and use tiny random models.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import sinkfix
from sinkfix import Policy, ResidualClip
from sinkfix.errors import MonitorError

from .conftest import tiny_config, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _policies(layers: int, heads: int) -> dict[str, Policy]:
    g = torch.Generator().manual_seed(0)
    return {
        "identity": Policy(),
        "sink_scale=0.9": Policy(sink_scale=0.9),
        "profile": Policy(sink_scale=0.5 + 0.5 * torch.rand(layers, heads, generator=g),
                          virtual_sink_logit=torch.randn(layers, heads, generator=g)),
        "clip": Policy(sink_scale=0.9, residual_clip=ResidualClip(3.0)),
    }


@pytest.mark.parametrize("policy", ["identity", "sink_scale=0.9", "profile", "clip"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gptoss"])
def test_patched_model_traces_into_one_graph(arch, policy, one_thread):
    model = tiny_model(arch)
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the sink is located from the mask, still without a branch on values
    with sinkfix.patch(model, _policies(2, 4)[policy]), torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            explained = torch._dynamo.explain(model)(input_ids=ids, **kwargs)
            assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
            assert explained.graph_count == 1


@pytest.mark.parametrize("policy", ["sink_scale=0.9", "profile"])
def test_fullgraph_compile_with_gradients_enabled(policy, one_thread):
    """A model as load_model returns it has parameters that require grad, and the README's
    torch.compile(model, fullgraph=True) then traces the backward too: a host read in the fused
    CPU op's backward raised "Could not guard on data-dependent expression". Outputs and gradients
    equal eager (aot_eager: the same AOT autograd trace as inductor, without its compile time)."""
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(3))
    weight = model.model.layers[0].self_attn.q_proj.weight
    with sinkfix.patch(model, _policies(2, 4)[policy]):
        eager = model(input_ids=ids).logits
        (eager_grad,) = torch.autograd.grad(eager.square().mean(), weight)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids).logits
        (compiled_grad,) = torch.autograd.grad(compiled.square().mean(), weight)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_with_a_per_head_profile_traces_into_one_graph(smollm2):
    model, tok = smollm2
    ids = tok("The attention sink is a token that", return_tensors="pt").input_ids
    with sinkfix.patch(model, _policies(30, 9)["profile"]), torch.no_grad():
        explained = torch._dynamo.explain(model)(input_ids=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["identity", "everything"])
def test_inductor_fullgraph_matches_eager(policy, one_thread):
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (2, 13), generator=torch.Generator().manual_seed(2))
    chosen = Policy() if policy == "identity" else Policy(
        sink_scale=_policies(2, 4)["profile"].sink_scale, virtual_sink_logit=_policies(2, 4)["profile"].virtual_sink_logit,
        residual_clip=ResidualClip(3.0))
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        with sinkfix.patch(model, chosen):
            eager = model(input_ids=ids).logits
            compiled = torch.compile(model, fullgraph=True, dynamic=False)(input_ids=ids).logits
    assert (compiled - eager).abs().max().item() <= 1e-4
    if policy == "identity":
        assert (compiled - stock).abs().max().item() <= 1e-4
    else:
        assert (eager - stock).abs().max().item() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["identity", "profile"])
def test_compiled_static_cache_generation(policy, one_thread):
    """generate() with a static cache and a compiled forward: the eager patched model's greedy tokens
    (and, under the identity, the stock model's), left-padded batch, no recompilation after warm-up."""
    from torch._inductor.compile_fx import compile_fx
    from transformers import CompileConfig

    model = tiny_model("llama")
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(ids)
    ids[0, :3], attention_mask[0, :3] = 0, 0
    kwargs = dict(input_ids=ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False,
                  cache_implementation="static")
    compiles = []

    def counting_inductor(graph, example_inputs):
        compiles.append(graph)
        return compile_fx(graph, example_inputs)

    config = CompileConfig(fullgraph=True, dynamic=False, backend=counting_inductor, mode="default")
    config._compile_all_devices = True  # transformers compiles decoding on CUDA only unless told
    stock = model.generate(**kwargs)
    with sinkfix.patch(model, _policies(2, 4)[policy]):
        eager = model.generate(**kwargs)
        compiled = model.generate(**kwargs, compile_config=config)
        warm = len(compiles)
        again = model.generate(**kwargs, compile_config=config)
    assert warm >= 1 and len(compiles) == warm, "decoding recompiled after warm-up"
    assert torch.equal(compiled, eager) and torch.equal(again, eager)
    if policy == "identity":
        assert torch.equal(compiled, stock)


@pytest.mark.parametrize("policy", ["profile", "identity"])
@pytest.mark.parametrize("padded", [False, True])
def test_monitored_compiled_generation_compiles_once_and_records_as_eager(padded, policy, one_thread):
    """A monitored generate() with a static cache and compiled decoding: the decode steps compile
    once (each step used to read a Python list that grew per step, so dynamo compiled again at every
    step until its recompile limit stopped the request), and the records equal the eager ones:
    sink shares, dormancy, and the residual peaks over every token, decode steps included (written
    by the compiled steps into a device buffer). The identity's eager decode steps with a dynamic
    cache leave their statistics to the monitor; traced ones compute them per call."""
    from transformers import CompileConfig

    model = tiny_model("llama")
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    attention_mask = torch.ones_like(ids)
    if padded:
        ids[0, :3], attention_mask[0, :3] = 0, 0
    kwargs = dict(input_ids=ids, attention_mask=attention_mask, max_new_tokens=12, min_new_tokens=12,
                  do_sample=False, eos_token_id=None, cache_implementation="static")
    graphs = []

    def counting_backend(graph, example_inputs, **options):  # transformers passes its mode along
        graphs.append(graph)
        return graph.forward

    config = CompileConfig(fullgraph=True, dynamic=False, backend=counting_backend)
    config._compile_all_devices = True  # transformers compiles decoding on CUDA only unless told
    torch._dynamo.reset()
    with sinkfix.patch(model, _policies(2, 4)[policy]), sinkfix.monitor(model) as monitor, torch.no_grad():
        with monitor.request():
            eager_tokens = model.generate(**kwargs)
        eager = monitor.records
        with monitor.request():
            model(input_ids=ids, attention_mask=attention_mask)  # the prompt alone
        prompt_only = monitor.records
        for _ in range(2):  # the second request reuses the compiled step
            with monitor.request():
                compiled_tokens = model.generate(**kwargs, compile_config=config)
            compiled = monitor.records
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled for 11 decode steps of two requests"
    assert torch.equal(compiled_tokens, eager_tokens)
    for got, want, prompt in zip(compiled, eager, prompt_only, strict=True):
        assert got["tokens"] == want["tokens"] and got["decoded_tokens"] == want["decoded_tokens"] == 11
        assert got["rows"] == want["rows"] and got["dormant_heads"] == want["dormant_heads"]
        for key in ("sink_share", "dormancy"):
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), atol=1e-5, rtol=0)
        assert got["residual_peak"] == pytest.approx(want["residual_peak"], rel=1e-4)
        assert got["residual_peak_position"] == want["residual_peak_position"]
        # the decode tokens are in the peak ratio (its median): without them it is another number
        assert got["residual_peak"] != pytest.approx(prompt["residual_peak"], rel=1e-3)


@pytest.mark.parametrize("policy", ["profile", "identity"])
def test_monitored_requests_on_a_compiled_forward_with_a_dynamic_cache_stop_compiling(policy, one_thread):
    """model.forward under torch.compile(fullgraph=True), generate() with its default DynamicCache: inside
    a monitor's requests every decode step compiled again (a list that grew per step), and every
    request's prompt too (its graph was guarded on the request's id), so the ninth forward stopped at
    dynamo's recompile limit (SmolLM2: the second request). Now the first request adds its prompt and
    decode graphs and later requests none; the records equal the eager model's."""
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(5))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    with sinkfix.patch(model, _policies(2, 4)[policy]), sinkfix.monitor(model) as monitor, torch.no_grad():
        eager = {}
        for n in (4, 9):
            with monitor.request():
                model.generate(**kwargs, max_new_tokens=n, min_new_tokens=n)
            eager[n] = monitor.records[0]
        eager_forward = model.forward
        model.forward = torch.compile(eager_forward, backend=counting_backend, fullgraph=True)
        try:
            with monitor.request(domain=["first"], request_id=["row-first"]):
                model.generate(**kwargs, max_new_tokens=4, min_new_tokens=4)
            first = len(graphs)
            for i, n in enumerate((4, 9, 9, 4, 9, 9, 4, 9, 9)):  # more forwards than dynamo's recompile limit (8)
                # labels that differ per request: the graphs were guarded on their values too
                with monitor.request(domain=[f"domain-{i}"], request_id=[f"row-{i}"]):
                    model.generate(**kwargs, max_new_tokens=n, min_new_tokens=n)
                got, want = monitor.records[0], eager[n]
                assert got["tokens"] == want["tokens"] and got["decoded_tokens"] == want["decoded_tokens"] == n - 1
                torch.testing.assert_close(torch.tensor(got["sink_share"]), torch.tensor(want["sink_share"]),
                                           atol=1e-5, rtol=0)
                assert got["residual_peak"] == pytest.approx(want["residual_peak"], rel=1e-4)
            # a label count other than the batch's is the monitor's error, raised before the compiled forward
            # (raised inside the graph it was dynamo's "Observed exception")
            with pytest.raises(MonitorError, match="2 domain labels for a batch of 1 sequences"):
                with monitor.request(domain=["a", "b"]):
                    model.generate(**kwargs, max_new_tokens=4, min_new_tokens=4)
        finally:
            model.forward = eager_forward
    assert len(graphs) == first, f"{len(graphs) - first} graphs compiled after the first request"


#: Prompt lengths a compiled forward serves one after the other: below and above 8 tokens (the
#: accumulator's decode-sized forwards), below and above 64 (every row sampled, then every k-th)
PROMPT_LENGTHS = (5, 7, 9, 12, 20, 31, 40, 55, 64, 70, 90, 130, 200, 250)


@pytest.mark.parametrize(("layout", "policy"), [("no mask", "profile"), ("mask", "profile"),
                                                ("left padding", "profile"), ("no mask", "identity")])
def test_monitored_compiled_forward_serves_prompts_of_many_lengths(layout, policy, monkeypatch, one_thread):
    """torch.compile(model.forward, fullgraph=True) inside a monitor's requests, one prompt length after
    another. The prompt measures used to do Python arithmetic on the prompt's length (the layout
    cache's and the merge groups' dict keys, the sampled rows' parts, the workspace's size check, the
    layout cache left on the monitor after the traced forward), so dynamo fixed every graph to one
    length: on a tiny Llama the eighth new length stopped at the recompile limit (8). Now the length
    stays symbolic; the graphs a traced forward may add are bounded: prompts of at most 8 tokens
    (decode-sized), every row sampled below 64 tokens, and one per rung of the layers measured
    together (TRACED_BATCH_LADDER; the merge limit is shrunk here so that 8 layers go from all at once
    to one at a time over these lengths). The identity without a mask takes its own path to the sink
    statistics (the log-sum-exp alone), whose row count went through float() and fixed each graph to
    its length. The records equal the eager model's."""
    from sinkfix.telemetry import prompt

    config = tiny_config("llama")
    config.num_hidden_layers = 8
    torch.manual_seed(0)
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    monkeypatch.setattr(prompt, "MERGED_BLOCK_ELEMENTS", 8 * 4 * 32 * 64)  # 8 layers of a 64-token prompt
    generator = torch.Generator().manual_seed(3)
    inputs = {}
    for n in PROMPT_LENGTHS:
        ids = torch.randint(3, 97, (2, n), generator=generator)
        mask = torch.ones_like(ids)
        if layout == "left padding":
            ids[0, : n // 3], mask[0, : n // 3] = 0, 0
        inputs[n] = dict(input_ids=ids) if layout == "no mask" else dict(input_ids=ids, attention_mask=mask)
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    eager_forward = model.forward
    with sinkfix.patch(model, _policies(8, 4)[policy]), torch.no_grad():
        torch._dynamo.reset()
        model.forward = torch.compile(eager_forward, backend=counting_backend, fullgraph=True)
        for n in PROMPT_LENGTHS:
            model(**inputs[n])
        unmonitored = len(graphs)
        model.forward = eager_forward
        with sinkfix.monitor(model) as monitor:
            eager = {}
            for n in PROMPT_LENGTHS:
                with monitor.request():
                    model(**inputs[n])
                eager[n] = monitor.records
            torch._dynamo.reset()
            graphs.clear()
            model.forward = torch.compile(eager_forward, backend=counting_backend, fullgraph=True)
            try:
                for n in PROMPT_LENGTHS:
                    with monitor.request():
                        model(**inputs[n])
                    for got, want in zip(monitor.records, eager[n], strict=True):
                        assert got["tokens"] == want["tokens"] and got["hidden_sinks"] == want["hidden_sinks"], n
                        for key in ("sink_share", "dormancy"):
                            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]),
                                                       atol=1e-5, rtol=0, msg=f"{key}, {n} tokens")
                        assert got["residual_peak"] == pytest.approx(want["residual_peak"], rel=1e-4), n
            finally:
                model.forward = eager_forward
    # (measured: 2 unmonitored; monitored 4 with a mask, 6 without: its layers are measured together)
    assert unmonitored <= 2 and len(graphs) <= unmonitored + 4, (unmonitored, len(graphs))


#: (batch, prompt length) of generate requests whose batch size changes from one to the next
BATCHED_REQUESTS = ((2, 20), (1, 7), (3, 33), (2, 11), (4, 30), (1, 50), (3, 12), (5, 40))


def test_monitored_compiled_generate_serves_new_batch_sizes(one_thread):
    """generate() on torch.compile(model.forward, fullgraph=True) with batch sizes that change from
    one request to the next and a domain label per row. The first decoder layer's hook compared the
    request's label count and its accumulator's batch (an int) with the batch inside the graph, and
    the accumulator read the lengths of its lists of the prompt's tensors: every graph was fixed to
    one batch size, about two more per new size, and the fourth request (batch sizes 2, 1, 3, 2)
    stopped at dynamo's recompile limit. Now the checks run on the host before the forward, and the
    monitored model compiles about as many graphs as the unmonitored one (measured: 7 and 7 over these
    requests). The records equal the eager model's; a batch that changes inside one request is still
    refused before the compiled forward runs."""
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    requests = []
    for batch, length in BATCHED_REQUESTS:
        ids = torch.randint(3, 97, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        if batch > 1:  # left padding on the first row
            ids[0, : length // 3], mask[0, : length // 3] = 0, 0
        requests.append((dict(input_ids=ids, attention_mask=mask), [f"domain-{row % 3}" for row in range(batch)]))
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    def serve(monitor=None):
        records = []
        for inputs, labels in requests:
            with monitor.request(domain=labels) if monitor else contextlib.nullcontext():
                model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
            records.append(monitor.records if monitor else None)
        return records

    eager_forward = model.forward
    with sinkfix.patch(model, Policy(sink_scale=0.9)), torch.no_grad():
        torch._dynamo.reset()
        model.forward = torch.compile(eager_forward, backend=counting_backend, fullgraph=True)
        try:
            serve()
        finally:
            model.forward = eager_forward
        unmonitored = len(graphs)
        with sinkfix.monitor(model) as monitor:
            eager = serve(monitor)
            torch._dynamo.reset()
            graphs.clear()
            model.forward = torch.compile(eager_forward, backend=counting_backend, fullgraph=True)
            try:
                compiled = serve(monitor)
                monitored = len(graphs)
                torch._dynamo.reset()  # plain forwards: graphs of their own, not counted
                with pytest.raises(MonitorError, match="the batch changed from 2 to 1 sequences"):
                    with monitor.request():
                        model(**requests[0][0])
                        model(**requests[1][0])
            finally:
                model.forward = eager_forward
    for got_request, want_request in zip(compiled, eager, strict=True):
        for got, want in zip(got_request, want_request, strict=True):
            assert (got["domain"], got["tokens"], got["hidden_sinks"]) == (want["domain"], want["tokens"],
                                                                          want["hidden_sinks"])
            for key in ("sink_share", "dormancy"):
                torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), atol=1e-5, rtol=0)
            assert got["residual_peak"] == pytest.approx(want["residual_peak"], rel=1e-4)
    assert monitored <= unmonitored + 1, (unmonitored, monitored)


def test_monitored_whole_module_compile_serves_new_batch_sizes_and_refuses_wrong_labels(one_thread):
    """torch.compile(model): dynamo traces the model's own hooks too, so the monitor's checks cannot run
    before the forward. Batch sizes 1 to 6 with per-row labels still compile few graphs (measured 4
    over these 10 requests; 10 before the checks left the traced path), and a label count other than
    the batch's is refused when the request ends (it was dynamo's "BUILD_STRING" error), leaving no
    record, not the previous request's."""
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    with sinkfix.patch(model, Policy(sink_scale=0.9)), sinkfix.monitor(model) as monitor, torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
        for batch, length in ((2, 20), (1, 7), (3, 33), (2, 11), (4, 30), (1, 50), (3, 12), (5, 40), (6, 70), (2, 90)):
            with monitor.request(domain=[f"domain-{row}" for row in range(batch)]):
                compiled(input_ids=torch.randint(3, 97, (batch, length), generator=generator))
            assert [record["domain"] for record in monitor.records] == [f"domain-{row}" for row in range(batch)]
        assert len(graphs) <= 5, len(graphs)
        with pytest.raises(MonitorError, match="3 domain labels for a batch of 2 sequences"):
            with monitor.request(domain=["a", "b", "c"]):
                compiled(input_ids=torch.randint(3, 97, (2, 9), generator=generator))
        assert monitor.records == []
        # one sequence in a request of two: broadcast into both rows it went unnoticed; refused at the end
        with pytest.raises(MonitorError, match="the batch changed from 2 sequences within one request"):
            with monitor.request():
                compiled(input_ids=torch.randint(3, 97, (2, 20), generator=generator))
                compiled(input_ids=torch.randint(3, 97, (1, 7), generator=generator))
        assert monitor.records == []


def test_a_tripping_guard_serves_the_identity_from_the_compiled_graphs(one_thread):
    """A guard's fallback on torch.compile(model.forward, fullgraph=True): the layers it switches off
    keep their code, and their values on the device become the identity's (sink scale 1, virtual
    sink logit -inf). Swapping in identity policies was other code in the graph: every set of layers
    switched off compiled graphs of its own (an 8-layer model whose 12 forwards tripped 6 different
    sets reached dynamo's limit of 8). Now the monitored model compiles no more graphs than the
    unmonitored one, each tripped forward's logits equal the identity model's, and the correction is
    back, with its own values, for the next request."""
    from sinkfix.profile import ModelIdentity, Profile, ProfileStatistics
    from sinkfix.telemetry import Guard, calibration_statistics

    config = tiny_config("llama")
    config.num_hidden_layers = 8
    torch.manual_seed(0)
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(0)
    profile = Profile(ModelIdentity.of(model), 0.5 + 0.4 * torch.rand(8, 4, generator=generator, dtype=torch.float64),
                      torch.randn(8, 4, generator=generator, dtype=torch.float64) - 2)

    def ids(length: int, seed: int) -> torch.Tensor:
        return torch.randint(2, 97, (1, length), generator=torch.Generator().manual_seed(seed))

    with sinkfix.patch(model, profile):
        stats = calibration_statistics(model, [ids(96, seed)[0] for seed in range(6)], min_rows=16)
    # ranges narrowed more in later layers, so that prompts of other lengths trip different sets of layers
    narrow = torch.linspace(0.0, 0.45, 8, dtype=torch.float64)[:, None] * (stats.high - stats.low)
    profile = profile.with_statistics(ProfileStatistics(stats.low + narrow, stats.high - narrow, stats.windows,
                                                        stats.min_rows))
    prompts = [ids(length, 100 + i) for i, length in enumerate((40, 96, 70, 64, 55, 80, 90, 50, 100, 33, 60, 75))]
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    with torch.no_grad():
        with sinkfix.patch(model):
            identity = [model(input_ids=prompt).logits for prompt in prompts]
        with sinkfix.patch(model, profile):
            corrected = [model(input_ids=prompt).logits for prompt in prompts]
            eager_forward = model.forward
            torch._dynamo.reset()
            model.forward = torch.compile(eager_forward, backend=counting_backend, fullgraph=True)
            try:
                for prompt in prompts:
                    model(input_ids=prompt)
                unmonitored = len(graphs)
                torch._dynamo.reset()
                graphs.clear()
                tripped_sets, restored_after_trip, previous_tripped = set(), 0, False
                with sinkfix.monitor(model, guard=Guard.from_profile(profile, margin=0.0)) as monitor:
                    for prompt, want_identity, want_corrected in zip(prompts, identity, corrected):
                        logits = monitor.forward(input_ids=prompt).logits
                        guard = monitor.records[0]["guard"]
                        if guard["tripped"]:
                            tripped_sets.add(tuple(guard["layers"]))
                            assert monitor.records[0]["correction"]["identity_layers"] == guard["layers"]
                            switched = guard["layers"]
                            assert monitor.records[0]["sink_share"][switched[0]] == \
                                monitor.records[0]["sink_share_unscaled"][switched[0]]
                            if len(switched) == 8:  # every layer off: the identity model
                                torch.testing.assert_close(logits, want_identity, atol=1e-5, rtol=0)
                        else:  # after a tripped request: the correction's own values are back
                            torch.testing.assert_close(logits, want_corrected, atol=1e-5, rtol=0)
                            restored_after_trip += previous_tripped
                        previous_tripped = guard["tripped"]
                monitored = len(graphs)
                torch.testing.assert_close(model(input_ids=prompts[0]).logits, corrected[0], atol=1e-5, rtol=0)
            finally:
                model.forward = eager_forward
    assert len(tripped_sets) >= 4 and restored_after_trip >= 1, (tripped_sets, restored_after_trip)
    assert monitored <= unmonitored, (unmonitored, monitored)


def test_compiled_before_patching_follows_the_patch(one_thread):
    """A model compiled first and patched (or unpatched) later never runs stale code: the compiled
    callable re-traces when the patch state changes. Patching the compiled wrapper works too."""
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    # the traced patched graph may round differently from the eager call (torch 2.11, one thread:
    # 3e-8 apart; bitwise equal with 2.13); stale code would be off by the patch's whole effect (0.3)
    same = functools.partial(torch.testing.assert_close, atol=1e-6, rtol=0)
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        assert torch.equal(compiled(input_ids=ids).logits, stock)
        with sinkfix.patch(model, Policy(sink_scale=0.3)):
            patched = model(input_ids=ids).logits
            same(compiled(input_ids=ids).logits, patched)
        assert torch.equal(compiled(input_ids=ids).logits, stock)
        with sinkfix.patch(compiled, Policy(sink_scale=0.3)):
            same(compiled(input_ids=ids).logits, patched)
            assert torch.equal(model(input_ids=ids).logits, patched)
        assert torch.equal(compiled(input_ids=ids).logits, stock)
    assert (patched - stock).abs().max() > 1e-2


def test_output_attentions_under_compile(one_thread):
    """The probabilities path compiles into one graph too. transformers installs its
    output-capturing hooks on the first call that asks for attentions, under a lock dynamo cannot
    trace (the stock model fails the same way), so one eager call comes first."""
    model = tiny_model("llama")
    model.set_attn_implementation("eager")  # the stock model's probabilities, for the check below
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        stock_share = model(input_ids=ids, output_attentions=True).attentions[0][0, :, 1:, 0]
    with torch.no_grad(), sinkfix.patch(model, Policy(sink_scale=0.3)):
        eager = model(input_ids=ids, output_attentions=True)
        explained = torch._dynamo.explain(model)(input_ids=ids, output_attentions=True)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids, output_attentions=True)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    for got, want in zip(compiled.attentions, eager.attentions):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(eager.attentions[0][0, :, 1:, 0], 0.3 * stock_share)  # beta x the stock sink mass


@pytest.mark.slow
def test_gpu_model_check_dry_run(tmp_path):
    """The GPU script's code path on the CPU with a 2-layer model (eager, telemetry on/off and the decode-step profile; not
    compiled: a CPU compile of it takes minutes): it must build, patch, monitor, time and write its
    tables, and refuse a mode it does not know before building anything."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_model_check.py"
    done = subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--modes", "eager,monitored,profile",
                           "--prompt", "32", "--new-tokens", "4", "--monitor-new-tokens", "4", "--rounds", "1",
                           "--profile-steps", "4", "--out", str(tmp_path / "model.md")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "model.md").read_text()
    assert "| eager | per-head profile |" in table and "| eager | stock |" in table
    assert "Telemetry (sinkfix.monitor, eager)" in table
    monitored = json.loads((tmp_path / "model.json").read_text())["modes"]["monitored"]
    assert set(monitored) == {"identity", "per-head profile"}  # the stock model is not monitored
    for row in monitored.values():
        for config in ("off", "on"):
            assert row[config]["prefill_s"] > 0 and row[config]["decode_step_s"] > 0
        assert row["prefill_ratio"] == row["on"]["prefill_s"] / row["off"]["prefill_s"]
        assert f"| {row['prefill_ratio']:.3f} |" in table
    # the decode-step profile: every variant profiled, the patched ones set against stock
    profile = json.loads((tmp_path / "model.json").read_text())["modes"]["profile"]
    assert set(profile) == {"stock", "identity", "identity + monitor", "per-head profile"}
    assert "Decode step profile" in table and "per-head profile: own time per step added against stock" in table
    for row in profile.values():
        assert row["step_ms"] > 0 and row["python_calls_per_step"] > 0 and row["launches_per_step"] == 0  # no CUDA
    # the per-head policy's combine (sigmoid, lerp, ...) issues torch operations the stock step does not
    assert profile["per-head profile"]["aten_ops_per_step"] > profile["stock"]["aten_ops_per_step"]
    assert "aten::sigmoid" in profile["per-head profile"]["added_aten_ops"]
    # inside a monitor's requests the step runs the monitor's per-layer residual statistics
    assert profile["identity + monitor"]["aten_ops_per_step"] > profile["identity"]["aten_ops_per_step"]

    wrong = subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--modes", "eager,monitor"],
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "unknown mode(s) monitor" in wrong.stderr


def test_residual_clip_with_one_number_compiles(one_thread):
    # one number is a documented threshold: it ran eagerly and failed under torch.compile (the custom
    # op's schema takes a tensor); a bad number still gets the eager error
    from sinkfix.ops.residual import residual_clip

    hidden = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) * 3
    eager = residual_clip(hidden, 2.0)
    compiled = torch.compile(lambda h: residual_clip(h, 2.0), backend="eager", fullgraph=True)(hidden)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert float(compiled.norm(dim=-1).max()) <= 2.0 + 1e-5
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        torch.compile(lambda h: residual_clip(h, -1.0), backend="eager")(hidden)
