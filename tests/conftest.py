"""Shared fixtures: tiny random-weight models of every architecture sinkfix claims to support."""

from __future__ import annotations

import importlib.util
import os
import types
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf

warnings.filterwarnings("ignore", message=".*does not support `output_attentions`.*")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str, module_name: str | None = None) -> types.ModuleType:
    """benchmarks/NAME.py loaded as a fresh module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(module_name or f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256)


def triton_kernels_unusable() -> str | None:
    """Why the Triton kernels cannot run here, or None: triton missing, or what
    sinkfix.kernels.triton_unusable_reason says, judged for the interpreter wherever the tests run
    the kernels through it (TRITON_INTERPRET=1 or no GPU: the knob may not be set yet at collection)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from sinkfix import kernels

    interpreted = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
    return kernels.triton_unusable_reason(interpreted=interpreted)


def require_triton_kernels() -> None:
    """Skip (the calling module, at module level) unless the Triton kernels can run here
    (:func:`triton_kernels_unusable`): otherwise every kernel call is refused by design, and a test of
    the kernels' numbers would fail instead of saying why."""
    unusable = triton_kernels_unusable()
    if unusable is not None:
        pytest.skip(unusable, allow_module_level=True)


def tiny_config(arch: str):
    """A 2-layer random config; sliding windows are 5 tokens so short tests cross them."""
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **_COMMON)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=5, **_COMMON)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **_COMMON)
    if arch == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=16, **_COMMON)
    if arch == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=5, attn_logit_softcapping=5.0,
                               **_COMMON)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(num_key_value_heads=1, head_dim=16, sliding_window=5,
                                   layer_types=["sliding_attention", "full_attention"], **_COMMON)
    if arch == "olmo2":
        return tf.Olmo2Config(num_key_value_heads=2, **_COMMON)
    if arch == "phi3":
        return tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **_COMMON)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    if arch == "gptoss":
        return tf.GptOssConfig(num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                               sliding_window=5, layer_types=["sliding_attention", "full_attention"], **_COMMON)
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2", "phi3", "gpt2", "gptoss")


def tiny_model(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def text_file(tmp_path):
    """A short English text file (about 150 tokens of the tiny models' character tokenizer) for the
    commands that read --text."""
    path = tmp_path / "text.txt"
    path.write_text("The attention sink of a language model is usually its first token. " * 12)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine run ~20x faster on one thread than on two contended ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class CharTokenizer:
    """Enough of a tokenizer for inspect / calibrate and their CLIs: one id per character, BOS = 1."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return types.SimpleNamespace(input_ids=torch.tensor([[2 + ord(c) % 90 for c in text]]))

    def decode(self, ids):
        return "".join(chr(32 + int(i) % 90) for i in ids)


def text_args(folder, texts: dict[str, str]) -> list[str]:
    """Each text written to ``folder/<name>.txt``, as the CLI's ``--text FILE`` arguments."""
    args = []
    for name, text in texts.items():
        (folder / f"{name}.txt").write_text(text)
        args += ["--text", str(folder / f"{name}.txt")]
    return args


@pytest.fixture
def loaded_tiny(monkeypatch):
    """``sinkfix.load_model`` hands out a tiny Llama (seed 3) and a :class:`CharTokenizer`, whatever
    the name: the CLIs run end to end in seconds. Returns the model."""
    import sinkfix

    model = tiny_model("llama", seed=3)
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (model, CharTokenizer()))
    return model


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M from its offline package, loaded once per session (~15 s) for every slow test
    that reads it; tests that patch it do so in ``with`` blocks, so it is always left stock."""
    import sinkfix

    pytest.importorskip("gguf")
    try:
        return sinkfix.load_model("smollm2-135m")
    except sinkfix.ModelLoadError as exc:
        pytest.skip(f"offline model package missing: {exc}")


@pytest.fixture(scope="module")
def gemma3():
    """Gemma3-270M from its offline package, once per test module (it is larger than SmolLM2 and
    only a few modules read it)."""
    import sinkfix

    pytest.importorskip("gguf")
    try:
        return sinkfix.load_model("gemma3-270m")
    except sinkfix.ModelLoadError as exc:
        pytest.skip(f"offline model package missing: {exc}")


@pytest.fixture
def no_model(monkeypatch):
    """A model load fails the test: a command's bad input must be refused before it."""
    import sinkfix

    def refuse(name=None, *args, **kwargs):
        raise AssertionError(f"the model {name} was loaded before the bad input was refused")

    monkeypatch.setattr(sinkfix, "load_model", refuse)


@pytest.fixture
def load_reached(monkeypatch):
    """The model load ends an accepted command with a one-line error: the command got that far."""
    import sinkfix
    from sinkfix.errors import ModelLoadError

    def stop(*args, **kwargs):
        raise ModelLoadError("reached the model load")

    monkeypatch.setattr(sinkfix, "load_model", stop)
