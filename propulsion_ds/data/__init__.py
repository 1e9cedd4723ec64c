"""Data: files -> raw ``datasets.Dataset`` -> template -> tokenize -> pack/pad -> batches.

    files.py    resolve a data spec into files, load them (``resolve_files``, ``load_raw``)
    tokens.py   templates and tokenizing per format (``tokenize``, ``pad_token_id``, ``check_vocab``)
    pack.py     best-fit-decreasing packing with restarting ``position_ids`` (``pack``)
    build.py    the run's data sets (``build_datasets`` -> ``Built``)
    cache.py    tokenize once per storage domain, memory-map everywhere (``load_or_build``)
    batches.py  sharded, resumable epoch plans and collation (``epoch_batches``, ``get_batch``)
"""
from .batches import batches_per_epoch, collate, epoch_batches, epoch_permutation, get_batch, real_tokens
from .build import Built, build_datasets
from .cache import CACHE_VERSION, cache_key, fingerprint, load_cache, load_or_build
from .files import SUPPORTED_EXTENSIONS, DataError, describe, from_text_files, load_raw, resolve_files
from .pack import best_fit_decreasing, document_lengths, pack, split_documents, truncate
from .tokens import (ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, IGNORE_INDEX, Work, check_vocab, pad_token_id,
                     tokenize)

__all__ = [
    "ALPACA_TEMPLATE", "ALPACA_TEMPLATE_NO_INPUT", "CACHE_VERSION", "IGNORE_INDEX", "SUPPORTED_EXTENSIONS",
    "Built", "DataError", "Work", "batches_per_epoch", "best_fit_decreasing", "build_datasets", "cache_key",
    "check_vocab", "collate", "describe", "document_lengths", "epoch_batches", "epoch_permutation",
    "fingerprint", "from_text_files", "get_batch", "load_cache", "load_or_build", "load_raw", "pack",
    "pad_token_id", "real_tokens", "resolve_files", "split_documents", "tokenize", "truncate",
]
