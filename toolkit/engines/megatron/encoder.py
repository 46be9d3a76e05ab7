"""An encoder folder evaluated as megatron stages at TP x PP: `MegatronEncoder.encode` is
`Encoder.encode` (same tokenization, instructions, length-sorted batches, Matryoshka `dim`) with the
backbone's forward running on this rank's stage only, so an encoder that fits no single device or
process can be evaluated or used to embed a corpus without being consolidated first.

Every rank of a model-parallel group calls `encode` with the same texts (the stages exchange
activations); the last stage pools each batch (its pooling head, the folder's weights) and the
embeddings are broadcast to every rank of the group, so each returns the same array.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch
from torch import Tensor

from toolkit.distributed.parallel_dims import ParallelDims
from toolkit.engines.megatron.inference import MegatronForward
from toolkit.engines.megatron.model import padding_mask
from toolkit.errors import CheckpointError
from toolkit.models.encoder import Encoder, check_safetensors
from toolkit.models.folder import SPEC_FILE, load_iem_weights, load_pooling_weights, load_spec
from toolkit.models.pooling import Pooling

BATCHES_PER_SCHEDULE = 32  # micro-batches per pipeline schedule (the stages overlap within one)


class MegatronEncoder(Encoder):
    def __init__(self, folder: Path, dims: ParallelDims, *, dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer

        folder = Path(folder)
        spec = load_spec(folder / SPEC_FILE)
        if not spec.bidirectional:
            raise CheckpointError(f"{folder / SPEC_FILE}: a causal encoder; the megatron forward is bidirectional")
        check_safetensors(folder)
        forward = MegatronForward(folder, dims, dtype=dtype, max_length=spec.max_length, weights_prefix="model.")
        pooling = Pooling(spec.pooling, forward.arch.hidden_size)
        load_pooling_weights(pooling, folder, required=True)
        super().__init__(None, AutoTokenizer.from_pretrained(folder), pooling.to(forward.device), spec)
        self.forward_stages = forward
        if self.iem is not None:  # a D2LLM student: its pair scorer, as Encoder.from_pretrained loads it
            load_iem_weights(self, folder)
        self.writes = dims.is_group_writer  # of the group's ranks, the one that writes

    @property
    def device(self) -> torch.device:
        return self.forward_stages.device

    def embed_batches(self, batches: Iterable[dict]) -> Iterator[Tensor]:
        stages, batches = self.forward_stages, iter(batches)
        while window := list(islice(batches, BATCHES_PER_SCHEDULE)):
            def pool(hidden: Tensor, index: int, window=window) -> Tensor:
                b = window[index]
                return self.pooling(hidden.float(), b["attention_mask"].to(hidden.device),
                                    b["embed_mask"].to(hidden.device))

            embs = stages.run([(b["input_ids"], padding_mask(b["attention_mask"])) for b in window], pool)
            yield from stages.broadcast(embs, [(b["input_ids"].shape[0], self.pooling.output_dim) for b in window])
