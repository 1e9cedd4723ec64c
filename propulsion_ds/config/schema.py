"""Run configuration: typed dataclasses, one JSON file per run, ``--set a.b=v`` overrides.

Each field carries its own documentation and limits in ``metadata`` (see :func:`option`):
validation (``config/validate.py``) and the README's reference table (``config/reference.py``)
both read them, so a limit is written once. Loading lives in ``config/load.py``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from propulsion_ds.method.propulsion import PropulsionConfig

__all__ = ["CheckpointConfig", "DataConfig", "DistributedConfig", "EvalConfig", "Leaf",
           "LoggingConfig", "ModelConfig", "RunConfig", "TokenizerConfig",
           "TrainConfig", "field_names", "leaves", "option"]

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, choices: tuple = (), gt=None, ge=None, lt=None,
           le=None, not_empty: Union[bool, str] = False, values: Optional[str] = None):
    """A dataclass field with its help, allowed ``choices``, bounds (``gt``/``ge``/``lt``/``le``,
    checked only when the value is set), ``not_empty`` (``""`` is refused; a string is the hint
    the error adds) and ``values`` (how the reference describes the allowed values where the
    type alone does not say it)."""
    bounds = tuple((op, b) for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None)
    meta = {"help": help, "choices": tuple(choices), "bounds": bounds, "not_empty": not_empty,
            "values": values}
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name_or_path: str = option("assets/stories260K", help="local transformers model directory or a "
                               "Hugging Face Hub id (`org/name`)")
    dtype: str = option("fp32", choices=("bf16", "fp16", "fp32"), help="dtype of the frozen weights "
                        "and of the compute")
    gradient_checkpointing: bool = option(False, help="recompute activations in the backward pass "
                                          "(less memory, more compute)")
    trust_remote_code: bool = option(False, help="run model code shipped with the checkpoint")
    attn_implementation: str = option("sdpa", choices=("sdpa", "eager", "flash_attention_2"),
                                      help="attention kernel; `flash_attention_2` needs the "
                                      "`flash_attn` package and a GPU")


@dataclass
class TokenizerConfig:
    name_or_path: Optional[str] = option(None, not_empty="use null for the model's tokenizer",
                                         help="tokenizer directory or Hub id; null: the model's")


@dataclass
class DataConfig:
    train: Union[str, list] = option("", help="training data: a file, a glob or a directory (searched "
                                     "recursively), or a list of them, of .jsonl, .json, .txt or "
                                     ".parquet files, one kind per data set; or one saved `datasets` "
                                     "directory")
    eval: Union[str, list, None] = option(None, help="eval data, in the forms `train` takes; null: "
                                          "none, or carved from train by `eval_fraction`")
    format: str = option("text", choices=("text", "instruction", "chat"),
                         help="how rows become samples (instruction and chat need records, not .txt)")
    text_field: str = option("text", not_empty=True, help="the field holding a row's text")
    max_length: int = option(512, ge=8, help="tokens per row; longer samples are truncated, "
                             "except text documents when packing: those are cut into pieces")
    packing: bool = option(True, help="pack whole samples into rows of at most `max_length` tokens "
                           "(positions restart per document)")
    template: Optional[str] = option(None, help="instruction prompt template; null: Alpaca")
    eval_fraction: float = option(0.0, ge=0, lt=1, help="share of train carved off as the eval set "
                                  "when `eval` is null")
    cache_dir: Optional[str] = option(None, help="tokenized-data cache; null: $PROPULSION_CACHE/data, "
                                      "else ~/.cache/propulsion-ds/data")
    num_proc: Optional[int] = option(None, ge=1, help="tokenizer processes for the cache build; "
                                     "null: 1")


@dataclass
class TrainConfig:
    lr: float = option(1e-3, gt=0, help="peak learning rate (AdamW)")
    weight_decay: float = option(0.0, ge=0, help="AdamW weight decay")
    warmup_steps: int = option(0, ge=0, help="updates of linear warm-up")
    schedule: str = option("constant", choices=("constant", "linear", "cosine"),
                           help="learning-rate schedule after the warm-up")
    max_steps: Optional[int] = option(None, ge=1, help="optimizer updates to run; set this or `epochs`")
    epochs: Optional[int] = option(None, ge=1, help="passes over the training data; set this or "
                                   "`max_steps`")
    micro_batch_size: int = option(1, ge=1, help="samples per GPU per forward")
    gradient_accumulation_steps: int = option(1, ge=1, help="micro-batches per optimizer update")
    seed: int = option(42, ge=0, le=2**32 - 1, help="seed of the data order and of torch")
    max_grad_norm: float = option(1.0, ge=0, help="gradient-norm clipping (DeepSpeed "
                                  "`gradient_clipping`)")
    max_bad_steps: int = option(10, ge=1, help="consecutive NaN/inf steps before the run stops (exit 3)")


@dataclass
class EvalConfig:
    every_steps: int = option(100, ge=1, help="evaluate every this many updates")
    max_batches: int = option(50, ge=1, help="micro-batches per evaluation, all ranks together: a "
                              "seeded sample of max_batches x micro_batch_size eval rows, the same for "
                              "any number of ranks")
    generate: bool = option(False, help="greedy generation on eval rows, scored by `metric`")
    generate_samples: int = option(16, ge=1, help="eval rows generated for")
    max_new_tokens: int = option(128, ge=1, help="tokens generated per row")
    metric: str = option("marker", choices=("marker", "exact", "none", "choice"),
                         help="`marker`: compare the text after `answer_marker`; `exact`: the whole "
                         "answer; `none`: no score; `choice`: multiple-choice accuracy of the eval rows "
                         "that carry an `answer` (candidates scored by log-likelihood, no generation; "
                         "docs/EVAL.md)")
    answer_format: str = option("label", choices=("label", "text"),
                                help="`metric: choice`: `label` scores the row's output with each "
                                "candidate label (summed log-likelihood); `text` scores \"the correct "
                                "answer is <option text>\" (mean per token) and trains the rows that "
                                "carry an `answer` to write that too")
    answer_marker: str = option("####", help="`metric: marker` compares the text after it")


@dataclass
class CheckpointConfig:
    every_steps: int = option(100, ge=1, help="checkpoint every this many updates")
    keep_last: int = option(2, ge=1, help="checkpoints kept")


@dataclass
class LoggingConfig:
    every_steps: int = option(1, ge=1, help="log metrics every this many updates")


@dataclass
class DistributedConfig:
    timeout_minutes: float = option(30.0, gt=0, help="collective timeout: a dead rank fails the "
                                    "others after it")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    propulsion: PropulsionConfig = field(default_factory=PropulsionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = option("out/run", not_empty=True, help="run directory (relative to the working "
                             "directory)")
    deepspeed: Union[str, dict] = option("configs/deepspeed/zero3.json", help="DeepSpeed JSON file or "
                                         "inline object; `\"auto\"` values are filled from the run config")
    resume: Union[bool, str] = option(False, values='false, true or `"auto"`', help="true: continue "
                                      "from the newest complete checkpoint (there must be one); "
                                      "`\"auto\"`: continue when there is one, else start")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer.name_or_path or self.model.name_or_path


# PropulsionConfig (method/propulsion.py) validates itself in __post_init__ and carries no
# metadata; its documentation (and the same bounds, for the reference) is kept here.
_PROPULSION = {
    "degree": dict(ge=1, help="k in y' = y * z**k"),
    "targets": dict(values='`"all-linear"`, `"attention"` or a list of module-name suffixes or '
                    'regexes', help="modules whose output channels are scaled"),
    "embeddings": dict(help="also scale the input embeddings"),
    "lm_head": dict(help="also scale the LM head"),
    "num_vectors": dict(ge=1, help="vectors per channel; n > 1 scales by mean_i z_i**k"),
    "train_bias": dict(help="also train the biases of the targets"),
}
EXTERNAL_METADATA = {PropulsionConfig: {name: option(**kw).metadata for name, kw in _PROPULSION.items()}}


@dataclass(frozen=True)
class Leaf:
    """One settable value of the schema: its dotted path, type, default and metadata."""
    path: str
    type: Any
    default: Any
    meta: dict


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not _MISSING else f.default


def leaves(cls=RunConfig, prefix: str = "") -> Iterator[Leaf]:
    """Every value of the schema below ``cls``, depth first, in declaration order."""
    hints = typing.get_type_hints(cls)
    external = EXTERNAL_METADATA.get(cls, {})
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, f"{prefix}{f.name}.")
        else:
            yield Leaf(prefix + f.name, tp, _default(f), dict(external.get(f.name, f.metadata)))
