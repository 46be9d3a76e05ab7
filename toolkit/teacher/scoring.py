"""D2LLM teacher: an (instruction-tuned) causal LLM judges a (query, passage) pair with yes / no.

    s = sigmoid((z_yes - z_no) / T),  z = the next-token logits at the prompt's last position

The prompt puts the question AFTER the query and the passage (D2LLM's Figure 1; the reference code
put it first, which breaks the decomposition the student emulates). Symmetric tasks (NLI, STS) and
asymmetric ones (retrieval) have their own template. Only the last position's hidden state is
projected, and only onto the yes and no rows of the LM head: the [b, s, V] logits are never built.
The teacher feature (feature imitation) is that last hidden state.

Texts are truncated by tokens, the passage first and the query to `max_query_tokens`, so the
question at the end is never cut off; batches are left-padded so the last position is every row's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from toolkit.config import ConfigError

SYMMETRIC = ("Sentence A: {query}\nSentence B: {passage}\n"
             "Does sentence B correctly describe or follow from sentence A? Answer yes or no.")
ASYMMETRIC = ("Query: {query}\nPassage: {passage}\n"
              "Does the passage answer the query? Answer yes or no.")


@dataclass(kw_only=True)
class TeacherPrompt:
    symmetric: str = SYMMETRIC
    asymmetric: str = ASYMMETRIC
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


class Teacher:
    """Scores pairs with a causal LM (`model`: an HF *ForCausalLM, its tokenizer alongside).

    `writes`: whether this process writes the scores (every HF teacher does; of a model-parallel
    teacher's ranks, one)."""

    writes = True

    def __init__(self, model: nn.Module, tokenizer, prompt: TeacherPrompt | None = None):
        self.model = model.eval()
        self._read_prompt(tokenizer, prompt)
        head = model.get_output_embeddings().weight
        self._direction = (head[self.yes_id] - head[self.no_id]).detach()  # z_yes - z_no = h . direction

    def _read_prompt(self, tokenizer, prompt: TeacherPrompt | None) -> None:
        self.tokenizer = tokenizer
        self.prompt = prompt or TeacherPrompt()
        self.use_chat = self.prompt.chat and getattr(tokenizer, "chat_template", None) is not None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.yes_id, self.no_id = (self._answer_token(w, f"teacher.{k}") for k, w in
                                   (("yes", self.prompt.yes), ("no", self.prompt.no)))

    def _answer_token(self, word: str, field: str) -> int:
        """The single token the answer starts with, as it follows the prompt (a leading space without chat)."""
        text = word if self.use_chat else " " + word
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise ConfigError(f"{field}: {text!r} is {len(ids)} tokens {pieces} for this tokenizer; the answer "
                              "words must each be one token (choose other words, e.g. Yes / No)")
        return ids[0]

    # ---------------------------------------------------------------- prompts
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _truncate(self, text: str, budget: int) -> str:
        ids = self._ids(text)
        return text if len(ids) <= budget else self.tokenizer.decode(ids[:max(1, budget)])

    def render(self, query: str, passage: str, symmetric: bool) -> list[int]:
        """Token ids of one pair's prompt, truncated so it fits `max_length` with the question intact."""
        p = self.prompt
        template = p.symmetric if symmetric else p.asymmetric
        query = self._truncate(query, p.max_query_tokens)
        frame = len(self._wrap(template.format(query="", passage="")))
        budget = p.max_length - frame - len(self._ids(query))
        if budget < 1:
            raise ConfigError(f"teacher.max_length={p.max_length} leaves no room for the passage "
                              f"(template {frame} tokens, query {len(self._ids(query))})")
        return self._wrap(template.format(query=query, passage=self._truncate(passage, budget)))

    def _wrap(self, prompt: str) -> list[int]:
        if self.use_chat:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self._ids(prompt + "\n" + self.prompt.answer_prefix)

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
        lasts = self.last_hidden([_left_pad([prompts[i] for i in idx], self.tokenizer.pad_token_id) for idx in chunks])
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
        device = next(self.model.parameters()).device
        out = []
        for ids, mask in batches:
            positions = (mask.cumsum(-1) - 1).clamp_min(0)  # a left-padded row starts at position 0
            hidden = self.model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device),
                                              position_ids=positions.to(device), use_cache=False).last_hidden_state
            out.append(hidden[:, -1].float())
        return out


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask
