"""Multiple-choice rows: a row's candidates, its gold answer, and the row rewritten to name the
gold option's text.

An instruction row with an ``answer`` label lists its candidates after "Answer format:" in the
instruction (or in an explicit ``choices`` list); a label's option text is what follows "<Label>:"
in the instruction, up to the next label or "Answer format:". The training data (``answer_format:
text`` rewrites the rows before tokenizing) and the multiple-choice scorer
(``propulsion_ds.eval.choice``) read rows through the same functions, so that a model is scored on
exactly what it was trained to write.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from propulsion_ds.errors import DataError

ANSWER_FORMATS = ("label", "text")
TEXT_PREFIX = "the correct answer is "
_FORMAT_RE = re.compile(r"answer format:\s*([^\n]*)", re.IGNORECASE)


def row_where(source: str, index: Optional[int]) -> str:
    return f"{source}: row {index + 1}" if index is not None else source


def _labels_of(instruction: str, choices, where: str) -> list[str]:
    if choices is not None:
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataError(f"{where}: field 'choices' must be a list of non-empty strings")
        labels = [c.strip() for c in choices]
    else:
        m = _FORMAT_RE.search(instruction)
        labels = [x.strip() for x in m.group(1).split("/")] if m else []
        labels = [x for x in labels if x]
    if len(labels) < 2:
        raise DataError(f"{where}: no candidates: the instruction lists none after 'Answer format:' "
                        "and the row has no 'choices' list")
    if len(set(labels)) != len(labels):
        raise DataError(f"{where}: candidates repeat: {'/'.join(labels)}")
    return labels


def parse_choices(instruction: str, choices: Optional[list] = None, *, where: str = "row") -> list[tuple[str, str]]:
    """The candidates of a row: ``(label, option text)`` pairs in order. The text is what follows
    "<label>:" (any case) up to the next label or "Answer format:"; rows whose labels have no
    "<label>:" (true/false) use the label itself as the text."""
    if not isinstance(instruction, str):
        raise DataError(f"{where}: field 'instruction' is {type(instruction).__name__}, expected a string")
    labels = _labels_of(instruction, choices, where)
    fm = _FORMAT_RE.search(instruction)
    body = instruction[:fm.start()] if fm else instruction
    starts = []  # (match start, text start, label index)
    for k, lab in enumerate(labels):
        m = re.search(r"(?<![0-9A-Za-z])" + re.escape(lab) + r"\s*:", body, re.IGNORECASE)
        if m:
            starts.append((m.start(), m.end(), k))
    if not starts:
        return [(lab, lab) for lab in labels]
    if len(starts) != len(labels):
        missing = [labels[k] for k in range(len(labels)) if k not in {s[2] for s in starts}]
        raise DataError(f"{where}: no option text for candidate {missing[0]!r} "
                        f"(no '{missing[0]}:' in the instruction)")
    starts.sort()
    texts: dict[int, str] = {}
    for j, (_, text_start, k) in enumerate(starts):
        end = starts[j + 1][0] if j + 1 < len(starts) else len(body)
        text = body[text_start:end].strip()
        if not text:
            raise DataError(f"{where}: candidate {labels[k]!r} has an empty option text")
        texts[k] = text
    return [(lab, texts[k]) for k, lab in enumerate(labels)]


def gold_index(row: dict, labels: Sequence[str], where: str) -> int:
    ans = row.get("answer")
    if not isinstance(ans, str):
        raise DataError(f"{where}: field 'answer' is {type(ans).__name__}, expected a string")
    ans = ans.strip()
    if ans in labels:
        return list(labels).index(ans)
    low = [x.lower() for x in labels]
    if ans.lower() in low:
        return low.index(ans.lower())
    raise DataError(f"{where}: answer {ans!r} is not among the candidates {'/'.join(labels)}")


def text_format_row(row: dict, *, where: str = "row") -> dict:
    """A copy of a training row whose output names the gold option's text instead of its label
    (rows without an ``answer`` are returned unchanged)."""
    if row.get("answer") is None:
        return dict(row)
    cands = parse_choices(row.get("instruction"), row.get("choices"), where=where)
    gold = gold_index(row, [c[0] for c in cands], where)
    return {**row, "output": TEXT_PREFIX + cands[gold][1]}
