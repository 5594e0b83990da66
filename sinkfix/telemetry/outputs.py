"""Where telemetry records go: a JSON-lines log, Prometheus metrics on an HTTP endpoint, a callback.

Each output is set up when the monitor is created, so that a folder that cannot be written or a
port already in use fails at once with a :class:`~sinkfix.errors.MonitorError` (or
:class:`~sinkfix.errors.OutputError` for the log) instead of at the first request. A log is only
ever appended to: an existing non-empty file whose first line is not a telemetry record (a request
file, a report, a typo for another file), or is the record of a model of another shape, is refused
(:func:`check_log_file`) instead of spoilt; so is such a file found at the path when the log is
opened again after a rotation (:class:`JsonlLog`).
"""

from __future__ import annotations

import errno
import json
import numbers
from pathlib import Path
from typing import Sequence

from sinkfix.errors import MonitorError
from sinkfix.files import LineLog, ends_in_partial_line, same_file
from sinkfix.telemetry.records import SCHEMA
from sinkfix.telemetry.requests import BUILTIN, NO_DOMAIN

__all__ = ["JsonlLog", "PrometheusExporter", "check_log_file", "check_port", "check_port_free", "SHARE_BUCKETS",
           "PEAK_BUCKETS", "DORMANT_BUCKETS", "guard_tripped", "served_without_correction"]

SHARE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # sink share lies in [0, 1]
# residual peak ratios seen: ~2-5x on most layers, ~100x at the sink layers of SmolLM2 (README)
PEAK_BUCKETS = (1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)
DORMANT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def guard_tripped(record: dict) -> bool:
    """Whether ``record``'s prompt left the guard's ranges (``guard.tripped``). Not the same as served
    without the correction: a trip whose KV cache could not be rolled back is served with it ("logged
    only"), and the in-range rows of a batch in which another row tripped are served without it."""
    return bool((record.get("guard") or {}).get("tripped"))


def served_without_correction(record: dict) -> bool:
    """Whether ``record``'s batch row was served with the correction switched off in at least one
    layer: the layers the guard ran as the identity (``correction.identity_layers``), which are the
    whole batch's (one forward serves every row)."""
    return bool((record.get("correction") or {}).get("identity_layers"))


# the first line of an existing log is read up to this many bytes: a record of a large model
# (hundreds of layers and heads) is well under it, and a large file without newlines is not read whole
_FIRST_LINE_LIMIT = 64 << 20


def _first_line(path: Path) -> bytes | None:
    """The first non-blank line of a regular file (None when it has none), at most _FIRST_LINE_LIMIT bytes."""
    with path.open("rb") as handle:
        while True:
            line = handle.readline(_FIRST_LINE_LIMIT)
            if not line:
                return None
            if line.strip():
                return line


def _first_record(p: Path) -> dict | None:
    """The first record of the existing file ``p`` (None when it has no non-blank line); a
    :class:`MonitorError` when its first line is not a telemetry record."""
    try:
        first = _first_line(p)
    except OSError as exc:
        raise MonitorError(f"cannot read the existing telemetry log {p}: {exc.strerror or exc}") from None
    if first is None:
        return None
    try:
        record = json.loads(first)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply to read
        record = None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise MonitorError(f"{p} exists and is not a sinkfix telemetry log (its first line is not a record with "
                           f"\"schema\": \"{SCHEMA}\"); records are only appended to a telemetry log: choose "
                           "another file, or move this one away")
    return record


def _describe(model, heads) -> str:
    """A model as a log's records show it: name, layers and heads per layer."""
    if not isinstance(heads, (list, tuple)):
        return f"{model}"
    counts = sorted({h for h in heads})
    per_layer = f", {'/'.join(map(str, counts))} heads per layer" if counts else ""
    return f"{model} ({len(heads)} layers{per_layer})"


def _other_model(p: Path, record: dict, model: str | None, heads: Sequence[int] | None) -> None:
    """MonitorError when ``record`` (the first of the log ``p``) comes from a model of another shape
    than the one whose records would be appended: another number of layers, or other heads per
    layer, which `sinkfix monitor report` refuses to pool (appending made the whole log unreadable by
    it). The model's name is not compared: it is the name the model was loaded by, and one local
    folder given as ``m``, ``./m`` or its absolute path is one model under three names (refused as
    "another model" once, where the report reads such a log as it reads any)."""
    share = record.get("sink_share")
    theirs = [len(h) for h in share] if isinstance(share, list) and all(isinstance(h, list) for h in share) else None
    ours = None if heads is None else [int(h) for h in heads]
    if ours is not None and theirs is not None and theirs != ours:
        raise MonitorError(f"the telemetry log {p} holds records of another model, "
                           f"{_describe(record.get('model'), theirs)}, and this monitor's model is "
                           f"{_describe(model, ours)}: `sinkfix monitor report` reads one model shape per log; "
                           "write this model's records to another file")


def check_log_file(path: str | Path, *, requests: str | Path | None = None, model: str | None = None,
                   heads: Sequence[int] | None = None) -> Path:
    """Raise a :class:`MonitorError` now when appending telemetry to ``path`` would spoil a file:
    ``path`` is the request file ``requests`` itself, an existing non-empty file whose first line
    is not a sinkfix telemetry record, or (given ``heads``, the records' heads per layer) a telemetry
    log whose first record has another shape (``model``, the records' model name, only names it in the
    message). An empty or
    missing file, an existing telemetry log of the same model (appended to), and what is not a
    regular file (``/dev/null``, a pipe) pass; what cannot be written at all is
    :func:`sinkfix.files.check_writable`'s and :class:`~sinkfix.files.LineLog`'s to refuse."""
    p = Path(path)
    if not p.is_file():
        return p
    if requests is not None and str(requests) != BUILTIN:
        if same_file(p, requests):  # a missing request file is read_requests' to report
            raise MonitorError(f"the telemetry log {p} is the request file {requests}: appending records to it "
                               "would spoil both; write the log to another file")
    record = _first_record(p)
    if record is not None:
        _other_model(p, record, model, heads)
        _refuse_partial_last_line(p)
    return p


def _refuse_partial_last_line(p: Path) -> None:
    """MonitorError when the log ``p`` does not end with a line feed: its last record was cut off (a
    copy made part way, another program's writer stopped mid-line; sinkfix's own writer cuts a failed
    line back). The next record was appended to that fragment, so it was lost and the whole log became
    unreadable to `sinkfix monitor report`."""
    try:
        partial = ends_in_partial_line(p)
    except OSError as exc:
        raise MonitorError(f"cannot read the existing telemetry log {p}: {exc.strerror or exc}") from None
    if partial:
        raise MonitorError(f"the telemetry log {p} ends in a partial line (its last record was cut off): a record "
                           "appended to it would join that line and be lost; remove the partial last line, or write "
                           "to another file")


def _refuse_foreign_file(model: str | None, heads: Sequence[int] | None):
    """The check a rotated log's path gets before it is opened again (``LineLog(before_reopen=...)``):
    the checks of creation (:func:`check_log_file`), so a file that is not this model's telemetry
    log, put at the path while the monitor ran, is not appended to (an :class:`OutputError`, which
    the monitor reports as a LogWriteWarning); it got the next record before."""

    def check(path: Path) -> str | None:
        try:
            check_log_file(path, model=model, heads=heads)
        except MonitorError as exc:
            return f"a file was put at its path while the log was in use, and {exc}"
        return None

    return check


class JsonlLog:
    """One JSON object per line, appended as each request finishes (:class:`sinkfix.files.LineLog`).
    An existing file must be empty or a telemetry log (:func:`check_log_file`) of ``model`` with
    ``heads`` per layer (when given), at creation and whenever the path is opened again after a
    rotation."""

    def __init__(self, path: str | Path, *, model: str | None = None, heads: Sequence[int] | None = None) -> None:
        check_log_file(path, model=model, heads=heads)
        self._log = LineLog(path, before_reopen=_refuse_foreign_file(model, heads))
        self.path = self._log.path

    def write(self, record: dict) -> None:
        self._log.append(json.dumps(record, allow_nan=False, separators=(",", ":")))

    def close(self) -> None:
        self._log.close()


def check_port(port, name: str = "prometheus_port") -> int:
    """A TCP port to serve on, checked: an integer in [0, 65535] (0: a free one); anything else is a
    :class:`MonitorError` naming ``name`` (the socket's own errors for it are an OverflowError or a
    TypeError, not what a user can act on)."""
    if isinstance(port, bool) or not isinstance(port, numbers.Integral) or not 0 <= port <= 65535:
        raise MonitorError(f"{name} must be an integer in [0, 65535] (0 = a free port), got {port!r}")
    return int(port)


def check_port_free(port: int, host: str = "127.0.0.1", name: str = "prometheus_port") -> None:
    """Refuse now a port the endpoint could not bind later (in use, or not this machine's address):
    a command checks before it loads its model, which takes seconds to minutes. Binding and closing a
    socket here leaves a moment in which another program may take the port; the endpoint's own bind
    still reports that."""
    import socket

    port = check_port(port, name)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as exc:
        raise _unservable(host, port, exc) from None


def _unservable(host: str, port: int, exc: OSError) -> MonitorError:
    """The error for a port the endpoint cannot bind (the check before a model loads and the bind itself)."""
    reason = ("the port is already in use (choose another, or 0 for a free one)"
              if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc)))
    return MonitorError(f"cannot serve Prometheus metrics on {host}:{port}: {reason}")


class PrometheusExporter:
    """Histograms and counters in their own registry, served on ``http://host:port/metrics``.

    ``port=0`` picks a free port (:attr:`port` tells which). Metrics (labels in brackets):
    ``sinkfix_sink_share`` (layer, domain) one observation per head and request;
    ``sinkfix_residual_peak_ratio`` (layer, domain) one per request; ``sinkfix_dormant_heads``
    (domain) one per request; counters ``sinkfix_requests_total``, ``sinkfix_tokens_total``,
    ``sinkfix_guard_trips_total`` (domain: requests, i.e. batch rows, served without the correction in
    at least one layer, :func:`served_without_correction`), ``sinkfix_guard_out_of_range_total``
    (domain: requests whose prompt left the guard's ranges, :func:`guard_tripped`) and
    ``sinkfix_hidden_sinks_total`` (layer, domain).
    """

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        port = check_port(port)
        if not isinstance(host, str) or not host:
            raise MonitorError(f"prometheus_host must be a host name or address, got {host!r}")
        try:
            import prometheus_client as prom
        except ImportError:
            raise MonitorError("Prometheus metrics need prometheus-client: pip install 'sinkfix[monitor]'") from None
        self.registry = prom.CollectorRegistry()
        per_layer, per_domain = ["layer", "domain"], ["domain"]
        self.share = prom.Histogram("sinkfix_sink_share", "Sink share of one head over one request",
                                    per_layer, buckets=SHARE_BUCKETS, registry=self.registry)
        self.peak = prom.Histogram("sinkfix_residual_peak_ratio", "Residual-norm max / median over one request",
                                   per_layer, buckets=PEAK_BUCKETS, registry=self.registry)
        self.dormant = prom.Histogram("sinkfix_dormant_heads", "Dormant heads of one request", per_domain,
                                      buckets=DORMANT_BUCKETS, registry=self.registry)
        self.requests = prom.Counter("sinkfix_requests", "Requests monitored", per_domain, registry=self.registry)
        self.tokens = prom.Counter("sinkfix_tokens", "Tokens monitored", per_domain, registry=self.registry)
        # the two differ: a trip whose KV cache could not be rolled back is served with the correction,
        # and the in-range rows of a batch in which another row tripped are served without it
        self.trips = prom.Counter("sinkfix_guard_trips", "Requests the guard served without the correction",
                                  per_domain, registry=self.registry)
        self.out_of_range = prom.Counter("sinkfix_guard_out_of_range",
                                         "Requests whose prompt left the guard's ranges (served without the "
                                         "correction, or with it where the KV cache could not be rolled back)",
                                         per_domain, registry=self.registry)
        self.hidden = prom.Counter("sinkfix_hidden_sinks", "Hidden sinks found on prompts", per_layer,
                                   registry=self.registry)
        try:
            self._server, self._thread = prom.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise _unservable(host, port, exc) from None
        self.host = host
        self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address goes in brackets
        return f"http://{host}:{self.port}/metrics"

    def observe(self, record: dict) -> None:
        domain = record["domain"] if record["domain"] is not None else NO_DOMAIN
        for layer, heads in enumerate(record["sink_share"]):
            histogram = self.share.labels(str(layer), domain)
            for value in heads:
                if value is not None:
                    histogram.observe(value)
        for layer, value in enumerate(record["residual_peak"]):
            if value is not None:
                self.peak.labels(str(layer), domain).observe(value)
        for layer, counts in enumerate(record["hidden_sinks"]):
            if sum(counts):
                self.hidden.labels(str(layer), domain).inc(sum(counts))
        self.dormant.labels(domain).observe(record["dormant_heads"])
        self.requests.labels(domain).inc()
        self.tokens.labels(domain).inc(record["tokens"])
        if served_without_correction(record):
            self.trips.labels(domain).inc()
        if guard_tripped(record):
            self.out_of_range.labels(domain).inc()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
