"""Optional document cleaning for preprocess (all off by default, so output stays Megatron-identical).

Each function is pure and cheap; preprocess counts every dropped document by
the reason returned here.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Optional

# C0/C1 controls except tab and newline (CR is handled by newline normalisation), plus DEL and BOM
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
_TRAILING_WS = re.compile(r"[ \t]+(?=\n)|[ \t]+\Z")
_BLANK_RUNS = re.compile(r"\n{3,}")
_INNER_SPACES = re.compile(r"(?<=\S) {2,}(?=\S)")


@dataclass(frozen=True)
class CleanOptions:
    normalize: Optional[str] = None  # None | "nfkc" | "nfc"
    strip_control: bool = False
    clean_whitespace: bool = False
    min_chars: int = 0
    max_chars: Optional[int] = None
    dedup: bool = False

    @property
    def transforms(self) -> bool:
        return bool(self.normalize or self.strip_control or self.clean_whitespace)

    @property
    def any(self) -> bool:
        return self.transforms or self.min_chars > 0 or self.max_chars is not None or self.dedup


def clean_text(text: str, opts: CleanOptions) -> str:
    """Apply the enabled transforms, in a fixed order: normalise, drop controls, tidy whitespace."""
    if opts.normalize:
        text = unicodedata.normalize(opts.normalize.upper(), text)
    if opts.strip_control or opts.clean_whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if opts.strip_control:
        text = _CONTROL.sub("", text)
    if opts.clean_whitespace:
        # keep indentation (leading spaces) and single blank lines: code and verse depend on them
        text = _TRAILING_WS.sub("", text)
        text = _INNER_SPACES.sub(" ", text)
        text = _BLANK_RUNS.sub("\n\n", text)
        text = text.strip("\n")
    return text


def length_filter(text: str, opts: CleanOptions) -> Optional[str]:
    """The drop reason for ``text`` under min/max chars, or None to keep it."""
    n = len(text)
    if n < opts.min_chars:
        return "too_short"
    if opts.max_chars is not None and n > opts.max_chars:
        return "too_long"
    return None
