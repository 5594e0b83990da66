"""lm-eval integration: the ``sinkfix`` model type, the built-in tasks, task errors, and ``sinkfix eval``.

Fast tests use a 2-layer random Llama with a small byte-level BPE tokenizer trained here on the
built-in prose, saved as a local model folder; the real-model checks are in the ``slow`` section.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import transformers as tf
from lm_eval.api.instance import Instance

import sinkfix
from sinkfix.cli import main
from sinkfix.errors import EvaluationError, PolicyError, ProfileError, UsageError
from sinkfix.evaluate import make_windows, windows_nll
from sinkfix.lmeval import builtin
from sinkfix.lmeval.config import Correction, EvalConfig
from sinkfix.lmeval.model import SinkfixLM
from sinkfix.lmeval.paired import compare_runs, evaluate_once, run_eval
from sinkfix.lmeval.taskload import load_tasks
from sinkfix.texts import domain_text


# -- fixtures -----------------------------------------------------------------------------------
def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([domain_text("pydoc")[:60_000], domain_text("python")[:20_000]], trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A local model folder: 2-layer random Llama (max 512 positions) + the tiny tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_lm(tiny_folder, one_thread):
    return SinkfixLM(pretrained=str(tiny_folder), device="cpu")


@pytest.fixture(scope="module")
def builtin_tasks():
    return load_tasks(list(builtin.BUILTIN_TASKS))


def _samples(results, task):
    return {s["doc_id"]: s for s in results["samples"][task]}


def _scores(results, task):
    """Every log-likelihood lm-eval got from the model for ``task``, item by item."""
    return {doc: s["resps"] for doc, s in _samples(results, task).items()}


# -- model arguments and corrections -----------------------------------------------------------------
def test_policy_keys_given_as_model_arguments_join_the_policy(tiny_folder, one_thread):
    """lm-eval splits model_args at every comma: the spec's other keys arrive as arguments of their own."""
    from lm_eval.utils import simple_parse_args_string

    args = simple_parse_args_string(f"pretrained={tiny_folder},policy=sink_scale=0.9,n_sink=2,layers=0:1,"
                                    "virtual_logit_on_sink_rows=false,virtual_sink_logit=0,device=cpu")
    lm = SinkfixLM(**args)
    assert lm.correction.source == ("sink_scale=0.9,virtual_sink_logit=0,virtual_logit_on_sink_rows=false,n_sink=2,"
                                    "layers=0:1")
    assert lm.correction.value == sinkfix.Policy(sink_scale=0.9, virtual_sink_logit=0.0, n_sink=2, layers=(0, 1))
    assert sinkfix.PatchHandle.of(lm.model).policy == lm.correction.value
    lm.apply(None)
    assert sinkfix.PatchHandle.of(lm.model) is None
    with pytest.raises(UsageError, match="next to a Policy object"):
        SinkfixLM(pretrained=str(tiny_folder), policy=sinkfix.Policy(), n_sink=2)


def test_dtype_is_checked_and_a_loaded_model_is_never_cast(tiny_folder, one_thread, monkeypatch):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_folder)
    with pytest.raises(UsageError, match=r"dtype bfloat16 asked for, but the loaded model is float32: cast it first"):
        SinkfixLM(pretrained=model, tokenizer=tokenizer, dtype="bfloat16")
    for bad in ("nonsense", "float8"):
        with pytest.raises(UsageError, match="unknown dtype"):
            SinkfixLM(pretrained=model, tokenizer=tokenizer, dtype=bad)
    assert model.dtype == torch.float32
    for same in (None, "float32", torch.float32, "auto"):
        assert SinkfixLM(pretrained=model, tokenizer=tokenizer, dtype=same).model.dtype == torch.float32
    half = tf.AutoModelForCausalLM.from_pretrained(tiny_folder).eval().to(torch.bfloat16)
    assert SinkfixLM(pretrained=half, tokenizer=tokenizer).model.dtype == torch.bfloat16  # no dtype: as it is

    import sinkfix.lmeval.model as model_module

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad dtype was refused")

    monkeypatch.setattr(model_module, "load_model", load_model)
    with pytest.raises(UsageError, match="unknown dtype 'nonsense'"):
        SinkfixLM(pretrained=str(tiny_folder), dtype="nonsense")


def test_max_length_beyond_the_model_is_refused(tiny_folder, one_thread):
    with pytest.raises(UsageError, match=r"max_length 513 is larger than .* \(max_position_embeddings = 512\)"):
        SinkfixLM(pretrained=str(tiny_folder), device="cpu", max_length=513)
    assert SinkfixLM(pretrained=str(tiny_folder), device="cpu", max_length=512).max_length == 512


def test_correction_from_arguments(tmp_path):
    assert Correction.from_args() is None
    assert Correction.from_args("sink_scale=0.9").value == sinkfix.Policy(sink_scale=0.9)
    with pytest.raises(UsageError, match="not both"):
        Correction.from_args("identity", "p.json")
    with pytest.raises(PolicyError):
        Correction.from_args("sink_scale=2")
    with pytest.raises(ProfileError, match="not found"):
        Correction.from_args(profile=str(tmp_path / "missing.json"))


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("sinkfix") is SinkfixLM


def test_lm_eval_api_by_name(tiny_folder, one_thread):
    """lm-eval's own entry point builds the model type from a model_args string."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="sinkfix", model_args=f"pretrained={tiny_folder},policy=sink_scale=0.5,n_sink=2,device=cpu",
        tasks=["sinkfix_cloze"], task_manager=TaskManager(include_path=str(builtin.TASKS_DIR), include_defaults=False),
        limit=2, bootstrap_iters=0)
    assert results["config"]["sinkfix_correction"]["source"] == "sink_scale=0.5,n_sink=2"
    assert results["results"]["sinkfix_cloze"]["acc,none"] in (0.0, 0.5, 1.0)


@pytest.mark.parametrize("include", [[], ["--include_path", "{folder}"], ["--include_path={folder}"]])
def test_lm_eval_command_line_wrapper(monkeypatch, tmp_path, include):
    """python -m sinkfix.lmeval hands lm-eval's CLI its arguments as given, and every task manager it
    builds sees the built-in tasks next to the user's include path (in either spelling)."""
    import lm_eval.__main__ as lm_eval_main
    import lm_eval.tasks
    from lm_eval._cli import HarnessCLI

    from sinkfix.lmeval.__main__ import main as wrapper

    builtin.export_tasks(tmp_path)  # a folder of tasks of the user's own: sinkfix_*_jsonl
    include = [arg.format(folder=tmp_path) for arg in include]
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lm_eval.tasks.TaskManager)  # restored after the test
    seen = {}

    def cli_evaluate():  # lm-eval's parsing, and the task manager its run command builds (without the catalogue)
        seen["argv"] = list(__import__("sys").argv)
        args = HarnessCLI().parse_args()
        seen["tasks"] = lm_eval.tasks.TaskManager(include_path=args.include_path, include_defaults=False).all_tasks

    monkeypatch.setattr(lm_eval_main, "cli_evaluate", cli_evaluate)
    argv = ["run", "--model", "sinkfix", "--tasks", "sinkfix_cloze", *include]
    monkeypatch.setattr("sys.argv", ["python -m sinkfix.lmeval", *argv])
    wrapper()
    assert seen["argv"] == ["lm-eval", *argv]
    assert set(builtin.BUILTIN_TASKS) <= set(seen["tasks"])
    assert ("sinkfix_cloze_jsonl" in seen["tasks"]) == bool(include)


# -- built-in items ------------------------------------------------------------------------------------
def test_builtin_documents_are_fixed_and_sized():
    for domain in ("prose", "code"):
        docs = builtin.documents(domain)
        assert docs == builtin.documents(domain)
        assert len(docs) == builtin.DOCUMENTS
        assert all(builtin.DOC_CHARS * 0.9 <= len(d["text"]) <= 2.2 * builtin.DOC_CHARS for d in docs)
        text = domain_text(domain)
        assert all(d["text"] in text for d in docs)


def test_cloze_items_are_true_continuations():
    items = builtin.cloze_items()
    assert items == builtin.cloze_items() and len(items) == builtin.CLOZE_ITEMS
    text = domain_text("pydoc")
    for item in items:
        choices = item["choices"]
        assert len(choices) == 4 == len(set(choices))
        assert item["context"] + " " + choices[item["gold"]] in text
    # the answer's position is spread over the four slots
    assert {item["gold"] for item in items} == {0, 1, 2, 3}


def test_export_tasks_read_the_same_items(tmp_path, builtin_tasks):
    written = builtin.export_tasks(tmp_path)
    assert {p.name for p in written} == {f"{n}.jsonl" for n in builtin.BUILTIN_TASKS} | {
        f"{n}_jsonl.yaml" for n in builtin.BUILTIN_TASKS}
    exported = load_tasks(["sinkfix_jsonl"], include=[tmp_path])
    for name in builtin.BUILTIN_TASKS:
        assert list(exported.tasks[f"{name}_jsonl"].test_docs()) == list(builtin_tasks.tasks[name].test_docs())


# -- task errors -----------------------------------------------------------------------------------------
def test_unknown_task_passes_lm_evals_message_on():
    with pytest.raises(EvaluationError, match="unknown task 'sinkfix_prosee'.*lm-eval: Spec 'sinkfix_prosee' is "
                                              "not a registered task.*did you mean sinkfix_prose"):
        load_tasks(["sinkfix_prosee"])


def test_include_path_must_be_a_folder(tmp_path):
    with pytest.raises(EvaluationError, match="no such folder"):
        load_tasks(["sinkfix_prose"], include=[tmp_path / "nope"])


def _local_task(folder: Path, data: Path) -> None:
    (folder / "local.yaml").write_text(
        "task: local_rolling\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data))}\noutput_type: loglikelihood_rolling\ntest_split: test\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')


def test_missing_data_file(tmp_path):
    _local_task(tmp_path, tmp_path / "absent.jsonl")
    with pytest.raises(EvaluationError, match="task data file not found: .*absent.jsonl"):
        load_tasks(["local_rolling"], include=[tmp_path])
    with pytest.raises(EvaluationError, match="task data file not found: .*absent.jsonl"):
        load_tasks([str(tmp_path / "local.yaml")])  # a task given as its file
    _local_task(tmp_path, tmp_path / "part-*.jsonl")
    with pytest.raises(EvaluationError, match="no task data file matches .*part-"):
        load_tasks(["local_rolling"], include=[tmp_path])


@pytest.mark.parametrize("bad_line, problem", [('{"text": "two', "not valid JSON"),
                                               ("[1, 2]", "a record must be a JSON object, got list")])
def test_malformed_data_file_names_the_line(tmp_path, bad_line, problem):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "one"}\n\n' + bad_line + '\n{"text": "three"}\n')
    _local_task(tmp_path, data)
    with pytest.raises(EvaluationError, match=f"data.jsonl, line 3: {problem}"):
        load_tasks(["local_rolling"], include=[tmp_path])


def test_an_empty_data_file_and_an_unparsable_task_file_are_named(tmp_path):
    """An empty JSONL file gave "could not load task(s) ...: StopIteration" (no file named); a task
    YAML that does not parse is skipped by lm-eval's index, and the task was only "unknown"."""
    data = tmp_path / "data.jsonl"
    data.write_text("\n")
    _local_task(tmp_path, data)
    with pytest.raises(EvaluationError, match="data.jsonl holds no record"):
        load_tasks(["local_rolling"], include=[tmp_path])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "brokeny.yaml").write_text("task: brokeny\ndataset_path: [unclosed\n")
    with pytest.raises(EvaluationError, match=r"unknown task 'brokeny'.*could not be read: .*brokeny.yaml"):
        load_tasks(["brokeny"], include=[broken])


def test_local_task_through_a_tag(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two\n')
    _local_task(tmp_path, data)
    (tmp_path / "local.yaml").write_text((tmp_path / "local.yaml").read_text() + "tag: [mine]\n")
    with pytest.raises(EvaluationError, match="line 2"):
        load_tasks(["mine"], include=[tmp_path])


def test_local_copy_of_a_standard_task(tmp_path, tiny_lm):
    """The README recipe: lm-eval's own lambada_openai definition, its data from a local JSONL file."""
    import lm_eval

    standard = Path(lm_eval.__file__).parent / "tasks" / "lambada" / "lambada_openai.yaml"
    data = tmp_path / "lambada.jsonl"
    lines = [line for line in domain_text("pydoc").splitlines() if len(line.split()) > 8][:4]
    data.write_text("".join(json.dumps({"text": line.strip()}) + "\n" for line in lines))
    (tmp_path / "lambada_local.yaml").write_text(
        f"include: {standard}\ntask: lambada_local\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n")
    loaded = load_tasks(["lambada_local"], include=[tmp_path])
    results = evaluate_once(tiny_lm, loaded)
    assert set(results["results"]["lambada_local"]) >= {"perplexity,none", "acc,none"}
    assert len(results["samples"]["lambada_local"]) == 4


# -- the model type on a tiny model ------------------------------------------------------------------------
def test_identity_gives_the_stock_results_and_a_policy_changes_them(tiny_lm, builtin_tasks):
    stock = evaluate_once(tiny_lm, builtin_tasks, limit=6)
    tiny_lm.apply(Correction.from_args("identity"))
    identity = evaluate_once(tiny_lm, builtin_tasks, limit=6)
    tiny_lm.apply(Correction.from_args("drop"))
    dropped = evaluate_once(tiny_lm, builtin_tasks, limit=6)
    tiny_lm.apply(None)
    for task in builtin.BUILTIN_TASKS:
        assert _scores(identity, task) == _scores(stock, task), task  # exactly
        assert identity["results"][task] == stock["results"][task]
    s, d = _samples(stock, "sinkfix_cloze"), _samples(dropped, "sinkfix_cloze")
    changed = max(abs(a[0] - b[0]) for doc in s for a, b in zip(d[doc]["filtered_resps"], s[doc]["filtered_resps"]))
    assert changed > 1e-3


def test_rolling_loglikelihood_agrees_with_sinkfix_evaluate(tiny_lm):
    """lm-eval's rolling windows of L tokens are sinkfix.evaluate's windows of L + 1 tokens at stride L
    over [prefix] + text: the same tokens scored with the same context. The one protocol difference
    is the last window, which lm-eval extends to the left to a full L tokens of context; on a text
    of a whole number of windows there is none."""
    ids = tiny_lm.tok_encode(domain_text("pydoc")[:4000])
    length = 64
    ids = ids[: (len(ids) // length) * length]
    text = tiny_lm.tokenizer.decode(ids)
    assert tiny_lm.tok_encode(text) == ids  # byte-level BPE: decode and encode round-trip
    tiny_lm._max_length = length
    try:
        request = Instance("loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
        via_lm_eval = tiny_lm.loglikelihood_rolling([request], disable_tqdm=True)[0]
    finally:
        tiny_lm._max_length = None
    stream = torch.tensor([tiny_lm.prefix_token_id, *ids])
    windows = make_windows(stream, seq_len=length + 1, stride=length)
    nll, tokens = windows_nll(tiny_lm.model, windows)
    assert tokens == len(ids) and len(windows) == len(ids) // length
    assert -via_lm_eval == pytest.approx(nll, rel=1e-5)


def test_paired_comparison_on_the_tiny_model(tiny_lm, builtin_tasks):
    stock = evaluate_once(tiny_lm, builtin_tasks, limit=5)
    tiny_lm.apply(Correction.from_args("sink_scale=0.5"))
    corrected = evaluate_once(tiny_lm, builtin_tasks, limit=5)
    tiny_lm.apply(None)
    config = EvalConfig(iterations=200)
    compared = compare_runs(builtin_tasks, stock, corrected, config)
    assert set(compared["sinkfix_cloze"]["metrics"]) == {"acc", "acc_norm"}
    assert set(compared["sinkfix_prose"]["metrics"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    for task, entry in compared.items():
        assert entry["items"] == 5
        for metric, m in entry["metrics"].items():
            # the point estimates are lm-eval's own numbers
            assert m["stock"] == pytest.approx(stock["results"][task][f"{metric},none"], rel=1e-12)
            assert m["corrected"] == pytest.approx(corrected["results"][task][f"{metric},none"], rel=1e-12)
            assert m["delta"] == pytest.approx(m["corrected"] - m["stock"])
    assert compared["sinkfix_cloze"]["metrics"]["acc"]["test"] == "mcnemar-exact"
    assert compared["sinkfix_prose"]["metrics"]["bits_per_byte"]["higher_is_better"] is False


# -- the command ---------------------------------------------------------------------------------------------
def _run(capsys, *argv):
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_command_json_and_table(tiny_folder, tmp_path, capsys, one_thread):
    out_file = tmp_path / "report.json"
    code, out, err = _run(capsys, "--model", str(tiny_folder), "--tasks", "sinkfix_cloze,sinkfix_code", "--limit", "4",
                          "--bootstrap", "100", "--json", "--out", str(out_file), "--policy", "sink_scale=0.5")
    assert code == 0, err
    report = json.loads(out)
    assert report == json.loads(out_file.read_text())
    assert report["schema"] == "sinkfix.eval/1"
    assert report["correction"] == {"kind": "policy", "source": "sink_scale=0.5",
                                    "description": "policy sink_scale=0.5"}
    assert set(report["tasks"]) == {"sinkfix_cloze", "sinkfix_code"}
    acc = report["tasks"]["sinkfix_cloze"]["metrics"]["acc"]
    assert {"stock", "corrected", "delta", "ci_low", "ci_high", "p_value", "test"} <= set(acc)
    assert acc["items"] == 4 and acc["iterations"] == 100
    from sinkfix.lmeval.report import table_rows

    rows = table_rows(report)
    assert [r[:2] for r in rows[:2]] == [["sinkfix_cloze", "acc ↑"], ["sinkfix_cloze", "acc_norm ↑"]]
    assert all(math.isfinite(float(r[3])) for r in rows)


def test_a_perplexity_past_floats_range_is_null_not_a_lost_run(tiny_folder, tmp_path, capsys, one_thread):
    """A document without spaces is one "word": its word perplexity is exp of its whole NLL, past
    float's range (lm-eval's aggregation raised OverflowError and nothing was written). Now inf,
    written as null; the other metrics of the task stand."""
    data = tmp_path / "unspaced.jsonl"
    data.write_text("".join(json.dumps({"text": "attentionsinks" * 30 + str(i)}) + "\n" for i in range(2)))
    _local_task(tmp_path, data)
    (tmp_path / "local.yaml").write_text((tmp_path / "local.yaml").read_text() + "  - metric: bits_per_byte\n")
    out_file = tmp_path / "report.json"
    code, out, err = _run(capsys, "--model", str(tiny_folder), "--tasks", "local_rolling", "--include-path",
                          str(tmp_path), "--bootstrap", "100", "--json", "--out", str(out_file))
    assert code == 0, err
    metrics = json.loads(out_file.read_text())["tasks"]["local_rolling"]["metrics"]
    assert metrics["word_perplexity"]["stock"] is None and metrics["word_perplexity"]["corrected"] is None
    assert math.isfinite(metrics["bits_per_byte"]["stock"]) and metrics["bits_per_byte"]["stock"] > 1


def _one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sinkfix eval: error:"), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_eval_command_errors(tiny_folder, tmp_path, capsys):
    out_file = tmp_path / "report.json"
    model = ["--model", str(tiny_folder), "--out", str(out_file)]
    _one_line_error(*_run(capsys, *model, "--limit", "0")[::2], "--limit must be >= 1")
    _one_line_error(*_run(capsys, *model, "--max-length", "1")[::2], "--max-length must be >= 2")
    # shorter than a choice of the cloze task: lm-eval asserted it mid-run (a bare AssertionError)
    code, _, err = _run(capsys, *model, "--tasks", "sinkfix_cloze", "--limit", "4", "--max-length", "3")
    last = err.strip().splitlines()[-1]  # after the run's progress lines
    assert code == 2 and last.startswith("sinkfix eval: error:") and "Traceback" not in err
    assert "more than max_length 3 (--max-length): raise it to at least" in last
    # no model of that name: the seed is refused before anything is loaded
    _one_line_error(*_run(capsys, "--model", str(tmp_path / "no-model"), "--seed", "-1")[::2],
                    "--seed must be >= 0, got -1")
    _one_line_error(*_run(capsys, *model, "--tasks", "no_such_task_x")[::2], "unknown task 'no_such_task_x'")
    _one_line_error(*_run(capsys, *model, "--policy", "sink_scale=7")[::2], "sink_scale")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n{"text": broken}\n')
    _local_task(tmp_path, data)
    _one_line_error(*_run(capsys, *model, "--tasks", "local_rolling", "--include-path", str(tmp_path))[::2],
                    "data.jsonl, line 2: not valid JSON")
    assert not out_file.exists() and not list(tmp_path.glob(".report.json*"))


def test_max_length_beyond_the_model_is_refused_before_the_runs(tiny_folder, tmp_path, capsys, monkeypatch,
                                                                one_thread):
    import sinkfix.lmeval.paired as paired

    def evaluate_once(*args, **kwargs):
        raise AssertionError("an evaluation ran before --max-length was refused")

    monkeypatch.setattr(paired, "evaluate_once", evaluate_once)
    code, _, err = _run(capsys, "--model", str(tiny_folder), "--tasks", "sinkfix_cloze", "--limit", "1",
                        "--max-length", "600")
    _one_line_error(code, err, "max_length 600 is larger than", "(max_position_embeddings = 512)")


def _fewshot_tasks(folder: Path) -> None:
    """Two copies of the cloze task read from a JSONL file: few_free without a few-shot count of
    its own, few_zero with num_fewshot: 0 in its config; and few_rolling, a copy of the prose task
    (rolling log-likelihood) whose config asks for 2 examples it can never use."""
    builtin.export_tasks(folder)
    cloze = (folder / "sinkfix_cloze_jsonl.yaml").read_text()
    prose = (folder / "sinkfix_prose_jsonl.yaml").read_text()
    for path in folder.glob("*.yaml"):
        path.unlink()
    for name, base, extra in (("few_free", cloze, ""), ("few_zero", cloze, "num_fewshot: 0\n"),
                              ("few_rolling", prose, "num_fewshot: 2\n")):
        text = base.replace("tag: [sinkfix_jsonl]", "tag: []")
        text = text.replace("task: sinkfix_cloze_jsonl", f"task: {name}").replace("task: sinkfix_prose_jsonl",
                                                                                  f"task: {name}")
        (folder / f"{name}.yaml").write_text(text + extra)


def test_num_fewshot_a_task_does_not_take_is_recorded_and_noted(tiny_folder, tmp_path, capsys, one_thread):
    """lm-eval keeps a task whose config says num_fewshot: 0 at zero shots whatever --num-fewshot says,
    and builds a rolling log-likelihood task's requests from the document alone: the report gives
    the count each task ran with, and a note per reason says so, also when stderr is no terminal."""
    _fewshot_tasks(tmp_path)
    code, out, err = _run(capsys, "--model", str(tiny_folder), "--tasks", "few_free,few_zero,few_rolling",
                          "--include-path", str(tmp_path), "--limit", "1", "--num-fewshot", "1", "--bootstrap", "100",
                          "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["settings"]["num_fewshot"] == 1
    assert {t: e["num_fewshot"] for t, e in report["tasks"].items()} == {"few_free": 1, "few_zero": 0,
                                                                         "few_rolling": 0}
    notes = ["--num-fewshot 1 not applied to few_zero (0-shot): the task's config fixes num_fewshot: 0",
             "--num-fewshot 1 not applied to few_rolling (0-shot): rolling log-likelihood tasks score each "
             "document alone, without few-shot examples"]
    assert report["notes"] == notes
    for note in notes:
        assert f"note: {note}" in err


@pytest.mark.parametrize("asked", [None, 0, 3])
def test_rolling_tasks_run_and_record_zero_shots(asked):
    from sinkfix.lmeval.paired import apply_fewshot, fewshot_notes, rolling_tasks

    loaded = load_tasks(list(builtin.BUILTIN_TASKS))  # a fresh copy: apply_fewshot sets the configs
    assert sorted(rolling_tasks(loaded)) == ["sinkfix_code", "sinkfix_prose"]
    counts = apply_fewshot(loaded, asked)
    assert counts == {"sinkfix_prose": 0, "sinkfix_code": 0, "sinkfix_cloze": asked or 0}
    assert all(loaded.tasks[name].get_config("num_fewshot") == count for name, count in counts.items())
    notes = fewshot_notes(counts, asked, rolling_tasks(loaded))
    assert notes == ([] if not asked else [
        f"--num-fewshot {asked} not applied to sinkfix_code (0-shot), sinkfix_prose (0-shot): rolling "
        "log-likelihood tasks score each document alone, without few-shot examples"])


def test_profile_for_another_model_is_refused(tiny_folder, tmp_path, capsys, one_thread):
    torch.manual_seed(1)
    other = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(tiny_folder)).eval()
    with sinkfix.patch(other, sinkfix.Policy()):
        profile = sinkfix.Profile(sinkfix.profile.ModelIdentity.of(other), torch.full((2, 4), 0.9))
    path = profile.save(tmp_path / "other.profile.json")
    out_file = tmp_path / "report.json"
    code, _, err = _run(capsys, "--model", str(tiny_folder), "--profile", str(path), "--tasks", "sinkfix_cloze",
                        "--limit", "2", "--out", str(out_file))
    _one_line_error(code, err, "does not fit", "weights fingerprint")
    assert not out_file.exists()


def test_export_command(tmp_path, capsys):
    code, _, err = _run(capsys, "--export-tasks", str(tmp_path / "tasks"))
    assert code == 0
    assert len(list((tmp_path / "tasks").iterdir())) == 6 and "sinkfix_cloze_jsonl.yaml" in err
    # an evaluation option next to it would be ignored (a bad one never checked): refused, nothing written
    _one_line_error(*_run(capsys, "--export-tasks", str(tmp_path / "other"), "--limit", "0", "--json")[::2],
                    "--limit, --json would be ignored")
    _one_line_error(*_run(capsys, "--export-tasks", "")[::2], "--export-tasks needs a folder")
    assert not (tmp_path / "other").exists()


# -- the real model -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_identity_policy_and_rolling(smollm2, one_thread):
    model, tokenizer = smollm2
    lm = SinkfixLM(pretrained=model, tokenizer=tokenizer)
    tasks = load_tasks(["sinkfix_cloze", "sinkfix_prose"])
    try:
        stock = evaluate_once(lm, tasks, limit=8)
        lm.apply(Correction.from_args("identity"))
        identity = evaluate_once(lm, tasks, limit=8)
        lm.apply(Correction.from_args("sink_scale=0.9"))
        corrected = evaluate_once(lm, tasks, limit=8)
    finally:
        lm.apply(None)
    # identity: exactly the stock log-likelihoods, item by item, hence exactly the stock results
    for task in ("sinkfix_cloze", "sinkfix_prose"):
        assert _scores(identity, task) == _scores(stock, task), task
        assert identity["results"][task] == stock["results"][task]
    prose_s, prose_c = _samples(stock, "sinkfix_prose"), _samples(corrected, "sinkfix_prose")
    assert max(abs(prose_s[d]["word_perplexity"][0] - prose_c[d]["word_perplexity"][0]) for d in prose_s) > 0.1


@pytest.mark.slow
def test_smollm2_rolling_matches_the_bench_protocol(smollm2, one_thread):
    """lm-eval's rolling log-likelihood on SmolLM2 = sinkfix.evaluate with windows of L + 1 tokens at
    stride L over [prefix] + text (text cut to whole windows)."""
    model, tokenizer = smollm2
    lm = SinkfixLM(pretrained=model, tokenizer=tokenizer, max_length=256)
    ids = lm.tok_encode(domain_text("pydoc")[:6000])[:512]
    text = tokenizer.decode(ids)
    assert lm.tok_encode(text) == ids
    via_lm_eval = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    nll, tokens = windows_nll(model, make_windows(torch.tensor([lm.prefix_token_id, *ids]), seq_len=257, stride=256))
    assert tokens == 512
    assert -via_lm_eval == pytest.approx(nll, rel=1e-5)


@pytest.mark.slow
def test_run_eval_on_smollm2_with_a_limit(one_thread):
    report = run_eval(EvalConfig(tasks=("sinkfix_cloze",), limit=3, iterations=100))
    acc = report["tasks"]["sinkfix_cloze"]["metrics"]["acc"]
    assert acc["items"] == 3 and report["model"]["name"] == "smollm2-135m"
