"""One micro-step per objective: samples -> tokens -> loss -> backward.

The step owns its backward so that GradCache (which must interleave forward and backward chunk by
chunk) and plain steps share one interface with the trainer: `step(samples, loss_scale)`. Every
forward runs as `self.forward(fn, *args)` and every backward as `self.backward(scalar)`: plain calls
by default, the engine's own where it must see each one (DeepSpeed ZeRO counts forwards to know
when gradients accumulate, and reduces / partitions gradients in its backward).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from toolkit.config import ConfigError, ObjectiveConfig, StageConfig, TeacherObjectiveConfig
from toolkit.errors import InputError
from toolkit.models.encoder import Encoder
from toolkit.models.yes_no import YesNoPrompter, instructed_query, last_position_hidden
from toolkit.objectives.contrastive import GatherFn, simcse_loss, supervised_contrastive_loss
from toolkit.objectives.distill import d2llm_loss
from toolkit.objectives.gradcache import gradcache_backward
from toolkit.objectives.mntp import NEW_MASK_TOKEN, MaskingSpec, mask_for_mntp, mntp_loss, resolve_mask_token
from toolkit.objectives.reranker import listwise_loss, pointwise_loss


def autograd_backward(loss: Tensor) -> None:
    loss.backward()


def direct_forward(fn: Callable[..., Tensor], *args) -> Tensor:
    return fn(*args)


class EngineHooks:
    """How a step runs its forwards and backwards (replaced by engines that must see them)."""

    forward: Callable[..., Tensor] = staticmethod(direct_forward)
    backward: Callable[[Tensor], None] = staticmethod(autograd_backward)


@dataclass
class StepStats:
    loss: float
    tokens: int  # real (non-pad) tokens processed, for throughput


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class MNTPStep(EngineHooks):
    """Masked next-token prediction: token i is recovered from the logits at position i-1."""

    def __init__(self, encoder: Encoder, lm_head: nn.Module, spec: MaskingSpec, max_length: int,
                 precision: str, generator: torch.Generator):
        self.encoder, self.lm_head, self.spec = encoder, lm_head, spec
        self.max_length, self.precision, self.generator = max_length, precision, generator

    def prepare(self, samples: list[dict]) -> dict[str, Tensor]:
        """Tokenise and mask (the engine-independent half): masked input_ids, attention_mask, labels."""
        batch = self.encoder.tokenize([s["text"] for s in samples], max_length=self.max_length)
        inputs, labels = mask_for_mntp(batch["input_ids"], batch["attention_mask"], self.spec, self.generator)
        return {"input_ids": inputs, "attention_mask": batch["attention_mask"], "labels": labels}

    def step(self, samples: list[dict], loss_scale: float) -> StepStats:
        batch = self.prepare(samples)
        loss = self.forward(self._loss, batch)
        self.backward(loss * loss_scale)
        return StepStats(float(loss.detach()), int(batch["attention_mask"].sum()))

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        device = self.encoder.device
        with autocast(self.precision, device):
            hidden = self.encoder.hidden_states(
                {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
            )
            return mntp_loss(hidden, self.lm_head, batch["labels"].to(device))


class _ContrastiveStep(EngineHooks, ABC):
    """Shared plumbing: tokenise the roles, embed (optionally with GradCache), loss, backward.

    `prepare` is the engine-independent half (other engines embed the groups their own way)."""

    loss_has_parameters = False  # does the loss over the embeddings train parameters of its own?

    def __init__(self, encoder: Encoder, cfg: ObjectiveConfig, max_length: int, precision: str,
                 gather: GatherFn | None = None):
        self.encoder, self.cfg, self.max_length = encoder, cfg, max_length
        self.precision, self.gather = precision, gather

    def _embed(self, batch: dict) -> Tensor:
        return self.forward(self._embed_here, batch)

    def _embed_here(self, batch: dict) -> Tensor:
        device = self.encoder.device
        with autocast(self.precision, device):
            return self.encoder({k: v.to(device) for k, v in batch.items()}).float()

    @abstractmethod
    def prepare(self, samples: list[dict]) -> tuple[list[dict], Callable[..., Tensor]]:
        """(tokenised groups, one per role; loss over one embedding matrix per group)."""

    def step(self, samples: list[dict], loss_scale: float) -> StepStats:
        groups, loss_fn = self.prepare(samples)
        tokens = int(sum(int(g["attention_mask"].sum()) for g in groups))
        if self.cfg.gradcache_chunk_size:
            loss = gradcache_backward(self._embed, groups, loss_fn, self.cfg.gradcache_chunk_size, loss_scale,
                                      backward=self.backward,
                                      loss_backward=self.backward if self.loss_has_parameters else autograd_backward)
            return StepStats(float(loss), tokens)
        loss = loss_fn(*[self._embed(g) for g in groups])
        self.backward(loss * loss_scale)
        return StepStats(float(loss.detach()), tokens)


class SimCSEStep(_ContrastiveStep):
    """Unsupervised SimCSE: the same batch twice; independent dropout makes the two views differ."""

    def prepare(self, samples: list[dict]) -> tuple[list[dict], Callable[..., Tensor]]:
        batch = self.encoder.tokenize([s["text"] for s in samples], max_length=self.max_length)

        def loss_fn(a: Tensor, b: Tensor) -> Tensor:
            return simcse_loss(a, b, self.cfg.temperature, gather=self.gather)

        return [batch, batch], loss_fn


class SupervisedStep(_ContrastiveStep):
    """(instructed query, positive, k hard negatives) against all positives+negatives of the batch."""

    def prepare(self, samples: list[dict]) -> tuple[list[dict], Callable[..., Tensor]]:
        k = len(samples[0]["negatives"])
        if any(len(s["negatives"]) != k for s in samples):
            raise InputError("supervised batch: every sample must have the same number of hard negatives")
        instruction = samples[0]["instruction"]
        if any(s["instruction"] != instruction for s in samples):
            raise InputError("supervised batch: all queries of a batch must share one instruction (one task per batch)")
        groups = [
            self.encoder.tokenize([s["query"] for s in samples], instruction, self.max_length),
            self.encoder.tokenize([s["positive"] for s in samples], max_length=self.max_length),
        ]
        if k:
            negs = [n for s in samples for n in s["negatives"]]  # sample-major: [b*k]
            groups.append(self.encoder.tokenize(negs, max_length=self.max_length))
        b = len(samples)

        def loss_fn(q: Tensor, p: Tensor, n: Tensor | None = None) -> Tensor:
            hard = n.view(b, k, -1) if n is not None else None
            return supervised_contrastive_loss(q, p, hard, self.cfg.temperature, gather=self.gather)

        return groups, loss_fn


class D2LLMStep(_ContrastiveStep):
    """D2LLM student: queries and candidates (positive + K hard negatives) pooled, the encoder's IEM
    scores every (query, own candidate) and (query, other positive) pair, and the distillation losses
    compare those logits with the teacher's scores from the `scored` shards.

    In-batch teacher scores exist for pairs of one planned group (`group`, `group_index`): a batch
    that is a whole group knows them all, a mixed batch only those within a group. The batch's
    in-batch pairs stay on this rank (the teacher scored no cross-rank pairs)."""

    loss_has_parameters = True  # the IEM

    def prepare(self, samples: list[dict]) -> tuple[list[dict], Callable[..., Tensor]]:
        d2 = self.cfg.d2llm
        k = len(samples[0]["negatives"])
        if k < 1 or any(len(s["negatives"]) != k for s in samples):
            raise InputError("d2llm batch: every sample needs the same number (>= 1) of hard negatives")
        instruction = samples[0]["instruction"]
        if any(s["instruction"] != instruction for s in samples):
            raise InputError("d2llm batch: all queries of a batch must share one instruction (one task per batch)")
        b = len(samples)
        groups = [self.encoder.tokenize([s["query"] for s in samples], instruction, self.max_length),
                  self.encoder.tokenize([c for s in samples for c in (s["positive"], *s["negatives"])],
                                        max_length=self.max_length)]
        s_cand = torch.tensor([s["scores"] for s in samples])
        s_inb, known = torch.zeros(b, b), torch.zeros(b, b, dtype=torch.bool)
        for i, a in enumerate(samples):
            for j, o in enumerate(samples):
                if "group" in a and a["group"] == o.get("group") and o["group_index"] < len(a["inbatch_scores"]):
                    s_inb[i, j], known[i, j] = a["inbatch_scores"][o["group_index"]], True
        t_cand = None
        if d2.feature:
            if any("features" not in s for s in samples):
                raise ConfigError("d2llm.feature > 0 needs teacher features in the scored shards "
                                  "(`embedforge teacher score --features`), or set d2llm.feature=0")
            t_cand = torch.tensor([s["features"] for s in samples], dtype=torch.float32)
        symmetric = samples[0]["task"] in d2.symmetric_tasks
        iem = self.encoder.iem

        def loss_fn(q: Tensor, cand: Tensor) -> Tensor:
            cand = cand.view(b, k + 1, -1)
            with autocast(self.precision, q.device):  # the IEM's weights may be bf16 (DeepSpeed's bf16 mode)
                u_q = iem.query_proj(q)[:, None]  # [B, 1, H]
                z_cand, h_cand = iem.score_proj(u_q, iem.passage_proj(cand), symmetric)  # [B, 1+K]
                z_inb, _ = iem.score_proj(u_q, iem.passage_proj(cand[:, 0])[None], symmetric)  # [B, B]
            dev = q.device
            loss, _ = d2llm_loss(z_cand.float(), s_cand.to(dev), z_inb.float(), s_inb.to(dev), d2, h_cand.float(),
                                 None if t_cand is None else t_cand.to(dev), known.to(dev))
            return loss

        return groups, loss_fn


class TeacherStep(EngineHooks):
    """Teacher fine-tuning (`objectives.reranker`): every (query, candidate) prompt through the causal
    backbone, the yes / no logit at its last position, pointwise or listwise loss."""

    def __init__(self, encoder: Encoder, lm_head: nn.Module, cfg: TeacherObjectiveConfig, max_length: int,
                 precision: str):
        self.encoder, self.lm_head, self.cfg, self.precision = encoder, lm_head, cfg, precision
        # the stage's data.max_length bounds the prompt, as it will when the fine-tuned teacher scores
        self.prompter = YesNoPrompter(encoder.tokenizer, cfg.stage_prompt(max_length))

    def prepare(self, samples: list[dict], side: str = "left") -> dict[str, Tensor]:
        """Prompts of every (query, candidate) pair, padded on `side` (`last`: each row's last real
        position); pair labels and the [queries, candidates] layout."""
        rows, counts = [], []
        for s in samples:
            candidates = (s["positive"], *s["negatives"])  # none: its positive alone (a listwise loss of 0)
            symmetric = s.get("task") in self.cfg.symmetric_tasks
            query = instructed_query(s["query"], s.get("instruction"))
            rows += [self.prompter.render(query, c, symmetric) for c in candidates]
            counts.append(len(candidates))
        ids, mask = self.prompter.pad(rows, side)
        width = max(counts)
        valid = torch.arange(width)[None] < torch.tensor(counts)[:, None]  # [queries, candidates]
        labels = torch.zeros(len(samples), width)
        labels[:, 0] = 1.0
        last = torch.full((len(rows),), ids.shape[1] - 1) if side == "left" else mask.sum(1) - 1
        return {"input_ids": ids, "attention_mask": mask, "last": last, "valid": valid, "pair_labels": labels[valid]}

    def step(self, samples: list[dict], loss_scale: float) -> StepStats:
        batch = self.prepare(samples)
        loss = self.forward(self._loss, batch)
        self.backward(loss * loss_scale)
        return StepStats(float(loss.detach()), int(batch["attention_mask"].sum()))

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        """(z_yes - z_no) / T of every pair, in the order of `prepare`'s rows."""
        device = self.encoder.device
        with autocast(self.precision, device):
            last = last_position_hidden(self.encoder.backbone, batch["input_ids"], batch["attention_mask"])
        return self.pair_logits(last, self.prompter.direction(self.lm_head.weight))

    def pair_logits(self, last: Tensor, direction: Tensor) -> Tensor:
        """(z_yes - z_no) / T from the last positions' hidden states [n, h] and W[yes] - W[no] (float32)."""
        return last.float() @ direction.to(last.device) / self.cfg.prompt.temperature

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self.loss_from_logits(self.logits(batch), batch)

    def loss_from_logits(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The stage's loss (pointwise or listwise) over the pair logits of `prepare`'s batch."""
        valid = batch["valid"].to(logits.device)
        if self.cfg.loss == "pointwise":
            return pointwise_loss(logits, batch["pair_labels"].to(logits.device))
        table = torch.zeros(valid.shape, dtype=logits.dtype, device=logits.device).masked_scatter(valid, logits)
        return listwise_loss(table, valid)


def mask_token_id(tokenizer, choice: str) -> int:
    """The MNTP mask id; `new` must already have been added (and embeddings resized) at model build."""
    if choice == "new":
        if NEW_MASK_TOKEN not in tokenizer.get_vocab():
            raise ValueError("mntp.mask_token=new: the <mask> token was not added when the model was built")
        return tokenizer.convert_tokens_to_ids(NEW_MASK_TOKEN)
    return resolve_mask_token(tokenizer, choice)[0]


NEEDS_KIND = {"mntp": ("text",), "simcse": ("text",), "supervised": ("pair", "scored"), "d2llm": ("scored",),
              "teacher": ("pair", "scored")}


def build_step(stage: StageConfig, encoder: Encoder, lm_head: nn.Module | None, generator: torch.Generator,
               gather: GatherFn | None = None, *, data_kind: str = "text"):
    """The step of the stage's objective; `data_kind` is the sample kind its shards hold."""
    obj = stage.objective
    if data_kind not in NEEDS_KIND[obj.kind]:
        raise ConfigError(f"stages.{stage.name}: objective {obj.kind} needs {' or '.join(NEEDS_KIND[obj.kind])} data, "
                          f"but {stage.data.path} holds {data_kind} samples (data.path)")
    if obj.kind == "mntp":
        mask_id = mask_token_id(encoder.tokenizer, obj.mntp.mask_token)
        spec = MaskingSpec(
            probability=obj.mntp.mask_probability,
            strategy=obj.mntp.strategy,
            mask_token_id=mask_id,
            vocab_size=len(encoder.tokenizer),
            special_ids=frozenset(encoder.tokenizer.all_special_ids),
        )
        return MNTPStep(encoder, lm_head, spec, stage.data.max_length, stage.precision, generator)
    if obj.kind == "simcse":
        return SimCSEStep(encoder, obj, stage.data.max_length, stage.precision, gather)
    if obj.kind == "d2llm":
        if encoder.iem is None:
            raise ValueError(f"stages.{stage.name}: objective d2llm needs the encoder's IEM (added by the engine)")
        return D2LLMStep(encoder, obj, stage.data.max_length, stage.precision)
    if obj.kind == "teacher":
        return TeacherStep(encoder, lm_head, obj.teacher, stage.data.max_length, stage.precision)
    return SupervisedStep(encoder, obj, stage.data.max_length, stage.precision, gather)
