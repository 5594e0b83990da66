"""Live extreme-token telemetry of a patched model while it serves requests (docs/monitoring.md).

``sinkfix.monitor(model, ...)`` returns a :class:`Monitor`; ``with monitor.request(domain=...)``
records every forward inside the block as one request: sink share per layer and head (exact, from
the attention fast path's side output), dormant heads and hidden sinks (estimated on a sample of
the prompt's rows), residual-peak ratio per layer (exact), the correction applied and the guard's
verdict. Records go to a JSON-lines log, Prometheus metrics and a callback; ``sinkfix monitor
report`` reads the log back.

Modules: ``prompt`` (what is measured once per request), ``accumulate`` (device-side sums),
``records`` (the log schema), ``guard`` (the fallback and the statistics a profile carries),
``outputs`` (log, Prometheus), ``requests`` (request files), ``report`` (reading logs back),
``sharded`` (a tensor-parallel model's heads gathered across its ranks).
"""

from sinkfix.errors import MonitorError
from sinkfix.telemetry.guard import DEFAULT_MARGIN, Guard, calibration_statistics
from sinkfix.telemetry.monitor import SAMPLE_ROWS, Monitor, monitor
from sinkfix.telemetry.records import SCHEMA, VERSION

__all__ = ["DEFAULT_MARGIN", "Guard", "Monitor", "MonitorError", "SAMPLE_ROWS", "SCHEMA", "VERSION",
           "calibration_statistics", "monitor"]
