"""What one ``sinkfix eval`` run depends on, and the correction it applies; importable without lm-eval,
so that bad arguments fail before lm-eval's imports (several seconds) are paid."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sinkfix.errors import UsageError
from sinkfix.lmeval.builtin import BUILTIN_TASKS
from sinkfix.lmeval.report import confidence_label
from sinkfix.lmeval.stats import DEFAULT_CONFIDENCE, DEFAULT_ITERATIONS
from sinkfix.models import DEFAULT_MODEL, pick_device
from sinkfix.policy import Policy
from sinkfix.profile import Profile

__all__ = ["EvalConfig", "Correction", "DEFAULT_POLICY"]

DEFAULT_POLICY = "sink_scale=0.9"


@dataclass(frozen=True)
class Correction:
    """What the corrected model carries: a policy (from a spec) or a calibrated profile (from a file)."""

    kind: Literal["policy", "profile"]
    source: str  # the spec as given, or the profile's path
    value: Policy | Profile

    @classmethod
    def from_args(cls, policy: str | Policy | None = None, profile: str | Profile | None = None) -> "Correction | None":
        """Parse a policy spec or load a profile file (every problem is a SinkfixError); None for neither."""
        if policy is not None and profile is not None:
            raise UsageError("give a policy or a profile, not both")
        if isinstance(policy, Policy):
            return cls("policy", policy.describe(), policy)
        if policy is not None:
            return cls("policy", str(policy), Policy.parse(str(policy)))
        if isinstance(profile, Profile):
            return cls("profile", "(in memory)", profile)
        if profile is not None:
            return cls("profile", str(profile), Profile.load(str(profile)))
        return None

    def describe(self) -> str:
        if self.kind == "policy":
            return f"policy {self.value.describe()}"
        return f"profile {self.source} ({self.value.describe()})"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "description": self.describe()}


@dataclass(frozen=True)
class EvalConfig:
    """Everything one ``sinkfix eval`` run depends on (its JSON ``settings``)."""

    model: str = DEFAULT_MODEL
    tasks: tuple[str, ...] = BUILTIN_TASKS
    include_paths: tuple[str, ...] = ()
    policy: str | None = None  # neither policy nor profile: DEFAULT_POLICY
    profile: str | None = None
    limit: int | None = None  # items per task, None = all
    batch_size: int = 8  # the CLI's default: same results as batch 1 on the built-in tasks, faster
    device: str | None = None
    kernel: str = "auto"
    iterations: int = DEFAULT_ITERATIONS
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = 0
    threads: int | None = None
    num_fewshot: int | None = None  # None: each task's own default (0 for the built-in tasks)
    extra: dict[str, Any] = field(default_factory=dict)  # further HFLM arguments (max_length, ...)

    def validate(self) -> None:
        for name, value, low in (("--limit", self.limit, 1), ("--batch-size", self.batch_size, 1),
                                 ("--bootstrap", self.iterations, 1), ("--threads", self.threads, 1),
                                 ("--num-fewshot", self.num_fewshot, 0), ("--seed", self.seed, 0),
                                 ("--max-length", self.extra.get("max_length"), 2)):
            if value is not None and value < low:
                raise UsageError(f"{name} must be >= {low}, got {value}")
        if not 0 < self.confidence < 1:
            raise UsageError(f"--confidence must lie in (0, 1), got {self.confidence}")
        if self.policy is not None and self.profile is not None:
            raise UsageError("give --policy or --profile, not both")
        if self.device is not None:
            pick_device(self.device)  # a name torch does not know, or CUDA where there is none

    def input_files(self) -> list[tuple[str, Path]]:
        """The files this run reads that are known without lm-eval, each with what it is: the profile,
        the files of a local model folder that loading the model reads (:func:`_model_reads`: not every
        file there; an earlier run's ``--out ckpt/eval.json`` is none, and the same command run again
        was refused), the task files (YAML under the include paths, or named in
        ``tasks``). The tasks' data files need lm-eval's task index: :func:`~sinkfix.lmeval.taskload.data_files`."""
        inputs = [] if self.profile is None else [("the --profile file", Path(self.profile))]
        model = Path(self.model).expanduser()
        if model.is_dir():
            templates = model / "additional_chat_templates"
            found = [*model.iterdir(), *(templates.iterdir() if templates.is_dir() else ())]
            inputs += [(f"the file {path.relative_to(model)} of the --model folder", path)
                       for path in sorted(found) if path.is_file() and _model_reads(path.relative_to(model))]
        inputs += [(f"the task file {name}", Path(name)) for name in self.tasks
                   if name.endswith((".yaml", ".yml")) and Path(name).is_file()]
        for folder in self.include_paths:
            if Path(folder).expanduser().is_dir():
                inputs += [(f"the task file {path} (--include-path)", path)
                           for path in sorted(Path(folder).expanduser().rglob("*")) if path.suffix in (".yaml", ".yml")]
        return inputs

    def interval_notes(self) -> list[str]:
        """A note when ``--bootstrap`` draws too few for the interval asked for: ``np.quantile``
        interpolates each bound at position (1 - confidence) / 2 x (N - 1) of the sorted draws, and
        below 1 the bound lies between the most extreme draw and the next, narrower than the level
        printed (50 draws at 99.9% gave [-0.996, -0.171] where 20,000 gave [-1, 0], McNemar's p 0.125).
        Not refused: a quick run with few draws stays possible."""
        tail = (1 - self.confidence) / 2
        if tail * (self.iterations - 1) >= 1 - 1e-9:
            return []
        level = confidence_label(self.confidence)
        needed = math.ceil(1 / tail + 1 - 1e-9)
        return [f"--bootstrap {self.iterations} is too few draws for a {level} interval: each bound lies between "
                f"the most extreme draw on its side and the next, so the intervals are narrower than {level}; use "
                f"--bootstrap {needed} or more"]

    def correction(self) -> Correction:
        spec = self.policy if self.policy is not None or self.profile is not None else DEFAULT_POLICY
        correction = Correction.from_args(spec, self.profile)
        assert correction is not None
        return correction


#: Files of a local model folder that ``transformers``' ``from_pretrained`` reads (model, configs, tokenizer) by
#: name; weights and tokenizer models by their suffix (a sharded checkpoint's parts, a GGUF file, ``*.model``).
_MODEL_FILES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "vocab.json", "vocab.txt", "merges.txt",
    "preprocessor_config.json", "processor_config.json",
})
_MODEL_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".model", ".tiktoken", ".index.json")


def _model_reads(relative: Path) -> bool:
    """Whether loading a model folder (:func:`sinkfix.load_model`: ``AutoTokenizer`` and
    ``AutoModelForCausalLM.from_pretrained``) reads the file at ``relative`` in it: the configs, the
    weights and their index, the tokenizer's files, the chat templates (``additional_chat_templates/``).
    Anything else there (a README, an earlier evaluation report) is no input of the run."""
    if len(relative.parts) == 2 and relative.parts[0] == "additional_chat_templates":
        return relative.suffix == ".jinja"
    if len(relative.parts) != 1:  # transformers reads the folder's top level only (a subfolder: when asked to)
        return False
    name = relative.name
    return name in _MODEL_FILES or name.endswith(_MODEL_SUFFIXES)

