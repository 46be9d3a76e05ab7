"""D2LLM semantic search: passages are encoded once, queries are cheap.

An index folder holds, for every passage, its pooled student embedding y_p and its IEM projection
u_p = W1b y_p (float32 .npy files, memory-mapped when searched), the passages themselves and the
student folder it was built with. A query costs one student encoding plus u_q = W1a y_q + b1; each
candidate then costs relu(u_q + u_p), one hidden x hidden matvec and a dot.

Two ways to search: `rerank` (a first-stage dot-product top-N over the normalised embeddings, then
the IEM scores those N) or `scan` (the IEM scores every passage, in blocks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from toolkit.atomic import atomic_dir
from toolkit.errors import CheckpointError, InputError, MissingPathError, PathExistsError
from toolkit.models.encoder import Encoder

META = "index.json"
EMBEDDINGS, PROJECTIONS, PASSAGES = "embeddings.npy", "projections.npy", "passages.jsonl"


def build_index(student_dir: str | Path, passages: Sequence[str], output: str | Path, *, ids: Sequence[str] | None = None,
                batch_size: int = 32, overwrite: bool = False) -> Path:
    """Encode `passages` with the student and write the index folder (atomically)."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise PathExistsError(f"{output}: already exists; pass --overwrite to replace it")
    student = Encoder.from_pretrained(student_dir)
    if student.iem is None:
        raise CheckpointError(f"{student_dir}: not a D2LLM student (no IEM in its embedforge.json); train one with "
                              "objective.kind d2llm")
    if not passages:
        raise InputError("search index: no passages to index")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(passages))]
    raw = student.encode(list(passages), batch_size=batch_size, normalize=False)
    with torch.inference_mode():
        proj = student.iem.w1_passage(torch.from_numpy(raw)).numpy()  # W1b y_p (u_p: IEM.passage_proj_from)
    with atomic_dir(output) as tmp:
        np.save(tmp / EMBEDDINGS, raw.astype(np.float32))
        np.save(tmp / PROJECTIONS, proj.astype(np.float32))
        with (tmp / PASSAGES).open("w", encoding="utf-8") as fh:
            for pid, text in zip(ids, passages):
                fh.write(json.dumps({"id": pid, "text": text}, ensure_ascii=False) + "\n")
        (tmp / META).write_text(json.dumps({"student": str(Path(student_dir).resolve()), "passages": len(passages),
                                            "dim": int(raw.shape[1]), "iem_hidden": student.iem.hidden}, indent=1))
    return output


@dataclass
class Hit:
    id: str
    text: str
    score: float  # the IEM logit


class SearchIndex:
    def __init__(self, folder: str | Path, student_dir: str | Path | None = None):
        self.folder = Path(folder)
        meta_file = self.folder / META
        if not meta_file.is_file():
            raise MissingPathError(f"{meta_file}: not a search index (build one with `embedforge search index`)")
        self.meta = json.loads(meta_file.read_text())
        self.student = Encoder.from_pretrained(student_dir or self.meta["student"])
        self.embeddings = np.load(self.folder / EMBEDDINGS, mmap_mode="r")
        self.projections = np.load(self.folder / PROJECTIONS, mmap_mode="r")
        if self.embeddings.shape[0] != self.meta["passages"] or self.projections.shape[0] != self.meta["passages"]:
            raise InputError(f"{self.folder}: {EMBEDDINGS} / {PROJECTIONS} do not hold {self.meta['passages']} rows")
        if self.student.iem is None or self.projections.shape[1] != self.student.iem.hidden:
            raise InputError(f"{self.folder}: built with another student than {student_dir or self.meta['student']}")
        self.passages = [json.loads(line) for line in (self.folder / PASSAGES).read_text(encoding="utf-8").splitlines()]
        self._normed: np.ndarray | None = None

    def _first_stage(self, y_q: np.ndarray, n: int) -> np.ndarray:
        """Top-n passage indices per query by cosine of the pooled embeddings."""
        if self._normed is None:
            e = np.asarray(self.embeddings, dtype=np.float32)
            self._normed = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        q = y_q / np.maximum(np.linalg.norm(y_q, axis=1, keepdims=True), 1e-12)
        sims = q @ self._normed.T
        n = min(n, sims.shape[1])
        top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
        return np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1), axis=1)

    @torch.inference_mode()
    def search(self, queries: Sequence[str], k: int = 10, *, mode: str = "rerank", first_stage: int = 100,
               instruction: str | None = None, symmetric: bool = False, block: int = 4096) -> list[list[Hit]]:
        """The k best passages per query by the IEM's logit (`rerank`: among the first stage's top N)."""
        if mode not in ("rerank", "scan"):
            raise InputError(f"search mode must be rerank or scan, got {mode!r}")
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        iem = self.student.iem
        y_q = self.student.encode(list(queries), instruction=instruction, normalize=False)
        u_q = iem.query_proj(torch.from_numpy(y_q))  # [Q, H]
        results = []
        if mode == "rerank":
            candidates = self._first_stage(y_q, max(k, first_stage))
            for qi, cand in enumerate(candidates):
                z, _ = iem.score_proj(u_q[qi][None], self._u_p(np.sort(cand)), symmetric)
                results.append(self._hits(np.sort(cand), z.numpy(), k))
        else:
            n = self.projections.shape[0]
            scores = np.empty((len(queries), n), dtype=np.float32)
            for start in range(0, n, block):
                u_p = self._u_p(slice(start, start + block))
                z, _ = iem.score_proj(u_q[:, None], u_p[None], symmetric)
                scores[:, start : start + u_p.shape[0]] = z.numpy()
            for qi in range(len(queries)):
                results.append(self._hits(np.arange(n), scores[qi], k))
        return results

    def _u_p(self, rows: np.ndarray | slice) -> torch.Tensor:
        """The IEM's u_p of these passages from the stored W1b y_p (and their embeddings: cosine skip)."""
        stored = torch.from_numpy(np.array(self.projections[rows], dtype=np.float32))  # a copy: writable
        embeddings = torch.from_numpy(np.array(self.embeddings[rows], dtype=np.float32)) \
            if self.student.iem.cosine_scale else None
        return self.student.iem.passage_proj_from(stored, embeddings)

    def _hits(self, indices: np.ndarray, scores: np.ndarray, k: int) -> list[Hit]:
        order = np.argsort(-scores, kind="stable")[:k]
        return [Hit(self.passages[indices[i]]["id"], self.passages[indices[i]]["text"], float(scores[i])) for i in order]
