"""What every document source shares: the bad-record policy, and `EpochIterator`, which repeats a
one-pass reader epoch after epoch with a small JSON state.

Its own module so that the sources of local files (sources.py) and of dataset hubs (hub_sources.py)
both build on it without importing each other: sources.py chooses among them and imports both.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Callable, Optional

import grain

from jaxllm.config import JaxllmError
from jaxllm.data import readers

logger = logging.getLogger("jaxllm.data.sources")  # the name bad-record warnings have always had

_WARN_FIRST = 10  # bad records logged one by one; after that one line every _WARN_EVERY
_WARN_EVERY = 1000


class BadRecordPolicy:
    """Skips a bad record with a rate-limited warning, or raises an error naming file and line."""

    def __init__(self, policy: str):
        self.policy = policy
        self.count = 0

    def __call__(self, where: str, problem: str) -> None:
        if self.policy == "error":
            raise JaxllmError(f"{where}: {problem}; fix it or set data.on_bad_record=skip")
        self.count += 1
        if self.count <= _WARN_FIRST:
            more = " (further bad records are counted, not listed)" if self.count == _WARN_FIRST else ""
            logger.warning("skipping %s: %s%s", where, problem, more)
        elif self.count % _WARN_EVERY == 0:
            logger.warning("skipped %d bad records so far; the latest: %s: %s", self.count, where, problem)


class EpochIterator(grain.DatasetIterator):
    """Repeats a one-pass reader epoch after epoch; fails loudly when a whole pass yields nothing.

    Subclasses implement `_read()` (next document or None at the end of the epoch), `_restart()`
    (go to the start of epoch `self.epoch`), `_position()` and `_seek(position)`.
    """

    def __init__(self, name: str, process_index: int, process_count: int, num_epochs: Optional[int],
                 convert: Optional[Callable[[dict], Optional[dict]]] = None):
        super().__init__()
        self.name, self.process_index, self.process_count = name, process_index, process_count
        self._convert = convert  # whole records -> documents (sources.py's module docstring); None: text only
        self._num_epochs = num_epochs
        self.epoch = 0
        self._yielded = False  # any document in this epoch yet? (an all-bad source must not loop forever)

    def __next__(self) -> dict[str, str]:
        while self._num_epochs is None or self.epoch < self._num_epochs:
            doc = self._read()
            if doc is not None:
                self._yielded = True
                return doc
            if not self._yielded:
                shard = f" for process {self.process_index} of {self.process_count}" if self.process_count > 1 else ""
                others = ", or another process's" if self.process_count > 1 else ""
                raise JaxllmError(
                    f"data source {self.name} yielded no documents in a whole pass{shard}: every record was empty "
                    f"or bad (see the warnings above){others}; check the path, format and text_field"
                )
            self.epoch, self._yielded = self.epoch + 1, False
            self._restart()
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "yielded": self._yielded, **self._position()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.epoch, self._yielded = state["epoch"], state["yielded"]
        self._seek(state)

    def _convert_record(self, record: dict, number: int) -> Optional[dict]:
        """`convert(record)`; a `readers.RecordError` becomes a `readers.BadRecord` of record `number`."""
        try:
            return self._convert(record)
        except readers.RecordError as e:
            raise readers.BadRecord(number, str(e)) from None

    # What a source implements (sources.FilesIterator, hub_sources.HFIterator, hub_sources.TfdsIterator):

    @abc.abstractmethod
    def _read(self) -> Optional[dict[str, str]]:
        """The next record of this process's share in the current epoch, or None at its end."""

    @abc.abstractmethod
    def _restart(self) -> None:
        """Go back to the start of the share for a new epoch."""

    @abc.abstractmethod
    def _position(self) -> dict[str, Any]:
        """Where the next `_read` continues (JSON-serialisable; saved with checkpoints)."""

    @abc.abstractmethod
    def _seek(self, state: dict[str, Any]) -> None:
        """Continue from a `_position` (and the epoch already set)."""
