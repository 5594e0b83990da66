"""Review 80: a `$` in a domain label and the report's figure, lone surrogates in a request file, and
labels of invisible characters only."""

from __future__ import annotations

import json

import pytest

from sinkfix import cli
from sinkfix.errors import MonitorError
from sinkfix.telemetry.report import _literal, summarise, write_figure
from sinkfix.telemetry.requests import check_domain_label, read_requests

from .test_monitor_inputs_review import _record, _write_log


@pytest.mark.parametrize("domain", ["price $\\x$", "$5 and $6", "50% $"])
def test_a_dollar_in_a_domain_is_shown_as_itself_in_the_figure(tmp_path, domain):
    """matplotlib reads ``$...$`` as math: the label ``price $\\x$`` failed the report ("Unknown
    symbol: \\x"), after its report.json, and ``$5 and $6`` showed as "5and6"."""
    log = _write_log(tmp_path / "log.jsonl", json.dumps(_record(domain)), json.dumps(_record("plain")))
    assert cli.main(["monitor", "report", str(log), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out").is_dir() and list((tmp_path / "out").glob("*.png"))
    figure = write_figure(summarise([_record(domain)]), tmp_path / "direct.png")
    assert figure.stat().st_size > 0
    assert _literal(domain).count(r"\$") == domain.count("$")  # every $ escaped: no math mode


@pytest.mark.parametrize("line, field", [('{"prompt": "x\\ud800y"}', "prompt"),
                                         ('{"prompt": "x", "id": "a\\udc00"}', "id")])
def test_a_lone_surrogate_is_refused_with_its_line(tmp_path, line, field):
    """Valid JSON, but no text: the tokenizer failed on it after the model loaded, with earlier
    requests' records already in the log."""
    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(MonitorError, match=rf"line 2: '{field}' holds a lone surrogate"):
        read_requests(path)


@pytest.mark.parametrize("label", ["\u200b", "\u200b \u2060", "\ufeff"])
def test_a_label_of_invisible_characters_only_is_refused(label):
    with pytest.raises(MonitorError, match="is empty"):
        check_domain_label(label)


@pytest.mark.parametrize("label", ["fa\u200cir", "\U0001F469\u200d\U0001F52C", "a\u200bb"])
def test_format_characters_inside_a_name_are_the_names_own(label):
    check_domain_label(label)  # a zero-width joiner in a Persian word or an emoji sequence


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    """json keeps the last of two equal keys: a request file's line with two prompts served one unsaid."""
    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "a", "domain": "x", "prompt": "b"}\n', encoding="utf-8")
    with pytest.raises(MonitorError, match=r"line 2: key 'prompt' given twice"):
        read_requests(path)
    path.write_text('{"prompt": "a", "meta": {"k": 1, "k": 2}}\n', encoding="utf-8")
    with pytest.raises(MonitorError, match=r"line 1: key 'k' given twice"):  # at any depth, before the key check
        read_requests(path)


def test_a_log_of_several_corrections_says_so(tmp_path, capsys):
    """Records served with different policies were pooled per domain without a word."""
    log = _write_log(tmp_path / "log.jsonl", json.dumps(_record("a", policy="identity")),
                     json.dumps(_record("a", policy="sink_scale=0.9")), json.dumps(_record("b", policy="identity")))
    assert cli.main(["monitor", "report", str(log), "--out", str(tmp_path / "out"), "--no-figures"]) == 0
    err = capsys.readouterr().err
    assert "note: the log holds requests served with 2 corrections (identity; sink_scale=0.9)" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["policies"] == ["identity", "sink_scale=0.9"]
    one = _write_log(tmp_path / "one.jsonl", json.dumps(_record("a", policy="identity")))
    assert cli.main(["monitor", "report", str(one)]) == 0
    assert "note:" not in capsys.readouterr().err


def test_a_domain_starting_with_an_underscore_keeps_its_legend_entry(tmp_path):
    """matplotlib's legend leaves out labels that start with "_": the domain had a box and no entry."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    seen = []
    real_legend = matplotlib.axes.Axes.legend

    def legend(self, *args, **kwargs):
        made = real_legend(self, *args, **kwargs)
        seen.append([text.get_text() for text in made.get_texts()])
        return made

    matplotlib.axes.Axes.legend = legend
    try:
        write_figure(summarise([_record("_internal"), _record("public")]), tmp_path / "f.png")
    finally:
        matplotlib.axes.Axes.legend = real_legend
        plt.close("all")
    assert seen and all(len(entries) == 2 for entries in seen), seen
    assert any(" _internal" in entry for entries in seen for entry in entries)


@pytest.mark.parametrize("label", ["code\u200b", "\u200bcode", "code\ufe0f", "\ufe0f", "\u3164", "\u2800"])
def test_labels_that_look_like_another_or_like_nothing_are_refused(label):
    """"code" and "code" + U+200B were two report rows that both read "code"; U+3164 or U+2800 alone a
    blank row."""
    with pytest.raises(MonitorError, match="invisible character|is empty"):
        check_domain_label(label)


@pytest.mark.parametrize("label", ["\u2764\ufe0f", "\U0001F3F4\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F",
                                   "\U0001F1EB\U0001F1F7", "\u0928\u092e\u0938\u094d\u0924\u0947"])
def test_emoji_and_scripts_that_end_in_marks_are_names(label):
    check_domain_label(label)  # a heart with its selector, a subdivision flag, a country flag, Devanagari


def test_the_figure_legend_shortens_long_labels_and_counts_one_request(tmp_path, monkeypatch):
    """Review 85: a 150-character label made the PNG 8910 px wide, and one request read "(1 requests)"."""
    from sinkfix.telemetry import report as report_module

    long = "x" * 150
    labels = []
    real = report_module.write_figure.__globals__["_literal"]
    monkeypatch.setattr(report_module, "_literal", lambda text: labels.append(text) or real(text))
    figure = write_figure(summarise([_record(long), _record("b"), _record("b")]), tmp_path / "f.png")
    assert figure.stat().st_size > 0
    assert f"{'x' * 39}\u2026 (1 request)" in labels and "b (2 requests)" in labels
    assert not any(long in label for label in labels)
    from PIL import Image

    with Image.open(figure) as image:
        assert image.width < 2000, image.size  # 8910 before
