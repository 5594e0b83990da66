"""Gradients through residual clipping, and the CLI under interruption, a closed standard output, read-only
and cut-off files and byte-order marks: the defects black-box reviews found, each pinned by a test that failed
before its fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sinkfix
from sinkfix import Policy, ResidualClip, cli, files
from sinkfix.errors import MonitorError, OutputError
from sinkfix.ops.residual import residual_clip_torch
from sinkfix.profile import Profile
from sinkfix.telemetry.outputs import check_log_file
from sinkfix.telemetry.requests import read_requests
from sinkfix.texts import read_text_file
from tests import test_bench

from .conftest import CharTokenizer, tiny_model

REPO = Path(__file__).resolve().parents[1]
files_on_disk = test_bench.files  # a tiny model saved to a folder, and two texts (module fixture, by assignment)

pytestmark = pytest.mark.usefixtures("one_thread")


def _own_clip64(hidden: torch.Tensor, cap: torch.Tensor, exempt: torch.Tensor) -> torch.Tensor:
    """The written rule in float64: a token whose norm exceeds its cap is scaled to it, exempt tokens
    and the others are left as they are (the scaled branch only is built, so its gradient is that of
    h * cap / ||h|| alone)."""
    norms = hidden.norm(dim=-1, keepdim=True)
    out = []
    for b in range(hidden.shape[0]):
        rows = []
        for s in range(hidden.shape[1]):
            h, n = hidden[b, s], norms[b, s]
            rows.append(h if exempt[b, s] or not n > cap[b] else h * (cap[b] / n))
        out.append(torch.stack(rows))
    return torch.stack(out)


def test_clip_gradients_are_finite_for_an_exempt_sink_and_a_zero_token():
    # an exempt sink has an infinite cap; a zero token is never scaled. Both made NaN gradients before
    # (0 * d(cap / norm) with cap = inf or norm = 0), though the output equalled the input there
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, dtype=torch.float64) * torch.tensor([30.0, 1, 1, 9, 1], dtype=torch.float64)[:, None]
    hidden[1, 2] = 0
    hidden.requires_grad_(True)
    is_sink = torch.zeros(2, 5, dtype=torch.bool)
    is_sink[:, 0] = True
    cap = torch.tensor([4.0, 5.0], dtype=torch.float64)
    weights = torch.randn(2, 5, 8, dtype=torch.float64)

    (residual_clip_torch(hidden, cap, is_sink) * weights).sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    (_own_clip64(hidden, cap, is_sink) * weights).sum().backward()
    assert torch.isfinite(got).all()
    # the clip takes its norms and factors in float32, as the kernel does: float32 agreement
    assert torch.allclose(got, hidden.grad, rtol=1e-6, atol=1e-6)
    clipped = hidden.detach().norm(dim=-1) > cap[:, None]
    assert (clipped & ~is_sink).any() and not torch.equal(got[clipped & ~is_sink], weights[clipped & ~is_sink])
    assert torch.equal(got[:, 0], weights[:, 0])  # the exempt sink passes its gradient through


@pytest.mark.parametrize("clip", [ResidualClip(1e9, mode="absolute"), ResidualClip(100.0), ResidualClip(1.0)],
                         ids=["absolute-never-fires", "relative-never-fires", "relative-fires"])
def test_backward_through_a_clipped_model_is_finite(clip):
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama")
    model.train()
    with sinkfix.patch(model, Policy(residual_clip=clip)):
        model(ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    if clip.threshold != 1.0:  # a clip that never fires leaves the gradients of the unclipped policy
        reference = tiny_model("llama")
        reference.train()
        with sinkfix.patch(reference, Policy()):
            reference(ids, labels=ids).loss.backward()
        for name, p in reference.named_parameters():
            assert torch.allclose(grads[name], p.grad, rtol=1e-5, atol=1e-7), name


# -- the CLI: a reader that closes standard output does not cost a command its files --------------------
@pytest.mark.parametrize("given_out", [True, False], ids=["out", "default-out"])
def test_a_closed_standard_output_does_not_cost_calibrate_its_profile(files_on_disk, tmp_path, given_out):
    # `sinkfix calibrate ... | head -3`: rich ended the process with exit code 1 and no word at the next
    # printed line, before the profile was written (inspect, stream, kvquant, monitor run likewise). The
    # message names the profile written, the default one too (not "nothing was saved")
    from sinkfix.commands.calibrate import default_out

    profile = tmp_path / "p.json" if given_out else Path(default_out(str(files_on_disk["model"])))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "sinkfix", "calibrate", "--model", str(files_on_disk["model"]),
         "--text", str(files_on_disk["prose"]), "--text", str(files_on_disk["code"]), "--max-tokens", "256",
         "--seq-len", "64", "--steps", "2", "--threads", "1", "--no-statistics",
         *(["--out", str(profile)] if given_out else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    child.stdout.close()  # the reader is gone before the first line
    err = child.stderr.read().decode()
    assert child.wait(timeout=300) == 2, err
    assert err.strip().splitlines()[-1] == (
        f"sinkfix calibrate: error: standard output was closed by its reader before everything was printed; "
        f"{profile} was written"), err
    assert Profile.load(tmp_path / profile).sink_scale.shape[0] == 2


def test_a_closed_descriptor_1_is_no_error(files_on_disk, tmp_path):
    # `sinkfix monitor requests --out F >&-`: Python has no sys.stdout then (None); the output guard
    # wrapped it and failed with an AttributeError after the file was written (exit 1); calibrate's rich
    # console failed on it before any work
    out = tmp_path / "requests.jsonl"
    profile = tmp_path / "p.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for argv in (["monitor", "requests", "--out", str(out)],
                 ["calibrate", "--model", str(files_on_disk["model"]), "--text", str(files_on_disk["prose"]),
                  "--text", str(files_on_disk["code"]), "--max-tokens", "256", "--seq-len", "64", "--steps", "2",
                  "--threads", "1", "--no-statistics", "--out", str(profile)]):
        child = subprocess.run([sys.executable, "-m", "sinkfix", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=env, cwd=tmp_path, timeout=300,
                               preexec_fn=lambda: os.close(1))
        assert child.returncode == 0, child.stderr.decode()
    assert read_requests(out)
    assert Profile.load(profile).sink_scale.shape[0] == 2


def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_half_written_file(tmp_path, monkeypatch, capsys):
    # SIGTERM's default action ended the process between two files (bench's folder mixed two runs) or
    # with an atomic write's temporary file left behind; now it unwinds and the command says so
    out = tmp_path / "requests.jsonl"
    out.write_text("the earlier file\n")
    real = files.atomic_write_text

    def killed_while_writing(path, text):
        with files.atomic_write(path) as handle:
            handle.write(text[:10])
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        raise AssertionError("not interrupted")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(files, "atomic_write_text", killed_while_writing)
    assert cli.main(["monitor", "requests", "--out", str(out)]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "sinkfix monitor requests: terminated"
    assert out.read_text() == "the earlier file\n" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert signal.getsignal(signal.SIGTERM) == before  # the process's own handler is back
    monkeypatch.setattr(files, "atomic_write_text", real)


# -- files: a read-only file is not replaced; a log cut off mid-line is not appended to ----------------
def test_a_read_only_output_file_is_refused_not_replaced(tmp_path, monkeypatch):
    # the atomic write renames a new file over the path, which needs only the folder's permission: a
    # profile the user had made read-only was replaced, exit status 0 (root passes os.access, so the
    # permission answer is given here as an ordinary user gets it)
    target = tmp_path / "profile.json"
    target.write_text("kept")
    real_access = os.access
    monkeypatch.setattr(files.os, "access",
                        lambda path, mode: False if Path(path) == target and mode & os.W_OK else real_access(path, mode))
    for attempt in (lambda: files.check_writable(target), lambda: files.check_writable(target, append=True),
                    lambda: files.atomic_write_text(target, "new")):
        with pytest.raises(OutputError, match="read-only"):
            attempt()
    assert target.read_text() == "kept"
    files.atomic_write_text(tmp_path / "other.json", "new")  # a writable path is written as before


def _log_record() -> dict:
    return {"schema": "sinkfix-telemetry", "version": 1, "domain": "a", "model": "m", "tokens": 10, "rows": [9, 9],
            "sink_share": [[0.3, 0.3], [0.3, 0.3]], "dormancy": [[0.1, 0.1], [0.1, 0.1]], "dormant_heads": 0,
            "residual_peak": [2.0, 50.0], "hidden_sinks": [[0, 1], [0, 0]], "guard": None}


def test_a_log_that_ends_in_a_partial_line_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    # the next record was appended to the fragment: that record was lost and `monitor report` refused the
    # whole log, while `monitor run` said it had appended its records (exit 0)
    line = json.dumps(_log_record())
    log = tmp_path / "log.jsonl"
    log.write_text(line + "\n" + line[: len(line) // 2])
    with pytest.raises(MonitorError, match="ends in a partial line"):
        check_log_file(log)
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"prompt": "hello"}) + "\n")
    monkeypatch.setattr(sinkfix, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(["monitor", "run", "--requests", str(requests), "--out", str(log)]) == 2
    assert "ends in a partial line" in capsys.readouterr().err
    log.write_text(line + "\n")
    assert check_log_file(log) == log  # a whole log is appended to, as before
    assert not files.ends_in_partial_line(log)


# -- a byte-order mark at the start of a user's file is not text ---------------------------------------
def test_a_byte_order_mark_is_not_read_as_text(tmp_path):
    text = "The river ran quietly past the old mill.\n"
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text(text, encoding="utf-8")
    marked.write_text(text, encoding="utf-8-sig")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_text_file(marked) == read_text_file(plain) == text

    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"prompt": "hello", "domain": "a"}) + "\n", encoding="utf-8-sig")
    assert [r.prompt for r in read_requests(requests)] == ["hello"]

    model = tiny_model("llama")
    profile = Profile.from_dict(json.loads(_saved_profile(model, tmp_path).read_text()))
    with_mark = tmp_path / "marked.profile.json"
    with_mark.write_text(json.dumps(profile.to_dict()), encoding="utf-8-sig")
    assert torch.equal(Profile.load(with_mark).sink_scale, profile.sink_scale)

    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(_log_record()) + "\n", encoding="utf-8-sig")
    out = tmp_path / "report"
    assert cli.main(["monitor", "report", str(log), "--out", str(out), "--no-figures"]) == 0
    assert json.loads((out / "report.json").read_text())


def _saved_profile(model, folder: Path) -> Path:
    from sinkfix.profile import ModelIdentity

    beta = torch.linspace(0.5, 1.0, 8, dtype=torch.float64).reshape(2, 4)
    path = folder / "p.json"
    Profile(ModelIdentity.of(model), beta, None).save(path)
    return path


# -- stream: no earlier run's figure beside this run's results ------------------------------------------
def test_stream_without_figures_removes_an_earlier_runs_figure(text_file, tmp_path, monkeypatch, capsys):
    model = tiny_model("llama")
    monkeypatch.setattr(sinkfix, "load_model", lambda name, **kw: (model, CharTokenizer()))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stream.png").write_bytes(b"\x89PNG an earlier run")
    argv = ["stream", "--text", str(text_file), "--tokens", "90", "--window", "20", "--n-sink", "2", "--segment", "30",
            "--chunk", "8", "--recompute-every", "8", "--out", str(out), "--no-figures"]
    assert cli.main(argv) == 0
    assert "removed" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["stream.json", "stream_tokens.pt"]
