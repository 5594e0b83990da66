"""Pieces of benchmarks/calibration_lodo.py that need no model: the score caches (a score on one
number of evaluation windows never answers for another, and writing one count's scores keeps the
others' in the file) and the own-fit table of ``analyses``."""

import importlib.util
import json
import math
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "calibration_lodo", Path(__file__).resolve().parents[1] / "benchmarks" / "calibration_lodo.py")
calibration_lodo = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(calibration_lodo)


def test_evaluation_scores_are_kept_per_window_count(tmp_path):
    path = tmp_path / "cache-m-bos.json"
    # a file saved before window counts were told apart: its "eval" scores are on the default count
    path.write_text(json.dumps({"val": {"legal|abc": 1.5}, "eval": {"legal|abc": 2.5}}), encoding="utf-8")

    default = calibration_lodo._cache(path)
    assert default["val"] == {("legal", "abc"): 1.5} and default["eval"] == {("legal", "abc"): 2.5}

    sixteen = calibration_lodo._cache(path, eval_windows=16)
    assert sixteen["val"] == {("legal", "abc"): 1.5}  # the selection's scores do not depend on it
    assert sixteen["eval"] == {}  # the 4-window score must not answer for 16 windows
    sixteen["eval"][("legal", "abc")] = 2.4  # saves the file at once
    sixteen["val"][("cpp", "def")] = 0.5

    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved == {"val": {"legal|abc": 1.5, "cpp|def": 0.5}, "eval": {"legal|abc": 2.5},
                     "eval-16w": {"legal|abc": 2.4}}
    assert calibration_lodo._cache(path)["eval"] == {("legal", "abc"): 2.5}
    assert calibration_lodo._saved_scores(tmp_path, "m-bos", 16)["eval"] == {("legal", "abc"): 2.4}
    assert calibration_lodo._saved_scores(tmp_path, "m-bos")["val"] == {("legal", "abc"): 1.5, ("cpp", "def"): 0.5}


def test_own_fit_table_counts_the_unpatched_model_among_the_global_betas():
    stock = {"a": 2.0, "b": 1.0}
    data = {"model": "m", "bos": True, "eval_windows": 4, "stock": stock,
            # on "b" every global beta is worse than unpatched: the best global choice is beta 1
            "global_beta": {"0.95": {"a": 2.0 + math.log(0.99), "b": 1.0 + math.log(1.02)},
                            "0.9": {"a": 2.0 + math.log(0.995), "b": 1.0 + math.log(1.05)}},
            "analyses": {"fit:a": {"a": 2.0 + math.log(0.97), "b": 1.0 + math.log(1.004)},
                         "fit:b": {"a": 2.0, "b": 1.0 + math.log(0.9)},
                         "recogniser": {"known": {"a": {"a": 1.0}, "b": {"unknown": 0.5, "b": 0.5}},
                                        "unseen": {"a": {"b": 1.0}, "b": {"a": 0.25, "unknown": 0.75}}}}}
    rows = calibration_lodo._analyses_markdown(data).splitlines()[-2:]
    assert rows[0] == f"| a | {math.exp(2.0):.3f} | -1.00% (0.95) | -3.00% | +0.00% | a 100% | b 100% |"
    # ties in the recogniser's calls are listed by name, so the table is the same from run to run
    assert rows[1] == f"| b | {math.exp(1.0):.3f} | +0.00% (1) | +0.40% | -10.00% | b 50%, unknown 50% | unknown 75%, a 25% |"
