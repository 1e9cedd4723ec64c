"""propulsion-ds: Propulsion fine-tuning of frozen LLMs on DeepSpeed."""
from propulsion_ds.errors import AdapterError
from propulsion_ds.method.adapter import (adapter_state_dict, load_adapter, load_adapter_state_dict,
                                          save_adapter)
from propulsion_ds.method.propulsion import PropulsionConfig, inject, merge_and_unload

__all__ = ["PropulsionConfig", "inject", "adapter_state_dict", "load_adapter_state_dict",
           "save_adapter", "load_adapter", "merge_and_unload", "AdapterError"]
__version__ = "0.1.0"
