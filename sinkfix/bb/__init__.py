"""Bigram-Backcopy (Guo et al. 2024): a toy task whose trained models show attention sinks,
value-state drains and residual-state peaks with a known active / dormant ground truth.

    from sinkfix.bb import BigramBackcopy, TrainConfig, VARIANTS, train_variant, measure
    task = BigramBackcopy.build()                     # 65 characters + BOS + delimiter, k = 3 triggers
    result = train_variant(task, VARIANTS["adam"], TrainConfig(steps=300))
    ids = task.sample(16, 64)
    print(measure(result.model, task, ids, VARIANTS["adam"]))

The trained models are plain transformers models (GPT-2 by default), so ``sinkfix.patch`` and
``sinkfix.inspect`` apply to them unchanged; the ReLU-attention variant runs the registered
``"sinkfix_relu"`` attention implementation. ``run_experiment`` (and ``sinkfix bb``) trains and
measures all three variants.
"""

from sinkfix.bb.data import BigramBackcopy
from sinkfix.bb.relu_attention import RELU_IMPL_NAME, register_relu, relu_attention
from sinkfix.bb.report import measure, probe, run_experiment, summary_table, to_json, write_figures
from sinkfix.bb.train import VARIANTS, TrainConfig, TrainResult, Variant, build_model, train_variant

__all__ = [
    "BigramBackcopy", "RELU_IMPL_NAME", "TrainConfig", "TrainResult", "VARIANTS", "Variant", "build_model",
    "measure", "probe", "register_relu", "relu_attention", "run_experiment", "summary_table", "to_json",
    "train_variant", "write_figures",
]
