"""Request files for ``sinkfix monitor run``: one JSON object per line, and a built-in set.

    {"prompt": "def parse(line):", "domain": "code"}
    {"prompt": "The attention sink is", "domain": "prose", "id": "q-17"}

``prompt`` (a non-empty string) is required; ``domain`` (a non-blank string or null) and ``id`` (a string or
number) are optional; blank lines are skipped. Any other key is refused, so a typo such as
``"promt"`` fails with the line that holds it instead of being ignored.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from sinkfix.errors import MonitorError
from sinkfix.files import json_error, json_lines, utf8_problem

__all__ = ["Request", "read_requests", "builtin_requests", "BUILTIN"]

BUILTIN = "builtin"  # the --requests value that names the built-in set
_KEYS = ("prompt", "domain", "id")

#: The label of requests without a domain in Prometheus (an empty label reads as "absent" in PromQL)
#: and in reports; reserved: no request may be labelled so.
NO_DOMAIN = "none"


# bidirectional overrides, embeddings and isolates: they reorder how the rest of a report line shows
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _unprintable(character: str) -> bool:
    """A character no label may hold: control characters, lone surrogates (not encodable: a label with
    one made every later Prometheus scrape fail), line and paragraph separators, bidi controls."""
    return unicodedata.category(character) in ("Cc", "Cs", "Zl", "Zp") or character in _BIDI_CONTROLS


#: characters that print as nothing though they are no format characters: Hangul fillers, the blank
#: braille pattern, the combining grapheme joiner and the variation selectors (a label of U+3164 or
#: U+2800 alone showed as an empty row)
_VARIATION_SELECTORS = frozenset(map(chr, range(0xFE00, 0xFE10)))
_BLANKS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f") | _VARIATION_SELECTORS


def _invisible(character: str) -> bool:
    return character.isspace() or character in _BLANKS or unicodedata.category(character) == "Cf"


def _visible(text: str) -> str:
    """``text`` without the characters that print as nothing: a label of a zero-width space only
    (U+200B, a format character) was taken and showed as an empty row of the report."""
    return "".join(c for c in text if not _invisible(c))


def _invisible_end(text: str) -> bool:
    """Whether ``text`` starts or ends with whitespace or a character that prints as nothing ("code"
    and "code" + U+200B were two rows that both read "code"). An emoji's own end is kept: a variation
    selector (U+2764 U+FE0F) and a tag sequence's cancel tag (a subdivision flag) end a name."""
    first, last = text[0], text[-1]
    emoji_end = "\U000e0020" <= last <= "\U000e007f" or (  # a selector after a symbol, not after a letter
        last in _VARIATION_SELECTORS and len(text) > 1 and unicodedata.category(text[-2]) == "So")
    return _invisible(first) or (not emoji_end and _invisible(last))


def _lone_surrogate(text: str) -> str | None:
    for character in text:
        if unicodedata.category(character) == "Cs":
            return character
    return None


def check_domain_label(domain: str | None, where: str = "") -> None:
    """MonitorError for a label no request may have: :data:`NO_DOMAIN`, which would merge the request
    with those that have no domain, an empty or blank one, which Prometheus reads as no label at
    all (a series ``domain=""`` matches the selectors for series without it), and one with a control
    character or whitespace at either end (another domain than the name it looks like). ``where`` prefixes the
    message (a request file's line)."""
    if domain == NO_DOMAIN:
        raise MonitorError(f"{where}the domain {NO_DOMAIN!r} is reserved for requests without one (reports and "
                           "Prometheus group those under it): use None (null), or another name")
    if isinstance(domain, str) and not _visible(domain):
        raise MonitorError(f"{where}the domain {domain!r} is empty: Prometheus reads an empty label as no label at "
                           "all, and one of invisible characters only shows as an empty row; use None (null) for a "
                           "request without a domain, or a name")
    if isinstance(domain, str) and (_invisible_end(domain) or any(_unprintable(c) for c in domain)):
        # "code " is another domain than "code" in every report, and a newline split the report's table;
        # format characters (a zero-width joiner in a Persian word or an emoji) and inner spaces are a name's own
        raise MonitorError(f"{where}the domain {domain!r} has a control character or starts or ends with "
                           "whitespace or an invisible character: give the name without them")


@dataclass(frozen=True)
class Request:
    prompt: str
    domain: str | None = None
    id: str | None = None
    line: int = 0  # where it came from (0 = not from a file)


def _pairs(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object that names a key once only: ``{"prompt": "a", "prompt": "b"}`` kept "b" unsaid."""
    data: dict = {}
    for key, value in pairs:
        if key in data:
            raise MonitorError(f"key {key!r} given twice")
        data[key] = value
    return data


def _parse_line(text: str, number: int, where: str) -> Request:
    try:
        data = json.loads(text, object_pairs_hook=_pairs)
    except MonitorError as exc:
        raise MonitorError(f"{where}, line {number}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MonitorError(f"{where}, line {number}: not JSON ({json_error(exc)})") from None
    except RecursionError:  # arrays nested thousands deep: json's decoder recurses once per level
        raise MonitorError(f"{where}, line {number}: not a request (JSON nested too deeply to read)") from None
    if not isinstance(data, dict):
        raise MonitorError(f"{where}, line {number}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise MonitorError(f"{where}, line {number}: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
    prompt, domain, ident = data.get("prompt"), data.get("domain"), data.get("id")
    if not isinstance(prompt, str) or not prompt.strip():
        raise MonitorError(f"{where}, line {number}: 'prompt' must be a non-empty string")
    for field, value in (("prompt", prompt), ("id", ident)):
        surrogate = _lone_surrogate(value) if isinstance(value, str) else None
        if surrogate is not None:  # valid JSON ("\ud800"), but no text: the tokenizer failed on it mid-run
            raise MonitorError(f"{where}, line {number}: '{field}' holds a lone surrogate ({surrogate!r}), which is "
                               "no text (half of a UTF-16 pair): fix the line's escapes")
    if domain is not None and not isinstance(domain, str):
        raise MonitorError(f"{where}, line {number}: 'domain' must be a string or null")
    check_domain_label(domain, f"{where}, line {number}: ")
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
        raise MonitorError(f"{where}, line {number}: 'id' must be a string or an integer")
    return Request(prompt, domain, None if ident is None else str(ident), number)


def read_requests(path: str | Path) -> list[Request]:
    """Parse a request file; every problem is a :class:`MonitorError` naming the line."""
    if str(path) == BUILTIN:
        return builtin_requests()
    p = Path(path)
    try:
        # a leading byte-order mark dropped; universal newlines: "\r\n" and a lone "\r" read as "\n"
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MonitorError(f"request file not found: {p}") from None
    except IsADirectoryError:
        raise MonitorError(f"request file {p} is a directory") from None
    except UnicodeDecodeError:
        raise MonitorError(f"request file {p} is not UTF-8 text: {utf8_problem(p)}") from None
    except OSError as exc:
        raise MonitorError(f"cannot read request file {p}: {exc.strerror or exc}") from None
    requests = [_parse_line(line, number, str(p)) for number, line in enumerate(json_lines(text), 1)
                if line.strip()]
    if not requests:
        raise MonitorError(f"request file {p} holds no request (one JSON object per line)")
    return requests


def _paragraphs(text: str, size: int) -> list[str]:
    """Consecutive blank-line separated paragraphs joined into chunks of about ``size`` characters."""
    chunks, current = [], ""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= size:
            chunks.append(current[: 2 * size])
            current = ""
    return chunks


def builtin_requests(per_domain: int = 4, size: int = 1200) -> list[Request]:
    """Prompts cut from the built-in evaluation texts (:func:`sinkfix.texts.domain_text`): ``per_domain``
    chunks of about ``size`` characters of each built-in domain, spread over the text, so that the whole
    loop (run, report, guard) can be tried offline (five domains: 20 requests by default)."""
    from sinkfix.texts import DOMAINS, domain_text

    requests = []
    for domain in DOMAINS:
        chunks = _paragraphs(domain_text(domain, "eval"), size)
        step = max(1, len(chunks) // per_domain)
        for i, chunk in enumerate(chunks[::step][:per_domain]):
            requests.append(Request(chunk, domain, f"{domain}-{i}"))
    return requests
