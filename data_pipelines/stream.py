"""Reading samples out of WebDataset shards: one shard, and one slot's endless stream of shards.

A *slot* is one (data-parallel rank, loader worker) pair; slots split the shards between them,
never the global RANK (tensor / pipeline peers must read the same data). Everything a slot reads is
a pure function of its `Position` (epoch, cursor into its shard sequence, samples taken from the
current shard), so resuming is seeking to a position, not replaying a run.

- `exact` mode: epoch e shuffles all shards with (seed, e) and slot s reads every num_slots-th
  one, so an epoch visits each shard once across slots; needs shards >= slots.
- `resampled` mode: the shard at each cursor is drawn with replacement from (seed, slot, epoch,
  cursor): infinite, and any number of slots works, so it survives a change of DP size.
Within a shard, samples are shuffled in chunks of `shuffle_buffer` with an RNG keyed by the shard
and the chunk, so a shard always yields the same order however it is reached.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_pipelines.manifest import Manifest, ShardInfo
from data_pipelines.records import BadRecord, validate
from toolkit.errors import EmbedforgeError

log = logging.getLogger(__name__)
MAX_LOGGED_BAD = 5


class DataError(EmbedforgeError, ValueError):
    """Unusable data: the message names the shard (and sample key) and what to do."""


@dataclass
class ReadStats:
    """Good and bad samples seen by one slot, bad ones by kind (`records.BAD_KINDS`)."""

    good: int = 0
    bad: dict = field(default_factory=dict)

    def add_bad(self, kind: str) -> None:
        self.bad[kind] = self.bad.get(kind, 0) + 1

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def check_budget(self, max_bad_fraction: float, where: str) -> None:
        total = self.good + self.num_bad
        if total and self.num_bad / total > max_bad_fraction:
            raise DataError(
                f"{where}: {self.num_bad} of {total} samples were bad ({self.bad}), over data.max_bad_fraction="
                f"{max_bad_fraction}; fix or rebuild the shards (`embedforge data verify`), or raise the budget"
            )

    def merge(self, other: "ReadStats") -> "ReadStats":
        bad = dict(self.bad)
        for k, v in other.bad.items():
            bad[k] = bad.get(k, 0) + v
        return ReadStats(self.good + other.good, bad)


class _HashingReader(io.RawIOBase):
    """Wraps a stream and hashes every byte read, to check the shard against the manifest."""

    def __init__(self, raw):
        self.raw, self.sha, self.nbytes = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.sha.update(data)
        self.nbytes += n
        return n

    def finish(self) -> str:
        while True:
            chunk = self.raw.read(1 << 20)
            if not chunk:
                return self.sha.hexdigest()
            self.sha.update(chunk)
            self.nbytes += len(chunk)


def _decode(group: dict, kind: str, max_chars: int) -> dict:
    raw = group.get("json")
    if raw is None:
        raise BadRecord("corrupt_member", "no .json member")
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRecord("non_utf8", "the .json member is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRecord("invalid_json", f"invalid JSON ({exc.msg})") from None
    if not isinstance(record, dict) or "id" not in record:
        raise BadRecord("missing_field", "missing field 'id'")
    sample = validate(record, kind, max_chars=max_chars)  # shards store texts under "text"
    if "tokens.npz" in group:
        try:
            with np.load(io.BytesIO(group["tokens.npz"])) as z:
                sample["tokens"] = {k: z[k].tolist() for k in z.files}
        except (ValueError, OSError, zlib.error, EOFError) as exc:
            raise BadRecord("corrupt_member", f"unreadable tokens.npz ({exc})") from None
    return sample


def read_shard(
    url: str, shard: ShardInfo, kind: str, stats: ReadStats, *, verify: bool = True, max_chars: int = 0,
) -> Iterator[dict]:
    """Valid samples of one shard, in file order. Bad samples are counted in `stats` and skipped;
    a truncated or corrupt tar ends the shard (counted); an unreadable shard or a sha256 that is
    not the manifest's raises DataError naming the shard. The sha256 is checked when the shard
    is read to its end (verify=True)."""
    try:
        stream = wds.gopen(url, "rb")
    except Exception as exc:  # noqa: BLE001 - any opener (file, pipe:) failure is the shard's
        raise DataError(f"shard {shard.name} ({url}): cannot open ({exc})") from None
    reader = _HashingReader(stream)
    buffered = io.BufferedReader(reader, 1 << 20)
    errors: list[Exception] = []
    good = logged = 0
    bad_before = stats.num_bad

    def stop(exc: Exception) -> bool:
        errors.append(exc)
        return False

    finished = False
    try:
        members = (dict(m, __url__=url) for m in tar_file_iterator(buffered, handler=stop))
        groups = group_by_keys(members, handler=stop)
        while True:
            try:
                group = next(groups)
            except StopIteration:
                finished = not errors
                break
            except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
                errors.append(exc)
                break
            try:
                sample = _decode(group, kind, max_chars)
            except BadRecord as bad:
                stats.add_bad(bad.kind)
                if logged < MAX_LOGGED_BAD:
                    log.warning("shard %s, key %s: skipped (%s: %s)", shard.name, group.get("__key__"), bad.kind, bad)
                    logged += 1
                continue
            good += 1
            stats.good += 1
            yield sample
        if errors:
            stats.add_bad("corrupt_member")
            log.warning("shard %s: corrupt tar after %d samples (%s); rest of shard skipped", shard.name, good, errors[0])
            if good == 0:
                raise DataError(f"shard {shard.name} ({url}): unreadable ({errors[0]}); rebuild it or remove it from the manifest")
        elif good + stats.num_bad - bad_before < shard.samples:  # tarfile takes a cut at a header for the end
            stats.add_bad("corrupt_member")
            log.warning("shard %s: ended after %d of the manifest's %d samples (truncated?)", shard.name, good, shard.samples)
            if good == 0:
                raise DataError(f"shard {shard.name} ({url}): unreadable (no samples); rebuild it or remove it from the manifest")
        if finished and verify and shard.sha256:
            digest = reader.finish()
            if digest != shard.sha256:
                raise DataError(f"shard {shard.name} ({url}): sha256 {digest[:16]}... does not match the manifest's "
                                f"{shard.sha256[:16]}...; the shard changed or is corrupt (`embedforge data verify`)")
    finally:
        stream.close()


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng([int.from_bytes(hashlib.sha1(repr(key).encode()).digest()[:8], "little")])


@dataclass
class Position:
    epoch: int = 0
    cursor: int = 0  # index into this slot's shard sequence for the epoch
    offset: int = 0  # samples already taken from that shard

    def to_list(self) -> list[int]:
        return [self.epoch, self.cursor, self.offset]


@dataclass
class SlotConfig:
    mode: str  # "exact" | "resampled"
    seed: int
    slot: int
    num_slots: int
    shuffle: bool = True
    shuffle_buffer: int = 1000
    verify: bool = True
    max_chars: int = 0
    max_bad_fraction: float = 0.0
    url_template: str = ""
    trust_commands: bool = False  # data.trust_manifest_commands: a manifest's own pipe: URLs may run


class SlotStream:
    """The endless sample stream of one slot over one task's shards, from a `Position`."""

    def __init__(self, manifest: Manifest, task: str, cfg: SlotConfig, position: Position | None = None,
                 stats: ReadStats | None = None):
        self.manifest, self.task, self.cfg = manifest, task, cfg
        self.shards = [s for s in manifest.shards if s.task == task and s.samples > 0]
        if not self.shards:
            raise DataError(f"{manifest.root}: task {task!r} has no non-empty shard")
        if cfg.mode == "exact" and len(self.shards) < cfg.num_slots:
            raise DataError(
                f"{manifest.root}: task {task!r} has {len(self.shards)} shards for {cfg.num_slots} readers "
                f"(data-parallel ranks x data.num_workers); exact-epoch mode needs at least one shard per reader: "
                f"rebuild with smaller --shard-samples, use fewer workers, or data.mode=resampled"
            )
        self.position = position or Position()
        self.stats = stats or ReadStats()

    def _shard_at(self, epoch: int, cursor: int) -> ShardInfo | None:
        c = self.cfg
        if c.mode == "resampled":
            return self.shards[int(_rng(c.seed, self.task, "resampled", c.slot, epoch, cursor).integers(len(self.shards)))]
        order = _rng(c.seed, self.task, "epoch", epoch).permutation(len(self.shards)) if c.shuffle else range(len(self.shards))
        mine = list(order)[c.slot :: c.num_slots]
        return self.shards[mine[cursor]] if cursor < len(mine) else None

    def _shard_samples(self, shard: ShardInfo, epoch: int) -> Iterator[dict]:
        c = self.cfg
        url = self.manifest.shard_url(shard, c.url_template, c.trust_commands)
        samples = read_shard(url, shard, self.manifest.kind, self.stats, verify=c.verify,
                             max_chars=c.max_chars)
        if not c.shuffle:
            yield from samples
        else:
            chunk_index, chunk = 0, []
            for s in samples:
                chunk.append(s)
                if len(chunk) == c.shuffle_buffer:
                    yield from (chunk[i] for i in _rng(c.seed, shard.name, epoch, chunk_index).permutation(len(chunk)))
                    chunk_index, chunk = chunk_index + 1, []
            yield from (chunk[i] for i in _rng(c.seed, shard.name, epoch, chunk_index).permutation(len(chunk)))
        self.stats.check_budget(c.max_bad_fraction, f"{self.manifest.root} (after shard {shard.name})")

    def __iter__(self) -> Iterator[dict]:
        """Samples forever; `self.position` always points just past the last sample yielded."""
        empty_in_a_row = 0
        while True:
            pos = self.position
            shard = self._shard_at(pos.epoch, pos.cursor)
            if shard is None:
                self.position = Position(pos.epoch + 1, 0, 0)
                continue
            taken = 0
            for i, sample in enumerate(self._shard_samples(shard, pos.epoch)):
                if i < pos.offset:
                    continue
                taken += 1
                self.position = Position(pos.epoch, pos.cursor, i + 1)
                yield sample
            empty_in_a_row = 0 if taken else empty_in_a_row + 1
            if empty_in_a_row > 2 * len(self.shards):
                raise DataError(f"{self.manifest.root}: task {self.task!r} yields no samples any more")
            self.position = Position(pos.epoch, pos.cursor + 1, 0)

    def state(self) -> dict:
        return {"position": self.position.to_list(), "stats": asdict(self.stats)}
