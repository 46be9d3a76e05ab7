"""The `hf` engine: a transformers model in one process, or replicated over data-parallel ranks.

Stages chain as in LLM2Vec: a LoRA adapter (or the full model) is trained, merged at the end of the
stage and saved as an encoder folder; the next stage adds a fresh adapter. With several processes
(torchrun), every rank holds the whole model, contrastive negatives are gathered across ranks with
gradient, and gradients are averaged over the DP group before clipping (DDP's arithmetic, without
its overlap), so dp ranks equal one process accumulating their shards.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from toolkit.checkpoint.integrity import load_torch
from toolkit.config import ConfigError, RunConfig, StageConfig
from toolkit.distributed.device import resolve_device
from toolkit.distributed.gather import make_gather
from toolkit.engines.base import Engine, StepResult, allreduce_mean, any_rank, nonfinite, stage_attention_dropout
from toolkit.engines.spec import EngineSpec, register_engine
from toolkit.errors import CheckpointError, MissingPathError
from toolkit.models.arch import active_sliding_window
from toolkit.models.encoder import Encoder
from toolkit.models.folder import load_encoder_weights, serving_length
from toolkit.models.loading import build_encoder, set_attention_dropout
from toolkit.models.lora import add_lora, merge_lora
from toolkit.models.stage_encoder import merged_stage_encoder
from toolkit.models.teacher_folder import save_teacher_folder
from toolkit.objectives.steps import build_step
from toolkit.optim import lr_lambda
from toolkit.run_layout import RunLayout
from toolkit.seeds import iem_seed

TRAINABLE = "trainable.safetensors"
STATE = "state.pt"


class HFEngine(Engine):
    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def build(self, *, add_mask_token: bool) -> None:
        self.add_mask_token = add_mask_token
        self._build_encoder()

    def _build_encoder(self) -> None:
        self.device = resolve_device(self.cfg.device)
        self.encoder, self.lm_head = self._load_encoder()
        self.encoder.to(self.device)  # the steps move each batch to the encoder's device
        if self.lm_head is not None:
            self.lm_head.to(self.device)
        if self.cfg.model.gradient_checkpointing:  # non-reentrant: gradient hooks fire once per parameter
            self.encoder.backbone.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})

    def _load_encoder(self) -> tuple:
        """(encoder, frozen MNTP head) of the recipe's model: whole, in this process."""
        return build_encoder(self.cfg.model, self.cfg.pooling, seed=self.cfg.seed, add_mask_token=self.add_mask_token)

    def load_stage_output(self, final_dir: Path) -> None:
        load_encoder_weights(self.encoder, final_dir)

    def begin_stage(self, index: int, stage: StageConfig, *, data_kind: str, generator: torch.Generator) -> None:
        self._prepare_trainable(index, stage)
        self.optimizer = self._make_optimizer(stage)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(stage.schedule, stage.steps))
        self._build_step(stage, data_kind, generator)
        self.encoder.train()

    def _make_optimizer(self, stage: StageConfig) -> torch.optim.Optimizer:
        o = stage.optimizer
        return torch.optim.AdamW(self.params.values(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)

    def _prepare_trainable(self, index: int, stage: StageConfig) -> None:
        """The stage's dropout, a fresh adapter (or the whole backbone) and the pooling head trainable."""
        encoder, base = self.encoder, self.encoder.backbone
        set_attention_dropout(base, stage_attention_dropout(stage, self.cfg, base.config))
        if stage.lora.enabled:
            encoder.backbone = add_lora(base, stage.lora)
        else:
            base.requires_grad_(True)
        encoder.pooling.requires_grad_(stage.objective.kind != "teacher")  # a teacher reads the LM head, not a pool
        if stage.objective.kind == "d2llm":  # the student's pair scorer, trained with the pooling head
            with torch.random.fork_rng():
                torch.manual_seed(iem_seed(self.cfg.seed, index))
                encoder.add_iem(stage.objective.d2llm.iem_hidden, stage.objective.d2llm.cosine_scale).requires_grad_(True)
        elif encoder.iem is not None:  # an earlier D2LLM stage's scorer rides along, frozen
            encoder.iem.requires_grad_(False)
        self.index, self.stage = index, stage
        self.params = {n: p for n, p in encoder.named_parameters() if p.requires_grad}

    def _build_step(self, stage: StageConfig, data_kind: str, generator: torch.Generator) -> None:
        self.encoder.pack = stage.data.pack
        config = self.encoder.backbone.config
        window = active_sliding_window(config.to_dict())
        if stage.data.pack and window and window < stage.data.max_length:
            raise ConfigError(f"stages.{stage.name}.data.pack=true: this model's sliding_window={window} < "
                              f"data.max_length={stage.data.max_length}; the packed block mask would drop the "
                              "window: set data.pack=false or data.max_length <= the window")
        gather = make_gather(self.dims.dp_group) if self.dims.dp > 1 else None
        self.step_fn = build_step(stage, self.encoder, self.lm_head, generator, gather, data_kind=data_kind)

    def train_step(self, micro_batches: list[list[dict]]) -> StepResult:
        loss, tokens = self._forward_backward(micro_batches)
        if self.dims.dp > 1:
            allreduce_mean([p.grad for p in self.params.values() if p.grad is not None], self.dims.dp_group)
        grad_norm = self._clip(self.stage.optimizer.clip_grad)  # loss and norm are the same on every DP rank
        skipped = any_rank(nonfinite(loss, grad_norm))
        if not skipped:  # a non-finite step leaves weights, optimizer state and LR schedule as they were
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, tokens=tokens, grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0],
                          skipped=skipped)

    def _forward_backward(self, micro_batches: list[list[dict]]) -> tuple[float, int]:
        """Every micro-batch's forward and backward (gradients accumulate, each scaled by 1 / count);
        the step's mean loss and its tokens over the DP group."""
        accum = len(micro_batches)
        loss, tokens = 0.0, 0
        for samples in micro_batches:
            stats = self.step_fn.step(samples, 1.0 / accum)
            loss += stats.loss / accum
            tokens += stats.tokens
        if self.dims.dp > 1:
            totals = torch.tensor([loss, float(tokens)], dtype=torch.float64)
            dist.all_reduce(totals, group=self.dims.dp_group)
            loss, tokens = float(totals[0]) / self.dims.dp, int(totals[1])
        return loss, tokens

    def _clip(self, max_norm: float) -> float:
        grads = [p for p in self.params.values() if p.grad is not None]
        if not grads:
            return 0.0
        if max_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))

    # ------------------------------------------------------------------ checkpoints
    def save(self, step_dir: Path) -> None:
        """Trainable tensors + optimizer / scheduler; DP replicas are identical, so rank 0 writes."""
        if self.dims.rank != 0:
            return
        save_file({k: v.detach().contiguous().cpu() for k, v in self.params.items()}, str(step_dir / TRAINABLE))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   step_dir / STATE)

    def load(self, step_dir: Path) -> None:
        for name in (TRAINABLE, STATE):
            if not (step_dir / name).is_file():
                raise MissingPathError(f"{step_dir / name}: missing (was this checkpoint written by engine=hf?)")
        tensors = load_file(str(step_dir / TRAINABLE))
        missing, unexpected = sorted(set(self.params) - set(tensors)), sorted(set(tensors) - set(self.params))
        if missing or unexpected:
            raise CheckpointError(f"{step_dir / TRAINABLE}: parameters differ (missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(tensors[name])
        state = load_torch(step_dir / STATE)  # tensors and plain data only: a received file runs no code
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def end_stage(self, final_dir: Path) -> Path:
        self.encoder.backbone = merge_lora(self.encoder.backbone)
        self.encoder.backbone.requires_grad_(False)
        if self.dims.rank == 0:
            save_stage_output(self.cfg, self.stage, self.encoder, self.lm_head, final_dir)
        if dist.is_initialized():
            dist.barrier()
        return final_dir


def save_stage_output(cfg: RunConfig, stage: StageConfig, encoder: Encoder, lm_head, folder: Path) -> Path:
    """A finished stage's merged model: an encoder folder, or for a teacher stage a causal-LM folder
    that `teacher score` reads with the stage's prompt."""
    if stage.objective.kind != "teacher":
        return encoder.save_pretrained(folder, max_length=serving_length(cfg, encoder.backbone.config))
    teacher = stage.objective.teacher
    return save_teacher_folder(encoder.backbone, lm_head, encoder.tokenizer, cfg.model,
                               teacher.stage_prompt(stage.data.max_length), folder, teacher.symmetric_tasks)


def export_step(cfg: RunConfig, index: int, step_dir: Path, output: Path) -> Path:
    """A `step-N/` of this engine (the trainable tensors) merged into the stage's rebuilt start."""
    trainable = step_dir / TRAINABLE
    if not trainable.is_file():
        raise CheckpointError(f"{trainable}: missing from a checkpoint marked complete")
    encoder, lm_head = merged_stage_encoder(cfg, index, RunLayout.of_stage_dir(step_dir.parent),
                                            load_file(str(trainable)), source=str(step_dir))
    return save_stage_output(cfg, cfg.stages[index], encoder, lm_head, output)


SPEC = register_engine(EngineSpec(
    name="hf", engine_cls=HFEngine, parallel_dims=frozenset({"dp"}), export_step=export_step,
    devices=frozenset({"cpu", "cuda"}), objectives=frozenset({"mntp", "simcse", "supervised", "d2llm", "teacher"}),
))
