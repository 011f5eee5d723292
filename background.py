"""Work the training thread need not wait for, done on a thread of its own, one job at a time."""
from __future__ import annotations

import threading
from typing import Callable, Optional


class BackgroundWorker:
    """Runs one job at a time on a thread of its own: starting a job first waits for the one
    before it, and what a job raised is raised again in the caller's thread by `wait`.

    The thread is not a daemon, so an interpreter that exits (a normal end, an error, Ctrl+C)
    lets the job finish first: a file it is writing is never cut short by the process ending.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[Exception] = None

    def start(self, job: Callable[[], None]) -> None:
        """Wait for the job before (raising what it raised), then start `job` and return."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name=self.name)
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception as error:  # kept for the caller's thread, which decides what it means
            self._error = error

    def wait(self) -> None:
        """Return once the job started last has finished; raise what it raised, once."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
