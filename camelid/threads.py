"""Where slow loads run: each in a thread of its own that ends with it (the server's models, draft and guard, and
camelid.load's conversion).

Torch's CPU kernels (and the compiled decode step's) run on OpenMP, and libgomp gives every thread that starts a
parallel region a team of worker threads that lives as long as that thread. Once its threads outnumber the cores,
libgomp stops letting idle workers spin and wakes them through the kernel for every parallel region: on 2 cores a
server whose main thread had loaded the model (a team of its own) decoded in its engine thread at 34 ms a token
against 7 ms in-process (the same compiled step; eager 31 against 15 ms), and so did an app that loaded a model and
generated in a worker thread. A load in a thread that then ends takes its team with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _start(fn: Callable[..., T], args: tuple, kwargs: dict) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
            future.set_exception(e)

    threading.Thread(target=run, name="camelid-load", daemon=True).start()
    return future


def in_own_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) run in a new thread that ends with it; its result, or its exception raised here."""
    return _start(fn, args, kwargs).result()


async def in_own_thread_async(fn: Callable[..., T], *args, **kwargs) -> T:
    """The same, awaited from the event loop (asyncio.to_thread's pool threads live on, and their teams with them)."""
    return await asyncio.wrap_future(_start(fn, args, kwargs))
