"""Webdataset shards: writing schema samples, and a streaming, resumable, fault-tolerant reader.

Writing (:func:`write_shards`) goes through ``webdataset.ShardWriter``: the result is a set of
plain webdataset tars (``{prefix}-000000.tar``, ...) that ``webdataset.WebDataset(...)`` reads
without mmfm.

Reading (:func:`read_shards` -> :class:`ShardDataset`) is a ``torch.utils.data.IterableDataset``:

1. **Shards**: the url list is expanded (list, directory, glob or brace notation) and sorted; per
   epoch it is shuffled with a seed shared by all ranks, then split ``shards[rank::world_size]``
   and, inside a DataLoader, ``[worker::num_workers]``. Every shard goes to exactly one
   (rank, worker) stream, so every sample is read exactly once per epoch when there are at least
   ``world_size * num_workers`` shards (fewer shards leave some streams empty, with a warning).
2. **Samples**: each shard is streamed with webdataset's tar iterator and files are grouped by
   key into raw samples; a shuffle buffer seeded by ``(seed, epoch, rank, worker)`` mixes them.
   The order of each stream is therefore a pure function of (shards, seed, epoch, rank, worker).
3. **Decoding** to the schema dataclass (``ImageSample`` / ``RegionSample`` /
   ``ConversationSample``), then the optional ``transform``. With ``decode_threads > 0`` the next
   ``2 * decode_threads`` samples of a stream decode on a thread pool (PIL decodes without holding the GIL)
   and are delivered in stream order: samples, skips and positions are exactly those of serial decoding.

Bad data never stops a run: a corrupt image, a missing key, bad JSON or a truncated tar skips the
sample, adds one to ``dataset.skipped[reason]`` and logs one warning naming shard and key. A shard
that cannot be opened at all (missing file, not a tar) raises :class:`ShardError` naming the file.

Resumable position. Each stream counts its *raw* samples consumed after the shuffle (delivered or
skipped). Because the stream order is deterministic, a restarted job that skips that many raw
samples (without decoding them) continues exactly where the previous one stopped: no sample is
repeated or skipped. Guarantees:

- ``num_workers=0``: iterate the dataset directly; ``dataset.state_dict()`` taken after receiving
  sample ``i`` resumes at sample ``i + 1`` (the generator is suspended at the yield, so the count is
  exact).
- DataLoader workers: use :meth:`ShardDataset.loader` (a :class:`ResumableLoader`). Every batch
  carries its worker id and that worker's raw position; ``loader.state_dict()`` after receiving a
  batch resumes right after that batch, whatever the prefetching: each worker's stream continues with its next
  sample, and the state names the stream the loader's round-robin serves next (the resumed loader's worker
  ``i`` reads stream ``(i + next_stream) % num_workers``), so the streams interleave as in the uninterrupted
  run and the samples arrive in the same order. The saved state is tied to the
  same ``num_workers``, ``world_size``, ``rank``, ``seed`` and shard list (checked on load). A plain
  ``DataLoader(dataset, num_workers>0)`` works for reading but its position and skip counts live
  in the worker processes and are not visible in the main process.
- Skip counts: with ``num_workers=0`` ``dataset.skipped`` is exact; with workers,
  ``loader.skipped`` aggregates all workers (each batch carries its worker's counts, and a final
  marker from each worker reports bad samples after its last batch) and is folded into
  ``dataset.skipped`` when the epoch ends. Counts are cumulative over epochs and restored from a
  state. The warning for a bad sample is logged once per process; worker processes are new each
  epoch, so with workers it is logged once per epoch.
"""

from __future__ import annotations

import glob as _glob
import logging
import os
import random
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import UnidentifiedImageError
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from mmfm.data.schemas import SCHEMAS, ConversationSample, ImageSample, RegionSample

logger = logging.getLogger(__name__)

# Skip reasons (keys of ``dataset.skipped``).
CORRUPT_IMAGE = "corrupt_image"
MISSING_KEY = "missing_key"
BAD_METADATA = "bad_metadata"
TRUNCATED = "truncated"


class ShardError(ValueError):
    """A whole shard cannot be read (missing file, not a tar archive)."""


# --------------------------------------------------------------------------------------------- writing


def write_shards(samples: Iterable[Any], out_dir: str | Path, samples_per_shard: int = 1000,
                 prefix: str = "shard", image_format: str = "png") -> list[Path]:
    """Write samples as webdataset tar shards ``out_dir/{prefix}-000000.tar``, ...

    ``samples`` are schema dataclasses (anything with ``to_wds(image_format)``) or ready webdataset
    dicts with a ``"__key__"``. Returns the shard paths in order; writes nothing for no samples.
    """
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard!r}: must be a positive int")
    if image_format not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_format={image_format!r}: use 'png' (lossless) or 'jpg'")
    if not prefix or "/" in prefix or "%" in prefix:
        raise ValueError(f"prefix={prefix!r}: must be a non-empty file-name prefix without '/' or '%'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    writer: wds.ShardWriter | None = None
    seen: set[str] = set()
    try:
        for sample in samples:
            record = sample.to_wds(image_format) if hasattr(sample, "to_wds") else dict(sample)
            key = record.get("__key__")
            if not isinstance(key, str) or not key or "." in key:
                raise ValueError(f"sample key {key!r}: needs a non-empty '__key__' without '.' "
                                 "(webdataset splits file names at the first dot)")
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r}: keys must be unique within a shard set")
            seen.add(key)
            if writer is None:  # opened lazily so that an empty input creates no empty shard
                writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=samples_per_shard,
                                         verbose=0, post=lambda fname: written.append(Path(fname)))
            writer.write(record)
    finally:
        if writer is not None:
            writer.close()
    return written


# --------------------------------------------------------------------------------------------- urls


def expand_urls(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Expand ``urls`` into a sorted list of shard paths.

    Accepts a directory (all ``*.tar`` in it), a glob (``dir/*.tar``), webdataset brace notation
    (``dir/shard-{000000..000009}.tar``), a single path, or a list of any of these.
    """
    if isinstance(urls, (str, Path)):
        items = [str(urls)]
    elif isinstance(urls, Sequence):
        items = [str(u) for u in urls]
    else:
        raise TypeError(f"urls={urls!r}: expected a path, directory, glob, brace pattern or a list of them")
    out: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(_glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise FileNotFoundError(f"urls: directory {item!r} holds no *.tar shards")
            out.extend(found)
        elif any(c in item for c in "*?["):
            found = sorted(_glob.glob(item))
            if not found:
                raise FileNotFoundError(f"urls: glob {item!r} matches no file")
            out.extend(found)
        else:
            out.extend(wds.shardlists.expand_urls(item))  # brace notation; a plain path stays as is
    if not out:
        raise ValueError(f"urls={urls!r}: no shards given")
    missing = [u for u in out if "://" not in u and not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(f"shard file not found: {missing[0]}" +
                                (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return sorted(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------- reading


@dataclass
class _Raw:
    """One raw sample (files grouped by key) before decoding; ``bad`` names a reason to skip it."""

    sample: dict[str, Any]
    bad: str | None = None


@dataclass
class _Decoded:
    """What decoding one raw sample gave: the sample, or the reason (and detail) to skip it."""

    sample: Any
    reason: str | None
    detail: str


class _Counted:
    """An iterator that counts the items drawn from it (a stream's final raw position)."""

    def __init__(self, items: Iterable[Any]) -> None:
        self.items, self.count = iter(items), 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = next(self.items)
        self.count += 1
        return item


def _resolve_schema(schema: str | type | None) -> Callable[[dict[str, Any]], Any] | None:
    if schema is None or schema == "raw":
        return None
    if schema == "auto":
        return _decode_auto
    if isinstance(schema, str):
        if schema not in SCHEMAS:
            raise ValueError(f"schema={schema!r}: use one of {sorted(SCHEMAS)}, 'auto', 'raw' or a class "
                             "with from_wds")
        return SCHEMAS[schema].from_wds
    if isinstance(schema, type) and hasattr(schema, "from_wds"):
        return schema.from_wds
    raise TypeError(f"schema={schema!r}: expected a schema name, 'auto', 'raw' or a class with from_wds()")


def _decode_auto(sample: dict[str, Any]) -> Any:
    """Pick the schema from the sample content: ``regions`` -> RegionSample, ``messages`` ->
    ConversationSample, otherwise ImageSample."""
    import json

    if "json" not in sample:
        raise KeyError("json")
    meta = json.loads(sample["json"])
    if "messages" in meta:
        return ConversationSample.from_wds(sample)
    if "regions" in meta:
        return RegionSample.from_wds(sample)
    return ImageSample.from_wds(sample)


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _stream_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    # A fixed arithmetic mix (not hash(), which is salted per process for str).
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + worker) & 0x7FFFFFFF


class ShardDataset(torch.utils.data.IterableDataset):
    """Streaming dataset over webdataset shards; see the module docstring for the guarantees.

    Build it with :func:`read_shards`. Iterating yields schema samples (or ``transform(sample)``).
    """

    def __init__(self, urls: list[str], schema: str | type | None = "image", transform: Callable | None = None,
                 shuffle_buffer: int = 0, shuffle_shards: bool | None = None, seed: int = 0, epoch: int = 0,
                 rank: int | None = None, world_size: int | None = None,
                 resume_from: dict[str, Any] | None = None, decode_threads: int = 0) -> None:
        super().__init__()
        if isinstance(decode_threads, bool) or not isinstance(decode_threads, int) or decode_threads < 0:
            raise ValueError(f"decode_threads={decode_threads!r}: must be an int >= 0 (0 decodes on the reading thread)")
        self.decode_threads = decode_threads
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={shuffle_buffer!r}: must be an int >= 0 (0 disables shuffling)")
        default_rank, default_world = _default_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not (0 <= self.rank < self.world_size):
            raise ValueError(f"rank={self.rank}, world_size={self.world_size}: need 0 <= rank < world_size")
        self.urls = list(urls)
        self.schema = schema
        self._decode = _resolve_schema(schema)
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_buffer > 0 if shuffle_shards is None else shuffle_shards
        self.seed = seed
        self.epoch = epoch
        self.skipped: Counter[str] = Counter()
        self._positions: list[int] = [0]       # raw position per stream, for state_dict() (num_workers=0)
        # (epoch, raw positions per stream, the stream a DataLoader's round-robin serves next)
        self._resume: tuple[int, list[int], int] | None = None
        self._logged: set[tuple[str, str, str]] = set()
        if resume_from is not None:
            self.load_state_dict(resume_from)

    # ----------------------------------------------------------------------------- epochs and state
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: it seeds the shard and sample shuffles. A resume position saved in
        another epoch no longer applies."""
        self.epoch = int(epoch)
        self._positions = [0]

    def state_dict(self) -> dict[str, Any]:
        """Position of a direct (``num_workers=0``) iteration; for workers use ``loader().state_dict()``."""
        return self._make_state(self._positions, self.skipped)

    def _make_state(self, positions: list[int], skipped: Counter[str], next_stream: int = 0) -> dict[str, Any]:
        return {"epoch": self.epoch, "positions": list(positions), "skipped": dict(skipped), "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "shuffle_buffer": self.shuffle_buffer,
                "num_shards": len(self.urls), "next_stream": int(next_stream)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` / :meth:`ResumableLoader.state_dict`: the next iteration of
        ``state["epoch"]`` skips the samples already consumed, per stream."""
        for name in ("seed", "rank", "world_size", "shuffle_buffer", "num_shards"):
            mine = len(self.urls) if name == "num_shards" else getattr(self, name)
            if name in state and state[name] != mine:
                raise ValueError(f"resume state has {name}={state[name]!r} but this dataset has {name}={mine!r}; "
                                 "resume with the same shards, seed, shuffle_buffer and rank layout")
        positions = [int(p) for p in state["positions"]]
        if any(p < 0 for p in positions):
            raise ValueError(f"resume state positions={positions}: must be >= 0")
        next_stream = int(state.get("next_stream", 0))
        if not 0 <= next_stream < max(1, len(positions)):
            raise ValueError(f"resume state next_stream={next_stream}: must index one of {len(positions)} streams")
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, positions, next_stream)
        self._positions = list(positions)
        self.skipped = Counter(state.get("skipped", {}))

    # ----------------------------------------------------------------------------- splitting
    def shards_for(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards read by stream (``self.rank``, ``worker``) in the current epoch, in order."""
        shards = list(self.urls)
        if self.shuffle_shards:
            random.Random(_stream_seed(self.seed, self.epoch, 0, 0) ^ 0x5EED).shuffle(shards)  # same on all ranks
        return shards[self.rank::self.world_size][worker::num_workers]

    # ----------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self._iterate(worker, num_workers, tagged=False)

    def _iterate(self, worker: int, num_workers: int, tagged: bool) -> Iterator[Any]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            positions, next_stream = self._resume[1], self._resume[2]
            if len(positions) != num_workers:
                raise ValueError(f"resume state has {len(positions)} stream positions but this run reads with "
                                 f"{num_workers} stream(s) (num_workers={0 if num_workers == 1 else num_workers}); "
                                 "resume with the num_workers the state was saved with")
            # DataLoader worker i reads stream (i + next_stream) % num_workers: the loader's round-robin starts
            # at worker 0, so the streams interleave after a resume as they did before it
            worker = (worker + next_stream) % num_workers
            start = positions[worker]
        shards = self.shards_for(worker, num_workers)
        if not shards and (self.rank, worker) != (0, 0):
            logger.warning("rank %d worker %d gets no shard: %d shards for %d ranks x %d workers", self.rank,
                           worker, len(self.urls), self.world_size, num_workers)
        # Skips made in this iteration; folded into self.skipped as they happen (num_workers=0) and
        # reported per batch when tagged (workers).
        local: Counter[str] = Counter()
        raw_stream = _Counted(_shuffled(self._raw_samples(shards), self.shuffle_buffer,
                                        random.Random(_stream_seed(self.seed, self.epoch, self.rank, worker))))
        for position, raw, decoded in self._decoded_in_order(raw_stream, start):
            out = self._account(raw, decoded, local)
            if not tagged:
                self._positions = [position]
            if out is None:
                continue
            if self.transform is not None:
                out = self.transform(out)
            yield _Tagged(worker, position, dict(local), out) if tagged else out
        if tagged:  # final marker: the worker's last position and skips after its last sample
            yield _Tagged(worker, raw_stream.count, dict(local), _END)
        if self._resume is not None and self._resume[0] == self.epoch and num_workers == 1:
            self._resume = None  # a completed epoch does not resume again

    def _decoded_in_order(self, raws: _Counted, start: int) -> Iterator[tuple[int, _Raw, _Decoded]]:
        """``(position, raw, decoded)`` for the raw samples after position ``start`` (those before were consumed
        before a restart: skipped without decoding), in stream order; decoded ahead on ``decode_threads``."""
        # raws.count is the position of the raw sample just drawn (read here, before any read-ahead)
        todo = ((raws.count, raw) for raw in raws if raws.count > start)
        if self.decode_threads == 0:
            for position, raw in todo:
                yield position, raw, self._decode_one(raw)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="shard-decode") as pool:
            window: deque = deque()
            for position, raw in todo:
                window.append((position, raw, pool.submit(self._decode_one, raw)))
                if len(window) >= 2 * self.decode_threads:  # bounded read-ahead: memory stays O(threads)
                    position, raw, future = window.popleft()
                    yield position, raw, future.result()
            while window:
                position, raw, future = window.popleft()
                yield position, raw, future.result()

    def _decode_one(self, raw: _Raw) -> _Decoded:
        """Decode one raw sample; a bad one gives its skip reason instead (no shared state: thread-safe)."""
        reason, detail = raw.bad, ""
        out = None
        if reason is None:
            try:
                out = raw.sample if self._decode is None else self._decode(raw.sample)
            except KeyError as err:
                reason, detail = MISSING_KEY, f"missing {err.args[0] if err.args else err!s}"
            except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL raises these on corrupt data
                reason, detail = CORRUPT_IMAGE, f"{type(err).__name__}: {err}"
            except (ValueError, TypeError) as err:  # bad JSON, wrong field types, invalid boxes
                reason, detail = BAD_METADATA, f"{type(err).__name__}: {err}"
        return _Decoded(out, reason, detail)

    def _account(self, raw: _Raw, decoded: _Decoded, local: Counter[str]) -> Any | None:
        """The decoded sample, or None after counting and (once) logging why it is skipped."""
        reason, detail = decoded.reason, decoded.detail
        if reason is None:
            return decoded.sample
        url, key = raw.sample.get("__url__", "?"), raw.sample.get("__key__", "?")
        local[reason] += 1
        self.skipped[reason] += 1
        if (url, key, reason) not in self._logged:  # once per bad sample, not once per epoch
            self._logged.add((url, key, reason))
            logger.warning("skipping sample %r in shard %s: %s%s", key, url, reason, f" ({detail})" if detail else "")
        return None

    def _raw_samples(self, shards: list[str]) -> Iterator[_Raw]:
        for url in shards:
            yield from _read_shard(url)

    # ----------------------------------------------------------------------------- loaders
    def loader(self, batch_size: int | None = None, num_workers: int = 0, collate_fn: Callable | None = None,
               **kwargs: Any) -> ResumableLoader:
        """A DataLoader over this dataset whose ``state_dict()`` / ``skipped`` are exact with workers."""
        return ResumableLoader(self, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn, **kwargs)


def _read_shard(url: str) -> Iterator[_Raw]:
    """Raw samples of one shard, files grouped by key. A truncated tar ends the shard: the sample
    being read is marked ``truncated``; a file that is not a tar at all raises :class:`ShardError`."""
    try:
        stream = gopen(url, "rb")
    except FileNotFoundError as err:
        raise ShardError(f"cannot open shard {url}: file not found") from err
    except OSError as err:
        raise ShardError(f"cannot open shard {url}: {err}") from err
    current: dict[str, Any] | None = None
    n_files = 0
    try:
        files = tar_file_iterator(stream)  # webdataset's streaming tar reader (mode 'r|*')
        while True:
            try:
                item = next(files)
            except StopIteration:
                break
            except (tarfile.TarError, EOFError, OSError) as err:
                if n_files == 0 and not _has_tar_header(url):
                    raise ShardError(f"cannot read shard {url}: not a tar archive ({err})") from err
                key = current["__key__"] if current is not None else "<next sample>"
                yield _Raw({"__key__": key, "__url__": url}, bad=TRUNCATED)
                logger.debug("shard %s truncated after %d files: %s", url, n_files, err)
                current = None
                break
            n_files += 1
            key, ext = base_plus_ext(item["fname"])
            if key is None:
                continue
            if current is not None and current["__key__"] != key:
                yield _Raw(current)
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext.lower()] = item["data"]
        if current is not None:
            yield _Raw(current)
    finally:
        stream.close()


def _has_tar_header(url: str) -> bool:
    """True if ``url`` is a local file starting with a POSIX tar header (so an early read error
    means truncation, not a file of another kind)."""
    try:
        with open(url, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return len(head) >= 263 and head[257:262] == b"ustar"


def _shuffled(items: Iterator[_Raw], bufsize: int, rng: random.Random) -> Iterator[_Raw]:
    """Reservoir-style shuffle buffer: fill ``bufsize`` items, then emit a random one per new item."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[_Raw] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(bufsize)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


# --------------------------------------------------------------------------------------------- loader


class _EndMarker:
    """End of a worker stream; pickles to the module singleton so ``is _END`` holds across processes."""

    def __repr__(self) -> str:
        return "<end of worker stream>"

    def __reduce__(self) -> str:
        return "_END"


_END = _EndMarker()


@dataclass
class _Tagged:
    """A sample with its worker's id, raw position and skip counts (for exact resume with workers)."""

    worker: int
    position: int
    skipped: dict[str, int]
    item: Any


class _TaggedView(torch.utils.data.IterableDataset):
    def __init__(self, dataset: ShardDataset) -> None:
        super().__init__()
        self.dataset = dataset

    def __iter__(self) -> Iterator[_Tagged]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.dataset._iterate(worker, num_workers, tagged=True)


class _TaggedCollate:
    """Collate the real samples of a batch; keep the last (worker, position, skipped) tag."""

    def __init__(self, collate_fn: Callable | None, batched: bool) -> None:
        self.collate_fn = collate_fn
        self.batched = batched

    def __call__(self, items: Any) -> tuple[_Tagged, Any]:
        items = items if self.batched else [items]
        last = items[-1]
        real = [t.item for t in items if not isinstance(t.item, _EndMarker)]
        if not real:
            return last, _END
        if self.batched:
            batch = (self.collate_fn or _list_collate)(real)
        else:
            batch = real[0] if self.collate_fn is None else self.collate_fn(real[0])
        return last, batch


def _list_collate(items: list[Any]) -> list[Any]:
    return list(items)


class ResumableLoader:
    """A ``torch.utils.data.DataLoader`` over a :class:`ShardDataset` with an exact resume position
    and skip counts, also with ``num_workers > 0``.

    Batches are collated with ``collate_fn`` (default: a plain list of samples, since schema
    dataclasses hold PIL images). ``state_dict()`` after receiving a batch, loaded into a fresh
    dataset (``load_state_dict`` or ``read_shards(..., resume_from=...)``) and iterated with the same
    ``num_workers``, continues with the next sample of every worker stream.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int | None = None, num_workers: int = 0,
                 collate_fn: Callable | None = None, **kwargs: Any) -> None:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r}: must be a positive int or None")
        if "shuffle" in kwargs or "sampler" in kwargs:
            raise ValueError("ResumableLoader: shuffling is done by the dataset (shuffle_buffer), not the loader")
        if kwargs.get("persistent_workers"):
            # Persistent workers keep their dataset copy, so set_epoch() and resume states would not reach them.
            raise ValueError("ResumableLoader: persistent_workers=True is not supported (workers would miss "
                             "set_epoch); leave it False")
        self.dataset = dataset
        self.num_workers = num_workers
        self._streams = max(1, num_workers)
        self._reset_positions()  # validates a pending resume state against num_workers
        self._loader = torch.utils.data.DataLoader(
            _TaggedView(dataset), batch_size=batch_size, num_workers=num_workers,
            collate_fn=_TaggedCollate(collate_fn, batched=batch_size is not None), **kwargs)

    def _reset_positions(self) -> None:
        resume = self.dataset._resume
        if resume is not None and resume[0] == self.dataset.epoch:
            if len(resume[1]) != self._streams:
                raise ValueError(f"resume state has {len(resume[1])} stream positions but the loader has "
                                 f"num_workers={self.num_workers}; resume with the same num_workers")
            self._positions = list(resume[1])
            self._next_stream = resume[2]
        else:
            self._positions = [0] * self._streams
            self._next_stream = 0
        self._base_skipped = Counter(self.dataset.skipped)  # counts restored from a state / earlier epochs
        self._iter_skipped: list[dict[str, int]] = [{} for _ in range(self._streams)]

    @property
    def skipped(self) -> Counter[str]:
        """Skip counts over all workers (reason -> count), including those restored from a state."""
        total = Counter(self._base_skipped)
        for counts in self._iter_skipped:
            total.update(counts)
        return total

    def state_dict(self) -> dict[str, Any]:
        return self.dataset._make_state(self._positions, self.skipped, self._next_stream)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (of a loader with the same ``num_workers``) at the next ``iter()``."""
        self.dataset.load_state_dict(state)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` at the next ``iter()`` (``ShardDataset.set_epoch``); workers are new each epoch."""
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        raise TypeError("ResumableLoader streams shards and has no length")

    def __iter__(self) -> Iterator[Any]:
        self._reset_positions()
        for tag, batch in self._loader:
            self._positions[tag.worker] = tag.position
            self._iter_skipped[tag.worker] = tag.skipped
            # every batch (an end marker's too) takes one round-robin turn; a finished worker is skipped
            # afterwards, by the DataLoader here as by the resumed one
            self._next_stream = (tag.worker + 1) % self._streams
            if isinstance(batch, _EndMarker):
                continue
            yield batch
        # Epoch finished: fold the counts into the dataset and forget the resume position.
        self.dataset.skipped = self.skipped
        self.dataset._resume = None


# --------------------------------------------------------------------------------------------- API


def read_shards(urls: str | Path | Sequence[str | Path], schema: str | type | None = "image",
                transform: Callable | None = None, shuffle_buffer: int = 0, shuffle_shards: bool | None = None,
                seed: int = 0, epoch: int = 0, rank: int | None = None, world_size: int | None = None,
                resume_from: dict[str, Any] | None = None, decode_threads: int = 0) -> ShardDataset:
    """Stream webdataset shards as schema samples.

    Args:
        urls: a list of paths, a directory (its ``*.tar``), a glob, or brace notation.
        schema: ``"image"`` | ``"regions"`` | ``"conversation"`` | a class with ``from_wds`` |
            ``"auto"`` (chosen per sample from its JSON) | ``"raw"`` / ``None`` (webdataset dicts).
        transform: applied to each decoded sample (e.g. to tensors).
        shuffle_buffer: sample shuffle buffer size; 0 keeps shard order.
        shuffle_shards: shuffle the shard order per epoch (default: when ``shuffle_buffer > 0``).
        seed, epoch: seed the shuffles; change the epoch with ``dataset.set_epoch(e)``.
        rank, world_size: shard split across processes (default: torch.distributed or env RANK/WORLD_SIZE).
        resume_from: a ``state_dict()`` to continue from.
        decode_threads: decode each stream's next samples on this many threads (0: on the reading thread);
            the order, skips and positions are those of serial decoding.
    """
    return ShardDataset(expand_urls(urls), schema=schema, transform=transform, shuffle_buffer=shuffle_buffer,
                        shuffle_shards=shuffle_shards, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                        resume_from=resume_from, decode_threads=decode_threads)
