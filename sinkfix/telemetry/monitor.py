"""``sinkfix.monitor(model)``: live extreme-token telemetry of a patched model while it serves requests.

    monitor = sinkfix.monitor(model, log="telemetry.jsonl", prometheus_port=9464)
    with monitor.request(domain="code"):
        model.generate(**inputs, max_new_tokens=32)     # or model(...), batched, with a KV cache
    monitor.close()

Inside a ``request()`` block every forward of the model feeds one :class:`RequestAccumulator` on
the device: the attention calls' sink statistics (the fast path's side output, no forced Python
path), the prompt's drain weights and sampled hidden sinks, and each decoder layer's residual
norms. Nothing is read on the host until the block ends; then one transfer, one record per batch
row, and the record goes to the log, to Prometheus and to the callback. Outside ``request()``
blocks the model runs exactly as it would unmonitored (no listener, no hook attached).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import numbers
import os
import uuid
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from sinkfix.analysis.metrics import HIDDEN_SINK_THRESHOLD, check_count, check_hidden_sink_threshold
from sinkfix.errors import MonitorError, OutputError
from sinkfix.telemetry.accumulate import DEFAULT_DECODE_CAPACITY, RequestAccumulator
from sinkfix.telemetry.guard import DEFAULT_MARGIN, Guard, GuardDecision
from sinkfix.telemetry.outputs import JsonlLog, PrometheusExporter
from sinkfix.telemetry.prompt import LayoutCache, Workspace, measure_sampled_many, sample_call
from sinkfix.telemetry.records import RequestInfo, build_records
from sinkfix.telemetry.requests import check_domain_label
from sinkfix.telemetry.sharded import TensorParallelGroup

__all__ = ["CallbackWarning", "LogWriteWarning", "Monitor", "monitor", "SAMPLE_ROWS", "check_sample_rows",
           "refuse_content_sinks"]


class CallbackWarning(RuntimeWarning):
    """A monitor's callback raised: the request was served and logged, the callback missed a record."""


class LogWriteWarning(RuntimeWarning):
    """A monitor could not append a record to its log (a full disk, a file removed from under it):
    the request was served, its records are in ``monitor.records``, the metrics and the callback."""

#: Query rows of the prompt whose whole attention rows are rebuilt for the hidden-sink estimate:
#: a (B, H, rows, K) block per layer, once per request. On SmolLM2 (512-token prompts, one thread)
#: 32 rows took the prompt measures from 28.7 to 15.7 ms against 64, with dormant-head counts as
#: close to inspect's on 8 windows of prose and code (528 vs 529 and 445 vs 441 with 32 rows;
#: 527 vs 529 and 444 vs 441 with 64); the per-head dormancy is noisier (mean difference 0.0065
#: against 0.0042). docs/monitoring.md, "Why 32 rows".
SAMPLE_ROWS = 32


def check_sample_rows(value: Any, name: str = "sample_rows") -> int:
    """The prompt rows behind the hidden-sink estimate, checked: an integer >= 1 (default
    :data:`SAMPLE_ROWS`); anything else is a :class:`MonitorError` naming ``name``."""
    return check_count(value, name, MonitorError)


@dataclass
class _Request:
    id: str
    domain: str | Sequence[str | None] | None
    row_ids: tuple[str | None, ...] | None = None  # per batch row, given by the caller (None: the request's id)
    acc: RequestAccumulator | None = None
    cache_before: int | None = None  # the cache's length before the prompt's forward (guard rollback)
    decision: GuardDecision | None = None
    records: list[dict] = field(default_factory=list)
    finished: torch.Tensor | None = None  # (B,) bool, rows of a generate() that produced an end-of-sequence token

    def domains(self, batch: int) -> list[str | None]:
        self.check_labels(batch)
        return [self.domain] * batch if self.domain is None or isinstance(self.domain, str) else list(self.domain)

    def __post_init__(self) -> None:
        # (what, how many) of the labels given per row, counted once here: the checks compare these numbers
        # with the batch on the host (Monitor._check_before_forward); read in a traced forward, the labels,
        # the id and these counts made dynamo guard the graphs on their values
        self.label_counts = tuple((what, len(labels)) for labels, what in (
            (None if self.domain is None or isinstance(self.domain, str) else self.domain, "domain labels"),
            (self.row_ids, "request ids")) if labels is not None)

    def check_labels(self, batch: int) -> None:
        """Refuse a label count other than the batch's (numbers only: :meth:`__post_init__`)."""
        for what, count in self.label_counts:
            if count != batch:
                raise MonitorError(f"request {self.id}: {count} {what} for a batch of {batch} sequences")

    def ids(self, batch: int) -> list[str]:
        self.check_labels(batch)
        return [self.id] * batch if self.row_ids is None else [self.id if row is None else row for row in self.row_ids]


def _as_keywords(function: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``function(*args, **kwargs)``'s arguments with the positional ones named, so that the checks
    before a call read every argument: ``generate(ids, GenerationConfig(num_beams=3))`` and
    ``model(ids, mask)`` pass the config and the mask positionally, and checks that read keywords
    alone let beam search crash mid-request and refused right padding only after the forward. A
    signature that cannot be bound (a ``*args``, or a call the function itself would refuse) is left
    as it is: the call then raises its own error."""
    if not args:
        return args, kwargs
    try:
        signature = inspect.signature(function)
        bound = signature.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    parameters = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters.values()):
        return args, kwargs
    positional: list = []  # positional-only parameters stay positional (a keyword would land in **kwargs)
    named: dict = {}
    for name, value in bound.arguments.items():
        kind = parameters[name].kind
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            positional.append(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return tuple(positional), named


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module whose signatures name the arguments: a ``torch.compile`` wrapper's forward takes
    ``*args``, which named nothing, so a positional mask escaped the checks (and the forward ran)."""
    return getattr(model, "_orig_mod", model)


def _refuse_right_padding(kwargs: dict) -> None:
    rows = _rows_padded_after_real(kwargs.get("attention_mask"))
    if rows:
        raise MonitorError(_RIGHT_PADDING.format(rows=rows))


def _check_labels(value: Any, what: str) -> str | tuple[str | None, ...] | None:
    """Labels given for a request (its domain, its id): a string, None, or a sequence of strings /
    None (one per batch row), checked when the request starts: anything else would be logged as it
    is, against the schema, and break ``sinkfix monitor report`` later."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        labels = tuple(value)
        wrong = [label for label in labels if label is not None and not isinstance(label, str)]
        if not wrong:
            return labels
        raise MonitorError(f"{what} labels must be strings or None, got {wrong[0]!r} ({type(wrong[0]).__name__})")
    raise MonitorError(f"{what} must be a string, None, or one string (or None) per batch row, got {value!r}")


def _real_rows(mask: Any, batch: int, q_len: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, Q) bool: the forward's new tokens that are not padding; and (B,) bool, the rows padded
    after a real token (None when the layout cannot have any).

    A left-padding row sees no key. A right-padding row of a causal mask sees the real keys before
    it, exactly what the row before it sees, where a real row sees one key more (itself; a sliding
    window also drops one): such rows are not real, and their batch row is flagged, because the fast
    path's sink statistics count every row that sees a key (RequestAccumulator.padding_after_real)."""
    from sinkfix.integrations.masks import PaddedCausalMask

    if isinstance(mask, PaddedCausalMask):  # sinkfix's structured mask: built dense once per forward here
        mask = mask.dense if mask.key_padding is not None else None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        return torch.ones(batch, q_len, dtype=torch.bool, device=device), None
    if mask.dtype != torch.bool:  # an additive float mask: 0 = attend
        mask = mask > torch.finfo(mask.dtype).min / 2
    seen = mask[:, 0]
    real = seen.any(-1).expand(batch, q_len)
    if q_len < 2:
        return real, None
    repeated = (seen[:, 1:] == seen[:, :-1]).all(-1) & real[:, 1:]  # (B, Q - 1)
    real = torch.cat([real[:, :1], real[:, 1:] & ~repeated], dim=1)
    return real, repeated.any(-1).expand(batch)


def _rows_padded_after_real(mask: Any) -> list[int]:
    """The rows a 2-D attention mask (B, T) pads after a real token (right padding): one host read,
    at the start of a request (Monitor.forward / Monitor.generate)."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[1] < 2:
        return []
    attends = mask != 0
    return torch.nonzero((attends[:, :-1] & ~attends[:, 1:]).any(-1)).flatten().tolist()


_RIGHT_PADDING = ("padding after a real token (right padding) in batch rows {rows}: the fast path's sink statistics "
                  "sum over every query row that sees a key, and a right-padding row sees the real keys before it, "
                  "so these rows' records would count their padding; pad on the left (tokenizer.padding_side = "
                  "'left') or send such prompts one by one")


def _cache_of(kwargs: dict) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _compiled_decode_capacity(cache: Any, compiled: bool = False) -> int | None:
    """Decode tokens the accumulator's compiled-step buffer must hold (telemetry/accumulate.py): the
    cache's maximum length when the cache is one transformers compiles decoding with (a static
    cache); :data:`DEFAULT_DECODE_CAPACITY` when the prompt's forward is itself compiled (a model
    under torch.compile) with a cache that states no maximum (DynamicCache: without the buffer every
    decode step appended to a list, dynamo compiled each step again and the second request stopped
    at its recompile limit); None (no buffer) otherwise: eager decode steps need none."""
    if cache is None or not getattr(cache, "is_compileable", False):
        return DEFAULT_DECODE_CAPACITY if compiled else None
    most = -1
    for name in ("get_max_length", "get_max_cache_shape"):  # the second is the older transformers' name
        try:
            most = int(getattr(cache, name)())
            break
        except (AttributeError, TypeError, ValueError, NotImplementedError):
            continue
    return most if most > 0 else DEFAULT_DECODE_CAPACITY


def _forward_is_compiled(model: nn.Module) -> bool:
    """``model.forward = torch.compile(model.forward, ...)``: its forward is a dynamo wrapper."""
    return getattr(getattr(model, "forward", None), "_torchdynamo_orig_callable", None) is not None


def _rollback(cache: Any, before: int | None, added: int) -> bool:
    """Put a KV cache back as it was before a forward that added ``added`` tokens; False when it
    cannot be (e.g. a sliding-window layer that already evicted what it would need), and the cache
    is then left as the forward made it. transformers crops layer by layer, so a model whose full
    layers come before a sliding one had those layers cut when the sliding one refused (a Qwen2 with
    its first layer full: 250 of 270 tokens gone, the next step's logits 0.089 off): every layer's
    attributes are kept before and put back when any layer refuses. That covers the caches whose
    crop replaces its tensors (DynamicCache's full and sliding layers); a layer whose crop writes
    into a tensor in place (static and linear-attention layers' counters) is not restored."""
    if cache is None:
        return True  # the model made its own cache for that forward
    kept = [(owner, dict(vars(owner))) for owner in (cache, *(getattr(cache, "layers", None) or ()))
            if hasattr(owner, "__dict__")]
    try:
        if before == 0:
            cache.reset()
        else:
            cache.crop(-added)
    except (AttributeError, RuntimeError, ValueError, NotImplementedError):
        for owner, attributes in kept:  # DynamicCache's crop replaces its tensors (docstring)
            vars(owner).clear()
            vars(owner).update(attributes)
        return False
    return True


class Monitor:
    """Telemetry of one patched model; create it with :func:`monitor`. Not thread-safe: one request
    at a time (the attention listeners are per model)."""

    def __init__(self, model: nn.Module, *, log: str | Path | None = None, prometheus_port: int | None = None,
                 prometheus_host: str = "127.0.0.1", callback: Callable[[dict], None] | None = None,
                 guard: Any = None, guard_margin: float | None = None, sample_rows: int = SAMPLE_ROWS,
                 hidden_sink_threshold: float = HIDDEN_SINK_THRESHOLD, min_queries: int = 32,
                 patch_if_needed: bool = True) -> None:
        from sinkfix.analysis.inspection import model_summary

        self.model = model
        self.log = self.exporter = None
        # checked before anything else, so that a refused argument leaves the model as it was
        if callback is not None and not callable(callback):
            raise MonitorError(f"callback must be a function of one record (or None), got {callback!r}")
        if log is not None and not isinstance(log, (str, os.PathLike)):
            raise MonitorError(f"log must be a file path (str or os.PathLike) or None, got {log!r}")
        self.sample_rows = check_sample_rows(sample_rows)
        self.hidden_sink_threshold = check_hidden_sink_threshold(hidden_sink_threshold, error=MonitorError)
        self.min_queries = check_count(min_queries, "min_queries", MonitorError)
        self._handle, self.owns_patch = _patched(model, guard, patch_if_needed)
        self.session = uuid.uuid4().hex[:12]
        self._counter = itertools.count()
        self._request: _Request | None = None
        self._hooks: list = []
        self._first_hooked: nn.Module | None = None  # the module _before_layers is hooked on
        self._handle.track_listener_hooks(self._hooks)  # a deep copy of the model leaves them behind
        self._rerunning = False
        self._closed = False
        self._layouts = LayoutCache()
        self._sampled: list = []  # the prompt's sampled calls, measured after the forward's last layer
        self._workspace = Workspace()  # the prompt measures' CPU buffers, kept between requests (Workspace says why)
        self.records: list[dict] = []  # the last request's records
        # records appended to the log and records whose write failed (LogWriteWarning), since creation:
        # a caller that must know whether every record reached the log reads these, not the warnings
        # (`sinkfix monitor run` said "appended 3 records" and exited 0 when 2 of the 3 never reached it)
        self.records_logged = 0
        self.records_not_logged = 0
        self.last_log_error: str | None = None
        try:  # anything refused below leaves the model as it was (close() removes a patch made here)
            _check_supported(self._handle)
            # looked up once: walking the model's modules for them took 1.3 ms of every request
            # (SmolLM2, one thread), and neither changes while the patch lives
            self._layers = self._handle.decoder_layers()
            self._num_heads = self._handle.num_heads()
            self._sharded = _sharded(model, self._handle, guard)
            self.guard = _as_guard(guard, guard_margin, self._handle, model)
            self._model_name = str(model_summary(model)["name"])
            # sharded: every rank builds the whole model's records, rank 0 of the group emits them
            replica = self._handle.replicated_attention
            emits = (self._sharded.rank == 0 if self._sharded is not None
                     else replica is None or replica[0] == 0)
            # the endpoint first: a port in use then leaves no empty log file behind
            self.exporter = (None if prometheus_port is None or not emits
                             else PrometheusExporter(prometheus_port, prometheus_host))
            # the records' model and heads per layer: a log of another model is refused, not appended to
            # (its report then refused the whole file as mixing models)
            heads = (self._num_heads if self._sharded is None
                     else [h * self._sharded.size for h in self._num_heads])
            self.log = None if log is None or not emits else JsonlLog(log, model=self._model_name, heads=heads)
        except BaseException:
            self.close()
            raise
        self.callback = callback if emits else None

    # -- public -------------------------------------------------------------------------------
    @property
    def prometheus_url(self) -> str | None:
        return None if self.exporter is None else self.exporter.url

    @contextlib.contextmanager
    def request(self, domain: str | Sequence[str | None] | None = None,
                request_id: str | Sequence[str | None] | None = None) -> Iterator[_Request]:
        """Record every forward inside the block as one request (one record per batch row).
        ``domain``: one label for the batch, or one per batch row. ``request_id``: the records'
        ``request`` field: one id for the batch, or one per batch row (None rows, and no id at all,
        get the monitor's own ``SESSION-N``)."""
        if self._request is not None:
            raise MonitorError("a monitor records one request at a time (request() blocks cannot nest)")
        if self._closed:
            raise MonitorError("this monitor was closed (its log and endpoint are shut): create a new one")
        if not self._handle.active:
            raise MonitorError(self._inactive_reason())
        domain = _check_labels(domain, "domain")
        for label in domain if isinstance(domain, tuple) else (domain,):
            check_domain_label(label)
        request_id = _check_labels(request_id, "request_id")
        own_id = f"{self.session}-{next(self._counter)}"
        if isinstance(request_id, tuple):
            req = _Request(own_id, domain, row_ids=request_id)
        else:
            req = _Request(own_id if request_id is None else request_id, domain)
        self._request = req
        # not the previous request's: one refused before its forward, or when it ends (right padding, a
        # changed batch, a label count the hooks could not check under torch.compile(model)), leaves none
        self.records = []
        self._attach()
        try:
            yield req
            self._detach()
            if self._closed:  # close() ran inside the block: later forwards were not monitored
                warnings.warn(f"sinkfix.monitor: closed during request {req.id}: it has no record (the forwards "
                              "after close() ran unmonitored)", RuntimeWarning, stacklevel=3)
            else:
                self._finish(req)
        finally:
            self._detach()
            self._handle.restore_layers()
            self._request = None
            self._sampled = []  # a forward that raised leaves its sampled calls behind

    def _inactive_reason(self) -> str:
        from sinkfix.patch import PatchHandle

        current = PatchHandle.of(self.model)
        replaced = current._replaced if current is not None else None
        while replaced is not None and replaced is not self._handle:
            replaced = replaced._replaced
        if replaced is not None and not self._handle._dismissed:
            # a nested `with sinkfix.patch(...)` block: this monitor's patch comes back when it ends
            return ("another patch is in force on this model (sinkfix.patch called after this monitor's): this "
                    "monitor records the patch it was made for, which is back in force when a `with` block of the "
                    "newer patch ends; monitor the newer patch with a monitor of its own")
        if current is None:  # the model runs stock now: there is no new patch to monitor
            return ("this monitor's patch was removed from the model (sinkfix's PatchHandle.remove()), which runs "
                    "stock now: create a new monitor (it patches the stock model with the identity again)")
        return "the model's patch was removed and another patch is in force; create a new monitor for that patch"

    def generate(self, *args, domain: str | Sequence[str | None] | None = None,
                 request_id: str | Sequence[str | None] | None = None, **kwargs):
        """``model.generate(*args, **kwargs)`` recorded as one request; ``domain`` and ``request_id``
        as :meth:`request` takes them (the record's, never passed to the model). Beam search is
        refused: its beams are batch rows that transformers reorders between steps, so no row's record
        would describe one sequence; so is assisted decoding (prompt lookup, an assistant model), whose
        draft tokens are fed and most of them cropped again."""
        args, kwargs = _as_keywords(_unwrapped(self.model).generate, args, kwargs)
        _refuse_beams(self.model, kwargs)
        _refuse_assisted(self.model, kwargs)
        _refuse_right_padding(kwargs)
        eos = _eos_ids(self.model, kwargs)
        with self.request(domain, request_id) as req:
            if eos is not None:  # a row that ends early is fed padding, with a mask of ones, until the last ends
                from transformers import StoppingCriteriaList

                kwargs["stopping_criteria"] = StoppingCriteriaList(
                    [*(kwargs.get("stopping_criteria") or []), _FinishedRows(req, eos)])
            return self.model.generate(*args, **kwargs)

    def forward(self, *args, domain: str | Sequence[str | None] | None = None,
                request_id: str | Sequence[str | None] | None = None, **kwargs):
        """``model(*args, **kwargs)`` recorded as one request; ``domain`` and ``request_id`` as
        :meth:`request` takes them (a Llama's forward swallowed an unknown ``request_id`` keyword, and
        the record got the monitor's own id)."""
        args, kwargs = _as_keywords(_unwrapped(self.model).forward, args, kwargs)
        _refuse_right_padding(kwargs)  # before the forward: nothing served is lost
        with self.request(domain, request_id):
            return self.model(*args, **kwargs)

    def close(self) -> None:
        """Stop the endpoint, close the log and remove the identity patch the monitor made itself;
        a closed monitor refuses further requests. Called inside a request, it ends the monitoring
        there: that request gets no record (a RuntimeWarning names it)."""
        self._closed = True
        if getattr(self, "_request", None) is not None:
            self._detach()
        if getattr(self, "_hooks", None) is not None:
            self._handle.untrack_listener_hooks(self._hooks)
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.owns_patch:
            _release_identity(self._handle)
            self.owns_patch = False

    def __deepcopy__(self, memo: dict) -> "Monitor":
        # a monitor is tied to one model, as its patch handle is: not copied. A model deep-copied
        # inside a request reaches it through its hooks' bound methods, and copying it copied the
        # handle early, before the model's later layers, whose monitor hooks the copy then kept (its
        # first forward failed in them); the handle strips them from the copy once every layer is copied
        return self

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- hooks (attached for the length of a request) -------------------------------------------
    def _attach(self) -> None:
        # Everything but the guard hooks a module *inside* the model (the first decoder layer, the
        # decoder layers, the attention function), so torch.compile traces it into the model's own
        # graph; hooks on the model itself would run in frames of their own.
        layers = self._layers
        self._handle.add_telemetry(self._on_attention)
        first = layers[0] if layers and layers[0] is not None else self.model
        self._first_hooked = first
        self._hooks.append(first.register_forward_pre_hook(self._before_layers, with_kwargs=True))
        last = max((layer for layer, module in enumerate(layers) if module is not None), default=None)
        for layer, module in enumerate(layers):
            if module is not None:
                self._hooks.append(module.register_forward_hook(self._residual_hook(layer, layer == last)))
        # the batch checks on the host, outside a compiled forward's graph (_check_before_forward)
        self._hooks.append(self.model.register_forward_pre_hook(self._check_before_forward, with_kwargs=True))
        if self.guard is not None:
            self._hooks.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
            self._hooks.append(self.model.register_forward_hook(self._after_forward, with_kwargs=True))

    def _detach(self) -> None:
        self._handle.remove_telemetry(self._on_attention)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _before_layers(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Start of one forward, seen from the first decoder layer: its hidden states give the batch
        and the new tokens, its (B, 1, Q, K) mask which of them are real (a padding row sees no key)."""
        if module is not self._first_hooked:
            return  # a deep copy of a submodule taken inside a request: its forwards are not this request's
        req = self._request
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_ids"))
        batch, q_len = hidden.shape[0], hidden.shape[1]
        self._measure_sampled()  # a forward whose last decoder layer had no hook
        compiling = torch.compiler.is_compiling()
        if not compiling:  # traced, these checks fixed each graph to one batch size (_check_before_forward)
            self._check_batch(req, batch)
        if req.acc is None:
            req.acc = RequestAccumulator(self._num_heads, batch, hidden.device,
                                         decode_capacity=_compiled_decode_capacity(_cache_of(kwargs), compiling))
        elif compiling:  # checked on the host when the request ends (torch.compile(model), model.forward(...))
            req.acc.note_batch(batch)
        real, padding_after_real = _real_rows(kwargs.get("attention_mask"), batch, q_len, hidden.device)
        req.acc.begin_forward(real, req.finished, padding_after_real)
        self._layouts = self._layouts.for_next_forward()  # the prompt measures' layouts (telemetry/prompt.py)

    @staticmethod
    def _check_batch(req: _Request, batch: int) -> None:
        """A wrong label count refused before the request's first forward (not after a whole
        generation); a batch that changes within the request refused before the forward that changes it."""
        if req.acc is None:
            req.check_labels(batch)
        elif batch != req.acc.batch:
            raise MonitorError(f"request {req.id}: the batch changed from {req.acc.batch} to {batch} sequences "
                               "within one request (beam search is not supported)")

    def _check_before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The batch checks of :meth:`_check_batch` on the host, before the model's forward. With the
        model's forward compiled, the first layer's hook runs in the graph, where the checks compared
        the request's label count and its accumulator's batch with the graph's batch: dynamo guarded
        every graph on those numbers, so each new batch size cost a prompt graph and a decode graph
        (``generate`` requests of batch sizes 2, 1, 3 with a domain label per row reached the
        recompile limit at the fourth request), and a MonitorError raised there became dynamo's
        "Observed exception". Inside a compiled region (``torch.compile(model)`` traces this hook)
        nothing is checked here; the label count and a changed batch (``RequestAccumulator.note_batch``)
        are then checked when the request ends."""
        req = self._request
        if module is not self.model or req is None or torch.compiler.is_compiling():
            return  # a copy of the model carrying this hook: not this request's
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if isinstance(inputs, torch.Tensor) and inputs.ndim >= 2:
            self._check_batch(req, inputs.shape[0])

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """(guard only) the cache's length before the prompt's forward, to roll it back."""
        req = self._request
        if module is not self.model:
            return  # a copy of the model carrying this hook: not this request's
        if req.acc is None:
            cache = _cache_of(kwargs)
            req.cache_before = None if cache is None else int(cache.get_seq_length())

    def _on_attention(self, call) -> None:
        acc = self._request.acc
        if call.sink_stats_deferred:  # an eager decode step of plain softmax (integrations/attention.py)
            acc.add_first_column_rows(call.layer, call.query, call.key, call.result.lse, call.scale)
        else:
            acc.add_attention(call.layer, call.result.sink_stats)
        if acc.in_prompt:  # the sampled rows now, the rest after the forward's last layer
            self._sampled.append(sample_call(call, rows_wanted=self.sample_rows, min_queries=self.min_queries,
                                             layouts=self._layouts))

    def _measure_sampled(self) -> None:
        """The prompt measures of the calls sampled so far, back to back (SampledCall says why)."""
        sampled, self._sampled = self._sampled, []
        acc = self._request.acc if self._request is not None else None
        if acc is None:  # a guard's rerun started the request over: those calls were never served
            return
        if sampled:
            with torch.no_grad():  # a request served with autograd on: the measures write into buffers (out=)
                measures = measure_sampled_many(sampled, threshold=self.hidden_sink_threshold,
                                                workspace=self._workspace)
            acc.add_prompts([call.layer for call in sampled], measures, [call.rows for call in sampled])
        if torch.compiler.is_compiling():
            # a layout cache left on the monitor when the traced forward ends would be rebuilt as a Python
            # object, and its keys' symbolic prompt length with it: dynamo then fixes the graph to that
            # length (a new graph per prompt length, the recompile limit at a tiny Llama's eighth length)
            self._layouts = LayoutCache()

    def _residual_hook(self, layer: int, last: bool):
        own = self._layers[layer]

        def hook(module: nn.Module, args, output) -> None:
            if module is not own:
                return  # a deep copy of a submodule taken inside a request: its forwards are not this request's
            acc = self._request.acc
            acc.add_residual(layer, output if isinstance(output, torch.Tensor) else output[0])
            if last:
                if self._sampled:
                    self._measure_sampled()
                acc.end_forward()

        return hook

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if module is not self.model:
            return None  # a copy of the model carrying this hook: not this request's
        req = self._request
        prompt, req.acc.in_prompt = req.acc.in_prompt, False
        if self.guard is None or not prompt or self._rerunning:
            return None
        req.decision = self.guard.decide(req.acc.stats)  # the one extra host read a guard costs
        if not req.decision.layers:
            req.decision.record("none")
            return None
        if not _rollback(_cache_of(kwargs), req.cache_before, int(req.acc.real[0].shape[1])):
            req.decision.record("logged only: the KV cache could not be rolled back")
            return None
        # serve the whole request with the fallback: the prompt's forward again, those layers off; a
        # compiled forward keeps its graphs (the identity's values in place: PatchHandle.run_as_identity)
        self._handle.run_as_identity(req.decision.layers, in_place=_forward_is_compiled(module))
        req.acc = None
        req.decision.record("rerun as identity", whole_batch=True)
        self._rerunning = True
        try:
            return module(*args, **kwargs)
        finally:
            self._rerunning = False

    # -- the end of a request -----------------------------------------------------------------
    def _finish(self, req: _Request) -> None:
        if req.acc is None:  # no forward ran inside the block (records: none, set when it started)
            return
        self._measure_sampled()
        values = req.acc.read()  # the one host read of the request
        if bool(values.pop("batch_changed")):  # no record: rows of two batch sizes were summed together
            raise MonitorError(f"request {req.id}: the batch changed from {req.acc.batch} sequences within one "
                               "request, in a compiled forward whose checks could not run before it "
                               "(torch.compile(model), or model.forward called directly); it has no record")
        padded = values.pop("padding_after_real").bool()
        if padded.any():  # no record: the outputs were served, the statistics cannot be told apart
            raise MonitorError(_RIGHT_PADDING.format(rows=torch.nonzero(padded).flatten().tolist()))
        identity = set(self._handle.identity_layers)  # switched off in place, a layer keeps its policy
        betas = [torch.ones_like(lp.beta) if lp.layer in identity else lp.beta for lp in self._handle.layer_policies()]
        num_heads, kv_heads = self._num_heads, req.acc.kv_heads
        if self._sharded is not None:  # the other ranks' heads (telemetry/sharded.py)
            values, betas, num_heads, kv_heads = _gather_shards(self._sharded, values, betas, num_heads, kv_heads)
        info = RequestInfo(
            req.ids(req.acc.batch), req.domains(req.acc.batch), self._model_name, self._handle.policy.describe(),
            betas, self._handle.identity_layers, None if req.decision is None else req.decision.rows)
        records = build_records(values, info, num_heads, kv_heads)
        for record in records:
            record["session"] = self.session
            if self.log is not None:
                self._write_log(record)
            if self.exporter is not None:
                self.exporter.observe(record)
        req.records = records
        self.records = records
        if self.callback is not None:
            self._call_back(records)

    def _write_log(self, record: dict) -> None:
        """Append ``record`` to the log. A failed write is reported as a warning: raised, it threw
        away what ``generate`` returned and left the batch's later rows out of the metrics. Either way
        it is counted (``records_logged`` / ``records_not_logged``, ``last_log_error``)."""
        try:
            self.log.write(record)
            self.records_logged += 1
        except (OutputError, OSError) as exc:  # a ValueError from the JSON encoder is a bug, not the disk's
            self.records_not_logged += 1
            self.last_log_error = str(exc)
            warnings.warn(f"sinkfix.monitor: could not append request {record['request']}, row {record['index']} "
                          f"to the telemetry log: {exc}; the record is in monitor.records", LogWriteWarning,
                          stacklevel=3)

    def _call_back(self, records: list[dict]) -> None:
        """The user's callback on every record. Its failure is the callback's, not the request's: it
        is reported as a warning and the request's output, log lines and metrics stand (raised, it
        threw away what ``generate`` returned and left the batch's later rows out of the log)."""
        for record in records:
            try:
                self.callback(record)
            except Exception as exc:  # noqa: BLE001 - any failure of user code, reported below
                warnings.warn(f"sinkfix.monitor: the callback raised {type(exc).__name__}: {exc} (request "
                              f"{record['request']}, row {record['index']}); the record is in monitor.records "
                              "and in the log", CallbackWarning, stacklevel=2)


#: Per model, the identity patch a monitor made on its stock model -> how many open monitors rely on
#: it (the one that made it and those created on the model while it was in force). The patch stays
#: while any of them is open and is removed by the last one's close(): before, the first monitor's
#: close() unpatched the model under a second one, which refused every later request. Keyed by the
#: patch handle (one per patched model), weakly: a collected model takes its entry with it.
_IDENTITY_USERS: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def _release_identity(handle) -> None:
    """One monitor that relied on a monitor-made identity patch is done with it: the last one removes it."""
    users = _IDENTITY_USERS.get(handle, 1) - 1
    if users > 0:
        _IDENTITY_USERS[handle] = users
        return
    _IDENTITY_USERS.pop(handle, None)
    handle.remove()


def _patched(model: nn.Module, guard: Any, patch_if_needed: bool):
    """(handle, whether the monitor relies on an identity patch a monitor made, and removes it as the
    last such monitor to close): an unpatched model is patched with the identity, and a model whose
    patch in force is a monitor's identity shares it."""
    from sinkfix.patch import PatchHandle, patch, require_process_group
    from sinkfix.policy import Policy

    # before the identity patch, whose discovery forward ran into torch's own error
    require_process_group(model, MonitorError, " and the monitor gathers every rank's heads after each request")
    handle = PatchHandle.of(model)
    if handle is not None:
        if handle.active and handle in _IDENTITY_USERS:
            _IDENTITY_USERS[handle] += 1
            return handle, True
        return handle, False
    if guard is not None:
        raise MonitorError("a guard switches a correction off, and this model is not patched: patch it with the "
                           "profile whose statistics the guard uses first (sinkfix.patch(model, profile))")
    if not patch_if_needed:
        raise MonitorError("this model is not patched: call sinkfix.patch(model, policy) first, or pass "
                           "patch_if_needed=True to monitor the stock model (the identity policy)")
    handle = patch(model, Policy())
    _IDENTITY_USERS[handle] = 1
    return handle, True


_CONTENT_REFUSED = ("telemetry is not implemented for content-dependent sinks (Policy(content_sinks=...): "
                    "hidden_sink_scale / hidden_sink_threshold / act, or a content-mode profile), {where}: monitor a "
                    "positional policy or profile, or the stock model")


def refuse_content_sinks(correction: Any, where: str) -> None:
    """Refuse a Policy or Profile with content-dependent sinks before any model is loaded (the same
    refusal as :func:`monitor` makes for a patched model)."""
    content = getattr(correction, "content_sinks", None)
    if content is not None and not content.is_identity:
        raise MonitorError(_CONTENT_REFUSED.format(where=where))


def _check_supported(handle) -> None:
    """Refuse at creation what the attention calls would refuse at the first request."""
    content = [lp.layer for lp in handle.layer_policies() if lp.content is not None]
    if content:
        raise MonitorError(_CONTENT_REFUSED.format(where=f"layers {content[0]}..{content[-1]} of this patch"))


def _sharded(model: nn.Module, handle, guard: Any) -> TensorParallelGroup | None:
    """The tensor-parallel group whose heads a record gathers (None when the attention heads are not
    sharded: not sharded at all, or every rank computing all of them)."""
    if handle.tensor_parallel is None and handle.replicated_attention is None:
        return None
    if guard is not None:
        raise MonitorError("the guard is not available on a model sharded with tensor parallelism: each rank "
                           "decides alone, and a rank that switched its correction off and ran the prompt again "
                           "alone would leave the others waiting in the collective; monitor without a guard (the "
                           "records still cover every head)")
    if handle.tensor_parallel is None:  # every rank computes every head: its own records are whole
        return None
    heads = handle.num_heads()
    if len(set(heads)) != 1:
        raise MonitorError(f"a sharded model whose layers have different head counts ({sorted(set(heads))}) "
                           "cannot be gathered into one record")
    return TensorParallelGroup.of(model, *handle.tensor_parallel)


def _gather_shards(group: TensorParallelGroup, values: dict, betas: list, num_heads: list[int],
                   kv_heads: list[int]) -> tuple[dict, list, list[int], list[int]]:
    """This rank's request values with every rank's heads put side by side (one collective)."""
    kv = max(kv_heads, default=0)
    fields = {name: (values[name], 2) for name in ("stats", "drain_weight", "hidden_sinks", "hidden_part")}
    fields["value_drain"] = (values["value_drain"][:, :, :kv], 2)
    fields["betas"] = (torch.stack([beta.detach().double().cpu() for beta in betas]), 1)
    gathered = group.gather_heads(fields)
    whole = {**values, **{name: gathered[name] for name in fields if name != "betas"}}
    return (whole, list(gathered["betas"].unbind(0)), [h * group.size for h in num_heads],
            [k * group.size for k in kv_heads])


def _eos_ids(model: nn.Module, kwargs: dict) -> list[int] | None:
    """The end-of-sequence ids a ``generate`` call stops rows at: its own argument, its generation
    config's where it sets them, or the model's (``_generation_value``: with a passed config, reading
    only it missed the model's end-of-sequence ids, and a row that ended early had its padding steps
    counted: 18 tokens instead of 14, sink share 0.147 instead of 0.174)."""
    eos = _generation_value(model, kwargs, "eos_token_id")
    if eos is None:
        return None
    ids = [int(e) for e in (eos.flatten().tolist() if isinstance(eos, torch.Tensor) else
                            eos if isinstance(eos, (list, tuple)) else [eos])]
    return ids or None


class _FinishedRows:
    """A stopping criterion that stops nothing: it marks, after every new token, the rows whose last
    token is an end-of-sequence id, so that the monitor stops counting them (transformers keeps
    feeding a finished row padding, with a mask of ones, until every row has finished: before, a row
    that ended early got those steps in its tokens, sink shares and residual peaks). Device ops only."""

    def __init__(self, request: _Request, eos: list[int]) -> None:
        self.request, self.eos = request, eos
        self._eos_tensor: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self._eos_tensor is None or self._eos_tensor.device != input_ids.device:
            self._eos_tensor = torch.tensor(self.eos, device=input_ids.device)
        ended = torch.isin(input_ids[:, -1], self._eos_tensor)
        req = self.request
        req.finished = ended if req.finished is None else req.finished | ended
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generation_value(model: nn.Module, kwargs: dict, name: str, default: Any = None) -> Any:
    """The value ``generate`` will use for the setting ``name``: the call's argument when given (None
    included: it is applied last), else the call's generation config's where it sets one (not None),
    else the model's own, else ``default``. transformers fills the fields a passed generation config
    leaves unset from the model's (``_prepare_generation_config``): reading only the passed config let
    prompt lookup and beam search that the model's config asked for run unrefused (a 14-token prompt
    logged as 16 tokens; one beam-search request written as 3 records)."""
    if name in kwargs:
        return kwargs[name]
    for config in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
        value = getattr(config, name, None) if config is not None else None
        if value is not None:
            return value
    return default


def _refuse_beams(model: nn.Module, kwargs: dict) -> None:
    """MonitorError for a generate call that would run beam search (its own argument, its
    generation config, or the model's)."""
    beams = _generation_value(model, kwargs, "num_beams", 1)
    if isinstance(beams, torch.Tensor) and beams.numel() == 1 and not beams.is_floating_point():
        beams = int(beams)  # num_beams=torch.tensor(3) ran beam search and failed inside the monitor
    if isinstance(beams, numbers.Integral) and beams > 1:
        raise MonitorError(f"beam search (num_beams={beams}) cannot be monitored: the beams are batch rows that "
                           "generate reorders at every step, so no record would describe one sequence; monitor "
                           "greedy or sampled generation")


#: generate's options that turn greedy or sampled decoding into assisted (speculative) decoding, as
#: transformers' GenerationConfig.get_generation_mode reads them (besides an ``assistant_model``)
_ASSISTED_OPTIONS = ("prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


def _refuse_assisted(model: nn.Module, kwargs: dict) -> None:
    """MonitorError for a generate call that would run assisted decoding (an ``assistant_model``, or
    prompt lookup / early-exit / multi-token-prediction drafts: the call's own arguments, its
    generation config's, or the model's). Each step feeds the model the drafted tokens and crops the
    rejected ones from the cache afterwards, and the monitor counts what is fed: prompt lookup with 4
    drafts on a 42-token prompt was logged as a 46-token prompt, 13 decoded tokens where 11 were kept,
    and sink shares 0.0049 off the greedy record of the same 12 tokens."""
    used = ["assistant_model"] if kwargs.get("assistant_model") is not None else []
    for name in _ASSISTED_OPTIONS:
        value = _generation_value(model, kwargs, name)
        if value is not None and value is not False:
            used.append(f"{name}={value!r}")
    if used:
        raise MonitorError(f"assisted (speculative) decoding ({', '.join(used)}) cannot be monitored: every step "
                           "feeds the model draft tokens and crops the rejected ones afterwards, and the monitor "
                           "counts every token fed, so the draft rows would enter the record's tokens, sink shares "
                           "and residual peaks and no record would describe the sequence generated; monitor greedy "
                           "or sampled generation without an assistant")


def _as_guard(guard: Any, margin: float | None, handle, model: nn.Module) -> Guard | None:
    """A Guard from a Guard or a Profile; a profile must be the policy the model is patched with.
    ``margin`` (None: the default) applies to a profile; a Guard carries its own."""
    if guard is None:
        if margin is not None:
            raise MonitorError("guard_margin without a guard would do nothing: pass guard=PROFILE as well")
        return None
    if isinstance(guard, Guard):
        if margin is not None and margin != guard.margin:
            raise MonitorError(f"guard_margin={margin} and a Guard with margin {guard.margin}: a Guard carries its "
                               "own margin (Guard.from_profile(profile, margin=...)); pass one of the two")
        # a profile's statistics were checked against the model when it was loaded for it; a Guard
        # built by hand was not, and its ranges met the request's statistics in a broadcast error
        num_heads = handle.num_heads()
        expected = (len(num_heads), max(num_heads, default=0))
        for name in ("low", "high"):
            shape = tuple(getattr(guard.statistics, name).shape)
            if shape != expected:
                raise MonitorError(f"the guard's ranges ({name}) are {shape} (layers, heads), and this model has "
                                   f"{expected[0]} attention layers of up to {expected[1]} heads: a Guard made for "
                                   "another model")
        return guard
    if not hasattr(guard, "policy_for"):
        raise MonitorError(f"guard must be a sinkfix.Profile or a telemetry Guard, got {type(guard).__name__}")
    built = Guard.from_profile(guard, margin=DEFAULT_MARGIN if margin is None else margin)
    if guard.policy_for(model) != handle.policy:
        raise MonitorError("the guard's profile is not the policy this model is patched with: the ranges it "
                           "compares against were measured with that profile applied (sinkfix.patch(model, profile))")
    return built


def monitor(model: nn.Module, **kwargs) -> Monitor:
    """Start telemetry on ``model``; arguments of :class:`Monitor`:

    ``log``: JSON-lines file, one record per request (appended). ``prometheus_port``: serve metrics on
    ``http://prometheus_host:port/metrics`` (0 = a free port). ``callback(record)``: called per record.
    ``guard``: a :class:`~sinkfix.profile.Profile` with calibration statistics (or a
    :class:`~sinkfix.telemetry.guard.Guard`), the one the model is patched with; ``guard_margin``.
    ``sample_rows``: prompt rows behind the hidden-sink estimate (an integer >= 1);
    ``hidden_sink_threshold``: ACT's criterion, in (0, 1). An unpatched model is patched with
    the identity policy (removed again by :meth:`Monitor.close`) unless ``patch_if_needed=False``.
    """
    return Monitor(model, **kwargs)
