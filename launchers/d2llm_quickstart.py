"""The D2LLM quickstart on real weights and real text, on a CPU: teacher -> student -> comparison.

1. Data: WordNet pairs (a definition -> its synset's example sentences) of the TRAINING families; hard
   negatives = the sibling synset's examples plus BM25 (`data mine`); scored by the teacher
   (SmolLM2-135M-Instruct, yes/no) for the positive, the hard negatives and the in-batch pairs of
   planned groups (`teacher score`).
2. The student recipe (`configs/d2llm/quickstart.yaml`: SmolLM2 + LoRA + PMA + IEM) trains on it.
3. Held-out families: each query (a definition) reranks 8 candidates (its own examples + the BM25
   top others among held-out documents). Rows: BM25's order, the untrained student, the trained
   student, the teacher; rank correlation student <-> teacher; the query-time cost per candidate of
   the teacher (an LLM pass over the pair) and of the student (one IEM pair on precomputed passages).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from toolkit.config import load_config
from toolkit.errors import EmbedforgeError


def _prepare_data(cfg, out: Path, n_train: int, group: int, log) -> Path:
    from data_pipelines.mining import mine
    from data_pipelines.writer import build_shards
    from toolkit.asset_splits import wordnet_training_pairs
    from toolkit.teacher.job import ScoreJob, finish, pending_shards, run_local

    data = out / "data"
    scored = data / "scored"
    if (scored / "manifest.json").is_file():
        return scored
    data.mkdir(parents=True, exist_ok=True)
    raw = data / "pairs.jsonl"
    raw.write_text("".join(json.dumps(p) + "\n" for p in wordnet_training_pairs(n_train)))
    if not (data / "pairs" / "manifest.json").is_file():
        build_shards([str(raw)], data / "pairs", "pair")
    if not (data / "mined" / "manifest.json").is_file():
        mine(str(data / "pairs"), str(data / "mined"), method="bm25", k=2, keep_existing=True)
    job = ScoreJob(model=cfg.model.path, input=str(data / "mined"), output=str(scored), group_size=group)
    t0 = time.perf_counter()
    run_local(job)
    if finish(job, pending_shards(job)[0]) is None:
        raise EmbedforgeError(f"{scored}: teacher scoring did not finish")
    log(f"teacher scored {n_train} training queries in {time.perf_counter() - t0:.0f} s")
    return scored


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


def _ranking(scores: np.ndarray) -> dict[str, float]:
    """MRR, nDCG and top-1 over candidate lists whose relevant item is column 0 (ties count against it)."""
    from toolkit.eval.local_tasks import retrieval_metrics

    n, relevant = scores.shape[1], np.zeros(len(scores), dtype=int)
    full = retrieval_metrics(scores, relevant, k=n)
    return {"mrr": full[f"mrr@{n}"], "ndcg": full[f"ndcg@{n}"],
            "top1": retrieval_metrics(scores, relevant, k=1)["recall@1"]}


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


def run_d2llm_quickstart(config: Path, overrides: list[str], *, n_train: int = 192, n_eval: int = 64,
                         n_candidates: int = 8, resume: str = "auto") -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.asset_splits import WN_INSTRUCTION
    from toolkit.models.encoder import Encoder
    from toolkit.models.loading import build_encoder, resolve_model_path
    from toolkit.teacher.scoring import Teacher
    from toolkit.train import Trainer

    cfg = load_config(config, overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    _prepare_data(cfg, out, n_train, cfg.stages[0].data.batch_size, print)
    t0 = time.perf_counter()
    outcomes = Trainer(cfg, resume=resume).run()
    train_s = time.perf_counter() - t0
    if any(o.final_dir is None for o in outcomes):
        raise EmbedforgeError("student training stopped before the end; rerun to resume")

    evalset = _heldout(n_eval, n_candidates)
    queries = [WN_INSTRUCTION + "\n" + e["query"] for e in evalset for _ in e["candidates"]]
    passages = [c for e in evalset for c in e["candidates"]]
    path = resolve_model_path(cfg.model.path)
    llm = AutoModelForCausalLM.from_pretrained(path)
    teacher = Teacher(llm, AutoTokenizer.from_pretrained(path))
    t0 = time.perf_counter()
    s, _ = teacher.score(queries, passages, batch_size=16)
    teacher_pair_s = (time.perf_counter() - t0) / len(passages)
    tokens = np.mean([len(teacher.render(q, p, False)) for q, p in zip(queries[:64], passages[:64])])
    n_params = sum(p.numel() for p in llm.parameters()) - llm.get_input_embeddings().weight.numel()
    teacher_scores = s.numpy().reshape(len(evalset), n_candidates)

    from data_pipelines.mining import BM25

    bm25 = np.stack([BM25(e["candidates"]).scores([e["query"]])[0] for e in evalset])
    student = Encoder.from_pretrained(outcomes[-1].final_dir)
    trained, cost = _student_scores(student, evalset, WN_INSTRUCTION)
    untrained_enc, _ = build_encoder(cfg.model, cfg.pooling, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    untrained_enc.add_iem(cfg.stages[0].objective.d2llm.iem_hidden)
    untrained, _ = _student_scores(untrained_enc.eval(), evalset, WN_INSTRUCTION)

    rows = {"BM25 (first-stage order)": _ranking(bm25), "student, untrained (random IEM)": _ranking(untrained),
            "student, trained (D2LLM)": _ranking(trained), "teacher (SmolLM2-135M-Instruct, yes/no)": _ranking(teacher_scores)}
    rho = {"student trained": _spearman(trained, teacher_scores), "student untrained": _spearman(untrained, teacher_scores),
           "BM25": _spearman(bm25, teacher_scores)}
    teacher_flops = 2.0 * n_params * tokens  # forward FLOPs of one prompt (no vocabulary projection)
    result = {"rows": rows, "spearman_vs_teacher": rho, "n_queries": len(evalset), "n_candidates": n_candidates,
              "cost": {"teacher_pair_s": teacher_pair_s, "teacher_pair_flops": teacher_flops,
                       "teacher_prompt_tokens": float(tokens), "student_pair_s": cost["pair_s"],
                       "student_pair_flops": cost["pair_flops"], "student_passage_encode_s": cost["passage_encode_s"]},
              "train_seconds": train_s, "total_seconds": time.perf_counter() - t_start}
    table = format_result(result)
    (out / "d2llm_quickstart_results.json").write_text(json.dumps(result, indent=2))
    (out / "d2llm_quickstart_table.md").write_text(table + "\n")
    print(table)
    return result


def format_result(r: dict) -> str:
    lines = [f"held-out WordNet families: {r['n_queries']} queries x {r['n_candidates']} candidates (own examples + "
             "BM25 top held-out documents)", "", "| ranker | MRR | nDCG | top-1 | Spearman vs teacher |", "|---|---|---|---|---|"]
    rho = {"BM25 (first-stage order)": r["spearman_vs_teacher"]["BM25"],
           "student, untrained (random IEM)": r["spearman_vs_teacher"]["student untrained"],
           "student, trained (D2LLM)": r["spearman_vs_teacher"]["student trained"]}
    for name, m in r["rows"].items():
        corr = f"{rho[name]:.3f}" if name in rho else "1"
        lines.append(f"| {name} | {100 * m['mrr']:.2f} | {100 * m['ndcg']:.2f} | {100 * m['top1']:.2f} | {corr} |")
    c = r["cost"]
    lines += ["", "| query-time cost per candidate | FLOPs | wall time |", "|---|---|---|",
              f"| teacher: one LLM pass over the pair ({c['teacher_prompt_tokens']:.0f} tokens) | "
              f"{c['teacher_pair_flops'] / 1e9:.1f} G | {1e3 * c['teacher_pair_s']:.1f} ms |",
              f"| student: one IEM pair (passage precomputed) | {c['student_pair_flops'] / 1e6:.2f} M | "
              f"{1e6 * c['student_pair_s']:.2f} us |",
              f"| (student, offline: encoding one passage) | | {1e3 * c['student_passage_encode_s']:.1f} ms |",
              "", f"teacher / student per candidate: {c['teacher_pair_flops'] / c['student_pair_flops']:,.0f}x FLOPs, "
              f"{c['teacher_pair_s'] / c['student_pair_s']:,.0f}x wall time; training {r['train_seconds']:.0f} s, "
              f"total {r['total_seconds']:.0f} s"]
    return "\n".join(lines)
