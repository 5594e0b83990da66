"""Calibration in the cases a review found wrong: fits that stayed the identity combined as if absent, a
user's patch left stale by a calibration, statistics a content-mode run cannot measure, ties broken by
rounding, and what a profile's description and validation leave out."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

import sinkfix
from sinkfix.analysis.robust import candidate_parameters, candidates, choose, combine
from sinkfix.errors import ProfileError
from sinkfix.patch import PatchHandle
from sinkfix.profile import ModelIdentity, Profile

from .conftest import CharTokenizer, text_args, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(*betas, logits=None):
    beta = torch.tensor([list(betas)], dtype=torch.float32)
    return beta, None if logits is None else torch.tensor([list(logits)], dtype=torch.float32)


# -- a fit that stayed the identity asks for no virtual-logit mass ---------------------------------
def test_consensus_with_an_identity_fit_is_the_identity():
    """The smallest correction any domain asked for, where one domain asked for none: none."""
    identity = _params(1.0, 1.0)  # a fit that never beat the unpatched model: beta 1, no virtual logit
    fitted = _params(0.8, 0.6, logits=[0.0, -1.0])
    beta, logit = combine([identity, fitted], "consensus")
    assert logit is None and torch.equal(beta, torch.ones(1, 2))
    beta, logit = combine([fitted, identity], "consensus", shrink=0.5)
    assert logit is None and torch.equal(beta, torch.ones(1, 2))


def test_mean_counts_an_identity_fit_as_zero_virtual_mass():
    identity = _params(1.0, 1.0)
    fitted = _params(0.8, 0.6, logits=[0.0, -1.0])
    beta, logit = combine([identity, fitted, identity], "mean")
    torch.testing.assert_close(beta, torch.tensor([[1 - 0.2 / 3, 1 - 0.4 / 3]]))
    # the mean of e^logit over all three domains, two of them 0
    torch.testing.assert_close(logit.exp(), torch.tensor([[1.0 / 3, math.exp(-1.0) / 3]]))
    beta, logit = combine([identity, fitted], "mean", shrink=0.5)
    torch.testing.assert_close(logit.exp(), torch.tensor([[0.25, math.exp(-1.0) / 4]]))


def test_fits_without_virtual_logits_anywhere_still_combine_to_none():
    for rule in ("consensus", "mean"):
        assert combine([_params(0.5, 0.5), _params(0.7, 0.9)], rule)[1] is None


def test_the_pools_combined_candidates_follow_the_rule():
    fits = [_params(1.0, 1.0), _params(0.8, 0.6, logits=[0.0, -1.0])]
    pool = {c.name: c for c in candidates()}
    for name, candidate in pool.items():
        if candidate.uses_fits and candidate.rule == "consensus":
            beta, logit = candidate_parameters(candidate, fits, (1, 2))
            assert logit is None and torch.equal(beta, torch.ones(1, 2)), name


# -- the selection's ties ---------------------------------------------------------------------------
def test_safe_mean_breaks_exact_ties_by_pool_order_with_or_without_pruning():
    from types import SimpleNamespace

    values = (-0.02, -0.01, -0.005, 0.0, 0.01, 0.02)
    rng = random.Random(7)
    domains = ["d0", "d1", "d2", "d3"]
    mismatches = 0
    for _ in range(3000):
        table = {"identity": dict.fromkeys(domains, 0.0)}
        for i in range(3):
            table[f"c{i}"] = {d: rng.choice(values) for d in domains}
        pool = [SimpleNamespace(name=name) for name in table]

        def score(candidate, domain, table=table):
            return table[candidate.name][domain]

        full = choose(pool, domains, score, rule="safe-mean", prune=False)[0].name
        pruned = choose(pool, domains, score, rule="safe-mean", prune=True)[0].name
        mismatches += full != pruned
    assert mismatches == 0
    # the review's table: c0 and c2 both have mean -0.00875; the earlier one wins either way
    table = {"identity": {"d0": 0.0, "d1": 0.0, "d2": 0.0, "d3": 0.0},
             "c0": {"d0": -0.005, "d1": -0.01, "d2": -0.02, "d3": 0.0},
             "c1": {"d0": 0.0, "d1": 0.01, "d2": 0.01, "d3": 0.01},
             "c2": {"d0": -0.01, "d1": 0.0, "d2": -0.005, "d3": -0.02}}
    pool = [SimpleNamespace(name=name) for name in table]
    for prune in (False, True):
        assert choose(pool, domains, lambda c, d: table[c.name][d], rule="safe-mean", prune=prune)[0].name == "c0"


# -- a calibration leaves the user's own patch in force ---------------------------------------------
TEXTS = {"a": "the cat sat on the mat and the dog sat on the log. " * 30,
         "b": "for i in range(10):\n    total += i * i\n" * 40}


def test_calibrating_a_patched_model_keeps_the_users_handle_live():
    model = tiny_model("llama", seed=3)
    ids = torch.randint(2, 90, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    policy = sinkfix.Policy(sink_scale=0.5, virtual_sink_logit=0.0)
    handle = sinkfix.patch(model, policy, backend="torch")
    with torch.no_grad():
        patched = model(input_ids=ids).logits
    sinkfix.calibrate(model, CharTokenizer(), TEXTS, seq_len=64, max_tokens=640, steps=4, progress=False)
    assert PatchHandle.of(model) is handle  # the same handle, not a new patch of its policy
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, patched)
    handle.remove()
    assert PatchHandle.of(model) is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, stock)
    with sinkfix.patch(model, policy):
        sinkfix.calibrate(model, CharTokenizer(), TEXTS, seq_len=64, max_tokens=640, steps=4, progress=False)
    assert PatchHandle.of(model) is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, stock)
    assert all(p.requires_grad for p in model.parameters())


# -- sinkfix calibrate: options refused before the work -------------------------------------------
THREE = {"prose": TEXTS["a"], "code": TEXTS["b"], "list": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 40}


def _one_line_error(capsys, *argv) -> str:
    from sinkfix import cli

    rc = cli.main(["calibrate", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    return err


@pytest.mark.parametrize("sinks", ["hidden", "combined"])
def test_statistics_are_refused_for_content_modes_before_the_model_loads(no_model, tmp_path, capsys, sinks):
    files = text_args(tmp_path, THREE)
    err = _one_line_error(capsys, *files, "--sinks", sinks, "--statistics", "--out", str(tmp_path / "p.json"))
    assert "the monitor does not serve content-dependent sinks" in err
    err = _one_line_error(capsys, *files, "--sinks", sinks, "--statistics-windows", "4", "--out", str(tmp_path / "p.json"))
    assert "--statistics-windows" in err


def test_content_modes_skip_the_statistics_by_default(loaded_tiny, tmp_path, capsys):
    """The default run of --sinks combined ends with a profile (the statistics pass raised after the
    fits whenever a hidden-sink head was chosen)."""
    from sinkfix import cli

    files = text_args(tmp_path, THREE)
    out = tmp_path / "p.json"
    rc = cli.main(["calibrate", *files, "--sinks", "combined", "--seq-len", "64", "--max-tokens", "640",
                   "--steps", "6", "--hidden-steps", "6", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert Profile.load(out).statistics is None


def test_windows_too_short_for_the_statistics_are_refused_before_the_model_loads(no_model, tmp_path, capsys):
    files = text_args(tmp_path, THREE)
    err = _one_line_error(capsys, *files, "--seq-len", "32", "--out", str(tmp_path / "p.json"))
    assert "--seq-len 33" in err and "--no-statistics" in err


# -- a profile's description and validation ------------------------------------------------------
def _profile(**kwargs) -> Profile:
    return Profile(ModelIdentity.of(tiny_model("llama", seed=3)), torch.full((2, 4), 0.9), **kwargs)


def test_describe_names_the_sink_set_and_the_clip():
    plain = _profile().describe()
    assert "sink set: first 1 token" in plain and "residual clip" not in plain
    described = _profile(n_sink=2, extra_sink_positions=(7,), residual_clip=[2.0, float("inf")]).describe()
    assert "sink set: first 2 tokens + positions 7" in described
    assert "residual clip on 1 layer (x2..x2 the median norm)" in described


@pytest.mark.parametrize("key, value", [("num_heads", [4, 0]), ("num_heads", [4, -4]), ("num_kv_heads", 0),
                                        ("hidden_size", -1), ("vocab_size", 0)])
def test_model_counts_must_be_positive(key, value):
    data = _profile().to_dict()
    data["model"][key] = value
    with pytest.raises(ProfileError, match="must be >= 1"):
        Profile.from_dict(data)


def test_an_old_format_profile_is_never_described_as_domain_robust():
    data = _profile().to_dict()
    data["version"] = 2
    data.pop("domains", None)
    data["calibration"] = {"domain_robust": True, "rule": "robust"}
    loaded = Profile.from_dict(copy.deepcopy(data))
    assert not loaded.domain_robust and "not domain-robust (format version 2)" in loaded.describe()


@pytest.mark.parametrize("protocol", [["ab", "cd"], "seq_len", 5])
def test_statistics_protocol_must_be_an_object(protocol):
    from sinkfix.profile import ProfileStatistics

    stats = ProfileStatistics(torch.full((2, 4), 0.1), torch.full((2, 4), 0.9), windows=2, min_rows=32)
    data = _profile().with_statistics(stats).to_dict()
    Profile.from_dict(copy.deepcopy(data))  # the valid one loads
    data["statistics"]["protocol"] = protocol
    with pytest.raises(ProfileError, match="statistics.protocol must be an object"):
        Profile.from_dict(data)


def test_monitor_ranges_refuses_a_content_profile_before_the_model_loads(no_model, tmp_path, capsys):
    """The same statistics pass, reached through `sinkfix monitor ranges`: a traceback after the model
    loaded, once a layer had a hidden-sink head."""
    from sinkfix import cli
    from sinkfix.policy import ContentSinks

    path = _profile(content_sinks=ContentSinks(threshold=0.1, hidden_sink_scale=0.5)).save(tmp_path / "p.json")
    text = tmp_path / "t.txt"
    text.write_text(THREE["prose"])
    rc = cli.main(["monitor", "ranges", "--profile", str(path), "--text", str(text), "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "content-mode profile" in err
    assert not (tmp_path / "o.json").exists()
