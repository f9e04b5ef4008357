"""Atomic, resumable training checkpoints.

Layout of one checkpoint (``ckpt_dir/step_00000120/``)::

    meta.json              written last: step, world size, every file with its size (the "commit record")
    model.safetensors      model weights (tied / shared tensors stored once, aliases in the metadata)
    <name>.safetensors     further tensor dicts, e.g. ``ema``
    train_state.pt         optimizer / scheduler / counters / trainer extras: plain tensors and containers
    rank00000.pt           per-rank RNG state (python, numpy, torch CPU, CUDA) + per-rank extras
    deepspeed/             DeepSpeed's own files when the run uses a DeepSpeed engine

Atomicity: everything is written into ``ckpt_dir/.tmp-step_00000120`` and the directory is moved into
place with ``os.replace`` only after ``meta.json`` is complete; then the ``latest`` pointer file is
replaced atomically. A crash at any point leaves the previous checkpoint and pointer untouched; a stale
``.tmp-*`` directory is ignored by readers and removed by the next save.

Loading never unpickles code: ``.pt`` files are read with ``torch.load(weights_only=True)``, so they
may hold only tensors, numbers, strings and lists/tuples/dicts of them. (DeepSpeed's own files under
``deepspeed/`` are read by ``engine.load_checkpoint``, i.e. by DeepSpeed's loader.)

In a multi-process run every rank must call ``save_checkpoint`` / ``load_checkpoint`` (they contain
barriers); rank 0 writes the shared files, each rank its own ``rank*.pt``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmfm.distributed import barrier, get_rank, get_world_size

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "capture_rng_state",
    "find_latest",
    "list_checkpoints",
    "load_checkpoint",
    "load_safetensors",
    "load_torch_state",
    "prune_checkpoints",
    "resolve_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "save_safetensors",
    "step_dir_name",
]

FORMAT_VERSION = 1
META_FILE = "meta.json"
STATE_FILE = "train_state.pt"
LATEST_FILE = "latest"
DS_DIR = "deepspeed"
DS_TAG = "ds"
_STEP_RE = re.compile(r"^step_(\d+)$")
_ALIAS_KEY = "mmfm_aliases"


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, wrong content)."""


@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` read. ``tensors["model"]`` is the model state dict (if saved)."""

    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    rank_state: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def extra(self) -> dict[str, Any]:
        """Trainer state saved as ``extra`` by ``Engine.save_checkpoint`` (empty if none)."""
        return dict(self.state.get("extra", {}))


def step_dir_name(step: int) -> str:
    return f"step_{int(step):08d}"


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


# ----------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """RNG state of python ``random``, numpy's global generator, torch CPU and every CUDA device.

    Returned as plain tensors/ints/tuples so it round-trips through ``torch.load(weights_only=True)``.
    """
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
        npst = state["numpy"]
        np.random.set_state(
            (
                npst["kind"],
                npst["keys"].numpy().astype(np.uint32),
                npst["pos"],
                npst["has_gauss"],
                npst["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"RNG state is malformed ({err!r}); was it written by capture_rng_state?") from err
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # a different number of visible GPUs: restore this process's device only
            torch.cuda.set_rng_state(cuda_states[torch.cuda.current_device() % len(cuda_states)])


# ----------------------------------------------------------------------------------------- safetensors


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Save a tensor dict as safetensors, storing tied/shared tensors once.

    Tensors that are the same view of the same storage (tied embeddings) are written once; the other
    names are recorded as aliases in the file metadata and restored by ``load_safetensors``. Tensors
    that merely overlap a storage are copied, so any state dict can be saved.
    """
    seen_views: dict[tuple, str] = {}
    seen_storages: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_safetensors: value of {name!r} is {type(t).__name__}, expected a Tensor")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        storage_ptr = t.untyped_storage().data_ptr() if t.numel() > 0 else -1
        view_key = (storage_ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if storage_ptr != -1 and view_key in seen_views:
            aliases[name] = seen_views[view_key]
            continue
        if storage_ptr != -1 and storage_ptr in seen_storages:
            t = t.clone()  # overlaps another tensor's storage without being identical to it
        elif not t.is_contiguous():
            t = t.contiguous()
        if storage_ptr != -1:
            seen_views[view_key] = name
            seen_storages.add(storage_ptr)
        tensors[name] = t
    meta = dict(metadata or {})
    meta["format"] = "pt"
    if aliases:
        meta[_ALIAS_KEY] = json.dumps(aliases)
    save_file(tensors, str(path), metadata=meta)


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a file written by ``save_safetensors`` (aliases of tied tensors restored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    try:
        tensors = load_file(str(path), device=str(device))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated: {err}") from err
    for alias, original in json.loads(meta.get(_ALIAS_KEY, "{}")).items():
        tensors[alias] = tensors[original]
    return tensors


def load_torch_state(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with clear errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises assorted types (UnpicklingError, RuntimeError, EOFError)
        raise CheckpointError(
            f"checkpoint file {path} is corrupt, truncated or holds non-tensor objects "
            f"(only tensors and plain containers load with weights_only=True): {err}"
        ) from err


# ---------------------------------------------------------------------------------------- directories


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with ``meta.json``) under ``ckpt_dir``, sorted by step."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for child in ckpt_dir.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and (child / META_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_latest(ckpt_dir: str | Path) -> Path | None:
    """Newest complete checkpoint under ``ckpt_dir`` (via ``latest``, else by scanning), or None."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST_FILE
    if pointer.is_file():
        target = ckpt_dir / pointer.read_text().strip()
        if target.is_dir() and (target / META_FILE).is_file():
            return target
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` is a checkpoint (has ``meta.json``) or a directory of them (-> its latest one)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if (path / META_FILE).is_file():
        return path
    latest = find_latest(path)
    if latest is None:
        if _STEP_RE.match(path.name) or path.name.startswith(".tmp-"):
            raise CheckpointError(f"checkpoint {path} is incomplete: {META_FILE} missing (interrupted save?)")
        raise FileNotFoundError(f"no complete checkpoint (step_*/{META_FILE}) under {path}")
    return latest


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    found = list_checkpoints(ckpt_dir)
    removed = []
    for _, path in found[: max(0, len(found) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != META_FILE
    }


# ---------------------------------------------------------------------------------------------- save


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    *,
    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    state: Mapping[str, Any] | None = None,
    rank_state: Mapping[str, Any] | None = None,
    deepspeed_engine: Any = None,
    keep_last: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``ckpt_dir/step_<step>`` atomically and point ``latest`` at it.

    Args:
        tensors: name -> tensor dict, each written as ``<name>.safetensors`` by rank 0 (``"model"``,
            ``"ema"``, ...). Under ZeRO-3 gather the weights first (every rank may pass them; rank 0 writes).
        state: plain tensors/containers (optimizer, scheduler, counters, trainer extras) written by
            rank 0 to ``train_state.pt``.
        rank_state: per-rank extras written next to this rank's RNG state.
        deepspeed_engine: a DeepSpeed engine; its ``save_checkpoint`` writes ``deepspeed/`` (collective).
        keep_last: keep only the newest k checkpoints (older ones deleted after this one is in place).
        metadata: JSON-serialisable extras stored in ``meta.json``.

    Returns the final checkpoint directory. All ranks must call it in a multi-process run.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be a non-negative int, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    ckpt_dir = Path(ckpt_dir)
    name = step_dir_name(step)
    final = ckpt_dir / name
    tmp = ckpt_dir / f".tmp-{name}"
    rank, world = get_rank(), get_world_size()

    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".tmp-step_*"):  # left by an interrupted save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()

    if deepspeed_engine is not None:
        deepspeed_engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, client_state={}, save_latest=False)

    torch.save({"rng": capture_rng_state(), "state": dict(rank_state or {})}, tmp / _rank_file(rank))
    _fsync_path(tmp / _rank_file(rank))
    if rank == 0:
        for tname, tdict in (tensors or {}).items():
            if not re.match(r"^[A-Za-z0-9_.-]+$", tname):
                raise ValueError(f"save_checkpoint: tensor group name {tname!r} must be a plain file stem")
            save_safetensors(tdict, tmp / f"{tname}.safetensors", metadata={"step": str(step)})
            _fsync_path(tmp / f"{tname}.safetensors")
        torch.save(dict(state or {}), tmp / STATE_FILE)
        _fsync_path(tmp / STATE_FILE)
    barrier()

    if rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world,
            "time": time.time(),
            "tensors": sorted((tensors or {}).keys()),
            "deepspeed": deepspeed_engine is not None,
            "files": _file_sizes(tmp),
            "metadata": dict(metadata or {}),
        }
        _atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1))
        _fsync_path(tmp)
        if final.exists():  # re-saving a step after a resume: move the old one out of the way first
            trash = ckpt_dir / f".tmp-old-{name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(ckpt_dir)
        _atomic_write_text(ckpt_dir / LATEST_FILE, name + "\n")
        if keep_last is not None:
            prune_checkpoints(ckpt_dir, keep_last)
    barrier()
    return final


# ---------------------------------------------------------------------------------------------- load


def load_checkpoint(
    path: str | Path,
    *,
    restore_rng: bool = True,
    deepspeed_engine: Any = None,
    load_optimizer_states: bool = True,
    tensor_names: list[str] | None = None,
) -> LoadedCheckpoint:
    """Read a checkpoint (``path`` = a ``step_*`` dir, or a directory of them -> the latest).

    Verifies every file listed in ``meta.json`` exists with its recorded size (missing ->
    FileNotFoundError, wrong size -> CheckpointError, each naming the file), loads the tensor groups
    (``tensor_names`` to restrict), ``train_state.pt`` and this rank's ``rank*.pt`` (restoring RNG unless
    ``restore_rng=False``; a rank beyond the saved world size restores nothing). With
    ``deepspeed_engine`` the engine's module/optimizer are loaded from ``deepspeed/``.
    """
    path = resolve_checkpoint(path)
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint file {meta_path} is corrupt: {err}") from err
    if not isinstance(meta, dict) or "step" not in meta or "files" not in meta:
        raise CheckpointError(f"checkpoint file {meta_path} lacks 'step'/'files'; not an mmfm checkpoint")
    for rel, size in meta["files"].items():
        f = path / rel
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint file missing: {f} (listed in {meta_path})")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint file {f} is corrupt or truncated: {f.stat().st_size} bytes, {size} expected"
            )

    names = meta.get("tensors", []) if tensor_names is None else tensor_names
    tensors = {}
    for tname in names:
        tensors[tname] = load_safetensors(path / f"{tname}.safetensors")
    state = load_torch_state(path / STATE_FILE)
    rank = get_rank()
    rank_state: dict[str, Any] = {}
    rank_path = path / _rank_file(rank)
    if rank_path.is_file():
        blob = load_torch_state(rank_path)
        if restore_rng:
            restore_rng_state(blob["rng"])
        rank_state = blob.get("state", {})
    elif rank < int(meta.get("world_size", 1)):
        raise FileNotFoundError(f"checkpoint file missing: {rank_path}")

    if deepspeed_engine is not None:
        if not meta.get("deepspeed"):
            raise CheckpointError(f"checkpoint {path} was not written with DeepSpeed; no {DS_DIR}/ to load")
        load_path, _ = deepspeed_engine.load_checkpoint(
            str(path / DS_DIR),
            tag=DS_TAG,
            load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_optimizer_states,
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load its checkpoint from {path / DS_DIR}")
    return LoadedCheckpoint(
        path=path, step=int(meta["step"]), tensors=tensors, state=state, rank_state=rank_state, meta=meta
    )
