"""Stock vs corrected through lm-eval on the same items, with one model load: the engine of ``sinkfix eval``.

The model is loaded once; the stock run uses it unpatched, the corrected run patched, and the patch
is removed afterwards (also when the run fails). Both runs go through lm-eval's own ``evaluate``
with per-sample logging; the items are paired by document id and checked to be the same documents
(lm-eval's per-sample document hashes) before any statistic is computed.
"""

from __future__ import annotations

import functools
import hashlib
import math
import platform
import random
import time
from dataclasses import asdict
from typing import Any, Callable, Collection

import numpy as np
import torch

from sinkfix.files import check_out_is_no_input
from sinkfix.lmeval.config import EvalConfig
from sinkfix.lmeval.model import SinkfixLM
from sinkfix.lmeval.stats import compare_paired
from sinkfix.lmeval.taskload import LoadedTasks, check_items, data_files, definition_files, load_tasks
from sinkfix.profile import ModelIdentity

__all__ = ["run_eval", "evaluate_once", "apply_fewshot", "fewshot_notes", "rolling_tasks", "compare_runs", "SCHEMA"]

SCHEMA = "sinkfix.eval/1"
Log = Callable[[str], None]


# -- one lm-eval run -----------------------------------------------------------------------------
ROLLING = "loglikelihood_rolling"


def rolling_tasks(loaded: LoadedTasks) -> list[str]:
    """The tasks that score rolling log-likelihoods: lm-eval builds their requests from the
    document alone (``doc_to_target``), so a few-shot context would be built and never used."""
    return [name for name, task in loaded.tasks.items() if getattr(task, "OUTPUT_TYPE", None) == ROLLING]


def apply_fewshot(loaded: LoadedTasks, num_fewshot: int | None = None) -> dict[str, int]:
    """Set each task's few-shot count; returns the count each task will run with.

    ``num_fewshot`` replaces a task's own count, except where the task's config says 0 (a task made
    to run zero-shot, often without a split to draw examples from): that stays 0, as lm-eval's own
    ``simple_evaluate`` keeps it. None keeps each task's own count (0 where it has none). A rolling
    log-likelihood task is set to 0 whatever is asked or configured: it never uses the examples."""
    counts = {}
    rolling = set(rolling_tasks(loaded))
    for name, task in loaded.tasks.items():
        if name in rolling:
            task.set_config(key="num_fewshot", value=0)
        elif num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        counts[name] = int(task.get_config("num_fewshot"))
    return counts


def fewshot_notes(counts: dict[str, int], num_fewshot: int | None, rolling: Collection[str] = ()) -> list[str]:
    """Notes naming the tasks that run with another few-shot count than ``num_fewshot`` asked for,
    one per reason: ``rolling`` tasks (rolling log-likelihood: no few-shot context at all), and
    the others (their config fixes num_fewshot: 0)."""
    if num_fewshot is None:
        return []
    other = sorted(name for name, count in counts.items() if count != num_fewshot)
    notes = []
    for names, reason in (([n for n in other if n not in rolling], "the task's config fixes num_fewshot: 0"),
                          ([n for n in other if n in rolling], "rolling log-likelihood tasks score each document "
                                                               "alone, without few-shot examples")):
        if names:
            notes.append(f"--num-fewshot {num_fewshot} not applied to "
                         f"{', '.join(f'{n} ({counts[n]}-shot)' for n in names)}: {reason}")
    return notes


def _overflowing_to_inf(aggregate: Callable) -> Callable:
    """``aggregate`` with an OverflowError turned into inf: lm-eval's perplexity aggregations call
    ``math.exp`` on a mean NLL, which raises past 709.78 nats (SmolLM2's word perplexity of one
    unspaced CJK document was 8.7e172, a random model's past the range) and lost the whole run.
    inf is written as null, as every non-finite number (schema.md)."""
    if getattr(aggregate, "_sinkfix_overflow_safe", False):
        return aggregate

    @functools.wraps(aggregate)
    def safe(items):
        try:
            return aggregate(items)
        except OverflowError:
            return math.inf

    safe._sinkfix_overflow_safe = True
    return safe


def overflow_safe_aggregations(loaded: LoadedTasks) -> None:
    """Make every loaded task's aggregations return inf where they would overflow (lm-eval's own
    evaluation and the paired bootstrap both call them)."""
    for task in loaded.tasks.values():
        aggregations = task.aggregation()
        for metric, aggregate in list(aggregations.items()):
            aggregations[metric] = _overflowing_to_inf(aggregate)


def evaluate_once(lm: SinkfixLM, loaded: LoadedTasks, limit: int | None = None,
                  num_fewshot: int | None = None) -> dict[str, Any]:
    """lm-eval's ``evaluate`` on the loaded tasks with per-sample logging, seeded as lm-eval's own
    ``simple_evaluate`` seeds it (without its environment report, which runs external programs)."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    apply_fewshot(loaded, num_fewshot)
    overflow_safe_aggregations(loaded)
    for task in loaded.tasks.values():
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    # lm-eval scores its requests type by type, in the order the tasks bring them: the log-likelihood
    # types first, so that SinkfixLM.loglikelihood's check of every answer's tokens comes before
    # anything is scored (a rolling task listed first was scored whole, 34 s, before a merged answer
    # was refused). Each type is scored apart, and each task draws its examples from its own
    # sampler: the order changes no number; the report keeps the order asked for.
    first = ("loglikelihood", "multiple_choice")
    ordered = dict(sorted(loaded.tasks.items(), key=lambda item: getattr(item[1], "OUTPUT_TYPE", None) not in first))
    task_dict = {"tasks": ordered, "groups": {}, "group_map": {}}
    return evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=True)


# -- pairing and statistics ----------------------------------------------------------------------
def _by_item(samples: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(s["filter"], s["doc_id"]): s for s in samples}


def _metric_keys(task_results: dict[str, Any]) -> list[tuple[str, str]]:
    keys = []
    for key in task_results:
        metric, sep, filter_name = key.partition(",")
        if sep and not metric.endswith("_stderr"):
            keys.append((metric, filter_name))
    return keys


def _items_hash(samples: list[dict[str, Any]]) -> str:
    hashes = sorted({(s["doc_id"], s["doc_hash"]) for s in samples})
    return hashlib.sha256("".join(f"{i}:{h};" for i, h in hashes).encode()).hexdigest()[:16]


def _paired_values(stock: dict, corrected: dict, metric: str, filter_name: str) -> tuple[list, list, list]:
    ids = sorted(doc for (f, doc) in stock if f == filter_name)
    if ids != sorted(doc for (f, doc) in corrected if f == filter_name):
        raise RuntimeError("stock and corrected runs scored different items")  # a bug, not bad input
    for doc in ids:
        if stock[filter_name, doc]["doc_hash"] != corrected[filter_name, doc]["doc_hash"]:
            raise RuntimeError(f"item {doc} differs between the stock and the corrected run")
    return ids, [stock[filter_name, d][metric] for d in ids], [corrected[filter_name, d][metric] for d in ids]


def _plain(value: Any) -> Any:
    """A per-item metric value as JSON holds it: numbers (numpy's too) as floats, tuples as lists."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    return value


def _compare_task(name: str, task: Any, stock: dict, corrected: dict, config: EvalConfig) -> dict[str, Any]:
    samples_stock, samples_corrected = _by_item(stock["samples"][name]), _by_item(corrected["samples"][name])
    aggregations = task.aggregation()
    higher = stock.get("higher_is_better", {}).get(name, {})
    metrics = {}
    for metric, filter_name in _metric_keys(stock["results"][name]):
        if metric not in aggregations:
            continue
        ids, before, after = _paired_values(samples_stock, samples_corrected, metric, filter_name)
        paired = compare_paired(before, after, aggregations[metric], iterations=config.iterations,
                                confidence=config.confidence, seed=config.seed)
        key = metric if filter_name == "none" else f"{metric},{filter_name}"
        # the per-item values the statistics came from, so that a report can be checked on its own
        per_item = {"doc_id": ids, "stock": [_plain(v) for v in before], "corrected": [_plain(v) for v in after]}
        metrics[key] = {**paired.to_dict(), "filter": filter_name, "higher_is_better": higher.get(metric),
                        "per_item": per_item}
    return {"output_type": task.OUTPUT_TYPE, "items": len({d for _, d in samples_stock}),
            "items_sha256": _items_hash(stock["samples"][name]),
            "num_fewshot": int(task.get_config("num_fewshot") or 0), "metrics": metrics}


def compare_runs(loaded: LoadedTasks, stock: dict[str, Any], corrected: dict[str, Any],
                 config: EvalConfig) -> dict[str, dict[str, Any]]:
    """Per task and metric: stock, corrected, delta, paired interval and test (see :mod:`.stats`)."""
    return {name: _compare_task(name, task, stock, corrected, config) for name, task in loaded.tasks.items()}


# -- the whole run -------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import transformers

    import sinkfix

    return {"sinkfix": sinkfix.__version__, "lm_eval": version("lm_eval"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _protocol(lm: SinkfixLM) -> dict[str, Any]:
    return {"prefix_token_id": lm.prefix_token_id, "max_length": lm.max_length, "add_bos_token": lm.add_bos_token,
            "batch_size": lm.batch_size, "device": str(lm.device)}


def _timed(step: str, message: str, log: Log, run: Callable[[], Any], timing: dict[str, float]) -> Any:
    """``run()``, announced by ``message``; its wall time lands in ``timing[step]``."""
    log(message)
    start = time.perf_counter()
    result = run()
    timing[step] = round(time.perf_counter() - start, 2)
    return result


def run_eval(config: EvalConfig, log: Log = lambda _: None, note: Log | None = None,
             out: str | None = None) -> dict[str, Any]:
    """Load the tasks, then the model once; evaluate stock, then corrected; return the JSON report.

    ``log`` hears of each stage; ``note`` (default: ``log``) of anything the run does otherwise than
    asked, as soon as it is known (also in the report's ``notes``). ``out``: the file the caller will
    write the report to, refused before the model loads when it is one of the run's inputs (the
    profile, a file of the model folder, a task file or a task's data file)."""
    config.validate()
    start, timing = time.perf_counter(), {}
    if config.threads:
        torch.set_num_threads(config.threads)
    correction = config.correction()  # a bad spec or profile file fails before anything is loaded
    loaded = _timed("tasks", "tasks ...", log, lambda: load_tasks(list(config.tasks), config.include_paths, log),
                    timing)
    if out:  # the tasks' data files are known now, before the model loads
        data = [(f"a data file of task {name} ({path})", path)
                for name in config.tasks for path in data_files(loaded.manager, [name])]
        definitions = [(f"a file defining task {name} ({path})", path)
                       for name in config.tasks for path in definition_files(loaded.manager, [name])]
        check_out_is_no_input(out, [*config.input_files(), *data, *definitions])
    counts = apply_fewshot(loaded, config.num_fewshot)  # before the check: it reads the few-shot counts
    check_items(loaded, config.limit)  # a record lm-eval cannot score as meant fails here, before the model loads
    notes = fewshot_notes(counts, config.num_fewshot, rolling_tasks(loaded)) + config.interval_notes()
    for text in notes:
        (note or log)(text)
    lm = _timed("model", f"model {config.model} ...", log, lambda: SinkfixLM(
        pretrained=config.model, batch_size=config.batch_size, device=config.device, kernel=config.kernel,
        **config.extra), timing)
    lm.apply(correction)  # a profile for another model or a policy it cannot take fails here, not after the stock run
    if lm.scores_alone and lm.batch_size != 1:
        text = (f"the correction pools statistics over each sequence's tokens (content-dependent sinks or a relative "
                f"residual clip) and lm-eval pads log-likelihood batches without an attention mask: the corrected "
                f"run scores them one sequence at a time (--batch-size {lm.batch_size} applies to the stock run "
                f"and to generation)")
        notes.append(text)
        (note or log)(text)
    lm.apply(None)
    run = functools.partial(evaluate_once, lm, loaded, config.limit, config.num_fewshot)
    stock = _timed("stock", "stock ...", log, run, timing)
    try:
        lm.apply(correction)
        corrected = _timed("corrected", f"corrected ({correction.describe()}) ...", log, run, timing)
    finally:
        lm.apply(None)
    timing["total"] = round(time.perf_counter() - start, 2)
    return {
        "schema": SCHEMA, "model": ModelIdentity.of(lm.model).to_dict(), "correction": correction.to_dict(),
        "settings": asdict(config), "protocol": _protocol(lm), "versions": _versions(),
        "threads": torch.get_num_threads(), "timing_s": timing,
        "tasks": compare_runs(loaded, stock, corrected, config), "notes": notes,
    }
