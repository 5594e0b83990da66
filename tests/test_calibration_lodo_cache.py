"""The score caches of benchmarks/calibration_lodo.py: a score on one number of evaluation windows
never answers for another, and writing one count's scores keeps the others' in the file."""

import importlib.util
import json
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
