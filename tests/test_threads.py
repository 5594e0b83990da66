"""The README's claim about threads: a model patched with a positional policy serves forwards from
two threads at once, each as it would alone (different batch sizes, left padding)."""

from __future__ import annotations

import threading

import pytest
import torch

import sinkfix

from .conftest import tiny_model

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]


def test_a_positional_policy_serves_two_threads_at_once():
    model = tiny_model("llama")
    beta = torch.linspace(0.3, 1.0, 8).reshape(2, 4)
    sinkfix.patch(model, sinkfix.Policy(sink_scale=beta, virtual_sink_logit=0.5, n_sink=2, extra_sink_positions=(5,)))
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(2, 97, (3, 17), generator=g), torch.randint(2, 97, (1, 29), generator=g)
    first_mask, second_mask = torch.ones_like(first), torch.ones_like(second)
    first_mask[1, :4] = 0
    with torch.no_grad():
        alone = [model(input_ids=first, attention_mask=first_mask).logits,
                 model(input_ids=second, attention_mask=second_mask).logits]
    differ, errors = [], []

    def serve(ids, mask, expected):
        for _ in range(40):
            try:
                with torch.no_grad():
                    out = model(input_ids=ids, attention_mask=mask).logits
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))
                return
            if not torch.equal(out, expected):
                differ.append(float((out - expected).abs().max()))

    threads = [threading.Thread(target=serve, args=(first, first_mask, alone[0])),
               threading.Thread(target=serve, args=(second, second_mask, alone[1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and differ == []
