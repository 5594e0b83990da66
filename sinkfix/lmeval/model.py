"""The ``sinkfix`` model type of lm-evaluation-harness: lm-eval's ``HFLM`` on a model patched by sinkfix.

    from sinkfix.lmeval.model import SinkfixLM          # importing registers the name "sinkfix"
    lm = SinkfixLM(pretrained="smollm2-135m", policy="sink_scale=0.9")
    lm_eval.simple_evaluate(model=lm, tasks=[...])
    lm_eval.simple_evaluate(model="sinkfix", model_args="pretrained=smollm2-135m,profile=p.json", ...)

``pretrained`` is anything :func:`sinkfix.load_model` takes (the offline models ``smollm2-135m`` and
``gemma3-270m``, a local folder, a hub id) or an already loaded model (then pass ``tokenizer=``).
``policy=`` takes the command-line spec syntax (``sink_scale=0.9,n_sink=1``; the keys of a spec may
also come as model arguments of their own, which is how lm-eval hands over ``model_args``
``policy=sink_scale=0.9,n_sink=1``), ``profile=`` a profile file;
neither = the stock model. Every other keyword is lm-eval's HFLM argument (``batch_size``,
``max_length``, ``add_bos_token``, ...); a ``max_length`` beyond the model's
``max_position_embeddings`` is refused. ``dtype`` is the precision a model loaded here gets
(default float32, the precision sinkfix's numbers are measured in); an already loaded model is used
as it is, never cast: a ``dtype`` other than its own is refused (cast it yourself, or leave ``dtype``
out). ``device`` defaults to CUDA when there is one, else the CPU.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import torch
from tqdm import tqdm

from sinkfix.errors import EvaluationError, UsageError
from sinkfix.evaluate import check_positions
from sinkfix.lmeval.config import Correction
from sinkfix.models import DEFAULT_MODEL, load_model
from sinkfix.patch import PatchHandle, patch
from sinkfix.policy import SPEC_KEYS, Policy
from sinkfix.profile import ModelIdentity, Profile

try:
    from lm_eval.api.registry import model_registry
    from lm_eval.models.huggingface import HFLM
except ImportError:  # the optional extra is not installed
    raise EvaluationError("downstream evaluation needs lm-evaluation-harness: pip install 'sinkfix[eval]' "
                          "(or pip install 'lm-eval>=0.4.10')") from None

__all__ = ["SinkfixLM", "MODEL_TYPE"]

MODEL_TYPE = "sinkfix"


def _with_spec_items(policy: str | Policy | None, kwargs: dict[str, Any]) -> str | Policy | None:
    """``policy`` plus the policy spec items that arrived as model arguments of their own: lm-eval
    splits ``model_args`` at every comma, so ``policy=sink_scale=0.9,n_sink=2`` reaches the model as
    ``policy="sink_scale=0.9"`` and ``n_sink=2``. Removes those items from ``kwargs``."""
    items = [f"{key}={_spec_value(kwargs.pop(key))}" for key in SPEC_KEYS if key in kwargs]
    if not items:
        return policy
    if isinstance(policy, Policy):
        raise UsageError(f"policy keys {', '.join(items)} given next to a Policy object: put them into the Policy")
    return ",".join([policy, *items] if policy else items)


def _spec_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@contextlib.contextmanager
def _quiet_hflm() -> Iterator[None]:
    # HFLM warns that an already loaded model makes some of its arguments moot and that it assumes a
    # single process: true of every model handed over here, and noise for the user who did not.
    logger = logging.getLogger("lm_eval.models.huggingface")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise UsageError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    return value


def _load(pretrained: Any, tokenizer: Any, dtype: torch.dtype | str | None, device: str | None):
    if not isinstance(pretrained, str):
        if tokenizer is None:
            raise UsageError("a loaded model needs its tokenizer: SinkfixLM(pretrained=model, tokenizer=tokenizer)")
        # casting the caller's model in place would change it behind their back (and for every
        # other user of the object): refuse instead, and say how to get the precision asked for
        own = getattr(pretrained, "dtype", None)
        if dtype not in (None, "auto") and own is not None and dtype != own:
            name = str(dtype).removeprefix("torch.")
            raise UsageError(f"dtype {name} asked for, but the loaded model is {str(own).removeprefix('torch.')}: "
                             f"cast it first (model.to(torch.{name})) or leave dtype out")
        return pretrained, tokenizer
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        # lm-eval's command line asks for cuda:0 unless told otherwise; HFLM falls back the same way
        logging.getLogger(__name__).warning("device %s asked for, but torch sees no CUDA device: using the CPU", device)
        device = "cpu"
    model, own_tokenizer = load_model(pretrained, dtype=torch.float32 if dtype is None else dtype, device=device)
    return model, tokenizer if tokenizer is not None else own_tokenizer


class SinkfixLM(HFLM):
    """lm-eval's Hugging Face model type on a model that sinkfix patches (or leaves stock)."""

    def __init__(self, pretrained: Any = DEFAULT_MODEL, policy: str | Policy | None = None,
                 profile: str | Profile | None = None, kernel: str = "auto", tokenizer: Any = None,
                 dtype: str | torch.dtype | None = None, device: str | None = None, **kwargs: Any) -> None:
        # a bad spec, profile file or dtype fails before the model loads
        correction = Correction.from_args(_with_spec_items(policy, kwargs), profile)
        model, tokenizer = _load(pretrained, tokenizer, None if dtype is None else _torch_dtype(dtype), device)
        if kwargs.get("max_length") is not None:  # past its positions a model gives garbage, not an error
            name = pretrained if isinstance(pretrained, str) else getattr(model.config, "name_or_path", "")
            check_positions(int(kwargs["max_length"]), model.config, "max_length", name or "the model")
        with _quiet_hflm():
            super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.kernel = kernel
        self.correction: Correction | None = None
        self._window_bars = True
        self.apply(correction)

    # -- the correction ---------------------------------------------------------------------------
    def apply(self, correction: Correction | None) -> None:
        """Patch the model with ``correction`` (replacing any previous one); None restores the stock model.

        A profile made for another model raises :class:`~sinkfix.errors.ProfileError` and leaves
        the model as it was.
        """
        if correction is not None:
            patch(self.model, correction.value, backend=self.kernel)
        else:
            handle = PatchHandle.of(self.model)
            if handle is not None:
                handle.remove()
        self.correction = correction

    @property
    def scores_alone(self) -> bool:
        """Whether the correction in force pools statistics over a sequence's tokens (content-dependent
        sinks: column means over query rows; a relative residual clip: the median token norm). lm-eval
        right-pads a log-likelihood batch and passes no attention mask, so the padding joined those
        statistics (SmolLM2, ``act``, 16 cloze items: per-item log-likelihoods 4.2 nats apart between
        batch 1 and 8, one answer flipped); such a correction is scored one sequence at a time."""
        handle = PatchHandle.of(self.model)
        return handle is not None and any(
            layer.content is not None or (layer.clip is not None and layer.clip.mode == "relative")
            for layer in handle.layer_policies())

    def get_model_info(self) -> dict[str, Any]:
        # HFLM's version asks the hub for the checkpoint's commit: a network call, and meaningless for
        # a model object. The weights fingerprint identifies the checkpoint instead.
        identity = ModelIdentity.of(self.model)
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype), "model_name": identity.name,
            "model_fingerprint": identity.fingerprint,
            "sinkfix_correction": None if self.correction is None else self.correction.to_dict(),
        }

    # -- requests lm-eval cannot score ------------------------------------------------------------
    def _encoding_problem(self, context: str, continuation: str) -> str | None:
        """Why lm-eval cannot score ``continuation`` after ``context`` with this tokenizer, or None: it
        encodes the two together and scores the tokens past the context's own, so an answer the
        tokenizer merges into the prompt's last token (SmolLM2: ``"def main("`` + ``")"`` is one
        ``()`` token) leaves nothing to score, and lm-eval failed on a bare AssertionError after the
        whole stock run. Encoded as lm-eval encodes it (``_encode_pair``; an empty prompt: the
        prefix token, then the answer)."""
        if context == "":
            encoded = self.tok_encode(continuation, add_special_tokens=False)
            if encoded[:1] == [self.prefix_token_id]:  # lm-eval then takes that token as the context
                encoded = encoded[1:]
            if not encoded:
                return f"the answer {continuation!r:.40} gives no token to score (the prompt is empty)"
            return None
        context_enc, continuation_enc = self._encode_pair(context, continuation)
        if not context_enc:
            return f"the prompt {context!r:.40} gives no token (only white space, which lm-eval moves into the answer)"
        if not continuation_enc:
            return (f"the answer {continuation!r:.40} gives no token of its own after the prompt ending "
                    f"{context[-30:]!r}: the tokenizer merges it into the prompt's last token, so lm-eval cannot "
                    "score it (let the prompt end where a token ends: e.g. start the answer with the space or the "
                    "delimiter that separates it from the prompt)")
        return None

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's log-likelihood, after every request's encoding is checked (:meth:`_encoding_problem`):
        a request it cannot score is an EvaluationError naming the task and the item, before any is scored."""
        for request in requests:
            problem = self._encoding_problem(*request.args)
            if problem is not None:
                raise EvaluationError(f"task {request.task_name}, item {request.doc_id}: {problem}")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    # -- progress ---------------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's rolling log-likelihood, one batch of documents at a time, with one progress bar
        over documents (HFLM draws one bar per window batch)."""
        if self.batch_size == "auto":
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        step = max(int(self.batch_size), 1)
        results: list[float] = []
        self._window_bars = False
        try:
            # disable=None: no bar where stderr is not a terminal
            with tqdm(total=len(requests), desc="rolling log-likelihood", unit="doc",
                      disable=True if disable_tqdm else None) as bar:
                for start in range(0, len(requests), step):
                    results += super().loglikelihood_rolling(requests[start:start + step], disable_tqdm=True)
                    bar.update(min(step, len(requests) - start))
        finally:
            self._window_bars = True
        return results

    def _loglikelihood_tokens(self, requests: Sequence, disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        quiet = disable_tqdm or not self._window_bars
        longest = max((len(request[2]) for request in requests), default=0)
        if longest > self.max_length:  # lm-eval asserts it per batch, a bare AssertionError mid-run
            raise EvaluationError(f"a scored continuation is {longest} tokens long, more than max_length "
                                  f"{self.max_length} (--max-length): raise it to at least {longest}")
        if not self.scores_alone or self.batch_size == 1:
            return super()._loglikelihood_tokens(requests, disable_tqdm=quiet, override_bs=override_bs)
        # HFLM reads override_bs only under batch_size="auto": the batch size itself is set aside
        batch_size, self.batch_size_per_gpu = self.batch_size_per_gpu, 1
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=quiet, override_bs=1)
        finally:
            self.batch_size_per_gpu = batch_size


if model_registry.get(MODEL_TYPE, None) is None:
    model_registry.register(MODEL_TYPE)(SinkfixLM)
