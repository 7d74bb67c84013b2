"""A real browser for the dashboard's tests: Debian's chromium, driven by Playwright.

Playwright's Python API is synchronous or asyncio; our servers run on trio.
So a browser test is a plain (synchronous) test: the coordinator and the fake
selectors run on trio in a thread of their own (:class:`TrioThread`), and
the test calls into it (:meth:`TrioThread.run`). Playwright's waits
(``expect``) wait on the page's state, with a time limit, never a sleep.

No browser is downloaded (``playwright install`` is never run): the tests use
``/usr/bin/chromium`` and are skipped, loudly (see ``tests/conftest.py``),
where it is missing.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import trio

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
#: How to get the browser tests where chromium is missing.
HOW_TO_GET_CHROMIUM = "apt-get install -y chromium (Debian's package; .ci/run does it)"
_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

needs_chromium = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"browser test not run: {CHROMIUM} is missing; get it with {HOW_TO_GET_CHROMIUM}",
)


class TrioThread:
    """A trio event loop in a thread, with a nursery that lives as long as the thread."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._failure: BaseException | None = None

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        except BaseException as error:
            self._failure = error
            raise

    def __enter__(self) -> TrioThread:
        self._thread.start()
        self._ready.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(60)
        if self._failure is not None:
            raise self._failure

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    def run(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await function(*args)`` in the loop's thread; its result."""
        return trio.from_thread.run(functools.partial(function, *args), trio_token=self._token)

    def start(self, function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """``nursery.start(function, *args)`` in the thread's nursery (a task that stays)."""
        assert self._nursery is not None
        return self.run(self._nursery.start, functools.partial(function, *args))

    def start_cancellable(
        self, function: Callable[..., Awaitable[Any]], *args: Any
    ) -> tuple[Any, Callable[[], None]]:
        """:meth:`start` a task; its started value, and a function that stops it (and waits)."""
        scope = trio.CancelScope()
        stopped = threading.Event()

        async def task(*, task_status: trio.TaskStatus[Any]) -> None:
            try:
                with scope:
                    async with trio.open_nursery() as inner:
                        task_status.started(await inner.start(functools.partial(function, *args)))
            finally:
                stopped.set()

        value = self.start(task)

        def stop() -> None:
            trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
            stopped.wait(60)

        return value, stop


@contextlib.contextmanager
def chromium_page() -> Iterator[Any]:
    """A new page of a headless chromium (Debian's), with a 30 s limit on each wait."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()
