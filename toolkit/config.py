"""Typed run configuration: kw-only dataclasses loaded from YAML, with `key.sub=value` overrides.

Paths in a recipe file: model.path, data.path and objective.teacher.prompt_file are relative to the
recipe's folder; output_dir and command-line overrides are relative to the current directory.

Every error names the file and the dotted field, and lists the allowed keys or values, because a
typo in a 70B recipe should fail in the first second, not after the model loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from toolkit.config_d2llm import (  # noqa: F401  (re-exported: a recipe's D2LLM sections)
    TEACHER_ASYMMETRIC,
    TEACHER_SYMMETRIC,
    D2LLMConfig,
    TeacherObjectiveConfig,
    TeacherPrompt,
)
from toolkit.config_schema import (  # noqa: F401  (re-exported)
    ConfigError,
    build_dataclass,
    check_sizes,
    from_dict,
    parse_override,
    set_path,
    to_dict,
)
from toolkit.errors import InputError
from toolkit.recipe_paths import resolve_recipe_paths

# --------------------------------------------------------------------------------------------------
# Sections


@dataclass(kw_only=True)
class ModelConfig:
    """The backbone. `path` is an HF folder, a `.gguf` file, or `asset:NAME` (see toolkit.assets)."""

    path: str
    bidirectional: bool = True
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    attention_dropout: float | None = None  # overrides the config's; SimCSE uses 0.3 in the paper
    # the in-run encoder's default length (each stage trains at its data.max_length; the folders a run
    # writes encode at export.max_seq_length); never above the model's context (pre-flight)
    max_length: int = 512
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_sizes("model", self, {"max_length": 1})
        if self.attention_dropout is not None and not 0 <= self.attention_dropout < 1:
            raise ConfigError(f"model.attention_dropout: must be in [0, 1), got {self.attention_dropout}")


@dataclass(kw_only=True)
class PoolingConfig:
    mode: Literal["mean", "weighted_mean", "last", "bos", "latent_attention", "pma"] = "mean"
    heads: int = 8  # latent_attention / pma
    num_latents: int = 512  # latent_attention
    num_seeds: int = 1  # pma
    instruction_template: str = "{instruction}\n"  # instruction tokens are attended, not pooled

    def __post_init__(self) -> None:
        check_sizes("pooling", self, {"heads": 1, "num_latents": 1, "num_seeds": 1})


@dataclass(kw_only=True)
class LoraConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self) -> None:
        check_sizes("lora", self, {"r": 1, "alpha": 1, "dropout": 0})


@dataclass(kw_only=True)
class MNTPConfig:
    mask_probability: float = 0.2
    strategy: Literal["bert", "all_mask"] = "bert"  # bert = 80/10/10
    # auto: the tokenizer's mask token if it has one, else "_" (the reference's) if it is one token, else EOS
    mask_token: Literal["auto", "tokenizer", "underscore", "eos", "new"] = "auto"


@dataclass(kw_only=True)
class ObjectiveConfig:
    kind: Literal["mntp", "simcse", "supervised", "d2llm", "teacher"]
    temperature: float = 0.05  # SimCSE 0.05 (scale 20), supervised 0.02 (scale 50)
    mntp: MNTPConfig = field(default_factory=MNTPConfig)
    d2llm: D2LLMConfig = field(default_factory=D2LLMConfig)
    teacher: TeacherObjectiveConfig = field(default_factory=TeacherObjectiveConfig)
    gradcache_chunk_size: int = 0  # 0 = off; else embed in chunks of this many texts

    def __post_init__(self) -> None:
        check_sizes("objective", self, {"gradcache_chunk_size": 0})
        if self.kind == "teacher" and self.gradcache_chunk_size:
            raise ConfigError("objective.gradcache_chunk_size: a teacher stage has no embeddings to cache (its "
                              "loss reads each prompt's yes / no logit); set it to 0")
        if self.temperature <= 0:
            raise ConfigError(f"objective.temperature: must be > 0, got {self.temperature}")


@dataclass(kw_only=True)
class DataConfig:
    """A stage's training data: WebDataset shards built by `embedforge data build` (a folder with
    manifest.json), or `asset:nlp-corpus` / `asset:wordnet-pairs` (built into the cache once).
    The sample kind comes from the manifest: text for MNTP / SimCSE, pair for supervised."""

    path: str
    max_length: int = 128  # tokens (>= 1, no "0 = model.max_length"); longer texts are truncated (the training crop)
    batch_size: int = 32  # per data-parallel rank
    mode: Literal["exact", "resampled"] = "exact"  # exact epochs, or infinite draws with replacement
    shuffle: bool = True
    shuffle_buffer: int = 1000  # samples shuffled together within a shard
    length_bucketing: bool = True  # text data: sort windows by length so batches pad little
    bucket_batches: int = 16  # batches per bucketing window
    max_tokens: int = 0  # >0: token-budget batches (size x longest <= max_tokens, size <= batch_size)
    pack: bool = False  # the backbone runs each micro-batch's texts packed, no pad tokens (models/packing.py)
    task_weights: dict[str, float] = field(default_factory=dict)  # default: proportional to task size
    num_workers: int = 0  # loader worker processes per rank (0 = in the training process)
    prefetch: int = 2  # batches each worker keeps ready
    max_chars: int = 100_000  # a longer text is a bad record (counted, skipped)
    max_bad_fraction: float = 0.001  # bad records tolerated before the run stops
    verify: bool = True  # check each shard's sha256 against the manifest as it is read
    shard_url_template: str = ""  # e.g. "pipe:aws s3 cp s3://bucket/corpus/{name} -"
    # A `pipe:COMMAND` shard URL runs a shell command. One from this recipe (shard_url_template) is
    # yours; one inside a received dataset's manifest.json is refused unless this is true.
    trust_manifest_commands: bool = False

    def __post_init__(self) -> None:
        check_sizes("data", self, {"max_length": 1, "batch_size": 1, "shuffle_buffer": 0, "bucket_batches": 1,
                                    "max_tokens": 0, "num_workers": 0, "prefetch": 1, "max_chars": 0,
                                    "max_bad_fraction": 0})
        if self.max_bad_fraction > 1:
            raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")
        if any(w < 0 for w in self.task_weights.values()):
            raise ConfigError(f"data.task_weights: must be >= 0, got {self.task_weights}")


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0  # max global grad norm; 0 disables

    def __post_init__(self) -> None:
        check_sizes("optimizer", self, {"lr": 0, "weight_decay": 0, "eps": 0, "clip_grad": 0})


@dataclass(kw_only=True)
class ScheduleConfig:
    warmup_steps: int = 0
    decay: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_sizes("schedule", self, {"warmup_steps": 0, "min_lr_ratio": 0})


@dataclass(kw_only=True)
class StageConfig:
    name: str
    objective: ObjectiveConfig
    data: DataConfig
    steps: int
    lora: LoraConfig = field(default_factory=LoraConfig)
    merge_previous: bool = True  # merge the previous stage's adapter before adding this one
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_accum: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    attention_dropout: float | None = None  # this stage's attention dropout (SimCSE: 0.3); None = model's

    def __post_init__(self) -> None:
        if self.steps < 1 or self.grad_accum < 1:
            raise ConfigError(f"stages.{self.name}: steps and grad_accum must be >= 1, got steps={self.steps}, "
                              f"grad_accum={self.grad_accum}")


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 0  # 0 = only at the end of each stage
    keep_last: int = 2
    # Wall-time backstop: with EMBEDFORGE_DEADLINE (unix seconds, set by `embedforge submit slurm`
    # from the job's end time) the run saves and stops once the deadline is nearer than this margin
    # plus two of its slowest steps plus its slowest save (measured from the save's start until every
    # rank's files are committed, async writes included; twice while a save is in flight: the stop
    # waits for it, then saves), so a time limit never loses the steps since the last checkpoint.
    deadline_margin_s: float = 120.0
    # Async save (engine=megatron): the loop goes on once this step's tensors are staged in CPU memory;
    # a background process writes them, and the step gets its COMPLETE marker only after every rank's
    # write finished and the files were verified (at a later step boundary, or the next save / the
    # stage's end, which wait for it). At most one save is in flight; while it is, the host holds this
    # rank's part of the step (GPU: a copy in CPU memory; CPU: the writer's copy-on-write snapshot).
    # Engines without it refuse it.
    async_save: bool = False
    # engine=megatron: every DP replica writes a distinct part of a step (megatron-core's fully
    # parallel save, ~1/DP of the bytes each); false: DP replica 0 writes everything.
    parallel_save: bool = True

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.keep_last < 1 or self.deadline_margin_s < 0:
            raise ConfigError("checkpoint: every_steps and deadline_margin_s must be >= 0, keep_last >= 1")


@dataclass(kw_only=True)
class TrainConfig:
    """Run-wide guards of the training loop (outside the stages: changing them never blocks a resume)."""

    # A step whose loss or global grad norm is non-finite is skipped (no update; it still consumes its
    # batches, so the data order does not depend on it). This many consecutive skips stop the run with
    # an error naming the newest good checkpoint.
    max_skipped_steps: int = 5
    # A warning (not an error) when the grad norm is exactly 0, or the loss equals the previous step's
    # (1e-7 relative), for this many consecutive steps: a collapsed run. 0 disables it.
    collapse_window: int = 20

    def __post_init__(self) -> None:
        if self.max_skipped_steps < 1 or self.collapse_window < 0:
            raise ConfigError(f"train: max_skipped_steps must be >= 1 and collapse_window >= 0, got "
                              f"max_skipped_steps={self.max_skipped_steps}, collapse_window={self.collapse_window}")


@dataclass(kw_only=True)
class LoggingConfig:
    every_steps: int = 10
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        check_sizes("logging", self, {"every_steps": 1})


@dataclass(kw_only=True)
class ParallelConfig:
    """How ranks split the work (megatron engine; the hf engine is data-parallel only).

    world size = dp x tp x pp x cp; `dp: 0` derives dp from the world size. Global batch per optimizer
    step = data.batch_size (per DP rank) x dp x grad_accum.
    """

    tp: int = 1  # tensor parallel: attention heads / MLP columns split across ranks
    pp: int = 1  # pipeline parallel: layers split into pp consecutive stages
    dp: int = 0  # data parallel; 0 = world_size / (tp * pp * cp)
    cp: int = 1  # context parallel: reserved, must be 1 for now
    micro_batch_size: int = 0  # pipeline micro-batch (texts); 0 = the whole per-rank batch at once
    sequence_parallel: bool = False  # megatron sequence parallelism (needs tp > 1)
    recompute: Literal["none", "selective", "full"] = "none"  # activation recomputation (megatron)
    # uneven pipeline stages (megatron): layers on the first / last stage, the rest split evenly; 0 = even
    first_stage_layers: int = 0
    last_stage_layers: int = 0
    # megatron: ZeRO-1 (fp32 main grads, fp32 masters and Adam state sharded over DP, bucketed
    # reduce-scatter overlapped with the backward); needed for model.dtype=bfloat16 full fine-tuning
    distributed_optimizer: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.dp < 0 or self.micro_batch_size < 0:
            raise ConfigError("parallel.dp and parallel.micro_batch_size must be >= 0 (0 = automatic)")
        if self.cp != 1:
            raise ConfigError(f"parallel.cp: context parallelism is reserved and must be 1, got {self.cp}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel: needs parallel.tp > 1")
        for name in ("first_stage_layers", "last_stage_layers"):
            n = getattr(self, name)
            if n < 0 or (n and self.pp == 1):
                raise ConfigError(f"parallel.{name}={n}: must be >= 0 and needs parallel.pp > 1 (0 = an even split)")


@dataclass(kw_only=True)
class ZeroConfig:
    """DeepSpeed ZeRO (engine: deepspeed): what is partitioned across data-parallel ranks.

    stage 0 = plain data parallel, 1 = optimizer states, 2 = + gradients, 3 = + parameters.
    Offloading moves the partitioned optimizer states (and, at stage 3, the parameters) to host
    memory. A stage with `precision: bf16` runs DeepSpeed's bf16 mode (bf16 weights, fp32 master
    copies in the optimizer).
    """

    stage: int = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"  # stage 3 only
    cpu_adam: bool = False  # DeepSpeed's compiled CPU Adam for an offloaded optimizer (else torch AdamW)
    overlap_comm: bool = False  # overlap gradient reduction with backward (stage 2 / 3)
    reduce_bucket_size: int = 50_000_000  # elements per reduction bucket
    allgather_bucket_size: int = 50_000_000  # elements per all-gather bucket (stage 1 / 2)
    prefetch_bucket_size: int = 50_000_000  # stage 3: parameters fetched ahead of use
    max_live_parameters: int = 1_000_000_000  # stage 3: gathered parameters kept before releasing some
    max_reuse_distance: int = 1_000_000_000  # stage 3: keep a gathered parameter reused within this many

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero.stage: must be 0, 1, 2 or 3, got {self.stage}")
        if self.offload_params != "none" and self.stage != 3:
            raise ConfigError(f"zero.offload_params: parameter offload needs zero.stage=3, got stage {self.stage}")
        if self.offload_optimizer != "none" and self.stage == 0:
            raise ConfigError("zero.offload_optimizer: optimizer offload needs zero.stage >= 1")
        if self.overlap_comm and self.stage < 2:
            raise ConfigError(f"zero.overlap_comm: overlaps the gradient reduction of zero.stage 2 or 3, got stage {self.stage}")
        if self.cpu_adam and self.offload_optimizer == "none":
            raise ConfigError("zero.cpu_adam: DeepSpeed's CPU Adam runs an offloaded optimizer; set "
                              "zero.offload_optimizer=cpu")
        for name in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size", "max_live_parameters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"zero.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_reuse_distance < 0:
            raise ConfigError(f"zero.max_reuse_distance: must be >= 0, got {self.max_reuse_distance}")


@dataclass(kw_only=True)
class EvalConfig:
    tasks: list[str] = field(default_factory=list)  # local task names, see toolkit.eval.local_tasks
    batch_size: int = 32
    task_sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # e.g. {rt-sentiment: {n_test: 400}}

    def __post_init__(self) -> None:
        check_sizes("eval", self, {"batch_size": 1})


@dataclass(kw_only=True)
class ExportConfig:
    """The encoder folders a run writes (each stage's `final/`, `embedforge export`): they are served at
    their own length, not at the training crop (data.max_length) nor model.max_length."""

    # tokens `SentenceTransformer(folder)` and `Encoder.from_pretrained(folder)` encode at (its
    # sentence_bert_config.json and embedforge.json); 0 = auto: the model's context
    # (max_position_embeddings), at most 512 (the length the LLM2Vec paper evaluates at) or
    # model.max_length when that is longer
    max_seq_length: int = 0

    def __post_init__(self) -> None:
        if self.max_seq_length < 0:
            raise ConfigError("export.max_seq_length: must be >= 1 (or 0: auto, the model's context at most 512 "
                              f"or model.max_length), "
                              f"got {self.max_seq_length}")


@dataclass(kw_only=True)
class RunConfig:
    output_dir: str  # relative: to the current directory (a recipe's other paths: to its folder, see load_config)
    seed: int = 0
    engine: str = "hf"  # a registered engine (toolkit.engines.spec checks the name and what it supports)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: this rank's GPU when CUDA is present (engines that run on it)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)  # engine: deepspeed
    model: ModelConfig
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    stages: list[StageConfig]
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if not names:
            raise ConfigError("stages: at least one stage is required")
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: stage names must be unique, got {names}")
        teachers = [s.name for s in self.stages if s.objective.kind == "teacher"]
        if teachers and len(teachers) != len(self.stages):
            raise ConfigError(f"stages: {teachers} fine-tune a teacher (objective.kind=teacher), the others an encoder; "
                              "a recipe trains one of the two (the D2LLM student is its own recipe)")
        if len(teachers) > 1:
            raise ConfigError(f"stages: {teachers}: a teacher recipe has one teacher stage (its folder is a causal LM, "
                              "not the start of another stage); fine-tune further from it in a new recipe")
        if teachers and self.model.bidirectional:
            raise ConfigError("model.bidirectional: a teacher (objective.kind=teacher) is the causal LLM; set "
                              "model.bidirectional: false")
        students = [s for s in self.stages if s.objective.kind == "d2llm"]
        shapes = {(s.objective.d2llm.iem_hidden, s.objective.d2llm.cosine_scale) for s in students}
        if len(shapes) > 1:  # one IEM goes through a run's D2LLM stages: refused now, not after a stage
            raise ConfigError("stages: the d2llm stages " + ", ".join(
                f"{s.name} (iem_hidden {s.objective.d2llm.iem_hidden}, cosine_scale {s.objective.d2llm.cosine_scale:g})"
                for s in students) + " train one IEM: give them the same d2llm.iem_hidden and d2llm.cosine_scale")
        for s in self.stages:
            if s.objective.kind == "d2llm" and (s.objective.d2llm.in_batch or s.objective.d2llm.rank_pairwise) \
                    and s.data.batch_size < 2:
                raise ConfigError(f"stages.{s.name}.data.batch_size: d2llm's in-batch terms (d2llm.in_batch, "
                                  f"d2llm.rank_pairwise) need >= 2 queries per batch, got {s.data.batch_size}")


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), cls: type = RunConfig, *,
                relative_to_recipe: bool = True) -> Any:
    """Load `path` (YAML) into `cls`, apply `key.sub=value` overrides; errors name file and field.

    Relative paths in the file (model.path, data.path, objective.teacher.prompt_file) resolve against
    its folder (toolkit.recipe_paths); output_dir and the overrides stay relative to the current
    directory. A run's own `config.yaml` records the paths it ran with: load it with
    `relative_to_recipe=False`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    if relative_to_recipe:
        try:
            resolve_recipe_paths(data, path.parent)
        except InputError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for item in overrides:
        key, value = parse_override(item)
        set_path(data, key, value)
    try:
        return build_dataclass(cls, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_from_dict(data: dict, cls: type = RunConfig, source: str = "<dict>") -> Any:
    """`data` as a RunConfig (or `cls`); errors name `source` and the field."""
    return from_dict(data, cls, source)
