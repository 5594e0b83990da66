"""Calibrated per-layer / per-head policy parameters, saved as versioned JSON tied to one model.

A :class:`Profile` is what :func:`sinkfix.calibrate` returns and what ``sinkfix.patch(model,
profile)`` applies. The file records the identity of the model it was fitted on (architecture,
attention layer and head counts, a fingerprint of the weights); applying it to a model it does not
fit raises :class:`~sinkfix.errors.ProfileError` naming the difference. Files are written
atomically (temporary file in the same folder, then ``os.replace``), so a crash never leaves a
half-written profile behind.

Format (``"format": "sinkfix-profile"``, ``"version": 3``)::

    {"format": "sinkfix-profile", "version": 3,
     "model": {"architecture", "name", "num_layers", "num_heads": [..], "num_kv_heads",
               "hidden_size", "vocab_size", "fingerprint", "fingerprint_dtype",
               "cast_fingerprints": {"bfloat16", "float16"}},
     "policy": {"sink_scale": [[..]], "virtual_sink_logit": [[..]] | null,
                "virtual_logit_on_sink_rows": false, "n_sink": 1,
                "extra_sink_positions": [], "residual_clip": [..] | null},
     "domains": null | {"NAME": {"sink_scale": [[..]], "virtual_sink_logit": [[..]] | null}, ...},
     "calibration": {...free-form record: protocol, rule, NLLs per domain, texts, steps...}}

Version 2 added ``"virtual_logit_on_sink_rows"`` to the policy: whether the virtual sink logit
also counts in the rows that see only the sink (the sink's own row). Version 1 always counted it
there, so a version-1 file loads with ``true`` (it means exactly what it meant when it was fitted).

Version 3 added ``"domains"``: the parameters fitted on each calibration domain alone, from which a
domain-robust profile's ``"policy"`` was combined (``sinkfix.analysis.robust``); they let
``sinkfix calibrate --evaluate`` rebuild the profile without any one domain. ``sinkfix.patch``
applies the ``"policy"`` only. Profiles of versions 1 and 2 were fitted on their calibration texts
pooled together, which overfits the kinds of text they were fitted on; they load unchanged and
:meth:`Profile.describe` says that they are not domain-robust. Saved again, they are written as
version 3 with ``"fitted_version": 1 | 2`` (the format they were fitted under; the calibration record
is kept as it was), so they still say so.

Version 4 adds ``"mode"`` to the policy: ``"positional"`` (what every earlier version means) or
``"content"``, with a ``"content_sinks"`` object ``{"threshold", "hidden_sink_scale": [[..]],
"heads": [[..]] | null, "min_rows", "reevaluate_every"}`` (docs/formulas.md, "Content-dependent
sinks"). Positional profiles are still written as version 3, so older readers keep reading them;
a file of version 1 to 3 that names a content mode is refused (it cannot have been written by a
sinkfix that had one), as is a version-4 file that does not (no sinkfix writes one). A policy of
version 2 or later without ``"virtual_logit_on_sink_rows"`` is refused, not given a default, as is a
version-1 policy with virtual logits where it is not true, or a file of version 1 or 2 with
``"domains"`` other than null (the versions' writers never wrote them; read with the version's
meaning, the file's values were ignored); and so is, at every version, a policy or ``"domains"``
entry without ``"virtual_sink_logit"`` (every writer writes it, null without virtual logits) or with
a key this format does not have.

``"fingerprint_dtype"`` and ``"cast_fingerprints"`` (optional at any version; files written before
them lack both) make a profile fitted in one precision fit the same model in another: the
fingerprint of the weights' sample cast to bfloat16 / float16, compared where the model or the
profile is in that precision (:meth:`ModelIdentity.differences`; docs/calibration.md, "The profile
file"). ``policy.n_sink`` is at most :data:`~sinkfix.policy.MAX_N_SINK`.

Optional, at any version: ``"statistics"``, what the profiled model's attention looked like on the
calibration text (:class:`ProfileStatistics`: per layer and head, the range of the sink share
before sink scaling), for the telemetry guard (docs/monitoring.md). A file without it loads with
``statistics=None``; readers that do not know the key ignore it. Keys this reader does not know
at the top level or in ``"model"`` are ignored with a warning that names them (a misspelt
``"domian"`` dropped its section unsaid); in ``"policy"``, a domain or ``"content_sinks"`` they
are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sinkfix import files
from sinkfix.errors import PolicyError, ProfileError, is_integer
from sinkfix.policy import MAX_N_SINK, ContentSinks, Policy, ResidualClip, listed_twice, reads_as_zero

__all__ = ["Profile", "ProfileStatistics", "ModelIdentity", "weights_fingerprint", "cast_fingerprints", "weights_dtype",
           "atomic_write_text", "FORMAT", "VERSION", "CAST_DTYPES"]

FORMAT = "sinkfix-profile"
VERSION = 3  # what a positional profile is written as (3: per-domain fits, domain-robust)
CONTENT_VERSION = 4  # the first version that records the mode (content-dependent sinks)
# Elements sampled per parameter tensor for the fingerprint: enough to tell two checkpoints of the
# same architecture apart, while hashing SmolLM2-135M takes a few milliseconds, not a full pass.
_FINGERPRINT_SAMPLES = 4096
# The half precisions a profile also records fingerprints in ("cast_fingerprints"): calibration fits
# float32 models, while the model a profile is applied to usually runs in one of these on a GPU, and
# a cast changes the weights' bits, so the float32 fingerprint alone would call it another model.
CAST_DTYPES = ("bfloat16", "float16")


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter names, shapes and a fixed strided sample of each tensor's values (as fp32)."""
    return _fingerprints(model, ())[0]


def cast_fingerprints(model: nn.Module) -> dict[str, str]:
    """The fingerprint of the same sample cast to each of :data:`CAST_DTYPES`: what
    :func:`weights_fingerprint` gives for this model cast to that precision (``model.to(dtype)``)."""
    return _fingerprints(model, CAST_DTYPES)[1]


def _fingerprints(model: nn.Module, casts: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """(the fingerprint, {dtype name: the fingerprint of the sample cast to it}), in one pass.

    A cast is made from each parameter's own values, element by element (round to nearest even on
    every device), so the sample of ``model.to(torch.bfloat16)`` is bit for bit the sample of
    ``model`` cast to bfloat16: the two fingerprints agree exactly, with no tolerance and no
    rounding boundary to land near."""
    plain = hashlib.sha256()
    cast = {name: hashlib.sha256() for name in casts}
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        header = f"{name}:{tuple(param.shape)};".encode()
        for digest in (plain, *cast.values()):
            digest.update(header)
        if param.device.type == "meta" or param.numel() == 0:
            continue
        param = param.detach()
        if hasattr(param, "full_tensor"):
            # a tensor-parallel shard (DTensor): every rank fingerprints the whole parameter, one
            # parameter at a time, so a profile made in one process fits its sharded model
            param = param.full_tensor()
        flat = param.reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
        sample = flat[::step][:_FINGERPRINT_SAMPLES].to(device="cpu")
        plain.update(sample.to(torch.float32).contiguous().numpy().tobytes())
        for dtype_name, digest in cast.items():
            # numpy has no bfloat16: the cast values are hashed as float32, which holds them exactly
            rounded = sample.to(getattr(torch, dtype_name)) if sample.is_floating_point() else sample
            digest.update(rounded.to(torch.float32).contiguous().numpy().tobytes())
    return plain.hexdigest()[:32], {name: digest.hexdigest()[:32] for name, digest in cast.items()}


def weights_dtype(model: nn.Module) -> str | None:
    """The floating-point dtype that holds most of the model's parameter elements ("float32",
    "bfloat16", ...), or None for a model without floating-point parameters."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    if not counts:
        return None
    return str(max(counts, key=counts.get)).removeprefix("torch.")


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ProfileError(f"{type(model).__name__} has no config: not a transformers model")
    return getattr(config, "text_config", None) or config


def _per_layer(value) -> str:
    """A per-layer tuple in runs ("9 in each of 30 layers", "(8 x2, 4 x16)"): written out, SmolLM2's
    and Gemma3's head counts made a 700-character line of a profile-for-another-model error."""
    if not isinstance(value, (tuple, list)) or not value:
        return str(value)
    runs: list[list] = []
    for item in value:
        if runs and runs[-1][0] == item:
            runs[-1][1] += 1
        else:
            runs.append([item, 1])
    if len(runs) == 1:
        return f"{runs[0][0]} in each of {runs[0][1]} layer{'s' * (runs[0][1] != 1)}"
    return "(" + ", ".join(f"{item} x{count}" if count > 1 else str(item) for item, count in runs) + ")"


@dataclass(frozen=True)
class ModelIdentity:
    """What a profile remembers about the model it was fitted on."""

    architecture: str
    num_layers: int
    num_heads: tuple[int, ...]
    num_kv_heads: int | None
    hidden_size: int | None
    vocab_size: int | None
    fingerprint: str
    name: str | None = None
    #: the precision most of the weights were in when fingerprinted (None: a profile written before
    #: sinkfix recorded it), and the fingerprints of the same sample cast to each of CAST_DTYPES,
    #: as sorted (dtype, fingerprint) pairs (empty for such a profile)
    dtype: str | None = None
    cast_fingerprints: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, model: nn.Module) -> "ModelIdentity":
        """The identity of ``model``; of the model inside it for a ``torch.compile`` wrapper, as
        :func:`sinkfix.patch` checks a profile against (``patch._compiled_original``): a calibration on
        the compiled model recorded architecture ``OptimizedModule`` and a fingerprint over
        ``_orig_mod.`` parameter names, a profile that the very model, compiled or not, refused."""
        from sinkfix.patch import PatchHandle, _compiled_original

        handle = PatchHandle.of(model)
        model = _compiled_original(model)
        handle = handle or PatchHandle.of(model)
        config = _text_config(model)
        if handle is not None:
            heads = tuple(handle.model_num_heads())
        else:
            layers = getattr(config, "num_hidden_layers", None)
            per = getattr(config, "num_attention_heads", None)
            if layers is None or per is None:
                raise ProfileError(f"cannot read layer / head counts from {type(model).__name__}'s config")
            heads = (int(per),) * int(layers)
        fingerprint, cast = _fingerprints(model, CAST_DTYPES)
        return cls(
            architecture=type(model).__name__,
            num_layers=len(heads),
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None),
            hidden_size=getattr(config, "hidden_size", None),
            vocab_size=getattr(config, "vocab_size", None),
            fingerprint=fingerprint,
            name=getattr(model, "sinkfix_name", None) or getattr(config, "_name_or_path", None) or None,
            dtype=weights_dtype(model),
            cast_fingerprints=tuple(sorted(cast.items())),
        )

    def describe(self) -> str:
        heads = self.num_heads[0] if len(set(self.num_heads)) == 1 else list(self.num_heads)
        return f"{self.name or self.architecture} ({self.architecture}, {self.num_layers} layers x {heads} heads, weights {self.fingerprint[:12]})"

    def differences(self, other: "ModelIdentity", *, check_weights: bool = True) -> list[str]:
        diffs = []
        for key in ("architecture", "num_layers", "num_heads", "num_kv_heads", "hidden_size", "vocab_size"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine is not None and theirs is not None and mine != theirs:
                diffs.append(f"{key} {_per_layer(mine)} vs {_per_layer(theirs)}")
        weights = self._weights_difference(other) if check_weights else None
        if weights:
            diffs.append(weights)
        return diffs

    def _weights_difference(self, other: "ModelIdentity") -> str | None:
        """Why ``other`` (the model at hand) does not have the weights this identity was taken of, or
        None. Where either side's weights are in a half precision, the fingerprints of both cast to
        it are compared: the same model cast to bfloat16 or float16 is the same model."""
        if self.fingerprint == other.fingerprint:
            return None
        mine, theirs = dict(self.cast_fingerprints), dict(other.cast_fingerprints)
        halves = [d for d in (other.dtype, self.dtype) if d in CAST_DTYPES]
        if mine and halves:
            if len(set(halves)) == 2:
                # two roundings of one float32 value do not always agree with one rounding
                return (f"weights cannot be compared: the profile was fitted on {self.dtype} weights and this "
                        f"model's are {other.dtype} (values rounded to these two precisions differ); load the model "
                        f"in {self.dtype} or float32 to check them, or, if it is the same model, apply "
                        "profile.without_weights_check()")
            common = halves[0]
            if mine.get(common) is not None and mine.get(common) == theirs.get(common):
                return None
            return (f"weights fingerprint {(mine.get(common) or '?')[:12]} vs {(theirs.get(common) or '?')[:12]} "
                    f"(both cast to {common})")
        found = f"weights fingerprint {self.fingerprint[:12]} vs {other.fingerprint[:12]}"
        if not mine and other.dtype in CAST_DTYPES:
            found += (f" (this model's weights are {other.dtype}; the profile does not record the precision it was "
                      "fitted in, which sinkfix calibrates in float32, and a cast changes the fingerprint: check it "
                      "on the model loaded in float32, or, if it is the same model, apply "
                      "profile.without_weights_check())")
        return found

    def to_dict(self) -> dict:
        return {
            "architecture": self.architecture, "name": self.name, "num_layers": self.num_layers,
            "num_heads": list(self.num_heads), "num_kv_heads": self.num_kv_heads, "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size, "fingerprint": self.fingerprint,
            **({} if self.dtype is None else {"fingerprint_dtype": self.dtype}),
            **({"cast_fingerprints": dict(self.cast_fingerprints)} if self.cast_fingerprints else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "ModelIdentity":
        if not isinstance(data, dict):
            raise ProfileError("profile 'model' entry must be an object")
        _warn_unknown_keys("profile 'model' entry", data, _MODEL_KEYS)
        try:
            # JSON types exactly: int() / str() would turn "12" into 12, 1.7 into 1, a list into text
            heads = _json_ints("model.num_heads", data["num_heads"])
            optional = {key: None if data.get(key) is None else _json_int(f"model.{key}", data[key])
                        for key in ("num_kv_heads", "hidden_size", "vocab_size")}
            name = data.get("name")
            if name is not None and not isinstance(name, str):
                raise ProfileError(f"profile model.name must be a string or null, got {_json_text(name)}")
            dtype = data.get("fingerprint_dtype")
            if dtype is not None and not isinstance(dtype, str):
                raise ProfileError(f"profile model.fingerprint_dtype must be a string or null, got {_json_text(dtype)}")
            cast = data.get("cast_fingerprints") or {}
            if not isinstance(cast, dict) or any(not isinstance(v, str) for v in cast.values()):
                raise ProfileError(f"profile model.cast_fingerprints must be an object of dtype -> fingerprint "
                                   f"strings, got {_json_text(cast)}")
            ident = cls(
                architecture=_json_str("model.architecture", data["architecture"]),
                num_layers=_json_int("model.num_layers", data["num_layers"]), num_heads=heads,
                fingerprint=_json_str("model.fingerprint", data["fingerprint"]), name=name, **optional,
                dtype=dtype, cast_fingerprints=tuple(sorted(cast.items())),
            )
        except KeyError as exc:
            raise ProfileError(f"profile 'model' entry lacks {exc.args[0]!r}") from None
        if ident.num_layers != len(heads) or ident.num_layers <= 0:
            raise ProfileError(f"profile 'model' entry: num_layers {ident.num_layers} but {len(heads)} head counts")
        # counts and sizes are positive: a 0 or a negative one loaded and failed only when applied
        bad = [f"num_heads {list(heads)}"] if any(h < 1 for h in heads) else []
        bad += [f"{key} {value}" for key, value in optional.items() if value is not None and value < 1]
        if bad:
            raise ProfileError(f"profile 'model' entry: {', '.join(bad)} (counts and sizes must be >= 1)")
        return ident


#: the keys a profile file and its "model" entry hold; others are named when read (below)
_TOP_KEYS = frozenset({"format", "version", "model", "policy", "domains", "calibration", "statistics", "fitted_version"})
_MODEL_KEYS = frozenset({"architecture", "name", "num_layers", "num_heads", "num_kv_heads", "hidden_size", "vocab_size",
                         "fingerprint", "fingerprint_dtype", "cast_fingerprints"})


def _warn_unknown_keys(where: str, data: dict, known: frozenset) -> None:
    """A warning naming keys this reader does not know, which it ignores: a hand-edited "domian" or
    "statistic" (typos of "domains", "statistics") loaded with that section silently absent. A warning,
    not an error as in "policy": what a reader does not know of a file it may ignore."""
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"{where} has key(s) this sinkfix does not know, ignored: {', '.join(map(repr, unknown))} "
                      f"(it reads {', '.join(sorted(known))})", UserWarning, stacklevel=4)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`sinkfix.files.atomic_write_text`, with a failure reported as :class:`ProfileError`.

    Callers of :meth:`Profile.save` catch ``ProfileError`` for every problem with a profile file,
    writing included; the :class:`~sinkfix.files.OutputError` is kept as the cause.
    """
    try:
        return files.atomic_write_text(path, text)
    except files.OutputError as exc:
        raise ProfileError(str(exc)) from exc


def _unsavable(value: Any, where: str = "") -> str | None:
    """Where in a profile's dictionary the first value that strict JSON cannot hold is, and what it is."""
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unsavable(item, f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _unsavable(item, f"{where}[{index}]")
            if found:
                return found
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value} (JSON has no NaN or infinity)"
    if value is not None and not isinstance(value, (str, int, float, bool)):
        return f"{where} is a {type(value).__name__}, which JSON cannot hold"
    return None


def _json_text(value: Any) -> str:
    """A field's value as it reads in the file, shortened, for error messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_int(name: str, value: Any) -> int:
    """A JSON integer. true is not 1 and 1.7 is not 1: a malformed count or position is refused, not
    rounded into a different profile."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(f"profile {name} must be an integer, got {_json_text(value)}")
    return value


def _json_ints(name: str, value: Any) -> tuple[int, ...]:
    """A JSON list of integers. A string is refused: iterating "12" would give the positions 1, 2."""
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ProfileError(f"profile {name} must be a list of integers, got {_json_text(value)}")
    return tuple(value)


def _json_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ProfileError(f"profile {name} must be a string, got {_json_text(value)}")
    return value


def _check_n_sink(n_sink: Any) -> None:
    """n_sink within [0, MAX_N_SINK] (sinkfix.policy says why there is a maximum): refused at load,
    not when patch() would build the sink set."""
    if isinstance(n_sink, bool) or not isinstance(n_sink, int):
        raise ProfileError(f"profile n_sink must be an integer, got {_json_text(n_sink)}")
    if n_sink < 0:
        raise ProfileError(f"profile n_sink must be >= 0, got {_json_text(n_sink)}")
    if n_sink > MAX_N_SINK:  # shortened: a 400-digit count was printed whole
        raise ProfileError(f"profile n_sink must be at most {MAX_N_SINK} (sinkfix.policy.MAX_N_SINK: a sink set is a "
                           f"few leading tokens), got {_json_text(n_sink)}")


def _check_calibration_record(record: Any) -> None:
    """The fields of the free-form calibration record that :meth:`Profile.describe` and
    :meth:`Profile.robustness` read, each of the type calibration writes: a hand-edited file is a
    :class:`ProfileError` naming the field, never an AttributeError when the profile is printed."""
    if not isinstance(record, dict):
        raise ProfileError(f"profile 'calibration' entry must be an object, got {_json_text(record)}")
    if "domain_robust" in record and not isinstance(record["domain_robust"], bool):
        # bool("no") is True: a string here would make a pooled profile read as domain-robust
        raise ProfileError(f"profile calibration.domain_robust must be true or false, got "
                           f"{_json_text(record['domain_robust'])}")
    for key in ("rule", "sinks"):
        if key in record and not isinstance(record[key], str):
            raise ProfileError(f"profile calibration.{key} must be a string, got {_json_text(record[key])}")
    texts = record.get("texts")
    if "texts" in record and not isinstance(texts, dict) and not (
            isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
        raise ProfileError(f"profile calibration.texts must be an object (domain -> windows) or a list of "
                           f"domain names, got {_json_text(texts)}")
    protocol = record.get("protocol")  # an object; a content-mode fit describes its windows in a string
    if isinstance(protocol, dict):
        if "bos" in protocol and not (isinstance(protocol["bos"], bool) or protocol["bos"] == "both"):
            # a string such as "true" read as "not recorded": sinkfix bench then measured a BOS profile
            # without its BOS, unsaid
            raise ProfileError(f"profile calibration.protocol.bos must be true, false or \"both\", got "
                               f"{_json_text(protocol['bos'])}")
        _check_window_counts(protocol, "calibration.protocol")
    if isinstance(record.get("hyper"), dict):
        _check_window_counts(record["hyper"], "calibration.hyper")
    if "selection" in record:
        selection = record["selection"]
        if not isinstance(selection, dict):
            raise ProfileError(f"profile calibration.selection must be an object, got {_json_text(selection)}")
        for key in ("chosen", "rule"):
            if key in selection and not isinstance(selection[key], str):
                raise ProfileError(f"profile calibration.selection.{key} must be a string, got "
                                   f"{_json_text(selection[key])}")


#: Window-protocol fields that `sinkfix monitor ranges` measures with, when a profile records them.
_WINDOW_COUNTS = ("seq_len", "max_tokens", "windows_per_text")


def _check_window_counts(protocol: dict, where: str) -> None:
    """Each recorded window count an integer >= 1 (numpy's too: ``calibrate`` takes them) or null (not
    recorded; max_tokens: every token): `monitor ranges` measures with them, and a string there was a
    TypeError traceback, a windows_per_text of -1 a slice that silently left each text's last window out."""
    for key in _WINDOW_COUNTS:
        value = protocol.get(key)
        if value is not None and not (is_integer(value) and value >= 1):
            raise ProfileError(f"profile {where}.{key} must be an integer >= 1 or null, got {_json_text(value)}")


def _has_bool(value: Any) -> bool:
    """Whether nested lists hold a true/false, which torch.tensor would read as 1.0 / 0.0."""
    if isinstance(value, (list, tuple)):
        return any(_has_bool(v) for v in value)
    return isinstance(value, bool)


def _matrix(name: str, value: Any, identity: ModelIdentity, low: float | None = None,
            high: float | None = None) -> torch.Tensor:
    """A [num_layers, max_heads] fp64 tensor from nested lists (or a tensor), with clear errors."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    elif _has_bool(value):
        raise ProfileError(f"profile {name} must hold numbers, not true/false")
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ProfileError(f"profile {name} is not a numeric [layers][heads] array: {exc}") from None
    shape = (identity.num_layers, max(identity.num_heads))
    if tuple(t.shape) != shape:
        raise ProfileError(f"profile {name} has shape {tuple(t.shape)}; its model entry says {list(shape)}")
    if not torch.isfinite(t).all():
        raise ProfileError(f"profile {name} contains NaN or infinite values")
    if (low is not None and (t < low).any()) or (high is not None and (t > high).any()):
        raise ProfileError(f"profile {name} must lie in [{low}, {high}]; got [{t.min().item():g}, {t.max().item():g}]")
    return t


#: The keys of a ``domains`` entry, and of a policy (``mode`` and ``content_sinks`` from version 4; the
#: version checks are _content_from_dict's). Every writer since version 1 writes ``virtual_sink_logit``
#: (null without virtual logits; the first profile.py, commit 0dd5a19, already did), so a file without it
#: was edited: read as "no virtual logits", it patched other numbers than the ones fitted, unsaid.
_DOMAIN_KEYS = ("sink_scale", "virtual_sink_logit")
_POLICY_KEYS = frozenset({"sink_scale", "virtual_sink_logit", "virtual_logit_on_sink_rows", "n_sink",
                          "extra_sink_positions", "residual_clip", "mode", "content_sinks"})


def _domain_parameters(value: Any, identity: ModelIdentity) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per-domain (sink_scale, virtual_sink_logit) from a mapping of pairs or of JSON objects."""
    if not isinstance(value, dict):
        raise ProfileError("profile 'domains' entry must be an object: domain -> parameters")
    out = {}
    for name, params in value.items():
        if isinstance(params, dict):
            # both keys, as every writer writes them (null: no virtual logits): a misspelt
            # "virtual_sink_logits" loaded as "no virtual logits" and --evaluate rebuilt another profile
            if "sink_scale" not in params:
                raise ProfileError(f"profile domain {name!r} has no 'sink_scale'")
            if "virtual_sink_logit" not in params:
                raise ProfileError(f"profile domain {name!r} has no 'virtual_sink_logit': give it (null / None for no "
                                   "virtual logits; every sinkfix writes it), since a misspelt key read as no virtual "
                                   "logits changed the patched numbers unsaid")
            unknown = sorted(set(params) - set(_DOMAIN_KEYS))
            if unknown:
                raise ProfileError(f"profile domain {name!r} has unknown key(s) {', '.join(map(repr, unknown))}; it "
                                   f"takes {', '.join(_DOMAIN_KEYS)}")
            params = (params["sink_scale"], params["virtual_sink_logit"])
        elif not (isinstance(params, tuple) and len(params) == 2):
            # a file holds objects; a (beta, logit) pair is what code passes. A list is refused: the
            # two rows of a 2-layer matrix would otherwise read as a (beta, logit) pair
            raise ProfileError(f"profile domain {name!r} must be an object with 'sink_scale' (and "
                               f"'virtual_sink_logit'), got {_json_text(params)}")
        beta, logit = params
        out[str(name)] = (_matrix(f"domain {name!r} sink_scale", beta, identity, 0.0, 1.0),
                          None if logit is None else _matrix(f"domain {name!r} virtual_sink_logit", logit, identity))
    return out


@dataclass
class Profile:
    """Per-layer / per-head policy parameters fitted on one model.

    ``sink_scale`` [L, H] beta in [0, 1]; ``virtual_sink_logit`` [L, H] or None; ``residual_clip``
    relative per-layer thresholds (inf = off) or None; ``calibration`` a free-form record of how
    the profile was made (protocol, rule, validation NLL per domain, texts, steps);
    ``domain_parameters`` the (sink_scale, virtual_sink_logit) fitted on each calibration domain
    alone, when the profile was combined from such fits (format version 3).
    """

    model: ModelIdentity
    sink_scale: torch.Tensor
    virtual_sink_logit: torch.Tensor | None = None
    n_sink: int = 1
    extra_sink_positions: tuple[int, ...] = ()
    residual_clip: list[float] | None = None
    calibration: dict = field(default_factory=dict)
    virtual_logit_on_sink_rows: bool = False
    statistics: "ProfileStatistics | None" = None
    domain_parameters: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None
    version: int = VERSION  # the format version it was read from (VERSION for a new profile)
    #: the older format version a version-1/2 profile saved again was fitted under (the file's
    #: "fitted_version"), None otherwise: such a profile is not domain-robust whatever its record says
    fitted_version: int | None = None
    content_sinks: ContentSinks | None = None  # mode "content" when set
    #: whether applying it (policy_for, so sinkfix.patch) checks the model's weights fingerprint; not
    #: saved: :meth:`without_weights_check` makes a copy for another checkpoint or precision
    check_weights: bool = True

    @property
    def mode(self) -> str:
        return "positional" if self.content_sinks is None else "content"

    def __post_init__(self) -> None:
        if self.content_sinks is not None:
            if not isinstance(self.content_sinks, ContentSinks):
                raise ProfileError(f"profile content_sinks must be a ContentSinks, got {type(self.content_sinks).__name__}")
            try:  # shapes against the model the profile was fitted on
                self.content_sinks.resolve(self.model.num_layers, max(self.model.num_heads))
            except PolicyError as exc:
                raise ProfileError(f"profile content_sinks: {exc}") from None
        if not isinstance(self.virtual_logit_on_sink_rows, bool):
            raise ProfileError(f"profile virtual_logit_on_sink_rows must be true or false, got "
                               f"{self.virtual_logit_on_sink_rows!r}")
        if not isinstance(self.check_weights, bool):
            raise ProfileError(f"profile check_weights must be True or False, got {self.check_weights!r}")
        if self.fitted_version is not None and (isinstance(self.fitted_version, bool) or not isinstance(
                self.fitted_version, int) or not 1 <= self.fitted_version < 3):
            raise ProfileError(f"profile fitted_version (the format a re-saved profile was fitted under) must be 1 "
                               f"or 2, got {_json_text(self.fitted_version)}")
        _check_n_sink(self.n_sink)
        twice = sorted(listed_twice(self.extra_sink_positions))
        if twice:  # refused when its policy was built, after a save and a load that took it
            raise ProfileError(f"profile extra_sink_positions lists {', '.join(map(str, twice))} twice: give each "
                               "position once")
        _check_calibration_record(self.calibration)
        self.sink_scale = _matrix("sink_scale", self.sink_scale, self.model, 0.0, 1.0)
        if self.virtual_sink_logit is not None:
            self.virtual_sink_logit = _matrix("virtual_sink_logit", self.virtual_sink_logit, self.model)
        if self.domain_parameters is not None:
            self.domain_parameters = _domain_parameters(self.domain_parameters, self.model)
        if self.residual_clip is not None:
            clip = [float(x) for x in self.residual_clip]
            if len(clip) != self.model.num_layers or any(math.isnan(x) or x < 1 for x in clip):
                raise ProfileError(f"profile residual_clip must be {self.model.num_layers} relative thresholds >= 1 "
                                   "(inf = off)")
            self.residual_clip = clip
        if self.statistics is not None:
            self.statistics.check(self.model)
        # what policy() would refuse when applied (extra_sink_positions inside the first n_sink, say) is
        # refused now: Profile.load names the file, before any model loads
        self.policy()

    # -- applying -------------------------------------------------------------------------------
    def policy(self) -> Policy:
        """The :class:`~sinkfix.policy.Policy` this profile stands for (no model check)."""
        clip = None
        if self.residual_clip is not None and any(math.isfinite(x) for x in self.residual_clip):
            clip = ResidualClip(self.residual_clip, mode="relative")
        try:
            return Policy(sink_scale=self.sink_scale.clone(), n_sink=self.n_sink,
                          virtual_sink_logit=None if self.virtual_sink_logit is None else self.virtual_sink_logit.clone(),
                          virtual_logit_on_sink_rows=self.virtual_logit_on_sink_rows,
                          extra_sink_positions=tuple(self.extra_sink_positions), residual_clip=clip,
                          content_sinks=self.content_sinks)
        except PolicyError as exc:
            raise ProfileError(f"profile does not describe a valid policy: {exc}") from None

    def check(self, model: nn.Module, *, check_weights: bool | None = None) -> None:
        """Raise :class:`ProfileError` unless this profile was made for ``model``. ``check_weights``
        None = the profile's own :attr:`check_weights`."""
        current = ModelIdentity.of(model)
        check_weights = self.check_weights if check_weights is None else check_weights
        diffs = self.model.differences(current, check_weights=check_weights)
        if diffs:
            raise ProfileError(
                f"this profile was calibrated for {self.model.describe()} and does not fit "
                f"{current.describe()}: {'; '.join(diffs)}"
            )

    def policy_for(self, model: nn.Module, *, check_weights: bool | None = None) -> Policy:
        """The policy, after checking that ``model`` is the model this profile was fitted on.

        ``check_weights=False`` accepts another checkpoint of the same architecture and shape; None
        (the default) = the profile's own :attr:`check_weights` (:meth:`without_weights_check`).
        """
        self.check(model, check_weights=check_weights)
        return self.policy()

    def without_weights_check(self) -> "Profile":
        """A copy that :func:`sinkfix.patch` applies to any model of the same architecture and shape,
        whatever its weights: ``sinkfix.patch(model, profile.without_weights_check())``. For another
        checkpoint, or a profile that does not record the precision it was fitted in (written before
        ``cast_fingerprints``) applied to the same model in bfloat16 or float16."""
        return dataclasses.replace(self, check_weights=False)

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = self._to_dict()
        if self.content_sinks is not None:
            rule = self.content_sinks
            beta, heads = rule.resolve(self.model.num_layers, max(self.model.num_heads))
            data["version"] = CONTENT_VERSION
            data["policy"]["mode"] = "content"
            data["policy"]["content_sinks"] = {
                "threshold": rule.threshold, "hidden_sink_scale": beta.tolist(),
                "heads": None if rule.heads is None else heads.tolist(), "min_rows": rule.min_rows,
                "reevaluate_every": rule.reevaluate_every,
            }
        return data

    def _to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model.to_dict(),
            "policy": {
                "sink_scale": self.sink_scale.tolist(),
                "virtual_sink_logit": None if self.virtual_sink_logit is None else self.virtual_sink_logit.tolist(),
                "virtual_logit_on_sink_rows": self.virtual_logit_on_sink_rows,
                "n_sink": self.n_sink,
                "extra_sink_positions": list(self.extra_sink_positions),
                "residual_clip": None if self.residual_clip is None else
                [x if math.isfinite(x) else "inf" for x in self.residual_clip],
            },
            "domains": None if self.domain_parameters is None else {
                name: {"sink_scale": beta.tolist(), "virtual_sink_logit": None if logit is None else logit.tolist()}
                for name, (beta, logit) in self.domain_parameters.items()},
            "calibration": self.calibration,
            **_statistics_entry(self.statistics),
            **({"fitted_version": self._fitted_version()} if self._fitted_version() < VERSION else {}),
        }

    def _fitted_version(self) -> int:
        """The format version the parameters were fitted under: the version read, or the older one of a
        version-1/2 profile saved again (``"fitted_version"``). Written as version 3, where the record's
        ``domain_robust`` flag is believed, such a profile once described itself as domain-robust."""
        return self.version if self.fitted_version is None else min(self.fitted_version, self.version)

    def with_statistics(self, statistics: "ProfileStatistics") -> "Profile":
        """A copy of this profile carrying ``statistics`` (checked against its model entry)."""
        statistics.check(self.model)
        return dataclasses.replace(self, statistics=statistics)

    @classmethod
    def from_dict(cls, data: Any) -> "Profile":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"not a sinkfix profile (expected \"format\": \"{FORMAT}\")")
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ProfileError(f"profile has no integer 'version' (got {_json_text(version)})")
        if version > CONTENT_VERSION:
            raise ProfileError(f"profile version {version} is newer than this sinkfix reads ({CONTENT_VERSION}); "
                               "upgrade sinkfix")
        if version < 1:
            raise ProfileError(f"profile version {version} is not valid")
        _warn_unknown_keys("profile", data, _TOP_KEYS)
        identity = ModelIdentity.from_dict(data.get("model"))
        policy = data.get("policy")
        if not isinstance(policy, dict) or "sink_scale" not in policy:
            raise ProfileError("profile has no 'policy' object with a 'sink_scale' entry")
        unknown = sorted(set(policy) - _POLICY_KEYS)
        if unknown:  # a misspelt key ("n_sinks", "residual_clips") was ignored and its default applied
            raise ProfileError(f"profile policy has unknown key(s) {', '.join(map(repr, unknown))}; it takes "
                               f"{', '.join(sorted(_POLICY_KEYS))}")
        if "virtual_sink_logit" not in policy:
            raise ProfileError("profile policy has no 'virtual_sink_logit' (null for no virtual logits; every "
                               "sinkfix writes it): the file was edited or is corrupted")
        clip = policy.get("residual_clip")
        if clip is not None:
            # numbers, or "inf" (what save() writes for a layer without a clip); float() would also
            # take "8", "nan" and true, and iterate a string character by character
            if not isinstance(clip, list) or any(
                    x != "inf" and (isinstance(x, bool) or not isinstance(x, (int, float))) for x in clip):
                raise ProfileError(f"profile residual_clip must be a list of numbers (or \"inf\"), got "
                                   f"{_json_text(clip)}")
            clip = [float(x) for x in clip]
        n_sink = _json_int("n_sink", policy.get("n_sink", 1))
        extra = _json_ints("extra_sink_positions", policy.get("extra_sink_positions", []))
        if any(p < 0 for p in extra):
            raise ProfileError(f"profile extra_sink_positions must be >= 0, got {_json_text(list(extra))}")
        # null is "no record"; [], false or "" are not objects (`or {}` read them as no record too)
        calibration = data.get("calibration")
        calibration = {} if calibration is None else calibration
        if not isinstance(calibration, dict):
            raise ProfileError("profile 'calibration' entry must be an object")
        if version >= 2 and "virtual_logit_on_sink_rows" not in policy:
            # every writer since version 2 writes it; a default would change the patched numbers of a
            # profile fitted with true, silently
            raise ProfileError(f"a version-{version} profile's policy needs 'virtual_logit_on_sink_rows' (true or "
                               "false; version 2 added it): the file was edited or is corrupted")
        # keys a version's writers never wrote: read as their version's meaning, a v1 file's false
        # still patched with true and a v2 file's "domains" were dropped, both unsaid
        # (true and null say what the version means, and are read; without virtual logits the flag changes nothing)
        if version < 2 and policy.get("virtual_logit_on_sink_rows", True) is not True \
                and policy["virtual_sink_logit"] is not None:
            raise ProfileError("a version-1 profile's policy cannot have 'virtual_logit_on_sink_rows' other than "
                               "true (version 2 added it; version 1 counted the virtual logit in the sink's own "
                               "row): the file was edited or is corrupted")
        if version < 3 and data.get("domains") is not None:
            raise ProfileError(f"a version-{version} profile cannot have 'domains' (version 3 added them): the "
                               "file was edited or is corrupted")
        # version 1 counted the virtual logit in the sink's own row too
        on_sink_rows = policy["virtual_logit_on_sink_rows"] if version >= 2 else True
        domains = data.get("domains") if version >= 3 else None
        return cls(identity, policy["sink_scale"], policy["virtual_sink_logit"], n_sink, extra, clip, calibration,
                   virtual_logit_on_sink_rows=on_sink_rows, statistics=_read_statistics(data, identity),
                   domain_parameters=domains, version=version, content_sinks=_content_from_dict(policy, version),
                   fitted_version=data.get("fitted_version"))

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON, atomically. Returns the path. A value JSON cannot hold (NaN or
        infinity, an object) is a :class:`ProfileError` naming where it is, before anything is written."""
        data = self.to_dict()
        try:
            text = json.dumps(data, indent=1, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"cannot save the profile: {_unsavable(data) or exc}") from None
        return atomic_write_text(path, text + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """Read and validate a profile file; every problem is a :class:`ProfileError`."""
        if not str(path).strip():  # Path("") is ".", which read as "cannot read profile ."
            raise ProfileError("empty profile path")
        p = Path(path)
        try:
            raw = p.read_text(encoding="utf-8-sig")  # a byte-order mark (an editor's) is not JSON's
        except FileNotFoundError:
            raise ProfileError(f"profile file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"cannot read profile {p}: {exc}") from None
        try:
            data = json.loads(raw, parse_constant=_reject_constant, parse_float=_float_as_written)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"profile {p} is corrupted (invalid JSON at line {exc.lineno}, column {exc.colno})") from None
        except ValueError as exc:
            raise ProfileError(f"profile {p}: {exc}") from None
        except RecursionError:  # arrays nested thousands deep: json's decoder recurses once per level
            raise ProfileError(f"profile {p} is corrupted (JSON nested too deeply to read)") from None
        try:
            return cls.from_dict(data)
        except ProfileError as exc:
            raise ProfileError(f"{p}: {exc}") from None
        except RecursionError:  # nesting under the interpreter's limit, deeper than the checks' own recursion
            raise ProfileError(f"profile {p} is corrupted (a value is nested too deeply)") from None
        except OverflowError:  # a JSON integer float() cannot hold (1 and 400 zeros): not a float, so not parse_float's
            raise ProfileError(f"profile {p}: a number is too large for a float") from None

    @property
    def domain_robust(self) -> bool:
        """Whether calibration chose these parameters so as not to trade one domain for another."""
        # formats 1 and 2 were written by the pooled fit only: a hand-edited flag does not make one robust,
        # nor does saving one again as version 3 ("fitted_version" keeps its version)
        return self._fitted_version() >= 3 and bool(self.calibration.get("domain_robust", False))

    def robustness(self) -> str:
        """One sentence on how the parameters were chosen, and what that means for unseen text."""
        record = self.calibration
        if self.domain_robust:
            selection = record.get("selection", {})
            # profiles from before the selection rule was recorded were chosen by the worst case
            rule = selection.get("rule", "worst")
            return (f"domain-robust: '{selection.get('chosen', '?')}' chosen by leave-one-domain-out "
                    f"({rule} selection) over {', '.join(record.get('texts', {})) or 'its domains'}")
        if not record:
            # the docs promise every version 1 / 2 file says "not domain-robust"; one without a record
            # (written by hand, or its record removed) said only that it was not calibrated
            return "not domain-robust: not calibrated by sinkfix (no calibration record)"
        fitted = self._fitted_version()
        origin = f"rule {record.get('rule', 'pooled')!r}"
        if fitted < 3:
            origin = f"format version {fitted}" + (f", saved again as {self.version}" if fitted != self.version else "")
        return (f"not domain-robust ({origin}): fitted on its calibration texts pooled together; it may make "
                "the model worse on other kinds of text")

    def _recorded_windows(self) -> str | None:
        """The calibration windows in words ("BOS + 512-token windows"), from ``calibration.protocol``."""
        length, bos = self.recorded_seq_len, self.recorded_bos
        if length is None and bos is None:
            return None
        return {True: "BOS + ", False: "no BOS, ", None: ""}[bos] + (f"{length}-token windows" if length else "windows")

    def _recorded_protocol(self) -> dict:
        protocol = self.calibration.get("protocol") if isinstance(self.calibration, dict) else None
        return protocol if isinstance(protocol, dict) else {}

    @property
    def recorded_bos(self) -> bool | None:
        """Whether the windows the profile was calibrated on started with a BOS
        (``calibration.protocol.bos``); None when that is not recorded (or "both")."""
        bos = self._recorded_protocol().get("bos")
        return bos if isinstance(bos, bool) else None

    @property
    def recorded_seq_len(self) -> int | None:
        """The length of the windows the profile was calibrated on (``calibration.protocol.seq_len``),
        None when not recorded."""
        length = self._recorded_protocol().get("seq_len")
        return length if isinstance(length, int) and not isinstance(length, bool) else None

    @property
    def sinks(self) -> str:
        """What was calibrated: "positional", "hidden" or "combined" (``sinkfix calibrate --sinks``);
        a content-mode profile without that record (made by hand or by ``calibrate_hidden_sinks``)
        reads "content"."""
        if self.content_sinks is None:
            return "positional"
        sinks = self.calibration.get("sinks")
        return sinks if sinks in ("hidden", "combined") else "content"

    def describe(self) -> str:
        beta = self.sink_scale
        parts = [f"sink_scale per-head [{beta.min().item():.3g}..{beta.max().item():.3g}], mean {beta.mean().item():.3f}"]
        if self.virtual_sink_logit is not None:
            v = self.virtual_sink_logit
            parts.append(f"virtual_sink_logit [{v.min().item():.3g}..{v.max().item():.3g}]")
            parts.append(f"virtual logit on the sink's own row: {'yes' if self.virtual_logit_on_sink_rows else 'no'}")
        # the sink set and the clip patch the model as much as the scales do: two profiles that differ
        # only there were described alike
        sinks = f"sink set: first {self.n_sink} token{'s' * (self.n_sink != 1)}"
        if self.extra_sink_positions:
            sinks += f" + positions {', '.join(map(str, self.extra_sink_positions))}"
        parts.append(sinks)
        clipped = [x for x in self.residual_clip or [] if math.isfinite(x)]
        if clipped:
            parts.append(f"residual clip on {len(clipped)} layer{'s' * (len(clipped) != 1)} "
                         f"(x{min(clipped):g}..x{max(clipped):g} the median norm)")
        if self.content_sinks is not None:
            parts.append(f"content sinks: {self.content_sinks.describe()}")
        windows = self._recorded_windows()
        if windows:  # which text the parameters are for: other windows are another protocol (bench notes it)
            parts.append(f"calibrated on {windows}")
        label = {"positional": "positional sink", "hidden": "hidden sinks", "combined": "positional + hidden sinks",
                 "content": "content-dependent sinks"}[self.sinks]
        # the version it was read from (a content profile made in memory is written as CONTENT_VERSION)
        version = max(self.version, CONTENT_VERSION) if self.content_sinks is not None else self.version
        return (f"Profile for {self.model.describe()}, mode {self.mode} ({label}, format version "
                f"{version}): " + ", ".join(parts)
                + f"; {self.robustness()}")

    def __repr__(self) -> str:
        return self.describe()


def bos_mismatch_note(recorded: bool | None, flag: bool, name: str | None, changes: str = "what it changes") -> str | None:
    """The note where ``--bos`` / ``--no-bos`` measures a profile (file ``name``) otherwise than it was
    calibrated (``recorded``: :attr:`Profile.recorded_bos`); None where they agree or nothing is recorded.
    ``changes`` names what the command reports of the profile (bench: "its perplexity changes")."""
    if recorded is None or recorded == flag:
        return None
    return (f"--profile {name} was calibrated {'with' if recorded else 'without'} a BOS but is measured "
            f"{'with one (--bos)' if flag else 'without one (--no-bos)'}: {changes} need not match the calibration's")


def bos_choice(flag: bool | None, recorded: bool | None, name: str | None,
               changes: str = "what it changes") -> tuple[bool | None, str, str | None]:
    """(bos, source, note) of the rule `bench` and `stream` share: ``--bos`` / ``--no-bos`` when given
    (source "flag", with :func:`bos_mismatch_note`), else the profile's recorded protocol (``recorded``;
    source "profile", the note the caller's own), else None for the caller's default (source
    "tokenizer")."""
    if flag is not None:
        return flag, "flag", bos_mismatch_note(recorded, flag, name, changes)
    if recorded is None:
        return None, "tokenizer", None
    return recorded, "profile", None


# -- optional statistics (the telemetry guard's reference) -----------------------------------------
def _statistics_protocol(value: Any) -> dict:
    """``statistics.protocol``: an object or null (``dict()`` of a list of two-letter strings made one)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProfileError(f"profile statistics.protocol must be an object or null, got {_json_text(value)}")
    _check_window_counts(value, "statistics.protocol")
    return dict(value)


@dataclass
class ProfileStatistics:
    """What the patched model's attention did on the calibration text, for the telemetry guard.

    ``low`` / ``high`` [L, H]: per layer and query head, the smallest and largest sink share before
    sink scaling (the mean over a request's rows of the attention mass on the sink set, with the
    profile applied) over every calibration window and every prefix of at least ``min_rows`` rows of
    it (a prefix is what a shorter request starting the same way would show). ``protocol`` records
    how the windows were made (seq_len, bos, texts).
    """

    low: torch.Tensor
    high: torch.Tensor
    windows: int
    min_rows: int
    protocol: dict = field(default_factory=dict)

    def check(self, identity: ModelIdentity) -> None:
        for name in ("low", "high"):
            setattr(self, name, _matrix(f"statistics.sink_share_unscaled.{name}", getattr(self, name).tolist(),
                                        identity, 0.0, 1.0))
        if (self.low > self.high).any():
            raise ProfileError("profile statistics: a sink-share range has low > high")
        if self.windows < 1 or self.min_rows < 1:
            raise ProfileError("profile statistics: windows and min_rows must be >= 1")

    def to_dict(self) -> dict:
        return {"sink_share_unscaled": {"low": self.low.tolist(), "high": self.high.tolist()},
                "windows": self.windows, "min_rows": self.min_rows, "protocol": self.protocol}


def _statistics_entry(statistics: ProfileStatistics | None) -> dict:
    return {} if statistics is None else {"statistics": statistics.to_dict()}


def _read_statistics(data: dict, identity: ModelIdentity) -> ProfileStatistics | None:
    """The optional ``statistics`` entry, validated; None when the file has none."""
    entry = data.get("statistics")
    if entry is None:
        return None
    try:
        ranges = entry["sink_share_unscaled"]
        if _has_bool(ranges["low"]) or _has_bool(ranges["high"]):
            raise ProfileError("profile statistics.sink_share_unscaled must hold numbers, not true/false")
        stats = ProfileStatistics(torch.tensor(ranges["low"], dtype=torch.float64),
                                  torch.tensor(ranges["high"], dtype=torch.float64),
                                  _json_int("statistics.windows", entry["windows"]),
                                  _json_int("statistics.min_rows", entry["min_rows"]), _statistics_protocol(entry.get("protocol")))
    except KeyError as exc:
        raise ProfileError(f"profile statistics lack {exc.args[0]!r}") from None
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ProfileError(f"profile statistics are malformed: {exc}") from None
    stats.check(identity)
    return stats


_CONTENT_KEYS = frozenset({"threshold", "hidden_sink_scale", "heads", "min_rows", "reevaluate_every"})


def _content_from_dict(policy: dict, version: int) -> ContentSinks | None:
    mode = policy.get("mode", "positional")
    if version < CONTENT_VERSION and ("mode" in policy or "content_sinks" in policy):
        raise ProfileError(f"a version-{version} profile cannot name a mode (\"mode\": {mode!r}); modes start at "
                           f"version {CONTENT_VERSION}: the file was edited or is corrupted")
    if mode == "positional":
        if version >= CONTENT_VERSION:
            raise ProfileError(f"a version-{version} profile is a content-mode profile (\"mode\": \"content\"); "
                               "positional profiles are version 3: the file was edited or is corrupted")
        if "content_sinks" in policy:
            raise ProfileError("a positional profile has a 'content_sinks' entry; set \"mode\": \"content\" or remove it")
        return None
    if mode != "content":
        raise ProfileError(f"profile mode must be 'positional' or 'content', got {mode!r}")
    entry = policy.get("content_sinks")
    if not isinstance(entry, dict) or "threshold" not in entry or "hidden_sink_scale" not in entry:
        raise ProfileError("a content-mode profile needs a 'content_sinks' object with 'threshold' and "
                           "'hidden_sink_scale'")
    unknown = sorted(set(entry) - _CONTENT_KEYS)
    if unknown:  # a misspelt key ("min_row") was ignored, and the rule ran with its default
        raise ProfileError(f"profile content_sinks has unknown key(s) {', '.join(map(repr, unknown))}; it takes "
                           f"{', '.join(sorted(_CONTENT_KEYS))}")
    heads = entry.get("heads")
    if heads is not None and not _all_bools(heads):
        # torch.tensor(..., dtype=bool) would read 0.5 or 2 as true
        raise ProfileError(f"profile content_sinks.heads must be a [layers][heads] array of true/false, got "
                           f"{_json_text(heads)}")
    if _has_bool(entry["hidden_sink_scale"]):
        raise ProfileError("profile content_sinks.hidden_sink_scale must hold numbers, not true/false")
    try:
        return ContentSinks(
            threshold=entry["threshold"],
            hidden_sink_scale=torch.tensor(entry["hidden_sink_scale"], dtype=torch.float64),
            heads=None if heads is None else torch.tensor(heads, dtype=torch.bool),
            min_rows=entry.get("min_rows", 1), reevaluate_every=entry.get("reevaluate_every"))
    except (PolicyError, TypeError, ValueError) as exc:
        raise ProfileError(f"profile content_sinks: {exc}") from None


def _all_bools(value: Any) -> bool:
    """Nested lists whose leaves are all true/false."""
    if isinstance(value, list):
        return all(_all_bools(v) for v in value)
    return isinstance(value, bool)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in a profile")


def _float_as_written(text: str) -> float:
    """A JSON number that float() reads as another value is refused: 1e-400 read as 0 made that
    head's sink scale a drop, unsaid (the spec parser refuses it for the same reason)."""
    value = float(text)
    if reads_as_zero(text, value):
        raise ValueError(f"the number {text} is too small for a float and would read as 0")
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text} is too large for a float and would read as {value}")
    return value
