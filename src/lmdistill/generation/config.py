"""Configuration of the generation-based regimes: tasks, sampling, black-box teachers, data regimes.

Every section forbids unknown keys (a misspelt key is an error naming the allowed keys, through
:func:`lmdistill.config.validate_config`). A regime parameter given for a regime that does not use it
(``kid_mask_ratio`` with ``kind: on_policy``) is an error too, so a config never silently means less
than it says (a parameter at its default value is accepted, so a dumped config reloads).

The run configs of this package's commands (:class:`~lmdistill.generation.run_config.TaskRunConfig`,
``GenerateConfig``) live in :mod:`lmdistill.generation.run_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmdistill.config import Section

RegimeKind = Literal["fixed", "sequence_kd", "on_policy", "scrg", "kid", "minillm"]
TaskName = Literal["gcide_define", "kjv_verse", "kjv_continue"]


class TaskConfig(Section):
    """An instruction-style task: built from an installed corpus (``name``), or the user's own prompts and
    responses (``path``; see :mod:`lmdistill.generation.tasks`)."""

    name: TaskName | None = Field(
        None,
        description="gcide_define: 'Define: WORD' -> its first definition; kjv_verse: 'BOOK C:V' -> the verse; "
        "kjv_continue: 'BOOK C:V first words' -> the rest of the verse (the default when no path is given)",
    )
    path: str | None = Field(
        None, description="your own examples instead of a built-in task: a .jsonl/.csv/.parquet file (or directory) "
        "of prompt/response records or chat 'messages' records (paths are relative to the working directory)",
    )
    prompt_template: str = Field(
        "{prompt}\n", description="prompt/response records: how the prompt is written before the response "
        "({prompt} is replaced; the default puts a newline between prompt and response)",
    )
    chat_template: Literal["default", "tokenizer"] = Field(
        "default", description="chat 'messages' records: the documented default template (<|role|> lines), or the "
        "tokenizer's own chat template (needs a tokenizer that has one)",
    )
    prompt_words: int = Field(5, ge=1, description="kjv_continue: words of the verse given in the prompt")
    response_words: int | None = Field(None, ge=1, description="kjv_continue: only the next N words (None: rest of the verse)")
    max_response_words: int | None = Field(24, ge=1, description="drop examples whose reference is longer (None: keep all)")
    max_examples: dict[Literal["train", "validation", "test"], int] = Field(
        default_factory=dict, description="per-split cap, a seeded sample (e.g. {test: 200}); absent splits are uncapped"
    )
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _default_task(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") is None and data.get("path") is None:
            return {**data, "name": "kjv_continue"}
        return data

    @model_validator(mode="after")
    def _fractions(self) -> TaskConfig:
        if self.name is not None and self.path is not None:
            raise ValueError("task: give either 'name' (a built-in task) or 'path' (your own examples), not both")
        if self.path is not None and not Path(self.path).expanduser().exists():
            raise ValueError(f"task.path '{self.path}' does not exist (paths are relative to the working directory)")
        if "{prompt}" not in self.prompt_template:
            raise ValueError("task.prompt_template must contain {prompt}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError("task.split_fractions must be three non-negative numbers summing to 1")
        if any(v < 1 for v in self.max_examples.values()):
            raise ValueError("task.max_examples values must be at least 1")
        return self


class SamplingConfig(Section):
    """How a model generates: greedy, or ancestral sampling with temperature / top-k / top-p."""

    greedy: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    max_new_tokens: int = Field(48, ge=1)


class BlackBoxConfig(Section):
    """Any OpenAI-compatible HTTP endpoint as the teacher. The API key is never in the config: only
    the NAME of the environment variable that holds it (``api_key_env``)."""

    base_url: str = Field(..., description="e.g. https://api.example.com/v1 or http://127.0.0.1:8000/v1")
    model: str = Field(..., description="the model name sent in each request")
    endpoint: Literal["chat", "completions"] = Field("chat", description="/chat/completions or /completions")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the key; null: no key")
    concurrency: int = Field(4, ge=1, le=256)
    timeout: float = Field(60.0, gt=0, description="seconds one attempt may take in all (connect, send, headers, body)")
    max_retries: int = Field(5, ge=0, description="retries after the first attempt (5xx, 429, 408, timeouts, resets)")
    backoff_base: float = Field(0.5, ge=0, description="first retry waits up to this many seconds; doubles each retry")
    backoff_max: float = Field(30.0, ge=0)
    system_prompt: str | None = Field(None, description="chat endpoint: an optional system message")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="extra JSON fields sent with every request")

    @model_validator(mode="after")
    def _url(self) -> BlackBoxConfig:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"blackbox.base_url must start with http:// or https:// (got {self.base_url!r})")
        return self


_REGIME_FIELDS: dict[str, set[str]] = {
    "fixed": set(),
    "sequence_kd": {"store"},
    "on_policy": {"lmbda", "sampling", "off_policy_store"},
    "scrg": {"lmbda", "sampling", "off_policy_store", "scrg_threshold", "scrg_metric", "scrg_selection"},
    "kid": {"kid_mask_ratio"},
    "minillm": {"mix_alpha", "sampling"},
}
_COMMON_FIELDS = {"kind", "task", "max_length"}


class RegimeConfig(Section):
    """Where a run's training sequences come from. Every regime trains on the task's training split
    with loss on response tokens only; they differ in which response tokens and which prefixes:

    - ``fixed``: the gold references (label-only SFT with ``cross_entropy``, token-level KD with a
      logit objective).
    - ``sequence_kd``: the teacher's generated responses read from ``store`` (written by
      ``lmdistill generate``; Kim & Rush 2016, arXiv 1606.07947).
    - ``on_policy``: GKD (arXiv 2306.13649): with probability ``lmbda`` a step's responses are sampled
      from the current student (``sampling``), otherwise the fixed responses are used.
    - ``scrg``: as ``on_policy``, each student sample then revised by SCRG (arXiv 2407.10068).
    - ``kid``: KID (arXiv 2410.11371): a ``kid_mask_ratio`` share (paper: alpha = 0.2) of each
      response's tokens is masked, predicted by the student in one forward pass over the masked
      sequence, and rewritten with those predictions; targets stay the gold continuation.
    - ``minillm``: MiniLLM (arXiv 2306.08543): every step's responses are sampled from the teacher-mixed
      policy ``mix_alpha * p + (1 - mix_alpha) * q`` (paper: alpha = 0.2) at temperature 1, and trained
      with the ``minillm`` objective (the policy-gradient reverse KL whose importance weights assume
      exactly that sampling distribution: no greedy, temperature or top-k/top-p settings).
    """

    kind: RegimeKind = "fixed"
    task: TaskConfig = TaskConfig()
    max_length: int = Field(128, ge=4, description="tokens per training sequence (prompt + response + EOS)")
    store: str | None = Field(None, description="sequence_kd: JSONL store of teacher responses (lmdistill generate)")
    off_policy_store: str | None = Field(
        None, description="on_policy/scrg: off-policy steps use these teacher responses instead of the gold ones"
    )
    lmbda: float = Field(0.5, ge=0, le=1, description="on_policy/scrg: probability that a step uses student samples")
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, max_new_tokens=48)
    scrg_threshold: float = Field(
        0.0, ge=0, description="scrg: only positions scoring above this can be corrected (0: any disagreeing position, as in the paper)"
    )
    scrg_metric: Literal["kl", "tvd", "teacher_nll"] = Field(
        "kl", description="scrg: per-position score: KL(teacher || student), total variation, or -log p_teacher(token)"
    )
    scrg_selection: Literal["max", "first"] = Field(
        "max", description="scrg: correct the most divergent disagreeing position (paper) or the first one above the threshold"
    )
    kid_mask_ratio: float = Field(0.2, gt=0, le=1, description="kid: share alpha of response tokens masked and rewritten (paper default 0.2)")
    mix_alpha: float = Field(
        0.2, ge=0, le=1, description="minillm: teacher share alpha of the sampling policy alpha*p + (1-alpha)*q "
        "(paper default 0.2; 0 samples from the student alone)",
    )

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> RegimeConfig:
        allowed = _COMMON_FIELDS | _REGIME_FIELDS[self.kind]
        # a field of another regime may appear with its default value (a dumped config lists every field)
        defaults = RegimeConfig.model_fields
        stray = sorted(
            f for f in set(self.model_fields_set) - allowed if getattr(self, f) != defaults[f].get_default(call_default_factory=True)
        )
        if stray:
            users = {f: [k for k, v in _REGIME_FIELDS.items() if f in v] for f in stray}
            detail = "; ".join(f"{f} applies to {', '.join(u) or 'no regime'}" for f, u in users.items())
            raise ValueError(f"regime.kind={self.kind} does not use {', '.join(stray)} ({detail})")
        if self.kind == "minillm":
            s = self.sampling
            if s.greedy or s.temperature != 1.0 or s.top_k is not None or s.top_p is not None:
                raise ValueError("regime.kind=minillm samples from alpha*p + (1-alpha)*q at temperature 1 (the minillm "
                                 "objective's importance weights assume it): leave sampling.greedy, temperature, top_k "
                                 "and top_p unset; only sampling.max_new_tokens applies")
        if self.kind == "sequence_kd" and not self.store:
            raise ValueError("regime.kind=sequence_kd needs regime.store: the JSONL file written by `lmdistill generate`")
        for name in ("store", "off_policy_store"):
            value = getattr(self, name)
            if value is not None and not Path(value).expanduser().exists():
                raise ValueError(f"regime.{name} '{value}' does not exist (write it with `lmdistill generate`)")
        return self
