#!/usr/bin/env python
"""Reference-side throughput driver: the paper authors' ``llm2vec==0.2.3``.

Runs ONLY inside the reference venv made by ``bench/setup_reference_env.sh`` (transformers 4.47.1);
it never imports Embedforge's ``toolkit``.  It drives llm2vec the way the authors' experiment
scripts (``experiments/run_mntp.py``, ``run_simcse.py``, ``run_supervised.py`` of the llm2vec
repository, which the PyPI package does not ship) train, but with a plain loop that does the same
per-step work as their HF ``Trainer`` (collate -> forward -> loss -> backward -> clip-grad 1.0 ->
AdamW -> linear LR schedule -> zero_grad), so that each step can be timed.

    .venv-llm2vec/bin/python bench/reference_llm2vec.py --model DIR --workload mntp \
        --batch-size 8 --seq-len 128 --warmup-steps 3 --steps 5 --threads 2 [--texts FILE.jsonl]

stdout gets exactly ONE JSON line (everything else goes to stderr):
    {"impl": "llm2vec-0.2.3", "workload": ..., "tokens_per_s": ..., "real_tokens_per_s": ...,
     "padded_tokens_per_s": ..., "step_s": ..., "peak_rss_mb": ..., "loss": ..., ...extra keys}

Token accounting (identical for every workload): every forward pass of the transformer is seen
by a pre-hook on the innermost HF model; ``real`` tokens are the non-pad tokens (sum of the
attention mask), ``padded`` tokens are ``input_ids.numel()``.  So SimCSE counts both dropout views,
supervised counts query + positive + negative.  ``tokens_per_s`` == ``real_tokens_per_s``.

Other helpers:
    --make-tiny-model OUT --tokenizer-from DIR   write a tiny random Llama (hidden 64, 2 layers)
                                                 with DIR's tokenizer, loadable by 4.47 and 5.x
    --self-check                                  check that the reference model really is
                                                 bidirectional and padding-invariant here
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import warnings

IMPL = "llm2vec-0.2.3"
SEPARATOR = "!@#$%^&*()"  # llm2vec's instruction/text separator (E5Data, LLM2Vec.tokenize)
# Instruction used for synthetic / instruction-less supervised triples (E5 msmarco prompt).
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
LORA_MODULES = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Per-workload defaults taken from the authors' train_configs/*/MetaLlama3.json + script defaults.
WORKLOAD_DEFAULTS = {
    # run_mntp.py: HF TrainingArguments default lr 5e-5 (configs do not set it), no warmup
    "mntp": dict(lr=5e-5, sched_warmup=0, total_steps=1000),
    # train_configs/simcse: lr 3e-5, loss_scale 20, simcse_dropout 0.3
    "simcse": dict(lr=3e-5, sched_warmup=0, total_steps=1000, loss_scale=20.0, attn_dropout=0.3),
    # train_configs/supervised: lr 2e-4, warmup 300, loss_scale default 50 (run_supervised.py)
    "supervised": dict(lr=2e-4, sched_warmup=300, total_steps=1000, loss_scale=50.0),
    "encode": dict(),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF Llama/Mistral folder (transformers 4.x or 5.x format)")
    p.add_argument("--workload", choices=["mntp", "simcse", "supervised", "encode"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128,
                   help="max tokens per text (truncation); MNTP grouped mode: block size")
    p.add_argument("--steps", type=int, default=5, help="timed steps (encode: timed batches)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--texts", help='JSONL: {"text": ...}; supervised: {"query","positive","negative"'
                                   '[,"instruction"]}. Default: deterministic synthetic text')
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="paper: bfloat16 on A100; float32 is the CPU default here")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                   help="paper: flash_attention_2 (GPU only); their scripts' default is sdpa")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="non-reentrant, as the paper's configs (off by default on CPU)")
    p.add_argument("--mntp-data", choices=["padded", "grouped"], default="padded",
                   help="padded: one text per row, padded to the longest in the batch (run_mntp.py "
                        "--line_by_line); grouped: texts concatenated and cut into --seq-len blocks "
                        "(run_mntp.py default, no padding)")
    p.add_argument("--mntp-collator", choices=["default", "all_mask"], default="default",
                   help="default: BERT 80/10/10 (Llama configs); all_mask: 100%% mask (Mistral)")
    p.add_argument("--mlm-probability", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=None, help="override the workload's paper LR")
    p.add_argument("--make-tiny-model", metavar="OUT", help="write a tiny random Llama folder and exit")
    p.add_argument("--tokenizer-from", metavar="DIR", help="tokenizer source for --make-tiny-model")
    p.add_argument("--self-check", action="store_true",
                   help="check bidirectionality / padding invariance of the reference model and exit")
    a = p.parse_args(argv)
    if not a.make_tiny_model and not a.model:
        p.error("--model is required")
    if not a.make_tiny_model and not a.self_check and not a.workload:
        p.error("--workload is required")
    if a.make_tiny_model and not a.tokenizer_from:
        p.error("--make-tiny-model needs --tokenizer-from")
    return a


def log(msg):
    print(f"[reference_llm2vec] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --------------------------------------------------------------------------------------------
# transformers 5.x -> 4.47 folder compatibility
# --------------------------------------------------------------------------------------------
def compat_model_dir(model_dir):
    """Return (dir, fixes): a folder transformers 4.47.1 loads with the right hyper-parameters.

    Folders written by transformers 5.x differ in ways 4.47 does not understand:
      * ``rope_parameters: {rope_theta, rope_type}`` replaces ``rope_theta`` / ``rope_scaling``;
        4.47 silently falls back to rope_theta=10000 (SmolLM2 needs 100000): wrong model, no error.
      * ``dtype`` replaces ``torch_dtype`` (harmless, mapped anyway).
      * ``tokenizer_config.json`` names ``tokenizer_class: TokenizersBackend`` -> AutoTokenizer
        raises; tokenizer.json itself is compatible, so ``PreTrainedTokenizerFast`` is named.
    If any applies, a shadow folder is made under a temp dir: patched JSON files, every other file
    symlinked (no weight copy).  llm2vec's own loaders (LLM2Vec.from_pretrained, *BiForMNTP)
    are then used unchanged on it.
    """
    import transformers
    fixes = []
    cfg_path = os.path.join(model_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    new_cfg = dict(cfg)
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" not in cfg:
        new_cfg["rope_theta"] = rp.get("rope_theta", 10000.0)
        rtype = rp.get("rope_type", "default")
        if rtype != "default":
            new_cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        fixes.append(f"config: rope_parameters -> rope_theta={new_cfg['rope_theta']}"
                     + (f", rope_scaling={new_cfg.get('rope_scaling')}" if rtype != "default" else ""))
    if "dtype" in cfg and "torch_dtype" not in cfg:
        new_cfg["torch_dtype"] = cfg["dtype"]
        fixes.append("config: dtype -> torch_dtype")

    tok_cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    new_tok_cfg = None
    if os.path.exists(tok_cfg_path):
        with open(tok_cfg_path) as f:
            tok_cfg = json.load(f)
        cls = tok_cfg.get("tokenizer_class")
        if cls and not hasattr(transformers, cls) and os.path.exists(os.path.join(model_dir, "tokenizer.json")):
            new_tok_cfg = dict(tok_cfg)
            new_tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            for k in ("backend", "is_local", "local_files_only"):
                new_tok_cfg.pop(k, None)
            fixes.append(f"tokenizer_config: tokenizer_class {cls} -> PreTrainedTokenizerFast")

    if not fixes:
        return model_dir, fixes
    shadow = tempfile.mkdtemp(prefix="l2v-compat-")
    for name in os.listdir(model_dir):
        if name in ("config.json",) or (name == "tokenizer_config.json" and new_tok_cfg is not None):
            continue
        os.symlink(os.path.abspath(os.path.join(model_dir, name)), os.path.join(shadow, name))
    with open(os.path.join(shadow, "config.json"), "w") as f:
        json.dump(new_cfg, f, indent=2)
    if new_tok_cfg is not None:
        with open(os.path.join(shadow, "tokenizer_config.json"), "w") as f:
            json.dump(new_tok_cfg, f, indent=2)
    for fx in fixes:
        log(f"compat fix: {fx}")
    return shadow, fixes


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
_WORDS = ("the of and to in is was for on that with as by at from his an were are which this be "
          "has had it not also or first one their its new after who they have her she two been other "
          "when there all during into school time may years more most only over city some world would "
          "where later up such used many can state about national out known university united then "
          "made government american film series team season between north under since while south "
          "river group war include well number several part early three people history music album "
          "game league family church named county area system public before called second major "
          "based each both same through against population company played around million language "
          "model train encoder token vector attention layer dense retrieval query passage semantic").split()


def synthetic_texts(n, seq_len, seed):
    """Deterministic pseudo-sentences whose lengths spread over ~[seq_len/4, seq_len] tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        nw = rng.randint(max(4, seq_len // 5), max(5, int(seq_len * 0.85)))
        out.append(" ".join(rng.choice(_WORDS) for _ in range(nw)).capitalize() + ".")
    return out


def synthetic_triples(n, seq_len, seed):
    rng = random.Random(seed + 1)
    docs = synthetic_texts(2 * n, seq_len, seed + 2)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 20))) + "?"
        out.append({"query": q, "positive": docs[2 * i], "negative": docs[2 * i + 1],
                    "instruction": DEFAULT_INSTRUCTION})
    return out


def load_records(path):
    recs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                recs.append(json.loads(line))
    if not recs:
        raise SystemExit(f"no records in {path}")
    return recs


def take(items, start, n):
    """items[start:start+n], cycling."""
    return [items[(start + i) % len(items)] for i in range(n)]


# --------------------------------------------------------------------------------------------
# model helpers (copies of the authors' experiment-script helpers, which PyPI does not ship)
# --------------------------------------------------------------------------------------------
def initialize_peft(model, lora_r=16, lora_alpha=32, lora_dropout=0.05, lora_modules=None):
    """experiments/run_{mntp,simcse,supervised}.py::initialize_peft (task_type=None, bias none)."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=lora_modules or LORA_MODULES,
                        lora_dropout=lora_dropout, bias="none", task_type=None)
    return get_peft_model(model, config)


def innermost_hf_model(m):
    """The HF *BiModel that actually runs the transformer (under PeftModel / LoraModel)."""
    from peft import PeftModel
    while True:
        if isinstance(m, PeftModel):
            m = m.get_base_model()
        elif hasattr(m, "get_model_for_peft"):  # *BiForMNTP
            m = m.model
        elif m.__class__.__name__ == "LLM2Vec":
            m = m.model
        else:
            return m


class TokenCounter:
    def __init__(self, hf_model):
        self.real = 0
        self.padded = 0
        self.passes = 0
        hf_model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        am = kwargs.get("attention_mask")
        if ids is None:
            return
        self.passes += 1
        self.padded += int(ids.numel())
        self.real += int(am.sum()) if am is not None else int(ids.numel())

    def snapshot(self):
        return self.real, self.padded, self.passes


def make_optimizer(model, lr, sched_warmup, total_steps):
    """HF Trainer defaults: adamw_torch, betas (0.9, 0.999), eps 1e-8, wd 0, linear schedule."""
    import torch
    from transformers import get_linear_schedule_with_warmup
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, sched_warmup, total_steps)
    return opt, sched, params


# --------------------------------------------------------------------------------------------
# workloads: each returns (step_fn, counter, meta); step_fn(i) runs step i and returns
# (loss or None, collate_seconds, examples)
# --------------------------------------------------------------------------------------------
def setup_mntp(args, model_dir, dtype):
    import torch
    from llm2vec.models import LlamaBiForMNTP, MistralBiForMNTP
    from transformers import AutoConfig, AutoTokenizer, DataCollatorForLanguageModeling

    config = AutoConfig.from_pretrained(model_dir)
    cls = {"LlamaConfig": LlamaBiForMNTP, "MistralConfig": MistralBiForMNTP}.get(config.__class__.__name__)
    if cls is None:  # run_mntp.py::get_model_class
        raise SystemExit(f"run_mntp.py supports Llama/Mistral only, got {config.__class__.__name__}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    if tokenizer.mask_token is None:  # mask_token_type "blank" (paper default)
        tokenizer.mask_token = "_"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = cls.from_pretrained(model_dir, config=config, torch_dtype=dtype, low_cpu_mem_usage=False,
                                attn_implementation=args.attn)
    # run_mntp.py: LoRA on the inner *BiModel, alpha = 2 * r
    peft_model = initialize_peft(model.get_model_for_peft(), lora_r=16, lora_alpha=32, lora_dropout=0.05)
    model.set_model_for_peft(peft_model)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    # Pre-tokenisation happens once in run_mntp.py (datasets.map) -> not timed here either.
    n_rows = args.batch_size * (args.warmup_steps + args.steps)
    if args.texts:
        texts = [r["text"] for r in load_records(args.texts)]
    else:
        texts = synthetic_texts(max(n_rows, 64), args.seq_len, args.seed)
    texts = [t for t in texts if len(t) > 0 and not t.isspace()]
    if args.mntp_data == "padded":  # --line_by_line branch of run_mntp.py
        enc = tokenizer(texts, padding=False, truncation=True, max_length=args.seq_len,
                        return_special_tokens_mask=True)
        rows = [{k: enc[k][i] for k in enc.keys()} for i in range(len(texts))]
    else:  # default branch: tokenize, concatenate, cut in max_seq_length blocks (group_texts)
        enc = tokenizer(texts, return_special_tokens_mask=True)
        cat = {k: [x for seq in enc[k] for x in seq] for k in enc.keys()}
        total = len(cat["input_ids"]) // args.seq_len * args.seq_len
        if total == 0:
            raise SystemExit("not enough text for one grouped block")
        rows = [{k: v[i:i + args.seq_len] for k, v in cat.items()} for i in range(0, total, args.seq_len)]
    coll_cls = DataCollatorForLanguageModeling
    if args.mntp_collator == "all_mask":
        coll_cls = _full_masking_collator_cls()
    collator = coll_cls(tokenizer=tokenizer, mlm_probability=args.mlm_probability, pad_to_multiple_of=None)

    d = WORKLOAD_DEFAULTS["mntp"]
    opt, sched, params = make_optimizer(model, args.lr or d["lr"], d["sched_warmup"], d["total_steps"])
    counter = TokenCounter(innermost_hf_model(model))

    def step(i):
        t0 = time.perf_counter()
        batch = collator(take(rows, i * args.batch_size, args.batch_size))
        t_coll = time.perf_counter() - t0
        out = model(**batch)  # LlamaForCausalLM.forward: full-vocab logits, shifted CE on labels
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach()), t_coll, args.batch_size

    return step, counter, {"mntp_data": args.mntp_data, "mntp_collator": args.mntp_collator,
                           "mask_token": tokenizer.mask_token, "mlm_probability": args.mlm_probability,
                           "lr": args.lr or d["lr"]}


def _full_masking_collator_cls():
    """run_mntp.py::DataCollatorForLanguageModelingWithFullMasking (100% mask token)."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    class DataCollatorForLanguageModelingWithFullMasking(DataCollatorForLanguageModeling):
        def torch_mask_tokens(self, inputs, special_tokens_mask=None):
            labels = inputs.clone()
            probability_matrix = torch.full(labels.shape, self.mlm_probability)
            if special_tokens_mask is None:
                special_tokens_mask = [self.tokenizer.get_special_tokens_mask(v, already_has_special_tokens=True)
                                       for v in labels.tolist()]
                special_tokens_mask = torch.tensor(special_tokens_mask, dtype=torch.bool)
            else:
                special_tokens_mask = special_tokens_mask.bool()
            probability_matrix.masked_fill_(special_tokens_mask, value=0.0)
            masked_indices = torch.bernoulli(probability_matrix).bool()
            labels[~masked_indices] = -100
            inputs[masked_indices] = self.tokenizer.convert_tokens_to_ids(self.tokenizer.mask_token)
            return inputs, labels

    return DataCollatorForLanguageModelingWithFullMasking


def load_llm2vec(args, model_dir, dtype, **extra):
    from llm2vec import LLM2Vec
    # run_simcse.py / run_supervised.py: LLM2Vec.from_pretrained(..., enable_bidirectional=True,
    # merge_peft=True, pooling_mode="mean", max_length=max_seq_length, torch_dtype, attn_implementation)
    return LLM2Vec.from_pretrained(base_model_name_or_path=model_dir, enable_bidirectional=True,
                                   peft_model_name_or_path=None, merge_peft=True, pooling_mode="mean",
                                   max_length=args.seq_len, torch_dtype=dtype,
                                   attn_implementation=args.attn, **extra)


def setup_contrastive(args, model_dir, dtype, workload):
    import torch
    from llm2vec.loss.utils import load_loss

    d = WORKLOAD_DEFAULTS[workload]
    extra = {"attention_dropout": d["attn_dropout"]} if workload == "simcse" else {}
    model = load_llm2vec(args, model_dir, dtype, **extra)
    # NOTE: the paper merges the MNTP LoRA first (merge_peft=True); merged weights cost the same,
    # and there is no trained adapter here, so the base weights are used.
    model.model = initialize_peft(model.model, lora_r=16, lora_alpha=32, lora_dropout=0.05)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss_fn = load_loss("HardNegativeNLLLoss", scale=d["loss_scale"])
    lr = args.lr or d["lr"]
    opt, sched, params = make_optimizer(model, lr, d["sched_warmup"], d["total_steps"])
    counter = TokenCounter(innermost_hf_model(model))

    n_rows = args.batch_size * (args.warmup_steps + args.steps)
    if workload == "simcse":
        # Wiki1M: TrainSample(texts=[line, line]); run_simcse.py's collator does NOT call
        # prepare_for_tokenization and there is no separator in the text.
        if args.texts:
            lines = [r["text"].strip() for r in load_records(args.texts)]
        else:
            lines = synthetic_texts(max(n_rows, 64), args.seq_len, args.seed)
        examples = [[t, t] for t in lines]
        prep = lambda t: t  # noqa: E731
    else:
        # E5Data: query = f"{instruction}; " + SEP + query ; pos/neg = SEP + text;
        # run_supervised.py's collator calls prepare_for_tokenization (a no-op for mean pooling
        # and model names outside the authors' hard-coded list).
        # A record's "instruction" is used when non-empty; without one the query is embedded whole
        # (SEP + query, as LLM2Vec._convert_to_str does for an empty instruction), so both
        # implementations see the same tokens.  Synthetic triples carry an E5 instruction.
        recs = load_records(args.texts) if args.texts else synthetic_triples(max(n_rows, 64), args.seq_len, args.seed)
        examples = []
        for r in recs:
            instr = r.get("instruction")
            q = (f"{instr.strip()}; " if instr else "") + SEPARATOR + r["query"]
            neg = r["negative"] if "negative" in r else r["negatives"][0]
            examples.append([q, SEPARATOR + r["positive"], SEPARATOR + neg])
        prep = model.prepare_for_tokenization

    def collate(batch):  # run_{simcse,supervised}.py::DefaultCollator
        n = len(batch[0])
        cols = [[prep(ex[j]) for ex in batch] for j in range(n)]
        return [model.tokenize(c) for c in cols]

    def step(i):
        t0 = time.perf_counter()
        features = collate(take(examples, i * args.batch_size, args.batch_size))
        t_coll = time.perf_counter() - t0
        # SimCSETrainer / LLM2VecSupervisedTrainer.compute_loss
        q_reps = model(features[0])
        d_reps = model(features[1])
        d_reps_neg = model(features[2]) if len(features) > 2 else None
        loss = loss_fn(q_reps, d_reps, d_reps_neg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), t_coll, args.batch_size

    return step, counter, {"loss_scale": d["loss_scale"], "lr": lr,
                           **({"attention_dropout": d["attn_dropout"]} if workload == "simcse" else {})}


def setup_encode(args, model_dir, dtype):
    model = load_llm2vec(args, model_dir, dtype)
    counter = TokenCounter(innermost_hf_model(model))
    n_rows = args.batch_size * (args.warmup_steps + args.steps)
    if args.texts:
        texts = [r["text"] for r in load_records(args.texts)]
    else:
        texts = synthetic_texts(max(n_rows, 64), args.seq_len, args.seed)
    return model, counter, texts


# --------------------------------------------------------------------------------------------
# tiny model / self-check
# --------------------------------------------------------------------------------------------
def make_tiny_model(out_dir, tok_dir, seed):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    src, fixes = compat_model_dir(tok_dir)
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                      torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    if src != tok_dir:
        shutil.rmtree(src, ignore_errors=True)
    return {"made": out_dir, "params": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tok), "tokenizer_from": tok_dir, "compat_fixes": fixes}


def self_check(args, model_dir, dtype):
    """Is llm2vec 0.2.3 under transformers 4.47.1 really bidirectional and padding-invariant?"""
    import torch
    model = load_llm2vec(args, model_dir, dtype)
    model.eval()
    hf, tok = model.model, model.tokenizer
    res = {}
    with torch.no_grad():
        ids = tok(["the quick brown fox jumps over the lazy dog"], return_tensors="pt")
        h1 = hf(**ids).last_hidden_state
        ids2 = {k: v.clone() for k, v in ids.items()}
        ids2["input_ids"][0, -1] = (ids2["input_ids"][0, -1] + 7) % len(tok)
        h2 = hf(**ids2).last_hidden_state
        res["last_token_changes_pos0"] = bool((h1[0, 0] - h2[0, 0]).abs().max() > 1e-6)
        # same check at batch size 1 via LLM2Vec.encode (issue #74: bs=1 went causal) and bs>1
        a = "short text"
        b = "a considerably longer text that forces left padding of the short one in the batch"
        e_alone = model.encode([a], batch_size=1, show_progress_bar=False)
        e_batch = model.encode([a, b], batch_size=2, show_progress_bar=False)
        res["left_padded_equals_alone_maxabs"] = float((e_alone[0] - e_batch[0]).abs().max())
        # causal reference: only if it differs from the bidirectional output is the check meaningful
    res["ok"] = res["last_token_changes_pos0"] and res["left_padded_equals_alone_maxabs"] < 1e-4
    return res


# --------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # library prints (peft trainable params, ...) must not pollute stdout
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    def emit(obj):
        print(json.dumps(obj), file=real_stdout, flush=True)

    if args.make_tiny_model:
        emit(make_tiny_model(args.make_tiny_model, args.tokenizer_from, args.seed))
        return 0

    dtype = getattr(torch, args.dtype)
    load_before = os.getloadavg()[0]
    t_load = time.perf_counter()
    model_dir, fixes = compat_model_dir(args.model)
    try:
        if args.self_check:
            emit({"impl": IMPL, "self_check": self_check(args, model_dir, dtype), "compat_fixes": fixes,
                  "transformers": transformers.__version__})
            return 0

        import llm2vec.version as l2v_version
        import peft
        base = {"impl": IMPL, "workload": args.workload}
        meta = {}
        if args.workload == "encode":
            model, counter, texts = setup_encode(args, model_dir, dtype)
            load_s = time.perf_counter() - t_load
            bs = args.batch_size
            nw, nt = bs * args.warmup_steps, bs * args.steps
            if nw:
                model.encode(take(texts, 0, nw), batch_size=bs, show_progress_bar=False)
            r0, p0, f0 = counter.snapshot()
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            emb = model.encode(take(texts, nw, nt), batch_size=bs, show_progress_bar=False)
            elapsed = time.perf_counter() - t0
            cpu_s = time.process_time() - cpu0
            r1, p1, f1 = counter.snapshot()
            n_examples, n_steps = nt, math.ceil(nt / bs)
            loss, coll_s, step_times = None, None, None
            meta = {"embedding_dim": int(emb.shape[1]), "texts_per_s": nt / elapsed}
        else:
            if args.workload == "mntp":
                step, counter, meta = setup_mntp(args, model_dir, dtype)
            else:
                step, counter, meta = setup_contrastive(args, model_dir, dtype, args.workload)
            load_s = time.perf_counter() - t_load
            for i in range(args.warmup_steps):
                loss, _, _ = step(i)
                log(f"warmup step {i}: loss {loss:.4f}")
            r0, p0, f0 = counter.snapshot()
            cpu0 = time.process_time()
            step_times, coll = [], []
            n_examples = 0
            for j in range(args.steps):
                t0 = time.perf_counter()
                loss, tc, ne = step(args.warmup_steps + j)
                step_times.append(time.perf_counter() - t0)
                coll.append(tc)
                n_examples += ne
                log(f"step {j}: {step_times[-1]:.3f}s loss {loss:.4f}")
            elapsed = sum(step_times)
            cpu_s = time.process_time() - cpu0
            r1, p1, f1 = counter.snapshot()
            n_steps = args.steps
            coll_s = sum(coll) / len(coll)
            meta["examples_per_s"] = n_examples / elapsed
        real, padded = r1 - r0, p1 - p0
        out = {
            **base,
            "tokens_per_s": real / elapsed,
            "real_tokens_per_s": real / elapsed,
            "padded_tokens_per_s": padded / elapsed,
            "step_s": elapsed / n_steps,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "loss": loss,
            "real_tokens": real,
            "padded_tokens": padded,
            "forward_passes_per_step": (f1 - f0) / n_steps,
            "step_s_min": min(step_times) if step_times else None,
            "step_s_max": max(step_times) if step_times else None,
            "collate_s": coll_s,
            # process CPU seconds (all threads) per timed step; less sensitive than wall time to
            # other processes competing for the cores (ideal: step_s * threads)
            "cpu_s_per_step": cpu_s / n_steps,
            "load_s": round(load_s, 2),
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "threads": args.threads,
            "dtype": args.dtype,
            "attn": args.attn,
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "lora": None if args.workload == "encode" else {"r": 16, "alpha": 32, "dropout": 0.05,
                                                            "modules": LORA_MODULES},
            **meta,
            "model": os.path.abspath(args.model),
            "texts": os.path.abspath(args.texts) if args.texts else "synthetic",
            "compat_fixes": fixes,
            # other processes on this 2-core box skew timings: a 1-min load average well above
            # --threads during the run means the figures are contended
            "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "versions": {"llm2vec": l2v_version.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__, "peft": peft.__version__},
        }
        emit(out)
        return 0
    finally:
        if model_dir != args.model:
            shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
