"""The disk tier: blocks in local files that check themselves, indexed, bounded, kept across mounts.

Layout: DIR/blocks/v3/<identity digest>/<unit>.blk (see slots.py for a unit
file's slots), and <name>.note beside them for a small value kept per identity
(its sha256, notes.py). DIR/blocks is the directory fusecache made and tagged in the cache
dir (cachedir.py); nothing outside it is touched. A write that fails (the disk is
full, mostly) stops writes for a while (writestop.py); reads go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fusecache.blockio import Block, BlockPool
from fusecache.cache.diskscan import left_behind, remove_older_formats
from fusecache.cache.notes import read_note, write_note
from fusecache.cache.slots import (
    DATA_OFFSET,
    FORMAT,
    HEADER,
    MAGIC,
    NOTE_SUFFIX,
    UNIT,
    accepts_direct_io,
    checksum,
    identity_digest,
    load_slot,
    punch_hole,
    store_slot,
    whole_pages,
)
from fusecache.cache.writestop import WriteStop
from fusecache.cachedir import TaggedDir
from fusecache.logrepeats import RepeatedLog
from fusecache.lru import BlockKey, ScanResistantLRU

log = logging.getLogger(__name__)
repeats = RepeatedLog(log)  # a damaged cache file fails each of its blocks


@dataclass(frozen=True)
class DiskStatistics:
    """The disk tier's counters."""

    used: int  # bytes of blocks held
    capacity: int  # bytes it may hold: at most --disk-cache and 90% of the free space
    validation_failures: int  # blocks that failed their checks when read (then refetched)
    write_errors: int  # writes that failed: the disk was full (ENOSPC, EDQUOT) or broken
    writes_refused_full: int  # writes refused at once because writes were stopped
    full_episodes: int  # times writes stopped after a failure
    full_now: bool  # writes are stopped, or being tried again after a stop

    @classmethod
    def none(cls) -> DiskStatistics:
        """The counters of a mount without a disk tier."""
        return cls(0, 0, 0, 0, 0, 0, False)


class _Size(int):
    """An index entry: only the block's size is kept in memory."""

    def __len__(self) -> int:
        return int(self)


class DiskTier:
    """Blocks on local disk, bounded by bytes, surviving remounts.

    The methods here block (file I/O); callers run them in worker threads,
    except lookups of the in-memory index (`contains`).
    """

    def __init__(self, cache_dir: Path, max_bytes: int, block_size: int = 1 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Open the cache in *cache_dir* (see cachedir.py) for this process alone.

        Raises OSError (cachedir.CacheDirError) when *cache_dir* holds what is not
        ours, or another daemon has it open.
        """
        self._dir = TaggedDir(cache_dir)
        self.root = self._dir.path / FORMAT
        self.root.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        remove_older_formats(self._dir)
        self.block_size = block_size
        self._slot = DATA_OFFSET + block_size  # bytes between the starts of two slots
        # tmpfs (before Linux 6.6) and some FUSE file systems refuse O_DIRECT.
        self.direct_io = block_size % DATA_OFFSET == 0 and accepts_direct_io(self.root)
        # Reader threads and the writer threads share the index; data moves
        # outside the lock, slots are given up (punched, unlinked) under it.
        self._lock = threading.Lock()
        self._max_bytes = max_bytes
        self._index: ScanResistantLRU[_Size] = ScanResistantLRU(max_bytes, self._evicted)
        self._digests: dict[Hashable, bytes] = {}
        # Indexed (their space is reserved) but not yet written.
        self._pending: set[BlockKey] = set()
        self._made_dirs: set[bytes] = set()  # digests whose block directory exists
        self.validation_failures = 0
        self._stop = WriteStop(self._dir.path, clock)
        self._load_index(max_bytes)

    def close(self) -> None:
        """Let another DiskTier open the cache dir (a daemon's exit does the same)."""
        self._dir.close()

    def statistics(self) -> DiskStatistics:
        with self._lock:
            return DiskStatistics(
                used=self._index.used,
                capacity=self._index.capacity,
                validation_failures=self.validation_failures,
                write_errors=self._stop.write_errors,
                writes_refused_full=self._stop.refused,
                full_episodes=self._stop.episodes,
                full_now=self._stop.stopped,
            )

    @property
    def capacity(self) -> int:
        return self._index.capacity

    @property
    def used(self) -> int:
        return self._index.used

    def _digest(self, file_key: Hashable) -> bytes:
        digest = self._digests.get(file_key)
        if digest is None:
            digest = self._digests[file_key] = identity_digest(file_key, self.block_size)
        return digest

    def _unit_path(self, digest: bytes, idx: int) -> str:
        """The file holding block *idx*; its slot starts at `_slot_offset(idx)`.

        A str, not a Path: pathlib's joins and hashes took 60 of the 140 us of Python
        in a 1 MiB block's write.
        """
        return f"{self.root}/{digest.hex()}/{idx // UNIT}.blk"

    def _slot_offset(self, idx: int) -> int:
        return idx % UNIT * self._slot

    def _load_index(self, max_bytes: int) -> None:
        """Index the slots an earlier daemon left, oldest file first.

        The capacity is the smaller of *max_bytes* and what the disk can take:
        what we already hold plus 90% of the free space.
        """
        found = left_behind(self.root, self._slot, self.block_size)
        self._fit_capacity(sum(size + DATA_OFFSET for *_, size in found))
        with self._lock:
            for _, digest, idx, size in found:
                # Indexed by digest: the file key is unknown until a reader opens the file.
                if not self._index.put((digest, idx), _Size(size)):
                    self._give_up(digest, idx)
        log.info("disk cache %s: %d blocks, %d bytes; %s", self.root, len(self._index),
                 self._index.used, "O_DIRECT" if self.direct_io else
                 "no O_DIRECT here, through the page cache")

    def _fit_capacity(self, held: int) -> None:
        """Hold at most --disk-cache, and what we hold (*held* bytes, headers too) plus 90%
        of the free space."""
        free = shutil.disk_usage(self.root).free
        self._index.capacity = min(self._max_bytes, held + int(free * 0.9))

    def _evicted(self, key: BlockKey, size: _Size) -> None:
        """The index let a block go (with the lock held): give up its slot."""
        digest = key[0]
        assert isinstance(digest, bytes)
        self._give_up(digest, key[1])

    def _give_up(self, digest: bytes, idx: int) -> None:
        """Free the slot of a block that is no longer indexed; call with the lock held.

        The unit's file goes when no other block of it is indexed (being written
        counts), else the slot is punched out.
        """
        path = self._unit_path(digest, idx)
        first = idx - idx % UNIT
        if not any((digest, i) in self._index for i in range(first, first + UNIT) if i != idx):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            punch_hole(fd, self._slot_offset(idx), self._slot)
        except OSError as exc:  # no hole punching here: the space comes back with the file
            log.debug("cannot punch out block %d of %s: %s", idx, path, exc)
        finally:
            os.close(fd)

    def contains(self, file_key: Hashable, idx: int) -> bool:
        key = (self._digest(file_key), idx)
        with self._lock:
            return key in self._index and key not in self._pending

    def contains_all(self, file_key: Hashable, idxs: Iterable[int]) -> bool:
        """Whether every block *idxs* of one identity is here: `contains`, one lock for all."""
        digest = self._digest(file_key)
        with self._lock:
            return all((key := (digest, idx)) in self._index and key not in self._pending
                       for idx in idxs)

    def read(self, file_key: Hashable, idx: int, length: int, pool: BlockPool
             ) -> Block | None:
        """The block if its slot is whole and belongs to this identity and index; else None.

        *pool* provides the block's memory.
        """
        digest = self._digest(file_key)
        key = (digest, idx)
        with self._lock:
            if key in self._pending or self._index.get(key) is None:
                return None
        path = self._unit_path(digest, idx)
        direct = self.direct_io and whole_pages(length) and pool.page_aligned
        data, why = load_slot(path, self._slot_offset(idx), (digest, idx, length), pool, direct)
        if why is None:
            return data
        repeats.log(logging.WARNING, "disk cache block %d in %s is bad (%s); fetching it again",
                    idx, path, why)
        with self._lock:
            self.validation_failures += 1
            if self._index.discard(key) is not None:
                self._give_up(digest, idx)
        return None

    @property
    def accepting_writes(self) -> bool:
        """False while writes are stopped after a failure (a full disk); cheap, no lock."""
        return self._stop.accepting

    def write(self, file_key: Hashable, idx: int, data: Block, page_aligned: bool = False
              ) -> bool:
        """Store a block; False if the index would not admit it, or writes are stopped.

        *page_aligned*: *data* starts on a page boundary (a block of a pool whose
        `page_aligned` is true), so a whole-page block may go with O_DIRECT. The caller
        says so because asking the buffer (numpy) took 27 us per block, a third of
        the write's Python.
        """
        if not self._stop.admit(self._refit):
            return False
        digest = self._digest(file_key)
        key = (digest, idx)
        with self._lock:
            if key in self._index:
                return True
            if not self._index.put(key, _Size(len(data))):
                return False
            self._pending.add(key)
        path = self._unit_path(digest, idx)
        try:
            if digest not in self._made_dirs:
                (self.root / digest.hex()).mkdir(mode=0o700, exist_ok=True)
                self._made_dirs.add(digest)
            direct = self.direct_io and whole_pages(len(data)) and page_aligned
            store_slot(path, self._slot_offset(idx),
                   HEADER.pack(MAGIC, digest, idx, len(data), checksum(data)), data, direct)
        except OSError as exc:
            log.debug("cannot write disk cache block %d to %s: %s", idx, path, exc)
            self._made_dirs.discard(digest)  # removed under us? made again next time
            with self._lock:
                self._pending.discard(key)
                if self._index.discard(key) is not None:
                    self._give_up(digest, idx)
            self._stop.failed(exc)
            return False
        self._stop.worked()
        with self._lock:
            self._pending.discard(key)
            if key in self._index:
                return True
            # Evicted or discarded while it was being written: its slot must go too.
            self._give_up(digest, idx)
        return False

    def _refit(self) -> None:
        """Writes may go on after a stop: measure the free space again."""
        with self._lock:
            self._fit_capacity(self._index.used + len(self._index) * DATA_OFFSET)

    def discard_file(self, file_key: Hashable) -> None:
        """Delete every block and note of one source identity (its content changed)."""
        digest = self._digest(file_key)
        with self._lock:
            units = {idx // UNIT for _, idx in self._index.discard_file(digest)}
            for unit in units:  # once per file, not once per block in it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._unit_path(digest, unit * UNIT))
        for note in (self.root / digest.hex()).glob(f"*{NOTE_SUFFIX}"):
            note.unlink(missing_ok=True)

    def note(self, file_key: Hashable, name: str) -> bytes | None:
        """A small value kept for one source identity (its sha256), or None (notes.py)."""
        return read_note(self.root / self._digest(file_key).hex(), name)

    def set_note(self, file_key: Hashable, name: str, value: bytes) -> None:
        """Keep *value* for one source identity, across remounts. Best effort."""
        if self._stop.admit(self._refit):
            write_note(self.root / self._digest(file_key).hex(), name, value, self._stop)
