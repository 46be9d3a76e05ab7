"""The D2LLM teacher as megatron stages at TP x PP (`teacher score --tp --pp`): a 70B teacher never
sits whole in one process.

Causal attention (the teacher is the plain LLM: causal + key-padding mask), forward only; the last
stage takes each batch's last position, and the yes / no rows of the vocabulary-parallel LM head
come from the TP ranks that hold them. Prompts, truncation and the score are `Teacher`'s own; the
last hidden states are broadcast to every rank of the model-parallel group, so all ranks compute the
same scores and one of them (last stage, TP rank 0) writes.
"""

from __future__ import annotations

from torch import Tensor

from toolkit.engines.megatron.inference import MegatronForward
from toolkit.engines.megatron.model import causal_padding_mask
from toolkit.teacher.scoring import Teacher, TeacherPrompt


class MegatronTeacher(Teacher):
    def __init__(self, forward: MegatronForward, tokenizer, prompt: TeacherPrompt | None = None):
        self.forward = forward
        self._read_prompt(tokenizer, prompt)
        self.writes = forward.dims.is_group_writer
        rows = forward.head_rows([self.yes_id, self.no_id])  # (on the last stage; broadcast below)
        [heads] = forward.broadcast([rows] if rows is not None else None, [(2, forward.arch.hidden_size)])
        self._direction = heads[0] - heads[1]

    def last_hidden(self, batches: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        per_batch = [(ids, causal_padding_mask(mask)) for ids, mask in batches]
        lasts = self.forward.run(per_batch, lambda hidden, index: hidden[:, -1].float())
        return self.forward.broadcast(lasts, [(ids.shape[0], self.forward.arch.hidden_size) for ids, _ in batches])
