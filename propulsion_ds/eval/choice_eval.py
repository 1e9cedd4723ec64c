"""``eval.metric: "choice"`` in the trainer: the questions of the eval files (each file reported on
its own, by its name's stem) and the record/TensorBoard values of a scoring.

Used from ``Trainer.evaluate``: ``questions = load_eval_questions(cfg.data, cfg.eval.answer_format)``
once, then at each eval ``score_questions(...)`` and ``choice_values(result)``.
"""
from __future__ import annotations

import os

from propulsion_ds.errors import DataError
from propulsion_ds.eval.choice import ChoiceQuestion, ChoiceResult, build_questions

TAG = "eval/choice_accuracy"


def file_stem(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    for ext in (".jsonl", ".json", ".parquet", ".txt"):
        if name.lower().endswith(ext):
            return name[:-len(ext)]
    return name


def load_eval_questions(data_cfg, answer_format: str) -> list[ChoiceQuestion]:
    """The questions of every ``data.eval`` file (rows with an ``answer``), source = the file's stem."""
    from propulsion_ds.data.files import load_raw, resolve_files

    if not data_cfg.eval:
        raise DataError("eval.metric: \"choice\" scores the data.eval files; set data.eval")
    files = resolve_files(data_cfg.eval)
    stems: dict[str, str] = {}
    questions: list[ChoiceQuestion] = []
    for path in files:
        stem = file_stem(path)
        if stem in stems:
            raise DataError(f"data.eval: {stems[stem]!r} and {path!r} share the name {stem!r}; "
                            "eval.metric \"choice\" reports each file by its name")
        stems[stem] = path
        rows = load_raw(path).to_list()
        qs = build_questions(rows, data_cfg.template, answer_format, stem)
        if not qs:
            raise DataError(f"{path}: no row carries an 'answer' field, which eval.metric \"choice\" scores")
        questions += qs
    return questions


def choice_values(result: ChoiceResult) -> dict:
    """``eval/choice_accuracy`` overall and ``eval/choice_accuracy/<stem>`` per file (the same keys
    in metrics.jsonl and TensorBoard)."""
    out = {TAG: result.accuracy}
    out.update({f"{TAG}/{stem}": acc for stem, acc in result.per_source.items()})
    return out
