"""The D2LLM sections of a recipe: the student's distillation weights and the yes/no teacher's prompt
and fine-tuning objective (METHODS.md 2.1, 2.3). A fine-tuned teacher folder records its TeacherPrompt."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from toolkit.config_schema import ConfigError, check_sizes, from_dict


@dataclass(kw_only=True)
class D2LLMConfig:
    """The D2LLM student's distillation (METHODS.md 2.3): loss weights, the IEM, the symmetric tasks."""

    in_batch: float = 1.0  # InfoNCE over the batch's positives (no teacher)
    contrastive: float = 1.0  # alpha: contrastive imitation
    rank_pearson: float = 1.0  # beta: rank imitation, 1 - Pearson
    rank_pairwise: float = 0.01  # gamma: rank imitation, hard vs in-batch negatives (teacher group scores)
    feature: float = 0.0  # eta (paper: 0.001): feature imitation; needs teacher features in the shards
    temperature: float = 1.0  # divides the logits of the two InfoNCE terms
    iem_hidden: int = 512
    # > 0: the IEM's score adds cosine_scale * cos(y_q, y_p) (not in the paper; toolkit/models/iem.py)
    cosine_scale: float = 0.0
    symmetric_tasks: list[str] = field(default_factory=list)  # tasks scored by the IEM's symmetric branch

    def __post_init__(self) -> None:
        weights = ("in_batch", "contrastive", "rank_pearson", "rank_pairwise", "feature")
        if any(getattr(self, w) < 0 for w in weights) or not any(getattr(self, w) for w in weights):
            raise ConfigError(f"d2llm: the loss weights {weights} must be >= 0 and not all 0")
        if self.temperature <= 0 or self.iem_hidden < 1:
            raise ConfigError("d2llm.temperature must be > 0 and d2llm.iem_hidden >= 1")
        if not math.isfinite(self.cosine_scale) or self.cosine_scale < 0:
            raise ConfigError(f"d2llm.cosine_scale: must be >= 0 (0: the paper's IEM), got {self.cosine_scale}")


TEACHER_SYMMETRIC = ("Sentence A: {query}\nSentence B: {passage}\n"
                     "Does sentence B correctly describe or follow from sentence A? Answer yes or no.")
TEACHER_ASYMMETRIC = ("Query: {query}\nPassage: {passage}\n"
                      "Does the passage answer the query? Answer yes or no.")


@dataclass(kw_only=True)
class TeacherPrompt:
    """How a yes/no cross-encoder (the D2LLM teacher) is asked about a (query, passage) pair: the same
    for scoring and for fine-tuning it, and recorded in a fine-tuned teacher's folder.

    With `chat`, the prompt is the user turn of the tokenizer's chat template and the answer word
    follows the generation prompt; without it, the prompt is followed by a newline and
    `answer_prefix`, and the answer word by a space; with neither (answer_prefix ""), the template is
    the whole prompt, verbatim (special tokens included: a reranker's own format), and the answer
    word follows it directly."""

    symmetric: str = TEACHER_SYMMETRIC
    asymmetric: str = TEACHER_ASYMMETRIC
    yes: str = "yes"
    no: str = "no"
    chat: bool = True  # wrap the prompt as a user turn of the tokenizer's chat template (if it has one)
    answer_prefix: str = "Answer:"  # without a chat template: the prompt ends with this, the answer follows
    temperature: float = 1.0
    max_length: int = 512
    max_query_tokens: int = 128

    def __post_init__(self) -> None:
        for name in ("symmetric", "asymmetric"):
            template = getattr(self, name)
            positions = [template.find("{query}"), template.find("{passage}")]
            if min(positions) < 0:
                raise ConfigError(f"teacher.{name}: the template must contain {{query}} and {{passage}}")
            if template.rstrip().endswith("}"):
                raise ConfigError(f"teacher.{name}: the question must come after {{query}} and {{passage}}, "
                                  "not before (the student decomposes query and passage)")
        if self.temperature <= 0:
            raise ConfigError(f"teacher.temperature: must be > 0, got {self.temperature}")
        check_sizes("teacher", self, {"max_length": 8, "max_query_tokens": 1})

    @classmethod
    def from_file(cls, path: str | Path) -> "TeacherPrompt":
        """A prompt from a YAML or JSON file of these fields (a reranker's own templates and answer words)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such prompt file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not YAML or JSON ({exc})") from None
        return from_dict(data or {}, cls, source=str(path))


@dataclass(kw_only=True)
class TeacherObjectiveConfig:
    """Fine-tuning the yes/no cross-encoder itself (METHODS.md 2.1) on pairs with hard negatives: the
    score s = sigmoid((z_yes - z_no) / T) of [positive] + negatives, trained pointwise (binary cross-
    entropy, the positive 1 and each negative 0) or listwise (softmax over the positive and its
    negatives, the positive the target)."""

    loss: Literal["pointwise", "listwise"] = "pointwise"
    prompt: TeacherPrompt = field(default_factory=TeacherPrompt)
    prompt_file: str = ""  # a TeacherPrompt file read into `prompt` when the recipe loads (max_length: data.max_length)
    symmetric_tasks: list[str] = field(default_factory=list)  # a sample's task here: the symmetric template

    def stage_prompt(self, max_length: int) -> TeacherPrompt:
        """The prompt a teacher stage trains with and its folder records: its stage's data.max_length bounds it."""
        return dataclasses.replace(self.prompt, max_length=max_length)

    def __post_init__(self) -> None:
        if self.prompt_file:  # read once: the run's config.yaml records the prompt itself, not the file
            self.prompt = TeacherPrompt.from_file(self.prompt_file)
            self.prompt_file = ""
