"""Training data: text sources, the token cache, step-indexed sampling, and tasks (text, parity, MQAR)."""

from __future__ import annotations

from ternkit.data.cache import TokenData, prepare_text_data, split_documents
from ternkit.data.sampling import StepBatches, TokenDataset, batch_indices
from ternkit.data.sources import TextSource, expand_paths, fingerprint, hash_int, stdlib_files, text_source
from ternkit.data.tasks import (IGNORE_INDEX, PARITY_VOCAB, MqarTask, ParityTask, Task, TextTask, make_task,
                                mask_targets, mqar_examples, parity_examples)

__all__ = ["IGNORE_INDEX", "PARITY_VOCAB", "MqarTask", "ParityTask", "StepBatches", "Task", "TextSource", "TextTask",
           "TokenData", "TokenDataset", "batch_indices", "expand_paths", "fingerprint", "hash_int", "make_task",
           "mask_targets", "mqar_examples", "parity_examples", "prepare_text_data", "split_documents",
           "stdlib_files", "text_source"]
