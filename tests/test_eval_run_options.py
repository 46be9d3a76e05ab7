"""Issue 20, item 4: `eval run` reports its progress on stderr (model, task, texts encoded, elapsed) and
sizes the local tasks from the command line; a result of other sizes is never read back from the cache."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from launchers.cli import main
from launchers.eval_run import parse_task_sizes
from tests.helpers import save_encoder, save_tiny_decoder
from toolkit.errors import InputError
from toolkit.eval.mteb_run import select_tasks
from toolkit.eval.mteb_tasks import EmbedforgeWordNetRetrieval, EmbedforgeWordNetSameSense
from toolkit.eval.progress import EncodeProgress

SAME_SENSE = "EmbedforgeWordNetSameSense"


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("eval-run")
    return save_encoder(tmp / "encoder", save_tiny_decoder(tmp / "decoder"), max_length=256)


def test_task_size_items_parse_and_bad_ones_are_named():
    assert parse_task_sizes(["rt-sentiment.n_test=200", "rt-sentiment.n_train=50", "EmbedforgeWordNetSameSense.n_pairs=8"]) \
        == {"rt-sentiment": {"n_test": 200, "n_train": 50}, SAME_SENSE: {"n_pairs": 8}}
    for bad in ("rt-sentiment=200", "rt-sentiment.n_test=0", "rt-sentiment.n_test=x", ".n_test=3"):
        with pytest.raises(InputError, match=re.escape(f"--task-size {bad}: expected TASK.FIELD=N")):
            parse_task_sizes([bad])


def test_sized_local_tasks_get_their_own_data_revision():
    default, = select_tasks(["wordnet-same-sense"])
    sized, = select_tasks(["wordnet-same-sense"], sizes={"wordnet-same-sense": {"n_pairs": 40}})
    assert sized.n_pairs == 40 and default.n_pairs == EmbedforgeWordNetSameSense.n_pairs
    assert sized.metadata.revision.endswith("wnsense-40") and sized.metadata.revision != default.metadata.revision
    assert EmbedforgeWordNetSameSense.metadata.revision == default.metadata.revision  # the class is untouched
    rt, wn = select_tasks(sizes={"rt-sentiment": {"n_test": 100}, "EmbedforgeWordNetRetrieval": {"n_queries": 50}})[:2]
    assert (rt.n_test, rt.n_train, wn.n_queries) == (100, 1000, 50)
    rt, = select_tasks(["rt-sentiment"], sizes={"rt-sentiment": {"n_test": 100}, "EmbedforgeRTSentiment": {"n_train": 60}})
    assert (rt.n_test, rt.n_train) == (100, 60)  # alias and mteb name: both sizes kept
    with pytest.raises(InputError, match="task size wordnet-same-sense.n_test: unknown; EmbedforgeWordNetSameSense is "
                                         "sized by n_pairs"):
        select_tasks(["wordnet-same-sense"], sizes={"wordnet-same-sense": {"n_test": 4}})
    with pytest.raises(InputError, match="the task is not among the selected ones"):
        select_tasks(["wordnet-same-sense"], sizes={"rt-sentiment": {"n_test": 4}})
    with pytest.raises(InputError, match="only local tasks are sized"):
        select_tasks(["STSBenchmark"], sizes={"STSBenchmark": {"n_test": 4}})


def test_progress_lines_name_model_task_count_and_time():
    now = [100.0]
    stream = io.StringIO()
    progress = EncodeProgress("my-model", every_s=10, stream=stream, clock=lambda: now[0])
    progress.begin("TaskA", "(test)", 100)
    now[0] += 3
    progress.advance(40)  # within every_s of the last line: quiet
    now[0] += 10
    progress.advance(80)
    progress.advance(100)  # the end of a call always reports
    now[0] += 1
    progress.begin("TaskA", "(train)", 10)  # the same task: the elapsed time goes on
    assert stream.getvalue().splitlines() == [
        "eval: my-model | TaskA (test): encoding 100 texts, 0 s",
        "eval: my-model | TaskA (test): 80/100 texts encoded, 13 s",
        "eval: my-model | TaskA (test): 100/100 texts encoded, 13 s",
        "eval: my-model | TaskA (train): encoding 10 texts, 14 s",
    ]


def eval_run(capsys, encoder_dir: Path, cache: Path, *extra: str) -> tuple[dict, str]:
    assert main(["eval", "run", "--models", str(encoder_dir), "--tasks", "wordnet-same-sense", "--cache", str(cache),
                 "--batch-size", "4", *extra]) == 0
    return json.loads((cache / "eval_run.json").read_text())["models"][0], capsys.readouterr().err


def test_eval_run_reports_progress_and_sizes_tasks(tmp_path, capsys, encoder_dir):
    cache = tmp_path / "cache"
    row, err = eval_run(capsys, encoder_dir, cache, "--task-size", "wordnet-same-sense.n_pairs=24")
    lines = [line for line in err.splitlines() if line.startswith("eval: ")]
    assert lines[0] == f"eval: {encoder_dir} | {SAME_SENSE} (test): encoding 24 texts, 0 s"  # sentence1 of 24 pairs
    assert any(re.fullmatch(rf"eval: {re.escape(str(encoder_dir))} \| {SAME_SENSE} \(test\): 24/24 texts encoded, "
                            r"\d+ s", line) for line in lines), lines
    assert row["computed"] and SAME_SENSE in row["scores"]
    stored = next((cache / "results").rglob(f"{SAME_SENSE}.json"))
    assert json.loads(stored.read_text())["dataset_revision"].endswith("wnsense-24")

    row, err = eval_run(capsys, encoder_dir, cache, "--task-size", "wordnet-same-sense.n_pairs=24")
    assert not row["computed"] and "eval: " not in err  # all cached: no model loaded, nothing encoded

    row, err = eval_run(capsys, encoder_dir, cache, "--task-size", "wordnet-same-sense.n_pairs=32")
    assert row["computed"] and "encoding 32 texts" in err  # other sizes: computed, never the cached 24-pair score
    assert json.loads(stored.read_text())["dataset_revision"].endswith("wnsense-32")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eval_run_with_progress_at_tp2_equals_one_process(tmp_path, capsys, encoder_dir):
    """Every rank of a TP group splits its encoding as rank 0 does (its progress is silent, not absent):
    more texts than one progress chunk, under torchrun at TP 2, give the one-process scores."""
    from tests.helpers import torchrun

    args = ["--tasks", "wordnet-same-sense", "--batch-size", "2", "--task-size", "wordnet-same-sense.n_pairs=80"]
    one, err = eval_run(capsys, encoder_dir, tmp_path / "one", *args[2:])
    r = torchrun("eval", "run", "--models", str(encoder_dir), "--cache", str(tmp_path / "tp2"), "--tp", "2", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    starts = err.count(" texts, ")  # "...: encoding N texts, 0 s", once per encode call
    assert starts >= 1 and r.stderr.count(" texts, ") == starts  # rank 0 reports, its peer is silent
    tp2 = json.loads((tmp_path / "tp2" / "eval_run.json").read_text())["models"][0]
    assert tp2["scores"][SAME_SENSE] == pytest.approx(one["scores"][SAME_SENSE], abs=1e-4)


def test_eval_sweep_sizes_each_jobs_local_tasks(tmp_path, capsys, encoder_dir):
    """`eval sweep --task-size` sizes the tasks of every job (one task per job: each takes only its own
    sizes) and the cache keeps the sized data revision, as `eval run` does."""
    out = tmp_path / "sweep"
    assert main(["eval", "sweep", "--models", str(encoder_dir), "--tasks", "wordnet-same-sense", "wordnet-retrieval",
                 "--task-size", "wordnet-same-sense.n_pairs=24", "EmbedforgeWordNetRetrieval.n_queries=12",
                 "--batch-size", "8", "--output", str(out)]) == 0
    revisions = {p.stem: json.loads(p.read_text())["dataset_revision"] for p in (out / "cache").rglob("Embedforge*.json")}
    assert revisions[SAME_SENSE].endswith("wnsense-24"), revisions
    assert revisions["EmbedforgeWordNetRetrieval"] != EmbedforgeWordNetRetrieval.metadata.revision, revisions
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted(r["task"] for r in rows) == ["EmbedforgeWordNetRetrieval", SAME_SENSE]
    capsys.readouterr()
    assert main(["eval", "sweep", "--models", str(encoder_dir), "--tasks", "wordnet-same-sense",
                 "--task-size", "STSBenchmark.n_test=4", "--output", str(tmp_path / "bad")]) != 0
    assert "task size for 'STSBenchmark': only local tasks are sized" in capsys.readouterr().err
