"""Generation-based distillation: tasks from real corpora, sampling with the KV cache, task metrics,
sequence-level KD data (local or black-box teachers, resumable store), and the data regimes
(fixed, sequence_kd, on_policy/GKD, SCRG, KID, MiniLLM) as batch sources of the one trainer.

Names are imported lazily, so the black-box client and the store (standard library only) load
without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RegimeConfig": "config", "TaskConfig": "config", "SamplingConfig": "config", "BlackBoxConfig": "config",
    "TaskRunConfig": "run_config", "GenerateConfig": "run_config", "GenerationEvalConfig": "run_config",
    "build_task": "tasks", "task_documents": "tasks",
    "Example": "batching", "PromptResponseSource": "batching", "collate_examples": "batching", "encode_examples": "batching",
    "SamplingParams": "sampling", "generate": "sampling", "sequence_logprobs": "sampling",
    "generate_mixed": "sampling", "mixed_probs": "sampling",
    "rouge_l": "metrics", "exact_match": "metrics", "evaluate_generation": "metrics", "GenerationScores": "metrics",
    "ResponseStore": "store", "request_key": "store",
    "BlackBoxTeacher": "blackbox", "BlackBoxError": "blackbox",
    "ModelServer": "server", "Fault": "server",
    "scrg_revise": "scrg", "imperfect_inputs": "kid",
    "fill_store_local": "seqkd", "documents_from_store": "seqkd",
    "OnPolicySource": "sources", "SCRGSource": "sources", "KIDSource": "sources", "build_batch_source": "sources",
    "MiniLLMSource": "sources", "check_regime_objective": "sources",
    "build_task_run": "run", "run_task": "run", "run_generate": "run", "task_streams": "run",
    "task_evaluator": "run", "response_nll": "metrics", "response_token_sums": "metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmdistill.generation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmdistill.generation.{_EXPORTS[name]}"), name)
