"""Run configuration: typed dataclasses, one JSON file per run, ``--set a.b=v`` overrides.

The schema is the dataclasses below; loading and validation live in ``config_load.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from propulsion_ds.method.propulsion import PropulsionConfig
from propulsion_ds.errors import ConfigError  # noqa: F401



@dataclass
class ModelConfig:
    name_or_path: str = "assets/stories260K"
    dtype: str = "fp32"                      # bf16 | fp16 | fp32
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"        # sdpa | eager | flash_attention_2 (where installed)


@dataclass
class TokenizerConfig:
    name_or_path: Optional[str] = None       # defaults to model.name_or_path


@dataclass
class DataConfig:
    train: Union[str, list] = ""             # files, globs, or a saved `datasets` directory
    eval: Union[str, list, None] = None
    format: str = "text"                     # text | instruction | chat
    text_field: str = "text"
    max_length: int = 512
    packing: bool = True
    template: Optional[str] = None           # instruction prompt template; None = Alpaca
    eval_fraction: float = 0.0               # carve eval from train when `eval` is unset
    cache_dir: Optional[str] = None          # tokenized-data cache; None = <output_dir>/data_cache
    num_proc: Optional[int] = None           # tokenizer processes for the cache build (None = 1)


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"               # constant | linear | cosine
    max_steps: Optional[int] = None
    epochs: Optional[int] = None
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 42
    max_grad_norm: float = 1.0
    max_bad_steps: int = 10                  # consecutive NaN/inf steps before the run stops


@dataclass
class EvalConfig:
    every_steps: int = 100
    max_batches: int = 50
    generate: bool = False                   # greedy generation on eval rows, scored by `metric`
    generate_samples: int = 16
    max_new_tokens: int = 128
    metric: str = "marker"                   # marker | exact | none
    answer_marker: str = "####"              # metric=marker: compare the text after it


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    keep_last: int = 2


@dataclass
class LoggingConfig:
    every_steps: int = 1


@dataclass
class DistributedConfig:
    timeout_minutes: float = 30.0            # collective timeout: a dead rank fails the others


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
    output_dir: str = "out/run"
    deepspeed: Union[str, dict] = "configs/deepspeed/zero3.json"
    resume: Union[bool, str] = False         # false | true | "auto"

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer.name_or_path or self.model.name_or_path
