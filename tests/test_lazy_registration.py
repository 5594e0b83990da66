"""``import sinkfix`` registers "sinkfix" with transformers without importing transformers' model
code, and the CLI imports only the command it runs. Import-order behaviour needs a fresh
interpreter, so these run in subprocesses."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest

from sinkfix.integrations.after_import import call_after_import, waiting_modules


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_sinkfix_defers_registration_until_transformers_defines_its_registries(tmp_path):
    out = _python(f"""
        import sys
        import sinkfix
        print("after import sinkfix:", "transformers.modeling_utils" in sys.modules, "transformers.masking_utils" in sys.modules)
        import torch, transformers
        from sinkfix.integrations.attention import attention_forward
        from sinkfix.integrations.masks import padded_causal_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        print("registered:", ALL_ATTENTION_FUNCTIONS["sinkfix"] is attention_forward,
              ALL_MASK_ATTENTION_FUNCTIONS["sinkfix"] is padded_causal_mask)
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained({str(tmp_path)!r})
        stock = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, attn_implementation="sdpa").eval()
        ours = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, attn_implementation="sinkfix").eval()
        ids = torch.randint(0, 64, (2, 9))
        mask = torch.ones_like(ids); mask[1, :3] = 0
        with torch.no_grad():
            diff = (stock(ids, attention_mask=mask).logits - ours(ids, attention_mask=mask).logits)[mask.bool()].abs().max()
        print("implementation:", ours.config._attn_implementation, float(diff))
    """)
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    assert lines["after import sinkfix"].split() == ["False", "False"]  # nothing of transformers' model code
    assert lines["registered"].split() == ["True", "True"]  # both registries, the real functions
    implementation, diff = lines["implementation"].split()
    assert implementation == "sinkfix" and float(diff) < 1e-5  # identity until patched, padding honoured


def test_import_sinkfix_after_transformers_registers_at_once():
    out = _python("""
        import transformers.masking_utils, transformers.modeling_utils
        import sinkfix
        from sinkfix.integrations.after_import import waiting_modules
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        print("sinkfix" in ALL_ATTENTION_FUNCTIONS, "sinkfix" in ALL_MASK_ATTENTION_FUNCTIONS, waiting_modules())
    """)
    assert out.split() == ["True", "True", "()"]


def test_cli_help_lists_every_command_and_imports_none_of_them():
    out = _python("""
        import contextlib, io, sys
        from sinkfix import cli
        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
            cli.main(["--help"])
        print(sorted(m for m in sys.modules if m.startswith("sinkfix.commands.")))
        print("transformers.modeling_utils" in sys.modules)
        print(text.getvalue())
    """)
    imported, modeling_utils, help_text = out.split("\n", 2)
    assert imported == "[]" and modeling_utils == "False"
    from sinkfix.commands import SUMMARIES

    for name, summary in SUMMARIES.items():
        assert name in help_text and summary[:40] in " ".join(help_text.split())


def test_cli_builds_only_the_command_it_runs():
    out = _python("""
        import contextlib, io, sys
        from sinkfix import cli
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            cli.main(["stream", "--help"])
        print(sorted(m for m in sys.modules if m.startswith("sinkfix.commands.")))
    """)
    assert out.strip() == "['sinkfix.commands.stream']"


@pytest.mark.parametrize("command", ["kvquant", "stream", "bench", "calibrate"])
def test_command_help_imports_no_transformers(command):
    # kvquant's options name the cache backends; the cache package resolves its names on first use,
    # so reading them does not import transformers' cache classes (kvquant --help was 6-7 s with them)
    out = _python(f"""
        import contextlib, io, sys
        from sinkfix import cli
        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
            cli.main([{command!r}, "--help"])
        print(sorted(m for m in sys.modules if m == "transformers" or m.startswith("transformers.")))
        print("--model" in text.getvalue())
    """)
    assert out.split("\n")[:2] == ["[]", "True"]


def test_cache_package_names_resolve_to_the_same_objects_in_any_import_order():
    # the function feed() lives in sinkfix.caches.chunked: a submodule named like it would replace
    # the package attribute the moment it was imported
    out = _python("""
        from sinkfix.caches.chunked import cache_keyword
        import sinkfix.caches as caches
        from sinkfix.caches import feed, SinkCache, BACKENDS
        from sinkfix.caches.cache import SinkCache as direct
        print(callable(feed) and feed.__module__ == "sinkfix.caches.chunked", SinkCache is direct,
              BACKENDS == ("quanto", "hqq", "fp8"), set(caches.__all__) <= set(dir(caches)))
        try:
            caches.not_a_name
        except AttributeError as error:
            print("not_a_name" in str(error))
    """)
    assert out.split() == ["True"] * 5


def test_full_parser_holds_every_command():
    from sinkfix import cli
    from sinkfix.commands import SUMMARIES

    parser = cli.build_parser()
    for name in SUMMARIES:
        assert callable(getattr(parser.parse_args([name] + (["report", "x.jsonl"] if name == "monitor" else [])),
                                "run", None)), name


# -- the import hook itself, on a module of our own ------------------------------------------------
@pytest.fixture
def hook_state(monkeypatch):
    """The hook's waiting list and sys.meta_path as they were before the test, afterwards."""
    from sinkfix.integrations import after_import

    monkeypatch.setattr(after_import, "_waiting", {})
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))


def _module(tmp_path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_function_runs_once_right_after_the_module_code(tmp_path, monkeypatch, hook_state):
    _module(tmp_path, monkeypatch, "sinkfix_after_import_probe", "VALUE = 41\ndef get():\n    return VALUE\n")
    seen = []
    call_after_import("sinkfix_after_import_probe", lambda m: seen.append(m.VALUE))
    assert seen == [] and "sinkfix_after_import_probe" in waiting_modules()
    import importlib

    module = importlib.import_module("sinkfix_after_import_probe")
    assert seen == [41] and "sinkfix_after_import_probe" not in waiting_modules()
    import inspect

    assert "return VALUE" in inspect.getsource(module.get)  # the wrapped loader still serves the source
    importlib.import_module("sinkfix_after_import_probe")
    assert seen == [41]  # not again
    call_after_import("sinkfix_after_import_probe", lambda m: seen.append(m.VALUE + 1))
    assert seen == [41, 42]  # already imported: at once


def test_failing_function_warns_and_the_import_still_succeeds(tmp_path, monkeypatch, hook_state):
    _module(tmp_path, monkeypatch, "sinkfix_after_import_broken", "VALUE = 1\n")

    def broken(module):
        raise KeyError("no registry here")

    call_after_import("sinkfix_after_import_broken", broken)
    import importlib

    with pytest.warns(RuntimeWarning, match="no registry here"):
        module = importlib.import_module("sinkfix_after_import_broken")
    assert module.VALUE == 1


def test_module_that_does_not_exist_still_raises_module_not_found(hook_state):
    call_after_import("sinkfix_after_import_missing_module", lambda m: None)
    with pytest.raises(ModuleNotFoundError), warnings.catch_warnings():
        warnings.simplefilter("error")
        import sinkfix_after_import_missing_module  # noqa: F401
    assert "sinkfix_after_import_missing_module" in waiting_modules()
