"""The manifest of a sharded dataset: what the readers trust, and what they check shards against.

`manifest.json` sits beside the shards. It lists every shard with its sample count, size and sha256,
the sample kind (text / pair / scored), the tasks present, the source and the build settings.
Readers plan epochs from it (no shard is opened to count samples) and verify shards against it.

Shard URLs: an entry's `url` is a path relative to the manifest's folder, an absolute path,
`file://...`, or `pipe:COMMAND` (any command that writes the shard to stdout: how shards are read
from S3 / GCS / Lustre). `DataConfig.shard_url_template` (e.g. `pipe:aws s3 cp s3://b/c/{name} -`)
re-points all shards at another store without editing the manifest.

A `pipe:` URL runs a shell command, and a manifest may come with a dataset someone sent: a manifest's
own `pipe:` URLs are refused unless the recipe sets `data.trust_manifest_commands: true` (the
recipe's template is the user's own and always allowed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolkit.atomic import atomic_write_text
from toolkit.errors import EmbedforgeError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
KINDS = ("text", "pair", "scored")


class ManifestError(EmbedforgeError, ValueError):
    """A missing or malformed manifest; the message names the file and the field."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (a shard), read in chunks: what `ShardInfo.sha256` holds."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass
class ShardInfo:
    name: str  # file name, unique within the dataset
    samples: int
    bytes: int
    sha256: str
    task: str = "default"  # pair / scored shards hold a single task each (homogeneous batches)
    url: str = ""  # where to read it; empty = `name` beside the manifest


@dataclass
class Manifest:
    kind: str
    shards: list[ShardInfo]
    source: str = ""
    created: str = ""
    build: dict = field(default_factory=dict)  # the settings it was built with
    tokenizer: str | None = None  # set when samples carry pre-tokenised ids (`tokens.npz`)
    bad_records: dict = field(default_factory=dict)  # what the build skipped, by kind
    format_version: int = FORMAT_VERSION
    root: Path | None = field(default=None, compare=False, repr=False)  # folder it was read from

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def tasks(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards:
            out[s.task] = out.get(s.task, 0) + s.samples
        return out

    def shard_url(self, shard: ShardInfo, template: str = "", trust_commands: bool = False) -> str:
        """Where to read `shard`: the recipe's template, else the manifest's URL (a command only if trusted)."""
        if template:
            return template.format(name=shard.name, task=shard.task)
        url = shard.url or shard.name
        if url.startswith("pipe:") and not trust_commands:
            where = manifest_path(self.root) if self.root is not None else MANIFEST
            raise ManifestError(f"{where}: shard {shard.name!r} has url {url!r}, a shell command; refused from a "
                                "manifest (it may have come with the data). Set data.trust_manifest_commands: true "
                                "if you wrote it, or data.shard_url_template in the recipe")
        if url.startswith(("pipe:", "file://", "/")) or "://" in url or self.root is None:
            return url
        return str(self.root / url)

    def check_urls(self, template: str = "", trust_commands: bool = False) -> None:
        """Refuse an untrusted manifest command before any shard is opened (`shard_url` on each)."""
        for shard in self.shards:
            self.shard_url(shard, template, trust_commands)

    def url_schemes(self) -> dict[str, int]:
        """Shards per URL scheme (`file` for paths): what reading this dataset will do."""
        out: dict[str, int] = {}
        for shard in self.shards:
            url = shard.url or shard.name
            scheme = "pipe" if url.startswith("pipe:") else url.split("://", 1)[0] if "://" in url else "file"
            out[scheme] = out.get(scheme, 0) + 1
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("root")
        return d

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def manifest_path(location: str | Path) -> Path:
    path = Path(location)
    return path if path.name == MANIFEST else path / MANIFEST


def load_manifest(location: str | Path) -> Manifest:
    """Read and validate `<dir>/manifest.json` (or the file itself)."""
    path = manifest_path(location)
    if Path(location).is_file() and Path(location).name != MANIFEST:
        raise ManifestError(f"{location}: a file, not a shard folder (data.path); build shards from it with "
                            f"`embedforge data build --input {location} --output DIR --kind text|pair|scored`")
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest here (data.path must be a folder built by `embedforge data build`)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a JSON object")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {raw.get('format_version')!r} is not {FORMAT_VERSION}; rebuild it")
    if raw.get("kind") not in KINDS:
        raise ManifestError(f"{path}: field 'kind' is {raw.get('kind')!r}; allowed: {list(KINDS)}")
    shards_raw = raw.get("shards")
    if not isinstance(shards_raw, list) or not shards_raw:
        raise ManifestError(f"{path}: field 'shards' must be a non-empty list")
    shards = []
    for i, s in enumerate(shards_raw):
        try:
            shard = ShardInfo(**s)
        except TypeError as exc:
            raise ManifestError(f"{path}: shards[{i}]: {exc}") from None
        if not isinstance(shard.samples, int) or shard.samples < 0:
            raise ManifestError(f"{path}: shards[{i}].samples must be a non-negative integer")
        shards.append(shard)
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: field 'shards' lists a shard name twice")
    known = {f for f in Manifest.__dataclass_fields__ if f != "root"}
    unknown = set(raw) - known
    if unknown:
        raise ManifestError(f"{path}: unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
    return Manifest(**{**raw, "shards": shards}, root=path.parent)
