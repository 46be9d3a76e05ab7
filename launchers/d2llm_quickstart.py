"""The D2LLM quickstart on real weights and real text, on a CPU: teacher -> student -> comparison.

1. Data: WordNet pairs (a definition -> its synset's example sentences) of the TRAINING families; hard
   negatives = the sibling synset's examples plus BM25 (`data mine`).
2. Teacher: `configs/d2llm/teacher.yaml` fine-tunes SmolLM2-135M-Instruct as a yes/no cross-encoder
   on them (`objective.kind: teacher`, LoRA merged into a teacher folder).
3. The fine-tuned teacher scores the positive, the hard negatives and the in-batch pairs of planned
   groups (`teacher score`, with the prompt it was trained with).
4. Students on the same backbone and pairs: the D2LLM recipe (`configs/d2llm/quickstart.yaml`: LoRA +
   PMA + IEM, distilled from the scores) and the baseline without a teacher (the same recipe with the
   supervised contrastive objective, scored by cosine).
5. Held-out families: each query (a definition) reranks `n_candidates` candidates (its own examples +
   the BM25 top others among held-out documents). Rows: random (expected), BM25, the untrained student,
   the contrastive-only student, the distilled student, the fine-tuned teacher and the teacher before
   fine-tuning; MRR / nDCG / top-1 with their standard errors over the queries, rank correlation with
   the fine-tuned teacher, and the query-time cost per candidate of the teacher (an LLM pass over the
   pair) and of the student (one IEM pair on precomputed passages).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from launchers.recipes import RECIPES_DIR
from toolkit.config import load_config
from toolkit.errors import EmbedforgeError

TEACHER_CONFIG = RECIPES_DIR / "d2llm" / "teacher.yaml"


def _prepare_pairs(data: Path, n_train: int) -> Path:
    """WordNet training pairs with mined hard negatives (sibling examples + BM25), built once."""
    from data_pipelines.mining import mine
    from data_pipelines.writer import build_shards
    from toolkit.asset_splits import wordnet_training_pairs

    mined = data / "mined"
    if (mined / "manifest.json").is_file():
        return mined
    data.mkdir(parents=True, exist_ok=True)
    raw = data / "pairs.jsonl"  # `data` is per training-set size: another --train-queries builds its own
    raw.write_text("".join(json.dumps(p) + "\n" for p in wordnet_training_pairs(n_train)))
    if not (data / "pairs" / "manifest.json").is_file():
        build_shards([str(raw)], data / "pairs", "pair")
    mine(str(data / "pairs"), str(mined), method="bm25", k=2, keep_existing=True)
    return mined


def _score(teacher: Path, mined: Path, scored: Path, group: int, log) -> Path:
    """The teacher's scores of every pair the student reads (`teacher score`, resumable)."""
    from toolkit.teacher.job import ScoreJob, finish, pending_shards, run_local, teacher_settings

    prompt, symmetric = teacher_settings(str(teacher))
    job = ScoreJob(model=str(teacher), input=str(mined), output=str(scored), group_size=group, prompt=prompt,
                   symmetric_tasks=symmetric)
    if pending_shards(job)[1]:  # (refuses an output scored with other settings: another teacher)
        t0 = time.perf_counter()
        run_local(job)
        log(f"teacher scored the training pairs in {time.perf_counter() - t0:.0f} s")
    if finish(job, pending_shards(job)[0]) is None:
        raise EmbedforgeError(f"{scored}: teacher scoring did not finish")
    return scored


def _train(cfg, resume: str) -> tuple[Path, float]:
    from toolkit.train import Trainer

    t0 = time.perf_counter()
    outcomes = Trainer(cfg, resume=resume).run()
    if any(o.final_dir is None for o in outcomes):
        raise EmbedforgeError(f"{cfg.output_dir}: training stopped before the end; rerun to resume")
    return outcomes[-1].final_dir, time.perf_counter() - t0


def _heldout(n_queries: int, n_candidates: int) -> list[dict]:
    """Held-out queries, each with its own document and the BM25 top others (held-out documents only)."""
    from data_pipelines.mining import BM25, top_k_excluding
    from toolkit.asset_splits import wordnet_document
    from toolkit.eval.local_tasks import WordNetRetrieval

    synsets = WordNetRetrieval(n_queries=n_queries).synsets()
    docs = [wordnet_document(s) for s in synsets]
    scores = BM25(docs).scores([s.definition for s in synsets])
    others = top_k_excluding(scores, docs, docs, n_candidates - 1)
    return [{"query": s.definition, "candidates": [docs[i]] + [docs[j] for j in others[i]]}
            for i, s in enumerate(synsets)]


def _per_query(scores: np.ndarray) -> dict[str, np.ndarray]:
    """Reciprocal rank, nDCG and top-1 of each query; its relevant item is column 0 (ties count against it)."""
    rank = (scores >= scores[:, :1]).sum(axis=1)
    return {"mrr": 1.0 / rank, "ndcg": 1.0 / np.log2(rank + 1), "top1": (rank == 1).astype(np.float64)}


def _ranking(scores: np.ndarray) -> dict[str, float]:
    """Mean MRR, nDCG and top-1 over the queries, and each one's standard error (`<metric>_se`)."""
    out = {}
    for name, values in _per_query(scores).items():
        out[name] = float(values.mean())
        out[f"{name}_se"] = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return out


def _random_ranking(n_queries: int, n_candidates: int) -> dict[str, float]:
    """The expected metrics of a uniformly random order (rank of the relevant item uniform in 1..n)."""
    ranks = np.arange(1, n_candidates + 1, dtype=np.float64)
    rows = {"mrr": 1.0 / ranks, "ndcg": 1.0 / np.log2(ranks + 1), "top1": (ranks == 1).astype(np.float64)}
    return {k: v for name, values in rows.items() for k, v in
            ((name, float(values.mean())), (f"{name}_se", float(values.std() / math.sqrt(n_queries))))}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    def ranks(x):
        return np.argsort(np.argsort(x, axis=1), axis=1).astype(np.float64)

    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return float(np.mean((ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))))


def _student_scores(encoder, evalset: list[dict], instruction: str) -> tuple[np.ndarray, dict]:
    """IEM logits [queries, candidates]; per-candidate IEM time on precomputed passage projections."""
    iem = encoder.iem
    n_c = len(evalset[0]["candidates"])
    y_q = torch.from_numpy(encoder.encode([e["query"] for e in evalset], instruction=instruction, normalize=False))
    t0 = time.perf_counter()
    y_p = torch.from_numpy(encoder.encode([c for e in evalset for c in e["candidates"]], normalize=False))
    passage_s = time.perf_counter() - t0
    with torch.inference_mode():
        u_p = iem.passage_proj(y_p).view(len(evalset), n_c, -1)  # offline in a real index
        u_q = iem.query_proj(y_q)[:, None]
        t0 = time.perf_counter()
        for _ in range(5):
            z, _ = iem.score_proj(u_q, u_p, False)
        pair_s = (time.perf_counter() - t0) / 5 / z.numel()
    return z.numpy(), {"pair_s": pair_s, "passage_encode_s": passage_s / y_p.shape[0],
                       "pair_flops": iem.flops_per_pair()}


def _cosine_scores(encoder, evalset: list[dict], instruction: str) -> np.ndarray:
    """A bi-encoder without an IEM: cosine of the instructed query and each candidate [queries, candidates]."""
    n_c = len(evalset[0]["candidates"])
    q = encoder.encode([e["query"] for e in evalset], instruction=instruction)
    p = encoder.encode([c for e in evalset for c in e["candidates"]]).reshape(len(evalset), n_c, -1)
    return np.einsum("qd,qcd->qc", q, p)


def _teacher_scores(folder: Path, evalset: list[dict], instruction: str) -> tuple[np.ndarray, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.models.yes_no import instructed_query
    from toolkit.teacher.job import teacher_settings
    from toolkit.teacher.scoring import Teacher

    llm = AutoModelForCausalLM.from_pretrained(folder)
    teacher = Teacher(llm, AutoTokenizer.from_pretrained(folder), teacher_settings(str(folder))[0])
    queries = [instructed_query(e["query"], instruction) for e in evalset for _ in e["candidates"]]
    passages = [c for e in evalset for c in e["candidates"]]
    t0 = time.perf_counter()
    s, _ = teacher.score(queries, passages, batch_size=16)
    pair_s = (time.perf_counter() - t0) / len(passages)
    tokens = float(np.mean([len(teacher.render(q, p, False)) for q, p in zip(queries[:64], passages[:64])]))
    n_params = sum(p.numel() for p in llm.parameters()) - llm.get_input_embeddings().weight.numel()
    cost = {"pair_s": pair_s, "pair_flops": 2.0 * n_params * tokens, "prompt_tokens": tokens}  # no vocab projection
    return s.numpy().reshape(len(evalset), len(evalset[0]["candidates"])), cost


def run_d2llm_quickstart(config: Path, overrides: list[str], *, teacher_config: Path = TEACHER_CONFIG,
                         n_train: int = 384, n_eval: int = 64, n_candidates: int = 8, resume: str = "auto") -> dict:
    from data_pipelines.mining import BM25
    from toolkit.asset_splits import WN_INSTRUCTION
    from toolkit.models.encoder import Encoder
    from toolkit.models.loading import build_encoder, resolve_model_path

    t_start = time.perf_counter()
    cfg = load_config(config, overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"data-{n_train}"
    mined = _prepare_pairs(data, n_train)
    teacher_cfg = load_config(teacher_config, [f"output_dir={out / 'teacher'}",
                                               f"stages.0.data.path={mined}"])
    teacher, teacher_s = _train(teacher_cfg, resume)
    print(f"teacher fine-tuned in {teacher_s:.0f} s: {teacher}", flush=True)
    group = cfg.stages[0].data.batch_size
    scored = _score(teacher, mined, data / "scored", group, print)
    student_cfg = load_config(config, [*overrides, f"stages.0.data.path={scored}"])
    student, student_s = _train(student_cfg, resume)
    baseline_cfg = load_config(config, [*overrides, f"output_dir={out / 'contrastive'}",
                                        f"stages.0.data.path={scored}", "stages.0.objective.kind=supervised",
                                        "stages.0.name=contrastive"])
    baseline, baseline_s = _train(baseline_cfg, resume)

    evalset = _heldout(n_eval, n_candidates)
    teacher_scores, teacher_cost = _teacher_scores(teacher, evalset, WN_INSTRUCTION)
    base_scores, _ = _teacher_scores(resolve_model_path(teacher_cfg.model.path), evalset, WN_INSTRUCTION)
    bm25 = np.stack([BM25(e["candidates"]).scores([e["query"]])[0] for e in evalset])
    distilled, cost = _student_scores(Encoder.from_pretrained(student), evalset, WN_INSTRUCTION)
    contrastive = _cosine_scores(Encoder.from_pretrained(baseline), evalset, WN_INSTRUCTION)
    untrained_enc, _ = build_encoder(cfg.model, cfg.pooling, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    untrained_enc.add_iem(cfg.stages[0].objective.d2llm.iem_hidden, cfg.stages[0].objective.d2llm.cosine_scale)
    untrained, _ = _student_scores(untrained_enc.eval(), evalset, WN_INSTRUCTION)

    untrained_name = "student, untrained (random IEM" + (" + cosine skip)" if untrained_enc.iem.cosine_scale else ")")
    scores = {"BM25 (first-stage order)": bm25, untrained_name: untrained,
              "student, contrastive only (no teacher)": contrastive, "student, distilled (D2LLM)": distilled,
              "teacher, fine-tuned (yes/no)": teacher_scores, "teacher before fine-tuning": base_scores}
    rows = {"random order (expected)": _random_ranking(len(evalset), n_candidates),
            **{name: _ranking(s) for name, s in scores.items()}}
    rho = {name: _spearman(s, teacher_scores) for name, s in scores.items()}
    result = {"rows": rows, "spearman_vs_teacher": rho, "n_queries": len(evalset), "n_candidates": n_candidates,
              "teacher": str(teacher_cfg.model.path),
              "cost": {"teacher_pair_s": teacher_cost["pair_s"], "teacher_pair_flops": teacher_cost["pair_flops"],
                       "teacher_prompt_tokens": teacher_cost["prompt_tokens"], "student_pair_s": cost["pair_s"],
                       "student_pair_flops": cost["pair_flops"], "student_passage_encode_s": cost["passage_encode_s"]},
              "seconds": {"teacher": teacher_s, "student": student_s, "contrastive": baseline_s},
              "total_seconds": time.perf_counter() - t_start}
    table = format_result(result)
    (out / "d2llm_quickstart_results.json").write_text(json.dumps(result, indent=2))
    (out / "d2llm_quickstart_table.md").write_text(table + "\n")
    print(table)
    return result


def format_result(r: dict) -> str:
    lines = [f"held-out WordNet families: {r['n_queries']} queries x {r['n_candidates']} candidates (own examples + "
             "BM25 top held-out documents); +- one standard error over the queries", "",
             "| ranker | MRR | nDCG | top-1 | Spearman vs fine-tuned teacher |", "|---|---|---|---|---|"]
    for name, m in r["rows"].items():
        rho = r["spearman_vs_teacher"].get(name)
        corr = "" if rho is None else f"{rho:.3f}"
        cells = " | ".join(f"{100 * m[k]:.1f} +- {100 * m[k + '_se']:.1f}" for k in ("mrr", "ndcg", "top1"))
        lines.append(f"| {name} | {cells} | {corr} |")
    c = r["cost"]
    sec = r["seconds"]
    lines += ["", "| query-time cost per candidate | FLOPs | wall time |", "|---|---|---|",
              f"| teacher: one LLM pass over the pair ({c['teacher_prompt_tokens']:.0f} tokens) | "
              f"{c['teacher_pair_flops'] / 1e9:.1f} G | {1e3 * c['teacher_pair_s']:.1f} ms |",
              f"| student: one IEM pair (passage precomputed) | {c['student_pair_flops'] / 1e6:.2f} M | "
              f"{1e6 * c['student_pair_s']:.2f} us |",
              f"| (student, offline: encoding one passage) | | {1e3 * c['student_passage_encode_s']:.1f} ms |",
              "", f"teacher / student per candidate: {c['teacher_pair_flops'] / c['student_pair_flops']:,.0f}x FLOPs, "
              f"{c['teacher_pair_s'] / c['student_pair_s']:,.0f}x wall time; training: teacher {sec['teacher']:.0f} s, "
              f"student {sec['student']:.0f} s, contrastive baseline {sec['contrastive']:.0f} s; "
              f"total {r['total_seconds']:.0f} s"]
    return "\n".join(lines)
