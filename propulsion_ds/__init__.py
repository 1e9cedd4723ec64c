"""propulsion-ds: Propulsion fine-tuning of frozen LLMs on DeepSpeed."""
from .adapter import (AdapterError, adapter_state_dict, load_adapter, load_adapter_state_dict,
                      save_adapter)
from .propulsion import PropulsionConfig, inject, merge_and_unload

__all__ = ["PropulsionConfig", "inject", "adapter_state_dict", "load_adapter_state_dict",
           "save_adapter", "load_adapter", "merge_and_unload", "AdapterError"]
__version__ = "0.1.0"
