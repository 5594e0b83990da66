"""patch() at the edges of how models are used: while another thread serves, on a module inside a
patched model (or around one), on models whose forward drops ``output_attentions``, in training
mode, pickled, and with attention settings kept per sub-config."""

from __future__ import annotations

import io
import pickle
import threading
import time

import pytest
import torch
import transformers as tf

import sinkfix
from sinkfix import ContentSinks, Policy, PolicyError, ResidualClip
from sinkfix.errors import UsageError

from .conftest import tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 9, 2, 7, 3, 11, 4, 8]])


def _serving(model, stop: threading.Event, errors: list) -> threading.Thread:
    def serve():
        ids = torch.randint(3, 90, (1, 24), generator=torch.Generator().manual_seed(0))
        while not stop.is_set():
            try:
                with torch.no_grad():
                    model(input_ids=ids)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                errors.append(repr(exc))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_patch_numbers_layers_from_its_own_forward_while_another_thread_serves_the_model():
    """The dummy forward that finds the attention modules recorded every thread's attention calls:
    a model serving requests in another thread while it was patched again got its layers numbered
    in the order of both threads' calls (11 of 40 re-patches put policy layer 1 on layers.5)."""
    config = tiny_config("llama")
    config.num_hidden_layers = 6
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    sinkfix.patch(model, Policy(sink_scale=0.5))
    stop, errors = threading.Event(), []
    thread = _serving(model, stop, errors)
    try:
        time.sleep(0.2)
        expected = [f"model.layers.{k}.self_attn" for k in range(6)]
        for _ in range(25):
            handle = sinkfix.patch(model, Policy(sink_scale=0.2, layers=(0,)))
            assert [name for name, _ in handle.layer_modules] == expected
    finally:
        stop.set()
        thread.join()
    assert errors == []


def test_patch_ignores_another_models_calls_made_meanwhile_in_another_thread():
    """Another model's attention calls, made in another thread during the dummy forward, ended as a
    bare KeyError (a module of the other model looked up among this one's)."""
    serving = tiny_model("llama", seed=1)
    sinkfix.patch(serving, Policy(sink_scale=0.5))
    stop, errors = threading.Event(), []
    thread = _serving(serving, stop, errors)
    try:
        time.sleep(0.2)
        for _ in range(20):
            handle = sinkfix.patch(tiny_model("llama", seed=2), Policy(sink_scale=0.5))
            assert handle.num_layers == 2
            handle.remove()
    finally:
        stop.set()
        thread.join()
    assert errors == []


@pytest.mark.parametrize("outer_first", [True, False])
def test_a_module_inside_or_around_a_patched_model_is_refused(outer_first):
    """patch(model.model) and patch(model) shared the layers and the config: removing either one took
    the other off silently while its handle still said active."""
    model = tiny_model("llama")
    stock = model(IDS).logits.detach()
    first, second = (model, model.model) if outer_first else (model.model, model)
    handle = sinkfix.patch(first, Policy(sink_scale=0.3))
    patched = model(IDS).logits.detach()
    with pytest.raises(UsageError, match="already patched through another module"):
        sinkfix.patch(second, Policy(sink_scale=0.9))
    assert handle.active and sinkfix.PatchHandle.of(first) is handle
    torch.testing.assert_close(model(IDS).logits.detach(), patched, rtol=0, atol=0)  # the first patch untouched
    handle.remove()
    torch.testing.assert_close(model(IDS).logits.detach(), stock, rtol=0, atol=0)
    sinkfix.patch(second, Policy(sink_scale=0.9)).remove()  # allowed once the other patch is gone


def test_gpt2_returns_the_attention_probabilities_its_forward_does_not_pass_down():
    """GPT-2's forward takes output_attentions out of its arguments and collects the probabilities
    from the attention modules' outputs: the patched model returned none (the stock eager one 2)."""
    model = tiny_model("gpt2")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        stock = model(IDS, output_attentions=True).attentions
        with sinkfix.patch(model):
            identity = model(IDS, output_attentions=True).attentions
        with sinkfix.patch(model, Policy(sink_scale=0.0)):
            dropped = model(IDS, output_attentions=True).attentions
            plain = model(IDS).attentions
    assert len(stock) == len(identity) == len(dropped) == 2
    for expected, got in zip(stock, identity):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.all(dropped[0][..., 1:, 0] == 0)  # the sink's column after beta = 0 (row 0 sees only the sink)
    assert not plain


def test_patch_in_training_mode_says_to_call_eval():
    model = tiny_model("gpt2").train()
    with pytest.raises(UsageError, match=r"training mode.*model\.eval\(\) before patch"):
        sinkfix.patch(model)
    assert model.config._attn_implementation != "sinkfix"


@pytest.mark.parametrize("policy", [Policy(sink_scale=0.5), Policy(sink_scale=0.5, residual_clip=ResidualClip(4.0)),
                                    Policy(content_sinks=ContentSinks(threshold=0.1, hidden_sink_scale=0.5))],
                         ids=["beta", "clip", "content"])
def test_pickling_a_patched_model_is_refused_with_what_to_do(policy):
    """torch.save(model) of a patched model failed with "cannot pickle 'weakref.ReferenceType'
    object" (or "Can't pickle local object" for a clip hook); the same model unpatched pickles."""
    model = tiny_model("llama")
    handle = sinkfix.patch(model, policy)
    for dump in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(UsageError, match=r"cannot be pickled: call remove\(\)"):
            dump(model)
    assert handle.active
    handle.remove()
    assert pickle.loads(pickle.dumps(model)) is not None


def test_a_refused_torch_save_says_that_its_file_is_already_emptied(tmp_path):
    """torch.save opens (truncates) its file before pickling: a checkpoint at that path was lost to a
    refused save of a patched model, and the refusal did not say so. pickle.dumps says nothing of it."""
    model = tiny_model("llama")
    path = tmp_path / "checkpoint.pt"
    torch.save({"weights": torch.ones(3)}, path)
    with sinkfix.patch(model, Policy(sink_scale=0.5)):
        with pytest.raises(UsageError, match=r"cannot be pickled.*torch.save opened its file before pickling: "
                                              "whatever that file held is gone"):
            torch.save(model, path)
        with pytest.raises(UsageError, match=r"cannot be pickled") as refused:
            pickle.dumps(model)
        assert "torch.save" not in str(refused.value).split("works on a patched model")[1]


def test_remove_puts_back_each_sub_configs_own_attention():
    """remove() set one value on every sub-config: a vision tower loaded with eager attention came
    back as sdpa."""
    text = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=16, patch_size=8)
    config = tf.LlavaConfig(text_config=text, vision_config=vision, image_token_id=96, projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration._from_config(
        config, attn_implementation={"text_config": "sdpa", "vision_config": "eager", "": "sdpa"}).eval()

    def settings():
        return (model.config._attn_implementation, model.config.text_config._attn_implementation,
                model.config.vision_config._attn_implementation)

    before = settings()
    assert before == ("sdpa", "sdpa", "eager")
    sinkfix.patch(model, Policy(sink_scale=0.5)).remove()
    assert settings() == before
    with sinkfix.patch(model, Policy(sink_scale=0.5)):
        with sinkfix.patch(model, Policy(sink_scale=0.9)):  # a replacing patch keeps the first one's record
            pass
    assert settings() == before


@pytest.mark.parametrize("make", [lambda: ResidualClip(True), lambda: ResidualClip(float("nan")),
                                  lambda: ResidualClip(-2.0), lambda: ResidualClip(0.5),
                                  lambda: ResidualClip([4.0, True]), lambda: ResidualClip([[4.0, 5.0]]),
                                  lambda: ResidualClip(4.0, mode="median"),
                                  lambda: ResidualClip(4.0, sink_norm=float("nan")),
                                  lambda: Policy.parse("clip=nan"), lambda: Policy.parse("clip=0.5")],
                         ids=["bool", "nan", "negative", "below-1", "bool-in-list", "2-d", "mode", "sink-nan",
                              "spec-nan", "spec-below-1"])
def test_residual_clip_values_are_checked_where_they_are_written(make):
    """Bad clip values passed Policy(...) and Policy.parse and failed only at patch(), after a model
    had loaded (``sinkfix bench --policy clip=nan``); ResidualClip(True) was a relative threshold of 1."""
    with pytest.raises(PolicyError, match="residual_clip"):
        make()


def test_an_encoder_decoder_model_is_refused_and_left_as_it_was():
    """BART routes its attention through the interface, so patch() took it and the policy acted on
    the encoder's bidirectional attention and on cross-attention (the encoder's first token as the
    'sink'), a use nothing here was measured for."""
    config = tf.BartConfig(vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.BartForConditionalGeneration(config).eval()
    before = model.config._attn_implementation
    with pytest.raises(sinkfix.UnsupportedModelError, match="encoder-decoder"):
        sinkfix.patch(model, Policy(sink_scale=0.5))
    assert model.config._attn_implementation == before and sinkfix.PatchHandle.of(model) is None


def test_two_threads_patching_their_own_models_at_once():
    """The discovery's record is one per process: two threads patching two models at the same moment
    overwrote each other's (8 of 60 patch() calls failed with a bare TypeError). One at a time now."""
    models = [tiny_model("llama", seed=seed) for seed in (1, 2)]
    barrier, failures, layers = threading.Barrier(2), [], []

    def worker(model):
        for _ in range(15):
            barrier.wait()
            try:
                handle = sinkfix.patch(model, Policy(sink_scale=0.5))
                layers.append(handle.num_layers)
                handle.remove()
            except Exception as exc:  # noqa: BLE001 - reported by the test
                failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(model,)) for model in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and layers == [2] * 30
