"""What every offline local mteb task shares: its TaskMetadata (English text, a `test` split, found data)
and its data revision, the split seed and the task's sizes (`SizedTask`), so mteb's result cache never
mixes the scores of two sizes."""

from __future__ import annotations

from typing import Any

from mteb.abstasks.task_metadata import TaskMetadata

from toolkit.asset_splits import SEED


def local_metadata(name: str, kind: str, main_score: str, **fields: Any) -> TaskMetadata:
    """A local task's metadata; its data revision is set by `SizedTask` from the task's sizes."""
    common: dict[str, Any] = dict(category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
                                  dialect=[], sample_creation="found", is_public=True,
                                  contributed_by="Embedforge (offline local task)")
    return TaskMetadata(name=name, type=kind, main_score=main_score,
                        dataset={"path": f"embedforge-local/{name}", "revision": str(SEED)},
                        **{**common, **fields})


class SizedTask:
    """A local task sized by the class attributes named in SIZES; KEY (e.g. "rt-{n_train}-{n_test}")
    filled with them names its data (`data_key`), in the class's metadata and in a resized instance's."""

    KEY: str
    SIZES: tuple[str, ...]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "metadata" in cls.__dict__:
            cls.metadata = _with_revision(cls.metadata, cls.data_key(cls))

    def data_key(self) -> str:
        return self.KEY.format(**{k: getattr(self, k) for k in self.SIZES})

    def resized(self, **sizes: int) -> None:
        """Set `sizes` (checked by the caller) and name the new data revision."""
        for key, value in sizes.items():
            setattr(self, key, value)
        self.metadata = _with_revision(self.metadata, self.data_key())


def _with_revision(metadata: TaskMetadata, key: str) -> TaskMetadata:
    return metadata.model_copy(update={"dataset": {**metadata.dataset, "revision": f"{SEED}-{key}"}})
