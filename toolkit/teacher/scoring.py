"""D2LLM teacher: an (instruction-tuned) causal LLM judges a (query, passage) pair with yes / no.

    s = sigmoid((z_yes - z_no) / T),  z = the next-token logits at the prompt's last position

The prompt puts the question AFTER the query and the passage (D2LLM's Figure 1; the reference code
put it first, which breaks the decomposition the student emulates). Symmetric tasks (NLI, STS) and
asymmetric ones (retrieval) have their own template. Only the last position's hidden state is
projected, and only onto the yes and no rows of the LM head: the [b, s, V] logits are never built.
The teacher feature (feature imitation) is that last hidden state. Prompts, truncation and the
readout are `toolkit.models.yes_no`'s, which the teacher's fine-tuning stage shares.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from toolkit.config import TEACHER_ASYMMETRIC as ASYMMETRIC  # noqa: F401  (the default templates, re-exported)
from toolkit.config import TEACHER_SYMMETRIC as SYMMETRIC  # noqa: F401
from toolkit.config import TeacherPrompt
from toolkit.models.yes_no import YesNoPrompter, last_position_hidden


class Teacher:
    """Scores pairs with a causal LM (`model`: an HF *ForCausalLM, its tokenizer alongside).

    `writes`: whether this process writes the scores (every HF teacher does; of a model-parallel
    teacher's ranks, one)."""

    writes = True

    def __init__(self, model: nn.Module, tokenizer, prompt: TeacherPrompt | None = None):
        self.model = model.eval()
        self._read_prompt(tokenizer, prompt)
        self._direction = self.prompter.direction(model.get_output_embeddings().weight).detach()

    def _read_prompt(self, tokenizer, prompt: TeacherPrompt | None) -> None:
        self.prompter = YesNoPrompter(tokenizer, prompt)
        self.tokenizer, self.prompt = tokenizer, self.prompter.prompt
        self.yes_id, self.no_id = self.prompter.yes_id, self.prompter.no_id

    def render(self, query: str, passage: str, symmetric: bool) -> list[int]:
        return self.prompter.render(query, passage, symmetric)

    # ---------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score(self, queries: Sequence[str], passages: Sequence[str], symmetric: bool | Sequence[bool] = False,
              *, batch_size: int = 16, features: bool = False) -> tuple[Tensor, Tensor | None]:
        """(scores [n] in (0, 1), last-position hidden states [n, d] or None) of the pairs, in order."""
        if len(queries) != len(passages):
            raise ValueError(f"score: {len(queries)} queries but {len(passages)} passages")
        flags = [symmetric] * len(queries) if isinstance(symmetric, bool) else list(symmetric)
        prompts = [self.render(q, p, s) for q, p, s in zip(queries, passages, flags)]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
        chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        lasts = self.last_hidden([self.prompter.pad([prompts[i] for i in idx]) for idx in chunks])
        scores = torch.empty(len(prompts))
        feats = torch.empty(len(prompts), lasts[0].shape[1]) if features and lasts else None
        direction = self._direction.float()
        for idx, last in zip(chunks, lasts):
            scores[idx] = torch.sigmoid(last @ direction.to(last.device) / self.prompt.temperature).cpu()
            if feats is not None:
                feats[idx] = last.cpu()
        return scores, feats

    def last_hidden(self, batches: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """The last position's final hidden state [b, h] (float32) of each left-padded (ids, mask) batch."""
        decoder = self.model.get_decoder()
        return [last_position_hidden(decoder, ids, mask).float() for ids, mask in batches]
