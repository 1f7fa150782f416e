"""Text clean-up and scrubbing of secrets and personal data, counted by kind.

Normalising keeps meaning: NFC so the same letter is the same code points, control characters out (tab and
newline stay), CRLF to LF, trailing spaces off each line. Inner spacing is kept because code and logs use it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# Ordered: private keys before the token patterns that would match inside them; IPv6 before IPv4.
# Every pattern runs in time linear in the row (a 1 MB row of "a." or of BEGIN lines in well under a second):
# a pattern that scans a whole run of characters may only start where that run starts, or a failing row costs
# the run's length at every position in it (quadratic: 120 KB took 43 s).
_PRIVATE_KEY_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")
_PRIVATE_KEY_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----")
SCRUB_PATTERNS: dict[str, re.Pattern[str]] = {
    # the whole block is found by `_private_keys` (a BEGIN line up to the next END line); this is what it matches
    "private_key": re.compile(_PRIVATE_KEY_BEGIN.pattern + r"[\s\S]*?" + _PRIVATE_KEY_END.pattern),
    "bearer": re.compile(r"(?i)\bbearer\s+[A-Za-z0-9\-._~+/]{16,}=*"),
    "aws_key": re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"),
    "api_key": re.compile(
        r"\b(?:sk-(?:proj-)?[A-Za-z0-9_\-]{20,}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}"
        r"|xox[abprs]-[A-Za-z0-9\-]{10,}|AIza[0-9A-Za-z_\-]{35}|hf_[A-Za-z0-9]{30,}"
        r"|glpat-[A-Za-z0-9_\-]{20,})"),
    # starts only where a run of address characters starts; its leading punctuation (`lead`, which `\b` used to
    # skip) is kept, so "..bob@example.com" still keeps its dots
    "email": re.compile(r"(?<![A-Za-z0-9._%+\-])(?P<lead>[._%+\-]*)[A-Za-z0-9][A-Za-z0-9._%+\-]*"
                        r"@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b"),
    "ipv6": re.compile(
        r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
        r"|(?:[0-9A-Fa-f]{1,4}:){1,7}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,5})?"
        r"|::(?:[0-9A-Fa-f]{1,4}:){0,6}[0-9A-Fa-f]{1,4})(?![\w:])"),
    "ipv4": re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"),
}
SCRUB_KINDS = tuple(SCRUB_PATTERNS)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+(?=\n|$)")


def normalize_text(text: str) -> str:
    cleaned = text if text.isascii() else unicodedata.normalize("NFC", text)
    if cleaned.isprintable():  # one line, no control or zero-width characters: only the ends can change
        return cleaned.strip()
    if "\r" in cleaned:
        cleaned = cleaned.replace("\r\n", "\n").replace("\r", "\n")
    cleaned = _CONTROL.sub("", cleaned)
    return _TRAILING_SPACE.sub("", cleaned).strip()


class Scrubber:
    """Replaces every match of the chosen kinds with the placeholder and counts the replacements per kind."""

    def __init__(self, kinds: list[str] | tuple[str, ...], placeholder: str = "<{kind}>") -> None:
        self.patterns = [(kind, SCRUB_PATTERNS[kind]) for kind in SCRUB_KINDS if kind in kinds]
        self.placeholder = placeholder
        self.counts: Counter[str] = Counter()

    def __call__(self, text: str) -> str:
        for kind, pattern in self.patterns:
            mark = self.placeholder.replace("{kind}", kind.upper())
            if kind == "private_key":
                text, n = _replace_private_keys(text, mark)
            else:  # a function, not a template: the placeholder is taken literally, and a `lead` stays in place
                text, n = pattern.subn(lambda match: (match.groupdict().get("lead") or "") + mark, text)
            if n:
                self.counts[kind] += n
        return text


def _replace_private_keys(text: str, mark: str) -> tuple[str, int]:
    """Each BEGIN ... PRIVATE KEY----- line up to the next END line, replaced by `mark`. Linear: a BEGIN without
    an END after it means no later BEGIN has one either, so the search stops there instead of scanning the rest of
    the row again from every later BEGIN (what the single lazy pattern did)."""
    pieces, position, count = [], 0, 0
    while (begin := _PRIVATE_KEY_BEGIN.search(text, position)) is not None:
        end = _PRIVATE_KEY_END.search(text, begin.end())
        if end is None:
            break
        pieces += [text[position:begin.start()], mark]
        position, count = end.end(), count + 1
    return "".join(pieces) + text[position:], count


def scrub_kinds(setting: bool | list[str]) -> list[str]:
    if setting is True:
        return list(SCRUB_KINDS)
    return list(setting) if setting else []
