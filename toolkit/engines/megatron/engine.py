"""The `megatron` engine: tensor / pipeline / data-parallel bidirectional backbones (megatron-core).

Every rank of a DP replica (all its TP and PP ranks) reads the same samples and tokenises / masks
them identically (same seeds), so no broadcast of batches is needed. One optimizer step runs
megatron's pipeline schedule over micro-batches; pooling and losses run on the last stage only:
- MNTP: logits only at masked rows, vocab-parallel cross-entropy; each micro-batch's token-loss sum
  is divided by its batch's masked-token count, so micro-batching never changes the loss;
- contrastive: a batch's role groups (queries, positives, negatives / two SimCSE views) travel as one
  micro-batch, because their loss couples them, or as GradCache chunks (two passes, see
  `_gradcache`); negatives are gathered across DP with gradient;
- teacher (the D2LLM cross-encoder, fine-tuned): a batch's right-padded prompts under a causal +
  key-padding mask as one micro-batch; each row's last real position onto W[yes] - W[no] of the
  frozen vocabulary-parallel head (gathered once per stage), then the pointwise / listwise loss.
Gradients are then summed over TP for replicated tensors under sequence parallelism, averaged over
DP, clipped by the global norm (TP shards counted once per shard, replicated tensors once) and
applied by torch AdamW: elementwise, so a sharded update equals the unsharded one; with
`parallel.distributed_optimizer` by `dist_optimizer.DistributedOptimizer` (ZeRO-1: gradients
reduce-scattered in buckets during the backward, fp32 masters and Adam state for this DP rank's
range only), the same arithmetic on owned ranges. Checkpoints are
megatron `dist_checkpointing` (weights or LoRA adapters + Adam moments as sharded tensors), so they
load at another TP / PP / DP layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from toolkit.checkpoint.pending import SaveHandle
from toolkit.config import RunConfig, StageConfig
from toolkit.distributed.device import resolve_megatron_device
from toolkit.distributed.gather import make_gather
from toolkit.distributed.megatron_shims import seed_model_parallel_rng
from toolkit.distributed.parallel_dims import ParallelDims
from toolkit.engines.base import (
    Engine,
    StepResult,
    allreduce,
    allreduce_mean,
    any_rank,
    nonfinite,
    stage_attention_dropout,
)
from toolkit.engines.megatron import checkpoint as mckpt
from toolkit.engines.megatron import micro_batches
from toolkit.engines.megatron.async_save import MegatronAsyncSave
from toolkit.engines.megatron.convert import megatron_to_hf
from toolkit.engines.megatron.dist_optimizer import DistributedOptimizer
from toolkit.engines.megatron.hf_export import StageWeights, export_encoder_folder, export_teacher_folder
from toolkit.engines.megatron.inference import load_stage_weights
from toolkit.engines.megatron.lora import MegatronLora
from toolkit.engines.megatron.model import build_backbone, tp_sharded_parameters, transformer_config, vocab_rows
from toolkit.engines.megatron.validate import validate
from toolkit.engines.megatron.weights import HFWeights
from toolkit.models.arch import ModelArgs
from toolkit.models.encoder import Encoder
from toolkit.models.folder import SPEC_FILE, EncoderSpec, load_head_weights, load_spec, serving_length
from toolkit.models.loading import DTYPES, resolve_model_path
from toolkit.models.pooling import Pooling
from toolkit.objectives.gradcache import rng_state, set_rng_state
from toolkit.objectives.mntp import IGNORE_INDEX
from toolkit.objectives.steps import autocast, build_step
from toolkit.optim import lr_lambda
from toolkit.seeds import head_seed, iem_seed, pipeline_dropout_seed, stage_seed


class MegatronEngine(Engine):
    def __init__(self, cfg: RunConfig, dims: ParallelDims):
        super().__init__(cfg, dims)
        self.model = None
        self.lora = None
        self.optimizer = None
        self.scheduler = None
        self.stage: StageConfig | None = None  # the stage begun last (None: weights loaded, no stage yet)

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    # ------------------------------------------------------------------ build
    def build(self, *, add_mask_token: bool) -> None:
        from transformers import AutoConfig, AutoTokenizer

        path = resolve_model_path(self.cfg.model.path)
        self.build_module(AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                          source=str(path / "config.json"))
        with HFWeights(path) as weights:  # one open per file, this rank's slices only
            self.load_hf_weights(weights, source=str(path))

    def build_module(self, hf_config, tokenizer=None, *, source: str = "config.json", meta: bool = False) -> None:
        """This rank's backbone and pooling head for `hf_config`, without weights (`build` loads them).

        `meta=True` (the dry run, `toolkit.dry_run`): every tensor on the meta device, so a 405B
        stage costs no memory; no tokenizer is needed then."""
        cfg, dims = self.cfg, self.dims
        self.hf_config = hf_config
        self.arch = ModelArgs.from_hf_config(hf_config, source=source)
        validate(cfg, self.arch)  # before any weight is read (the pre-flight could not see this config)
        dims.initialize_megatron(cfg.seed)
        if meta:
            self.device = torch.device("meta")
        else:
            self.device = resolve_megatron_device(cfg.device)
        self.mconfig = transformer_config(  # attention dropout: set per stage in begin_stage
            self.arch, tp=dims.tp, pp=dims.pp, dtype=DTYPES[cfg.model.dtype],
            sequence_parallel=cfg.parallel.sequence_parallel,
            recompute="full" if cfg.model.gradient_checkpointing and cfg.parallel.recompute == "none" else cfg.parallel.recompute,
            first_stage_layers=cfg.parallel.first_stage_layers, last_stage_layers=cfg.parallel.last_stage_layers,
        )
        if meta:
            self.mconfig.use_cpu_initialization = True  # megatron's GPU path names the CUDA device explicitly
        with self._on_meta():
            self.model = build_backbone(self.arch, self.mconfig, pre_process=dims.is_first_stage,
                                        post_process=dims.is_last_stage, pp_rank=dims.pp_rank).to(self.device)
        with torch.random.fork_rng(), torch.device(self._head_device):  # the same initial head as the hf engine
            torch.manual_seed(head_seed(cfg.seed))
            pooling = Pooling(cfg.pooling, self.arch.hidden_size)
        spec = EncoderSpec(pooling=cfg.pooling, max_length=cfg.model.max_length, bidirectional=True)
        self.encoder = Encoder(self.model, tokenizer, pooling.to(self.device) if dims.is_last_stage else pooling, spec)
        self._output_in_place: Path | None = None  # the folder end_stage wrote from these very weights

    @property
    def _head_device(self) -> torch.device:
        """The heads (pooling, IEM) run on the last pipeline stage only; the other stages keep them on
        the meta device (shapes, no storage), so a big head costs nothing there."""
        return torch.device("cpu") if self.dims.is_last_stage and self.device.type != "meta" else torch.device("meta")

    def _on_meta(self):
        """Create modules directly on the meta device in a dry run; elsewhere as always (CPU, then moved)."""
        return torch.device("meta") if self.device.type == "meta" else contextlib.nullcontext()

    def load_hf_weights(self, hf, *, include_head: bool = True, source: str = "HF weights") -> None:
        load_stage_weights(self.model, hf, self.arch, self.dims, include_head=include_head, source=source,
                           **self._stage_split)

    def hf_state_dict(self, grads: bool = False) -> dict[str, Tensor] | None:
        """The full HF-layout weights (or gradients) gathered on rank 0 (None elsewhere): a whole-model
        pickle for tests on tiny models; the stage's output never goes through it (`hf_export`).

        Only DP replica 0 sends its shards (the others hold copies), and only rank 0 receives."""
        local = {}
        if self.dims.dp_rank == 0:
            for name, p in self.model.named_parameters():
                value = p.grad if grads else p.data
                if value is not None:
                    local[name] = value.detach().cpu()
        mine = (self.dims.tp_rank, self.dims.pp_rank, self.dims.dp_rank, local)
        gathered = [mine]
        if dist.is_initialized() and self.dims.world_size > 1:
            gathered = [None] * self.dims.world_size if self.dims.rank == 0 else None
            dist.gather_object(mine, gathered, dst=0)
        if self.dims.rank != 0:
            return None
        shards = {(t, p): sd for t, p, d, sd in gathered if d == 0}
        return megatron_to_hf(shards, self.arch, tp=self.dims.tp, pp=self.dims.pp, **self._stage_split)

    @property
    def _stage_split(self) -> dict[str, int]:
        """The uneven pipeline split, as the conversion takes it."""
        par = self.cfg.parallel
        return {"first_stage_layers": par.first_stage_layers, "last_stage_layers": par.last_stage_layers}

    def load_stage_output(self, final_dir: Path) -> None:
        """A finished stage's encoder folder (HF backbone + heads) into this rank's shards.

        When this engine wrote that folder (the stage ended in this process), its merged weights and
        heads are already in place: nothing is read. Otherwise (a run resumed at a later stage) the
        folder is read lazily, this rank's tensors only. The folder has no LM head (an encoder does
        not need one): the frozen MNTP head stays as built.
        """
        if self._output_in_place is not None and Path(final_dir).resolve() == self._output_in_place:
            return
        with HFWeights(final_dir, prefix="model.") as backbone:  # this rank's slices only, sharded folders too
            self.load_hf_weights(backbone, include_head=False, source=str(final_dir))
        if self.dims.is_last_stage:
            load_head_weights(self.encoder, final_dir)
            self.encoder.pooling.to(self.device)
            if self.encoder.iem is not None:
                self.encoder.iem.to(self.device)
        else:  # the heads' shapes only (an IEM the folder declares)
            with torch.device("meta"):
                spec = load_spec(Path(final_dir) / SPEC_FILE)
                if spec.iem_hidden:
                    self.encoder.add_iem(spec.iem_hidden, spec.iem_cosine_scale)

    # ------------------------------------------------------------------ stage
    def begin_stage(self, index: int, stage: StageConfig, *, data_kind: str, generator: torch.Generator) -> None:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        self.stage = stage
        # Dropout streams per stage (independent of earlier stages in this process) and per pipeline
        # stage (layer k of stage 0 and of stage 1 must not share masks), as Megatron-LM seeds them.
        dropout_seed = pipeline_dropout_seed(self.cfg.seed, index, self.dims.pp_rank)
        torch.manual_seed(dropout_seed)
        seed_model_parallel_rng(dropout_seed, self.dims.tp_rank)
        dropout = stage_attention_dropout(stage, self.cfg, self.hf_config)
        for module in self.model.modules():
            if isinstance(module, DotProductAttention):
                module.attention_dropout.p = dropout
        self.build_trainable(index, stage)
        self.step_obj = build_step(stage, self.encoder, None, generator, make_gather(self.dims.dp_group),
                                   data_kind=data_kind)
        self.kind = stage.objective.kind
        self._yes_no = None  # a teacher stage's W[yes] - W[no] (frozen LM head), on the last stage
        if self.kind == "teacher" and self.dims.is_last_stage:
            prompter = self.step_obj.prompter
            rows = vocab_rows(self.model.output_layer.weight, [prompter.yes_id, prompter.no_id],
                              tp_rank=self.dims.tp_rank, tp_group=self.dims.tp_group if self.dims.tp > 1 else None)
            self._yes_no = rows[0] - rows[1]

    def build_trainable(self, index: int, stage: StageConfig) -> None:
        """A stage's trainable state: LoRA adapters (or the whole backbone), the heads on the last
        stage, and the optimizer over them; the dry run builds it alone, on the meta device."""
        trains_heads = self.dims.is_last_stage and stage.objective.kind != "teacher"  # a teacher reads the LM head
        self.encoder.pooling.requires_grad_(trains_heads)
        if stage.lora.enabled:
            self.model.requires_grad_(False)
            self.lora = MegatronLora(self.model, self.arch, stage.lora, tp=self.dims.tp, tp_rank=self.dims.tp_rank,
                                     pp_rank=self.dims.pp_rank, seed=stage_seed(self.cfg.seed, index),
                                     sequence_parallel=self.cfg.parallel.sequence_parallel).to(self.device)
            self.params = {f"lora.{n}": p for n, p in self.lora.named_parameters()}
            self.tp_sharded = {f"lora.{n}" for n in self.lora.sharded_names()}
        else:
            self.lora = None
            self.model.requires_grad_(True)
            if self.dims.is_last_stage:
                self.model.output_layer.weight.requires_grad_(False)
            self.params = {f"backbone.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
            self.tp_sharded = {f"backbone.{n}" for n in tp_sharded_parameters(self.model)}
        self._prepare_iem(index, stage)
        if trains_heads:
            self.params.update({f"pooling.{n}": p for n, p in self.encoder.pooling.named_parameters()})
            if stage.objective.kind == "d2llm":
                self.params.update({f"iem.{n}": p for n, p in self.encoder.iem.named_parameters()})
        o = stage.optimizer
        if isinstance(self.optimizer, DistributedOptimizer):
            self.optimizer.close()
        self.mconfig.no_sync_func = None
        if self.cfg.parallel.distributed_optimizer:  # ZeRO-1: fp32 main grads + masters, state sharded over DP
            self.optimizer = DistributedOptimizer(self.params, lr=o.lr, betas=o.betas, eps=o.eps,
                                                  weight_decay=o.weight_decay, dp_group=self.dims.dp_group)
            self.mconfig.no_sync_func = self.optimizer.no_sync  # the schedule reduces on the last micro-batch
        else:
            self.optimizer = torch.optim.AdamW(self.params.values(), lr=o.lr, betas=o.betas, eps=o.eps,
                                               weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(getattr(self.optimizer, "inner", self.optimizer),
                                                           lr_lambda(stage.schedule, stage.steps))

    def materialize_step(self) -> None:
        """Dry run only (meta device): the gradients a backward allocates (one per trainable parameter,
        in its dtype) and the states the optimizer's first step creates, so `state_bytes` counts them."""
        if self.device.type != "meta":
            raise RuntimeError("materialize_step is for a meta-device engine (the dry run)")
        if isinstance(self.optimizer, DistributedOptimizer):  # its buffers hold the gradients, not p.grad
            self.optimizer.step_as_if_every_param_had_a_grad()
            return
        for p in self.params.values():
            p.grad = torch.empty_like(p)
        self.optimizer.step()

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the tensors this rank holds now: every parameter (backbone, LoRA, heads), the
        gradients present, the optimizer's state tensors. Activations are not tensors held between steps."""
        heads = (self.encoder.pooling, self.encoder.iem) if self.dims.is_last_stage else ()  # meta elsewhere
        modules = (self.model, self.lora, *heads)
        params = {id(p): p for m in modules if m is not None for p in m.parameters()}.values()
        if isinstance(self.optimizer, DistributedOptimizer):
            grads, optimizer = self.optimizer.grad_bytes(), self.optimizer.state_bytes()
        else:
            grads = sum(p.grad.nbytes for p in params if p.grad is not None)
            optimizer = sum(t.nbytes for state in self.optimizer.state.values() for t in state.values()
                            if isinstance(t, Tensor))
        return {"weights": sum(p.nbytes for p in params), "grads": grads, "optimizer": optimizer}

    def _prepare_iem(self, index: int, stage: StageConfig) -> None:
        """A D2LLM stage's pair scorer, seeded as the hf engine seeds it: built and trained on the last
        pipeline stage only (where pooling and the loss run), shapes only (meta) elsewhere. A later
        stage keeps an earlier stage's IEM frozen."""
        encoder = self.encoder
        if stage.objective.kind == "d2llm":
            with torch.random.fork_rng(), torch.device(self._head_device):
                torch.manual_seed(iem_seed(self.cfg.seed, index))
                encoder.add_iem(stage.objective.d2llm.iem_hidden, stage.objective.d2llm.cosine_scale)
            if self.dims.is_last_stage:
                encoder.iem.to(self.device)
            encoder.iem.requires_grad_(self.dims.is_last_stage)
        elif encoder.iem is not None:
            encoder.iem.requires_grad_(False)

    # ------------------------------------------------------------------ one optimizer step
    @property
    def _length_multiple(self) -> int:
        """Sequence parallelism splits the sequence over TP ranks: lengths must divide by tp."""
        return self.dims.tp if self.cfg.parallel.sequence_parallel else 1

    def _micro_batches(self, batches: list[list[dict]]) -> list[dict]:
        accum = len(batches)
        out = []
        for samples in batches:
            if self.kind == "mntp":
                b = self.step_obj.prepare(samples)
                masked = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                size = self.cfg.parallel.micro_batch_size or b["input_ids"].shape[0]
                out += micro_batches.mntp_chunks(b, size=size, scale=1.0 / (accum * max(masked, 1)))
            elif self.kind == "teacher":  # right-padded prompts under a causal mask; pairs of a query coupled
                out.append({**self.step_obj.prepare(samples, side="right"), "causal": True, "scale": 1.0 / accum})
            else:
                groups, loss_fn = self.step_obj.prepare(samples)
                out.append({**micro_batches.concat_groups(groups), "loss_fn": loss_fn, "scale": 1.0 / accum})
        return [self._finish(m) for m in out]

    def _finish(self, micro_batch: dict) -> dict:
        return micro_batches.finish(micro_batch, multiple=self._length_multiple, pack=self.stage.data.pack)

    def _forward_step(self, data_iterator, model):
        micro_batch = next(data_iterator)
        ids = micro_batches.model_ids(micro_batch).to(self.device)
        mask = micro_batches.attention_mask(micro_batch).to(self.device)
        # megatron's RoPE numbers the slots 0..T-1: a packed text at an offset keeps its relative
        # positions, and attention within a text sees only those
        positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0).expand_as(ids)
        with autocast(self.stage.precision, self.device):
            output = model(ids if self.dims.is_first_stage else None, positions, mask)
        return output, functools.partial(self._loss, micro_batch)

    def _loss(self, mb: dict, output: Tensor, non_loss_data: bool = False):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        if self.cfg.parallel.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]; backward keeps each rank's slice
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            output = gather_from_sequence_parallel_region(output, tensor_parallel_output_grad=False)
        hidden = output.transpose(0, 1)  # [b, s, h]
        if "packed" in mb:
            hidden = mb["packed"].unpack(hidden)
        if self.kind == "mntp":
            targets = mb["labels"][:, 1:].to(self.device)
            selected = targets != IGNORE_INDEX
            rows = hidden[:, :-1][selected]
            if rows.shape[0] == 0:  # nothing masked: a zero that still reaches every parameter
                loss = hidden.sum() * 0.0
            else:
                with autocast(self.stage.precision, self.device):  # as the hf engine's MNTP head under bf16
                    logits = self.model.lm_logits(rows).float()
                logits = self._mask_padded_vocab(logits)
                loss = vocab_parallel_cross_entropy(logits, targets[selected]).sum() * mb["scale"]
        elif self.kind == "teacher":  # each prompt's last real position, read onto the yes / no rows
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), mb["last"].to(hidden.device)]
            logits = self.step_obj.pair_logits(last, self._yes_no)
            loss = self.step_obj.loss_from_logits(logits, mb) * mb["scale"]
        else:
            emb = self.encoder.pooling(hidden.float(), mb["attention_mask"].to(self.device),
                                       mb["embed_mask"].to(self.device))
            if non_loss_data:  # GradCache pass 1: the embeddings themselves
                return emb
            if "cached_grad" in mb:  # GradCache pass 2: d loss / d emb is known
                loss = (emb * mb["cached_grad"]).sum()
                return loss, torch.tensor(1, dtype=torch.int, device=self.device), {"loss": loss.detach()}
            parts = torch.split(emb, mb["sizes"])
            loss = mb["loss_fn"](*parts) * mb["scale"]
        return loss, torch.tensor(1, dtype=torch.int, device=self.device), {"loss": loss.detach()}

    def _mask_padded_vocab(self, logits: Tensor) -> Tensor:
        per_rank = logits.shape[-1]
        start = self.dims.tp_rank * per_rank
        pad_from = self.arch.vocab_size - start
        if pad_from >= per_rank:
            return logits
        logits = logits.clone()
        logits[:, max(pad_from, 0):] = float("-inf")
        return logits

    def _schedule(self, mbs: list[dict], *, forward_only: bool = False) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(mbs), model=self.model,
            num_microbatches=len(mbs), seq_length=max(micro_batches.model_ids(m).shape[1] for m in mbs),
            micro_batch_size=micro_batches.model_ids(mbs[0]).shape[0], forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )

    def forward_backward(self, micro_batches: list[list[dict]]) -> tuple[float, int]:
        """Gradients of the step's loss, averaged over DP; returns (loss, real tokens over all DP ranks)."""
        distributed = isinstance(self.optimizer, DistributedOptimizer)
        if self.kind not in ("mntp", "teacher") and self.stage.objective.gradcache_chunk_size:
            losses, tokens = [], 0
            # GradCache's two passes and several schedules: reduce once, after all of them
            with self.optimizer.without_overlap() if distributed else contextlib.nullcontext():
                for samples in micro_batches:
                    loss, n = self._gradcache(samples, 1.0 / len(micro_batches))
                    losses.append({"loss": loss / len(micro_batches)})
                    tokens += n
        else:
            mbs = self._micro_batches(micro_batches)
            tokens = sum(int(mb["attention_mask"].sum()) for mb in mbs)
            losses = self._schedule(mbs)
        if distributed:  # reductions are linear: pad row and TP sums act on the reduced owned ranges
            self.optimizer.finish_grad_sync()
        self._freeze_pad_row()
        self._sync_sequence_parallel_grads()
        if not distributed:
            allreduce_mean([p.grad for p in self.params.values() if p.grad is not None], self.dims.dp_group)
        return self._step_loss(losses), self._dp_sum(tokens)

    def _sync_sequence_parallel_grads(self) -> None:
        """Under sequence parallelism a TP-replicated tensor inside the layers (norms, replicated LoRA
        halves) sees only this rank's sequence slice: sum its gradient over TP, as megatron's
        finalize_model_grads does. The heads (pooling, IEM) see the gathered sequence: already whole."""
        if not self.cfg.parallel.sequence_parallel or self.dims.tp == 1:
            return
        names = [n for n in self.params if n not in self.tp_sharded and not n.startswith(HEADS)]
        if isinstance(self.optimizer, DistributedOptimizer):  # TP ranks share the bucket layout
            allreduce(self.optimizer.owned_grads(names), self.dims.tp_group, average=False)
            return
        allreduce([self.params[n].grad for n in names if self.params[n].grad is not None],
                  self.dims.tp_group, average=False)

    def _freeze_pad_row(self) -> None:
        """HF embeddings never train the pad token's row (`nn.Embedding(padding_idx=pad_token_id)`);
        neither do ours, so both engines train the same weights (it matters where pad == EOS == mask)."""
        pad = getattr(self.hf_config, "pad_token_id", None)
        if pad is None or not self.dims.is_first_stage:
            return
        weight = self.model.embedding.word_embeddings.weight
        local = pad - self.dims.tp_rank * weight.shape[0]
        name = "backbone.embedding.word_embeddings.weight"
        if isinstance(self.optimizer, DistributedOptimizer) and name in self.params:
            if 0 <= local < weight.shape[0]:
                self.optimizer.zero_grad_range(name, local * weight.shape[1], (local + 1) * weight.shape[1])
        elif weight.grad is not None and 0 <= local < weight.shape[0]:
            weight.grad[local] = 0

    def optimizer_step(self, loss: float = 0.0) -> tuple[float, bool]:
        """Clip by the global norm, update, advance the LR schedule; returns (the norm before clipping,
        skipped). A non-finite loss or norm skips the update (weights, Adam moments, LR schedule
        untouched; gradients zeroed) on every rank: the loss is reduced over PP and DP, the norm over
        TP x PP of DP-averaged gradients, and a flag all-reduced over the world settles any doubt."""
        grad_norm = self._clip(self.stage.optimizer.clip_grad)
        skipped = any_rank(nonfinite(loss, grad_norm))
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, skipped

    def train_step(self, micro_batches: list[list[dict]]) -> StepResult:
        loss, tokens = self.forward_backward(micro_batches)
        grad_norm, skipped = self.optimizer_step(loss)
        return StepResult(loss=loss, tokens=tokens, grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0],
                          skipped=skipped)

    def _gradcache(self, samples: list[dict], scale: float) -> tuple[Tensor, int]:
        """GradCache through the pipeline: the batch size no longer bounds memory.

        Pass 1 runs the schedule forward-only over chunks of each role group; the last stage pools,
        computes the contrastive loss on the [n, d] embeddings (negatives gathered across DP) and
        its gradient w.r.t. them. Pass 2 replays the same chunks with the same RNG (per stage the
        forwards consume it in the same order) and back-propagates emb . cached_grad per chunk.
        """
        groups, loss_fn = self.step_obj.prepare(samples)
        size = self.stage.objective.gradcache_chunk_size
        chunks, roles = [], []
        for role, g in enumerate(groups):
            for i in range(0, g["input_ids"].shape[0], size):
                chunk = {k: g[k][i : i + size] for k in ("input_ids", "attention_mask", "embed_mask")}
                chunks.append(self._finish(chunk))
                roles.append(role)
        tokens = sum(int(c["attention_mask"].sum()) for c in chunks)
        rng = _rng_snapshot()
        with torch.no_grad():
            pooled = self._schedule(chunks, forward_only=True)
        loss = torch.zeros(())
        if self.dims.is_last_stage:
            reps = [torch.cat([e for e, r in zip(pooled, roles) if r == role]).requires_grad_()
                    for role in range(len(groups))]
            loss = loss_fn(*reps)
            (loss * scale).backward()
            grads = {role: list(torch.split(rep.grad, [c["input_ids"].shape[0] for c, r in zip(chunks, roles)
                                                       if r == role])) for role, rep in enumerate(reps)}
            for c, role in zip(chunks, roles):
                c["cached_grad"] = grads[role].pop(0)
        _rng_restore(rng)
        self._schedule(chunks)
        return loss.detach(), tokens

    def _step_loss(self, losses: list[dict]) -> float:
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.dims.is_last_stage:
            value += sum(float(d["loss"]) for d in losses)
        if dist.is_initialized():
            dist.all_reduce(value, group=self.dims.group("pp"))  # only the last stage holds a loss
            allreduce_mean([value], self.dims.dp_group)
        return float(value)

    def _dp_sum(self, n: int) -> int:
        if not dist.is_initialized() or self.dims.dp == 1:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self.device)
        dist.all_reduce(t, group=self.dims.dp_group)
        return int(t)

    def grad_norm(self) -> Tensor:
        """Global L2 norm over every rank's gradients: TP shards once each, replicated tensors once."""
        def counted(name: str) -> bool:
            return name in self.tp_sharded or self.dims.tp_rank == 0

        if isinstance(self.optimizer, DistributedOptimizer):  # owned ranges, summed over DP first
            sq = self.optimizer.sum_of_squares(counted)
            if dist.is_initialized():
                dist.all_reduce(sq, group=self.dims.group("mp"))
            return sq.sqrt()
        sq = torch.zeros(1, dtype=torch.float64, device=self.device)
        for name, p in self.params.items():
            if p.grad is not None and counted(name):
                sq += torch.linalg.vector_norm(p.grad, dtype=torch.float32).double() ** 2
        if dist.is_initialized():
            dist.all_reduce(sq, group=self.dims.group("mp"))
        return sq.sqrt()

    def _clip(self, max_norm: float) -> float:
        norm = self.grad_norm()
        if max_norm > 0:  # the same arithmetic as torch.nn.utils.clip_grad_norm_
            coef = torch.clamp(max_norm / (norm.float() + 1e-6), max=1.0)
            if isinstance(self.optimizer, DistributedOptimizer):
                self.optimizer.scale_grads(coef)
                return float(norm)
            for p in self.params.values():
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
        return float(norm)

    # ------------------------------------------------------------------ checkpoints
    def save(self, step_dir: Path) -> None:
        mckpt.save(self, step_dir)

    def begin_save(self, step_dir: Path) -> SaveHandle:
        """checkpoint.async_save: megatron-core's async save (toolkit/engines/megatron/async_save.py)."""
        if not self.cfg.checkpoint.async_save:
            return super().begin_save(step_dir)
        return MegatronAsyncSave(mckpt.save(self, step_dir, async_save=True), step_dir / mckpt.MODEL_DIR)

    def load(self, step_dir: Path) -> None:
        mckpt.load(self, step_dir)

    def rng_state(self) -> dict:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        return {"tracker": get_cuda_rng_tracker().get_states()}

    def set_rng_state(self, state: dict) -> None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        if "tracker" in state:
            get_cuda_rng_tracker().set_states(state["tracker"])

    def end_stage(self, final_dir: Path) -> Path:
        """Merge the adapters in place and write the encoder folder (a teacher stage: the causal-LM
        folder, LM head included) from every rank's shards: each pipeline stage writes its own
        safetensors files (`hf_export`); no rank holds the model."""
        self.merge_adapters()
        dims = self.dims
        teacher = self.stage is not None and self.stage.objective.kind == "teacher"
        weights = StageWeights(self.model, tp_sharded_parameters(self.model), self.arch, tp=dims.tp,
                               tp_rank=dims.tp_rank, pp=dims.pp, pp_rank=dims.pp_rank,
                               tp_group=dims.tp_group if dims.tp > 1 else None,
                               split=(self.cfg.parallel.first_stage_layers, self.cfg.parallel.last_stage_layers),
                               causal_lm=teacher)
        where = dict(dp_rank=dims.dp_rank, rank=dims.rank, world=dims.world_size, hf_config=self.hf_config,
                     dtype=DTYPES[self.cfg.model.dtype], tokenizer=self.encoder.tokenizer)
        if teacher:
            objective = self.stage.objective.teacher
            export_teacher_folder(final_dir, weights, **where, prompt=objective.stage_prompt(self.stage.data.max_length),
                                  symmetric_tasks=objective.symmetric_tasks)
        else:
            spec = dataclasses.replace(self.encoder.spec, max_length=serving_length(self.cfg, self.hf_config))
            export_encoder_folder(final_dir, weights, **where, spec=spec, pooling=self.encoder.pooling,
                                  iem=self.encoder.iem)
        self._output_in_place = Path(final_dir).resolve()
        return final_dir

    def merge_adapters(self) -> None:
        """Fold the stage's LoRA into the backbone (the end of a stage; the dry run between stages)."""
        if self.lora is not None:
            self.lora.merge_into(self.model)
            self.lora = None


HEADS = ("pooling.", "iem.")  # trainable modules outside the backbone, on the last pipeline stage


def _rng_snapshot() -> tuple:
    """The default streams (CPU, current CUDA device) and megatron's tracked TP streams."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return rng_state(), get_cuda_rng_tracker().get_states()


def _rng_restore(state: tuple) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    default, tracker = state
    set_rng_state(default)
    get_cuda_rng_tracker().set_states(dict(tracker))
