"""Ingress back-pressure: at most N running requests, at most Q waiting, the rest refused at once."""

from __future__ import annotations

import asyncio

from services.config import AdmissionConfig
from services.errors import Overloaded


class Admission:
    """A bounded queue in front of a bounded set of running requests (one router replica).

    ``acquire`` returns once the request may run, or raises ``Overloaded``
    immediately if ``max_active_requests`` run and ``max_queued_requests`` wait.
    Every successful ``acquire`` must be paired with one ``release``.
    """

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._slots = asyncio.Semaphore(config.max_active_requests)
        self._active = 0
        self._waiting = 0

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return self._waiting

    async def acquire(self) -> None:
        if self._active >= self.config.max_active_requests and self._waiting >= self.config.max_queued_requests:
            raise Overloaded(self.config.retry_after_s)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._active += 1

    def release(self) -> None:
        self._active -= 1
        self._slots.release()
