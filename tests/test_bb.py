"""Bigram-Backcopy: generator properties, ReLU attention, and short training runs of the paper's claims.

The training tests use 1-layer models (width 64, batch 32 x 64 tokens, one CPU thread) so that the
file stays well under 90 s on two shared cores; docs/bb.md has the default (3-layer) run.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from sinkfix.bb.data import BigramBackcopy
from sinkfix.bb.relu_attention import RELU_IMPL_NAME, observing, relu_attention, relu_attention_forward
from sinkfix.bb.report import measure, probe
from sinkfix.bb.train import VARIANTS, TrainConfig, build_model, train_variant


@pytest.fixture(scope="module")
def task() -> BigramBackcopy:
    return BigramBackcopy.build("prose")


@pytest.fixture
def one_thread():
    # Two threads on a machine whose two cores are already busy ran ~7x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- generator ------------------------------------------------------------------------------------
def test_vocabulary_and_bos_first(task):
    ids = task.sample(8, 256, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (8, 256)  # the default sequence length
    assert task.vocab_size == 65 + 2  # 65 characters + BOS + delimiter, as in the paper
    assert (ids[:, 0] == task.bos_id).all()
    assert (ids[:, 1:] < task.n_regular).all()  # BOS only at 0, the delimiter never emitted


def test_triggers_are_the_k_most_frequent(task):
    from sinkfix.texts import domain_text

    vocab = set(task.chars)
    counts = Counter(c for c in domain_text("pydoc", "eval") if c in vocab)
    assert [task.chars[t] for t in task.triggers] == [c for c, _ in counts.most_common(3)]
    order = torch.argsort(task.frequency, descending=True)[:3]
    assert sorted(order.tolist()) == sorted(task.triggers)


def test_after_trigger_copies_the_token_before_it(task):
    ids = task.sample(16, 256, generator=torch.Generator().manual_seed(1))
    trig = task.trigger_rows(ids)
    rows, cols = torch.nonzero(trig[:, :-1], as_tuple=True)
    assert len(rows) > 500  # ' ', 'e', 't' are ~27% of the characters
    assert (cols >= 2).all()  # position 1 is never a trigger: it would have to copy BOS
    assert torch.equal(ids[rows, cols + 1], ids[rows, cols - 1])
    assert not (trig[:, 1:] & trig[:, :-1]).any()  # hence two triggers never follow each other


def test_non_trigger_rows_follow_the_bigram_statistics(task):
    ids = task.sample(64, 256, generator=torch.Generator().manual_seed(2))
    trig = task.trigger_rows(ids)
    src, nxt = ids[:, 1:-1], ids[:, 2:]
    keep = ~trig[:, 1:-1]
    char = task.chars.index("o")  # a frequent non-trigger character
    followers = nxt[keep & (src == char)]
    empirical = torch.bincount(followers, minlength=task.n_regular).float() / followers.numel()
    # ~1.5k samples of a 65-way distribution: total variation ~0.05 from sampling noise alone
    assert 0.5 * (empirical - task.transition[char]).abs().sum() < 0.12


def test_random_source_is_seeded_and_follows_the_rule():
    a = BigramBackcopy.build("random", n_chars=20, k=3, seed=5)
    b = BigramBackcopy.build("random", n_chars=20, k=3, seed=5)
    c = BigramBackcopy.build("random", n_chars=20, k=3, seed=6)
    assert torch.equal(a.transition, b.transition) and not torch.equal(a.transition, c.transition)
    assert torch.allclose(a.transition.sum(1), torch.ones(20))
    assert set(a.triggers) == set(torch.argsort(a.frequency, descending=True)[:3].tolist())
    ids = a.sample(4, 128, generator=torch.Generator().manual_seed(0))
    rows, cols = torch.nonzero(a.trigger_rows(ids)[:, :-1], as_tuple=True)
    assert torch.equal(ids[rows, cols + 1], ids[rows, cols - 1])


def test_from_text_counts_characters():
    task = BigramBackcopy.from_text("abababab cacac", n_chars=4, k=1)
    assert task.chars == ("a", "b", "c", " ") and task.triggers == (0,)  # counts 6, 4, 3, 1
    # 'b' is followed by 'a' 3 times and by ' ' once; the smoothing moves ~1e-3 of the mass
    torch.testing.assert_close(task.transition[1], torch.tensor([0.75, 0.0, 0.0, 0.25]), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="distinct characters"):
        BigramBackcopy.from_text("abc", n_chars=4, k=1)


# -- ReLU attention -------------------------------------------------------------------------------
def test_relu_attention_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[None, None]
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])[None, None]
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])[None, None]
    out, weights, _ = relu_attention(q, k, v, None, scale=1.0)
    # row 0 sees key 0 (score 1): 1/1; row 1 sees scores (0, 1): (0, 1/2);
    # row 2 sees (1, 1, -1): (1/3, 1/3, 0) -- ReLU, then divided by the number of visible keys
    expected_w = torch.tensor([[1.0, 0, 0], [0, 0.5, 0], [1 / 3, 1 / 3, 0]])
    torch.testing.assert_close(weights[0, 0], expected_w)
    torch.testing.assert_close(out[0, 0], torch.tensor([[1.0, 2.0], [1.5, 2.0], [4 / 3, 2.0]]))
    # a padding-style mask hides key 0 from row 2: two visible keys, so (., 1/2, 0)
    visible = torch.ones(3, 3, dtype=torch.bool).tril()
    visible[2, 0] = False
    _, w_masked, _ = relu_attention(q, k, v, visible[None, None], scale=1.0)
    torch.testing.assert_close(w_masked[0, 0, 2], torch.tensor([0.0, 0.5, 0.0]))
    # one decode query (mask None) sees every key: divided by K = 3
    _, w_decode, _ = relu_attention(q[:, :, 2:], k, v, None, scale=1.0)
    torch.testing.assert_close(w_decode[0, 0, 0], torch.tensor([1 / 3, 1 / 3, 0.0]))


def test_relu_attention_interface_layout_and_gqa():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k = torch.randn(2, 2, 5, 8, generator=gen)
    v = torch.randn(2, 2, 5, 8, generator=gen)
    out, weights = relu_attention_forward(torch.nn.Module(), q, k, v, None, scaling=0.3)
    assert out.shape == (2, 5, 4, 8)  # (B, Q, H, D), the interface contract
    ref, _, _ = relu_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), None, 0.3)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    assert weights.shape == (2, 4, 5, 5)


def test_relu_model_is_a_transformers_model_running_relu_attention(task):
    config = TrainConfig(layers=2, width=16, seq_len=16)
    model = build_model(task, config, VARIANTS["relu"]).eval()
    assert model.config._attn_implementation == RELU_IMPL_NAME
    ids = task.sample(2, 16, generator=torch.Generator().manual_seed(0))
    calls = []
    attn = [block.attn for block in model.transformer.h]
    with torch.no_grad(), observing(attn, lambda module, *rest: calls.append(rest)):
        out = model(input_ids=ids, output_attentions=True)
    assert len(calls) == len(attn)
    for (query, key, value, scores, weights), returned in zip(calls, out.attentions):
        count = torch.arange(1, 17, dtype=torch.float32)[:, None]
        expected = torch.relu(scores).tril() / count
        torch.testing.assert_close(returned, expected)
        assert not torch.allclose(returned.sum(-1), torch.ones(2, 1, 16))  # not a softmax
    # left padding goes through the registered mask builder and gives finite outputs
    model.set_attn_implementation(RELU_IMPL_NAME)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()


# -- training -------------------------------------------------------------------------------------
_SHORT = TrainConfig(steps=400, layers=1, width=64, seq_len=64, batch=32)


@pytest.fixture(scope="module")
def adam_run(task):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_variant(task, VARIANTS["adam"], _SHORT)
        ids = task.sample(32, 64, generator=torch.Generator().manual_seed(123))
        return result, ids
    finally:
        torch.set_num_threads(before)


def test_probe_matches_eager_attention(task, adam_run, one_thread):
    result, ids = adam_run
    model = result.model
    seen = probe(model, ids[:4], VARIANTS["adam"])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(input_ids=ids[:4], output_attentions=True).attentions[0]
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(seen.weights[0], eager.float(), atol=1e-5, rtol=1e-4)


def test_adam_head_is_dormant_on_non_trigger_rows_and_active_on_triggers(task, adam_run, one_thread):
    result, ids = adam_run
    m = measure(result.model, task, ids, VARIANTS["adam"], detector=False)
    # Measured on this 400-step run (1 thread): BOS share 0.977 on non-trigger rows and 0.000 on
    # trigger rows, previous-token share 0.861, value ratio 0.22, copy accuracy 0.95, logit gap 21.
    # At init: 0.062 / 0.052 / 0.052, value ratio 1.15, copy accuracy 0.06, gap 0.
    assert m["bos_attention_nontrigger"] >= 0.9
    assert m["bos_attention_trigger"] <= 0.02
    assert m["prev_token_attention_trigger"] >= 0.75
    # drained; the <= 0.1 target is met by the default 3-layer run (0.086), not by this short one
    assert m["bos_value_ratio"] <= 0.5
    assert m["trigger_accuracy"] >= 0.9
    assert m["bos_logit_gap"] >= 5.0


def test_detector_agrees_with_the_trigger_ground_truth(task, adam_run, one_thread):
    pytest.importorskip("sinkfix.analysis.inspection")
    result, ids = adam_run
    m = measure(result.model, task, ids, VARIANTS["adam"])
    assert m["detector_accuracy"] is not None
    assert m["detector_accuracy"] >= 0.95  # measured 0.982 on this run (0.956 after 300 steps)


def test_sgd_keeps_the_sink_without_a_residual_peak(task, one_thread):
    config = TrainConfig(steps=400, layers=1, width=64, seq_len=64, batch=32)
    result = train_variant(task, VARIANTS["sgd"], config)
    ids = task.sample(32, 64, generator=torch.Generator().manual_seed(123))
    m = measure(result.model, task, ids, VARIANTS["sgd"], detector=False)
    # Measured on this run: BOS share 0.906 (0.062 at init), residual ratio 0.93 (0.85 at init).
    assert m["bos_attention_nontrigger"] >= 0.7
    assert m["bos_residual_ratio"] <= 2.0


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_json_is_one_object_with_a_key_per_variant(capsys, tmp_path, one_thread):
    from sinkfix.cli import main

    rc = main(["bb", "--json", "--steps", "2", "--layers", "1", "--width", "16", "--seq-len", "16",
               "--eval-every", "1", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout holds the JSON object and nothing else
    assert "step 2/2" in captured.err
    required = ("bos_attention_nontrigger", "bos_attention_trigger", "prev_token_attention_trigger",
                "bos_value_ratio", "bos_residual_ratio", "detector_accuracy")
    for name in ("adam", "sgd", "relu"):
        assert all(key in report[name] for key in required), name
        assert [h["step"] for h in report[name]["history"]] == [0, 1, 2]
    assert report["relu"]["detector_accuracy"] is None and "detector_note" in report["relu"]
    assert json.loads((tmp_path / "bb.json").read_text()) == report
    assert (tmp_path / "bb_dynamics.png").stat().st_size > 0 and (tmp_path / "bb_final.png").stat().st_size > 0
    assert not (tmp_path / "bb.partial.json").exists()  # the finished run's partial file is gone


TINY = ["--steps", "2", "--layers", "1", "--width", "16", "--seq-len", "16", "--eval-every", "1", "--threads", "1"]


@pytest.mark.parametrize("blocked", ["bb.json", "bb_final.png"])
def test_cli_refuses_a_folder_in_an_output_files_place_before_training(capsys, tmp_path, blocked, monkeypatch):
    """A folder where bb.json or a figure goes was refused after the whole training (nothing printed)."""
    from sinkfix.bb import report as bb_report
    from sinkfix.cli import main

    (tmp_path / blocked).mkdir()
    monkeypatch.setattr(bb_report, "run_experiment", lambda *a, **k: pytest.fail("trained before the check"))
    assert main(["bb", *TINY, "--out", str(tmp_path)]) == 2
    assert blocked in capsys.readouterr().err


def test_cli_seed_outside_torchs_range_is_a_usage_error(capsys, one_thread):
    from sinkfix.cli import main

    assert main(["bb", "--seed", str(2 ** 64 - 1), "--steps", "1"]) == 2
    assert "--seed must be in" in capsys.readouterr().err
    assert main(["bb", "--seed", str(-2 ** 63 - 1), "--steps", "1"]) == 2
    capsys.readouterr()
    assert main(["bb", *TINY, "--variants", "adam", "--seed", "-1", "--json"]) == 0  # torch takes negative seeds


def test_cli_keeps_the_finished_variants_when_a_later_one_fails(capsys, tmp_path, monkeypatch, one_thread):
    """The second variant diverges (or is interrupted): the first one's results are in
    bb.partial.json and the error says so (the run used to keep nothing, and a divergence was a traceback)."""
    from sinkfix.bb import report as bb_report
    from sinkfix.cli import main

    real = bb_report.train_variant

    def diverging(task, variant, config, **kwargs):
        if variant.name == "sgd":
            raise FloatingPointError("sgd: loss became nan at step 1")
        return real(task, variant, config, **kwargs)

    monkeypatch.setattr(bb_report, "train_variant", diverging)
    assert main(["bb", *TINY, "--variants", "adam,sgd", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "training diverged: sgd: loss became nan" in err and "bb.partial.json" in err
    kept = json.loads((tmp_path / "bb.partial.json").read_text())
    assert "adam" in kept and "sgd" not in kept and not (tmp_path / "bb.json").exists()
    # a later run into the same folder keeps them: refused before training, nothing overwritten
    assert main(["bb", *TINY, "--variants", "adam", "--out", str(tmp_path)]) == 2
    assert "holds the finished variants of an earlier run" in capsys.readouterr().err
    assert json.loads((tmp_path / "bb.partial.json").read_text()) == kept


def test_cli_rejects_unknown_variant(capsys):
    from sinkfix.cli import main

    assert main(["bb", "--variants", "adam,lion", "--steps", "1"]) == 2
    assert "lion" in capsys.readouterr().err
    assert main(["bb", "--variants", "adam,sgd,adam", "--steps", "1"]) == 2  # one report entry per name
    assert "named twice: adam" in capsys.readouterr().err


@pytest.mark.parametrize("width", [0, 1, 3])
def test_cli_refuses_llama_widths_rope_cannot_run_before_training(capsys, monkeypatch, width):
    """RoPE rotates pairs of the head's dimensions and the one head is as wide as the model (before:
    a traceback from the first forward pass, exit code 1)."""
    from sinkfix.bb import report as bb_report
    from sinkfix.cli import main

    monkeypatch.setattr(bb_report, "run_experiment", lambda *a, **k: pytest.fail("trained before the check"))
    assert main(["bb", *TINY, "--arch", "llama", "--width", str(width)]) == 2
    err = capsys.readouterr().err
    assert f"--width must be an even number >= 2 with --arch llama, got {width}" in err and "Traceback" not in err


def test_build_model_refuses_an_odd_llama_width_before_any_forward_pass(task):
    with pytest.raises(ValueError, match="width must be an even number >= 2 with arch llama, got 3"):
        build_model(task, TrainConfig(arch="llama", width=3, layers=1), VARIANTS["adam"])


def test_cli_width_one_runs_on_gpt2(capsys, one_thread):
    from sinkfix.cli import main

    assert main(["bb", *TINY, "--variants", "adam", "--width", "1", "--seq-len", "8", "--json"]) == 0
    assert "adam" in json.loads(capsys.readouterr().out)


def test_cli_refuses_no_figures_without_out(capsys, monkeypatch):
    """Without --out no figure is drawn, so --no-figures would change nothing (before: silently accepted)."""
    from sinkfix.bb import report as bb_report
    from sinkfix.cli import main

    monkeypatch.setattr(bb_report, "run_experiment", lambda *a, **k: pytest.fail("trained before the check"))
    assert main(["bb", *TINY, "--no-figures"]) == 2
    assert "--no-figures applies to the figures of --out" in capsys.readouterr().err


def test_cli_no_figures_removes_an_earlier_runs_figures(capsys, tmp_path, one_thread):
    """Figures left by an earlier run would read as this run's (before: kept next to the new bb.json)."""
    from sinkfix.cli import main

    for name in ("bb_dynamics.png", "bb_final.png"):
        (tmp_path / name).write_bytes(b"an earlier run's figure")
    assert main(["bb", *TINY, "--variants", "adam", "--out", str(tmp_path), "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bb.json"]
    assert f"removed {tmp_path / 'bb_final.png'} (an earlier run's figure; this run did not draw it)" in err


def test_history_train_loss_is_the_mean_since_the_previous_entry(task, one_thread):
    """With steps not a multiple of eval_every the last entry averages only its own steps (before:
    the entry at step 25 averaged steps 16-25, overlapping the one at step 20)."""
    config = TrainConfig(steps=25, eval_every=10, layers=1, width=8, seq_len=8, batch=2)
    result = train_variant(task, VARIANTS["adam"], config, on_eval=lambda step, model: {})
    losses = result.losses
    assert [h["step"] for h in result.history] == [0, 10, 20, 25]
    assert "train_loss" not in result.history[0]
    for entry, (start, end) in zip(result.history[1:], [(0, 10), (10, 20), (20, 25)]):
        assert entry["train_loss"] == pytest.approx(sum(losses[start:end]) / (end - start))


def test_final_figure_draws_ratios_from_one_and_shares_from_zero(tmp_path, monkeypatch):
    """On the log axis the bars began at matplotlib's automatic floor: a value ratio of 0.21 was a sliver
    beside 0.52. They start at 1 (the median) now, so a bar's length is the ratio's log."""
    pytest.importorskip("matplotlib")
    from sinkfix.bb import report as bb_report

    from pathlib import Path

    import sinkfix.files as files

    drawn = {}

    def keep(fig, path, **kw):
        drawn[Path(path).name] = fig
        return Path(path)

    monkeypatch.setattr(files, "save_figure", keep)
    variant = {"bos_attention_nontrigger": 0.9, "bos_attention_trigger": 0.5, "prev_token_attention_trigger": 0.4,
               "bos_value_ratio": 0.21, "bos_residual_ratio": 3.0, "history": [{"step": 0}], "description": "v"}
    bb_report.write_figures({"adam": dict(variant), "sgd": {**variant, "bos_value_ratio": 0.52}}, tmp_path)
    shares, ratios = drawn["bb_final.png"].axes
    bars = [(round(b.get_y(), 6), round(b.get_y() + b.get_height(), 6)) for b in ratios.patches]
    assert sorted(bars) == sorted([(1.0, 0.21), (1.0, 3.0), (1.0, 0.52), (1.0, 3.0)])
    assert shares.get_ylim()[0] == 0.0
    import matplotlib.pyplot as plt

    plt.close("all")


def test_an_undefined_measure_is_a_dash_in_the_table_not_nan():
    """bb.json writes an undefined measure (NaN in memory: a ReLU model of width 1) as null; the table
    printed "nan" where docs/bb.md promises "-"."""
    from sinkfix.bb.report import summary_line, summary_table

    variant = {"bos_attention_nontrigger": float("nan"), "bos_attention_trigger": None,
               "prev_token_attention_trigger": 0.5, "bos_key_ratio": 1.0, "bos_value_ratio": float("nan"),
               "bos_residual_ratio": float("inf"), "bos_logit_gap": 0.1, "detector_accuracy": None,
               "trigger_accuracy": 0.5, "loss": 1.0, "train_s": 3}
    table = summary_table({"relu": variant})
    assert "nan" not in table and "inf" not in table
    row = next(line for line in table.splitlines() if line.startswith("BOS value ratio"))
    assert row.split()[-1] == "-"
    assert "nan" not in summary_line("relu", variant) and "value ratio null" in summary_line("relu", variant)
