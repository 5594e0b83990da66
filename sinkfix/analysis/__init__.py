"""Analysis on top of the patch: streaming extreme-token statistics, inspection, calibration.

Importing this package is cheap; matplotlib is imported only when a figure is drawn.
"""

from sinkfix.analysis.metrics import DORMANT_THRESHOLD, ExtremeTokenMetrics, measure_extreme_tokens

__all__ = ["DORMANT_THRESHOLD", "ExtremeTokenMetrics", "measure_extreme_tokens"]
