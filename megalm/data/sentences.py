"""Sentence splitting for ``preprocess --split-sentences`` (BERT-pair data).

Uses NLTK's punkt (what Megatron-LM uses, so output matches it) when NLTK and
its punkt data are installed; otherwise a rule-based splitter for Latin
script that breaks after . ! ? (and closing quotes) before a capital, digit or
quote, and at blank lines.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

_BOUNDARY = re.compile(
    r"""(?<=[.!?])["'\u201d\u2019)\]]*"""  # sentence end + closing quotes/brackets
    r"""(\s+)(?=["'\u201c\u2018(\[]?[A-Z0-9\u00c0-\u00de])"""  # whitespace, then a likely sentence start
    r"""|(\n\s*\n)"""  # or a blank line (paragraph break)
)
_ABBREV = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Prof|Sr|Jr|vs|etc|e\.g|i\.e|No|Vol|Gen|Col|Capt|Lt|Rev)\.$")


def _rule_split(text: str, keep_newlines: bool) -> list[str]:
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        ws_start = m.start(1) if m.group(1) is not None else m.start(2)
        if m.group(1) is not None and _ABBREV.search(text[start:ws_start]):
            continue
        ws_end = m.end()
        piece = text[start:ws_end] if keep_newlines else text[start:ws_start]
        out.append(piece)
        start = ws_end
    out.append(text[start:])
    if keep_newlines:
        return [s for s in out if s]
    return [s.strip() for s in out if s.strip()]


def _nltk_splitter(keep_newlines: bool, lang: str) -> Optional[Callable[[str], list[str]]]:
    try:
        import nltk
        from nltk.tokenize import punkt

        splitter = nltk.load(f"tokenizers/punkt/{lang}.pickle")
    except Exception:  # noqa: BLE001 - not installed, or punkt data missing: fall back to rules
        return None
    if keep_newlines:
        class _Vars(punkt.PunktLanguageVars):
            _period_context_fmt = r"""
                \S*                          # some word material
                %(SentEndChars)s             # a potential sentence ending
                \s*                       #  <-- THIS is what I changed
                (?=(?P<after_tok>
                    %(NonWord)s              # either other punctuation
                    |
                    (?P<next_tok>\S+)     #  <-- Normally you would have \s+ here
                ))"""
        splitter = punkt.PunktSentenceTokenizer(train_text=splitter._params, lang_vars=_Vars())
    return splitter.tokenize


def make_splitter(keep_newlines: bool = False, lang: str = "english",
                  prefer_nltk: bool = True) -> Callable[[str], list[str]]:
    """A function text -> sentences; documents longer than 1M chars are split in 1M-char pieces first."""
    fn = _nltk_splitter(keep_newlines, lang) if prefer_nltk else None
    base = fn or (lambda t: _rule_split(t, keep_newlines))
    max_len = 1_000_000

    def split(text: str) -> list[str]:
        if len(text) <= max_len:
            return base(text)
        return [s for i in range(0, len(text), max_len) for s in base(text[i:i + max_len])]

    split.backend = "nltk" if fn else "rules"  # type: ignore[attr-defined]
    return split
