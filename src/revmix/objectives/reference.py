"""Reference policies and the on-disk cache of their log-probs.

DPO (and PPO's KL term) compare the policy with a frozen reference π_ref. Three interchangeable ways to
get π_ref's log-probs, all giving the same numbers:

* :class:`AdapterDisabledReference` — the policy itself with its LoRA adapter switched off. After a stage
  merges its adapter, the next stage trains a fresh one, so "adapter off" *is* the previous stage's
  policy, at zero extra memory (this is what TRL does for a PEFT model with ``ref_model=None``).
* :class:`FrozenCopyReference` — a deep copy with ``requires_grad=False`` (full fine-tuning).
* :class:`ReferenceLogpCache` — π_ref's summed response log-probs computed once per stage and stored per
  example, keyed by (checkpoint identity, tokenizer, the tokenised rows' content). A cached batch carries
  ``ref_chosen_logps`` / ``ref_rejected_logps`` and DPO then runs no reference forward at all (TRL's
  ``precompute_ref_log_probs``).

"Chosen" is y+ (``input_ids``/``labels``), "rejected" is y− (``other_*``), both scored in one
concatenated forward pass (:func:`concatenated_inputs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from revmix.atomic import atomic_write
from revmix.objectives.base import (
    DIRECTIONS,
    IGNORE_INDEX,
    Batch,
    Reference,
    policy_logits,
    token_logps,
)
from revmix.objectives.buckets import bucketed_logits
from revmix.objectives.prefix import supports_shared_prompt

CACHE_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Pair packing
# --------------------------------------------------------------------------------------------------


def _pad_to(x: Tensor, width: int, value: int) -> Tensor:
    if x.shape[1] == width:
        return x
    pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)


def concatenated_inputs(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, labels)`` of shape ``[2B, T]``: rows ``:B`` are y+, rows ``B:`` are y−.

    Both halves are right-padded to the same width (pad id 0, mask 0, label -100) so that chosen and
    rejected go through the model in a single forward pass — one kernel launch per layer instead of two,
    and identical numerics for both halves.
    """
    if batch.other_input_ids is None or batch.other_attention_mask is None or batch.other_labels is None:
        raise ValueError(
            "batch.other_input_ids/other_attention_mask/other_labels are None: this objective scores y− "
            "(other_response); collate with requires={'response', 'other_response'}"
        )
    width = max(batch.input_ids.shape[1], batch.other_input_ids.shape[1])
    ids = torch.cat([_pad_to(batch.input_ids, width, 0), _pad_to(batch.other_input_ids, width, 0)])
    mask = torch.cat([_pad_to(batch.attention_mask, width, 0), _pad_to(batch.other_attention_mask, width, 0)])
    labels = torch.cat(
        [_pad_to(batch.labels, width, IGNORE_INDEX), _pad_to(batch.other_labels, width, IGNORE_INDEX)]
    )
    return ids, mask, labels


def response_token_counts(batch: Batch) -> tuple[Tensor, Tensor]:
    """Number of scored response tokens of y+ and y− per row (``[B]`` each, after the causal shift)."""
    _, _, labels = concatenated_inputs(batch)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    return counts[: batch.size], counts[batch.size :]


# --------------------------------------------------------------------------------------------------
# Reference policies
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off inside the block (deterministic passes); every submodule's previous mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _reference_logits(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor | None,
    groups: int,
) -> Tensor:
    """Shared-prompt rows (a 4-D mask with ``position_ids``) in one call; plain rows per length group."""
    if position_ids is not None:
        return policy_logits(model, input_ids, attention_mask, position_ids=position_ids)
    return bucketed_logits(model, input_ids, attention_mask, groups)


class AdapterDisabledReference:
    """The policy with its PEFT adapter(s) disabled: the base model, with no extra memory.

    Runs under ``torch.no_grad()`` and in eval mode (no dropout: the reference must be deterministic);
    every submodule's previous train/eval mode is restored afterwards. ``length_groups`` and
    ``shared_prompt`` are the :class:`~revmix.objectives.base.Reference` contract.
    """

    def __init__(self, peft_model: torch.nn.Module, length_groups: int = 1) -> None:
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError(
                f"AdapterDisabledReference needs a peft.PeftModel (with .disable_adapter()), got "
                f"{type(peft_model).__name__}; use FrozenCopyReference for a full fine-tune"
            )
        self.model: Any = peft_model
        self.length_groups = length_groups
        self.shared_prompt = supports_shared_prompt(peft_model)

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        with eval_mode(self.model), self.model.disable_adapter():
            return _reference_logits(self.model, input_ids, attention_mask, position_ids, self.length_groups)


class FrozenCopyReference:
    """A deep copy of ``model`` in eval mode with every parameter frozen (the ``Reference`` contract)."""

    def __init__(self, model: torch.nn.Module, length_groups: int = 1) -> None:
        import copy

        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.length_groups = length_groups
        self.shared_prompt = supports_shared_prompt(model)

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        return _reference_logits(self.model, input_ids, attention_mask, position_ids, self.length_groups)


@torch.no_grad()
def reference_logps(ref: Reference, batch: Batch) -> tuple[Tensor, Tensor]:
    """Summed response-token log-probs of y+ (chosen) and y− (rejected) under ``ref``, ``[B]`` each.

    One concatenated forward pass (:func:`concatenated_inputs`), no gradient.
    """
    ids, mask, labels = concatenated_inputs(batch)
    logp, _ = token_logps(ref.logits(ids, mask), labels)
    total = logp.sum(-1)
    return total[: batch.size], total[batch.size :]


# --------------------------------------------------------------------------------------------------
# Identity hashes
# --------------------------------------------------------------------------------------------------


def hash_state_dict(state_dict: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict: names, dtypes, shapes and raw bytes, independent of key order.

    Use it as the "checkpoint identity" of a :class:`ReferenceLogpCache` key: any changed weight gives a
    different hash, so a stale cache can never be read for a new reference.
    """
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(model_identity: str, tokenizer_identity: str, rows: Iterable[Mapping[str, Any]]) -> str:
    """A cache key from the reference checkpoint, the tokenizer and the tokenised rows' content.

    Each row is a tokenised row (``item_id``, ``direction``, ``prompt_ids``, ``response_ids``,
    ``other_ids``): every token takes part, so an edited text, another ``max_length`` or chat template
    (which change the ids) gives another key, and a stale file is never read. Row order does not matter
    (a worker's shard arrives in any order). ``model_identity`` is e.g. :func:`hash_state_dict` of the
    reference weights or :func:`files_identity` of its weight files.
    """
    digests = sorted(_row_digest(r) for r in rows)
    h = hashlib.sha256()
    h.update(f"v{CACHE_FORMAT_VERSION}\0{model_identity}\0{tokenizer_identity}\0{len(digests)}\0".encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()[:32]


def _row_digest(row: Mapping[str, Any]) -> bytes:
    content = [
        str(row["item_id"]),
        _direction_name(row["direction"]),
        *([int(t) for t in row[k]] for k in ("prompt_ids", "response_ids", "other_ids")),
    ]
    return hashlib.sha256(json.dumps(content).encode()).digest()


WEIGHT_FILES = ("*.safetensors", "*.bin")


def files_identity(folder: str | os.PathLike[str], memo: str | os.PathLike[str] | None = None) -> str:
    """SHA-256 over ``folder``'s weight files (:data:`WEIGHT_FILES`) and ``config.json``: each file's name
    and the SHA-256 of its bytes (:func:`file_digest`; remembered in ``memo`` when given). The reference
    model's identity by content, whatever its path or modification time."""
    folder = Path(folder)
    weights = sorted(f for pattern in WEIGHT_FILES for f in folder.glob(pattern))
    if not weights:
        raise FileNotFoundError(
            f"{folder}: no weight files ({', '.join(WEIGHT_FILES)}) to identify the reference model by"
        )
    h = hashlib.sha256()
    for f in weights + sorted(folder.glob("config.json")):
        h.update(f"{f.name}\0{file_digest(f, memo)}\0".encode())
    return h.hexdigest()


MEMO_SETTLE_NS = 2_000_000_000
"""A digest is remembered only for a file unchanged for this long (see :func:`file_digest`)."""


def file_digest(path: Path, memo: str | os.PathLike[str] | None = None) -> str:
    """SHA-256 of the bytes of ``path``; with ``memo`` (a folder), remembered under the file's stat
    signature, so every worker of every stage reading the same weights hashes them once per node.

    Why a stat signature and not a cheaper manifest: nothing cheaper than the bytes is sound. A
    safetensors header lists names, dtypes, shapes and offsets, which a fine-tune leaves as they were;
    hashing the first and last MiB misses a change to any tensor in between (a stage that trained only
    the middle layers). The signature is (real path, device, inode, size, mtime_ns, ctime_ns): the
    kernel sets ``ctime`` on every write, truncate or rename onto the path, and no call (``touch``,
    ``os.utime``) can set it back, so a file whose bytes may have changed gets a new signature and is
    hashed again, as git's index decides which files to rehash. The one gap is a write within the
    timestamp granularity after the hash (a "racy" file): a file changed less than
    :data:`MEMO_SETTLE_NS` ago is hashed but not remembered. A copy elsewhere (another node, path or
    inode) is hashed once there. The memo is written atomically; one that cannot be read or written
    only costs a hash.
    """
    if memo is None:
        return _sha256_file(path)
    before = os.stat(path)
    entry = Path(memo) / _stat_signature(path, before)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        digest = entry.read_text()
        if len(digest) == 64:
            return digest
    digest = _sha256_file(path)
    after = os.stat(path)
    settled = time.time_ns() - after.st_ctime_ns > MEMO_SETTLE_NS
    if settled and _stat_signature(path, after) == entry.name:
        with contextlib.suppress(OSError):
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(entry, digest)
    return digest


def _stat_signature(path: Path, st: os.stat_result) -> str:
    fields = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return hashlib.sha256("\0".join(map(str, fields)).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _direction_name(direction: int | str) -> str:
    if isinstance(direction, str):
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
        return direction
    code = int(direction)
    if code not in (0, 1):
        raise ValueError(f"unknown direction code {code}; valid: 0 (forward), 1 (reverse)")
    return DIRECTIONS[code]


def _item_ids(batch: Batch, method: str) -> list[str]:
    if batch.item_id is None:
        raise ValueError(
            f"ReferenceLogpCache.{method}: batch.item_id is None; collate item_id to use the cache"
        )
    return batch.item_id


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------


class ReferenceLogpCache:
    """Per-example reference log-probs on disk: ``{direction: {item_id: [chosen, rejected, n_c, n_r]}}``.

    ``chosen``/``rejected`` are summed response-token log-probs of y+/y− (as :func:`reference_logps`);
    ``n_c``/``n_r`` their token counts (for length-normalised DPO and sanity checks). The file is
    ``<cache_dir>/ref_logps-<key>.json``; JSON keeps it inspectable, and float32 values round-trip exactly
    through Python floats. :meth:`save` is atomic: a killed job never leaves a half-written cache.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], key: str) -> None:
        if not key or any(c in key for c in "/\\\0"):
            raise ValueError(f"ReferenceLogpCache key must be a non-empty file-name-safe string, got {key!r}")
        self.cache_dir = Path(cache_dir)
        self.key = key
        self.path = self.cache_dir / f"ref_logps-{key}.json"
        self._entries: dict[str, dict[str, list[float]]] = {name: {} for name in DIRECTIONS}

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def get(
        self, item_ids: Sequence[str], directions: Tensor | Sequence[int | str]
    ) -> tuple[Tensor, Tensor] | None:
        """``(chosen [B], rejected [B])`` float32 tensors, or ``None`` if any row is missing."""
        dirs = directions.tolist() if isinstance(directions, Tensor) else list(directions)
        out: list[list[float]] = []
        for item_id, d in zip(item_ids, dirs, strict=True):
            entry = self._entries[_direction_name(d)].get(str(item_id))
            if entry is None:
                return None
            out.append(entry)
        if not out:
            return None
        values = torch.tensor([e[:2] for e in out], dtype=torch.float32)
        return values[:, 0], values[:, 1]

    def put(
        self,
        item_ids: Sequence[str],
        directions: Tensor | Sequence[int | str],
        chosen: Tensor,
        rejected: Tensor,
        chosen_tokens: Tensor | None = None,
        rejected_tokens: Tensor | None = None,
    ) -> None:
        """Store one batch's reference log-probs (token counts optional, stored as -1 when absent)."""
        dirs = directions.tolist() if isinstance(directions, Tensor) else list(directions)
        n = len(item_ids)
        if not (len(dirs) == chosen.numel() == rejected.numel() == n):
            raise ValueError(
                f"ReferenceLogpCache.put: lengths differ (item_ids {n}, directions {len(dirs)}, "
                f"chosen {chosen.numel()}, rejected {rejected.numel()})"
            )
        c = chosen.detach().float().cpu().tolist()
        r = rejected.detach().float().cpu().tolist()
        nc = chosen_tokens.tolist() if chosen_tokens is not None else [-1] * n
        nr = rejected_tokens.tolist() if rejected_tokens is not None else [-1] * n
        for i in range(n):
            self._entries[_direction_name(dirs[i])][str(item_ids[i])] = [c[i], r[i], int(nc[i]), int(nr[i])]

    def attach(self, batch: Batch) -> bool:
        """Set ``batch.ref_chosen_logps/ref_rejected_logps`` from the cache; ``False`` on any miss."""
        hit = self.get(_item_ids(batch, "attach"), batch.direction)
        if hit is None:
            return False
        device = batch.input_ids.device
        batch.ref_chosen_logps, batch.ref_rejected_logps = hit[0].to(device), hit[1].to(device)
        return True

    def fill(self, ref: Reference, batch: Batch) -> None:
        """Compute ``ref``'s log-probs for ``batch`` and store them (the once-per-stage precompute)."""
        item_ids = _item_ids(batch, "fill")
        chosen, rejected = reference_logps(ref, batch)
        n_c, n_r = response_token_counts(batch)
        self.put(item_ids, batch.direction, chosen, rejected, n_c, n_r)

    def save(self) -> Path:
        """Write atomically (:func:`revmix.atomic.atomic_write`)."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        payload = {"version": CACHE_FORMAT_VERSION, "key": self.key, "entries": self._entries}
        return atomic_write(self.path, json.dumps(payload))

    def load(self) -> bool:
        """Read the cache file if it exists (``False`` if not); a wrong key or version is an error."""
        if not self.path.exists():
            return False
        with open(self.path) as f:
            payload = json.load(f)
        if payload.get("version") != CACHE_FORMAT_VERSION or payload.get("key") != self.key:
            raise ValueError(
                f"{self.path}: cache file has version {payload.get('version')!r} / key {payload.get('key')!r}, "
                f"expected version {CACHE_FORMAT_VERSION} / key {self.key!r}; delete the file to rebuild it"
            )
        entries = payload["entries"]
        unknown = sorted(set(entries) - set(DIRECTIONS))
        if unknown:
            raise ValueError(f"{self.path}: unknown direction(s) {unknown}; valid: {', '.join(DIRECTIONS)}")
        self._entries = {name: dict(entries.get(name, {})) for name in DIRECTIONS}
        return True
