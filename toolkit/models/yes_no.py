"""The yes/no cross-encoder's reading of a (query, passage) pair, shared by scoring and fine-tuning.

    s = sigmoid((z_yes - z_no) / T),  z = the next-token logits at the prompt's last position

`YesNoPrompter` renders a pair as token ids (the template, truncated by tokens, the passage first and
the query to `max_query_tokens`, so the question at the end is never cut off) and names the two answer
tokens. Batches are left-padded so the last position is every row's (right-padded on megatron, which reads
each row's last real position); only that position's hidden state
is projected, and only onto the yes / no rows of the LM head (the [b, s, V] logits are never built).
The teacher that scores (toolkit.teacher.scoring) and the stage that fine-tunes it
(toolkit.objectives.steps.TeacherStep) read pairs through this one module, so a fine-tuned teacher is
scored exactly as it was trained.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from toolkit.config import ConfigError, TeacherPrompt


def instructed_query(query: str, instruction: str | None) -> str:
    """The query as the teacher reads it: its task instruction on the line before, when it has one."""
    return f"{instruction}\n{query}" if instruction else query


class YesNoPrompter:
    def __init__(self, tokenizer, prompt: TeacherPrompt | None = None):
        self.tokenizer = tokenizer
        self.prompt = prompt or TeacherPrompt()
        self.use_chat = self.prompt.chat and getattr(tokenizer, "chat_template", None) is not None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.yes_id, self.no_id = (self._answer_token(w, f"teacher.{k}") for k, w in
                                   (("yes", self.prompt.yes), ("no", self.prompt.no)))

    @property
    def verbatim(self) -> bool:
        """The template is the whole prompt (no chat turn, no answer prefix): a reranker's own format."""
        return not self.use_chat and not self.prompt.answer_prefix

    def _answer_token(self, word: str, field: str) -> int:
        """The single token the answer starts with, as it follows the prompt (a leading space after an
        answer prefix)."""
        text = word if self.use_chat or self.verbatim else " " + word
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise ConfigError(f"{field}: {text!r} is {len(ids)} tokens {pieces} for this tokenizer; the answer "
                              "words must each be one token (choose other words, e.g. Yes / No)")
        return ids[0]

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
        if self.verbatim:  # the template carries its own special tokens
            return self._ids(prompt)
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self._ids(prompt + "\n" + self.prompt.answer_prefix)

    def pad(self, rows: list[list[int]], side: str = "left") -> tuple[Tensor, Tensor]:
        """(ids, attention mask) of prompts padded on the left (the last position is every row's: HF
        scoring and training) or on the right (positions 0.. as megatron numbers its slots)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, span] = torch.tensor(r)
            mask[i, span] = 1
        return ids, mask

    def direction(self, lm_head_weight: Tensor) -> Tensor:
        """W[yes] - W[no] in float32: z_yes - z_no = h . direction at the last position."""
        return lm_head_weight[self.yes_id].detach().float() - lm_head_weight[self.no_id].detach().float()


def last_position_hidden(decoder: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """The decoder's final hidden state at the last position [b, h] of a left-padded batch (positions
    restart at 0 on each row's first real token, as if it were alone)."""
    device = next(decoder.parameters()).device
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                     use_cache=False).last_hidden_state
    return hidden[:, -1]
