"""ViGGO (GEM/viggo): a video-game sentence to its meaning representation, `function(attr[value], ...)`.

Exact match means the same dialogue-act function and the same set of attribute/value pairs, in any order; values are
compared without case and surrounding space, and a list value (`genres[action, adventure]`) as a set.
"""

from __future__ import annotations

import re

_MR = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.S)
_ATTR = re.compile(r"([a-z_]+)\s*\[([^\]]*)\]")


def parse(mr: str) -> tuple[str, frozenset] | None:
    """(function, {(attribute, frozenset of values)}) of a meaning representation; None when it is not one."""
    text = mr.strip().split("\n")[0]
    match = _MR.match(text)
    if match is None:
        return None
    attrs = frozenset((name, frozenset(v.strip().lower() for v in value.split(",") if v.strip()))
                      for name, value in _ATTR.findall(match.group(2)))
    return match.group(1), attrs


def exact_match(prediction: str, gold: str) -> bool:
    got, want = parse(prediction), parse(gold)
    return got is not None and got == want


def function_match(prediction: str, gold: str) -> bool:
    got, want = parse(prediction), parse(gold)
    return got is not None and want is not None and got[0] == want[0]
