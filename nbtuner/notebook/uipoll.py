"""Keep widgets alive while a cell blocks: handle comm messages by hand, defer everything else.

While a cell runs, ipykernel processes no other shell message, so a Stop button's click (a
``comm_msg`` from the front end) would only be seen after the cell ends. ``%%finetune`` blocks
on purpose ("Run All" and headless execution must wait for training), so its wait loop uses
:class:`KernelPoller`:

- it reads messages straight from the ZMQ socket that feeds the main shell (ipykernel 7: the
  in-process socket the shell-channel thread forwards to; ipykernel 6: the shell ROUTER socket);
- ``comm_open``/``comm_msg``/``comm_close`` go to the kernel's comm handlers right away, on the
  main thread, which is where ipywidgets runs ``on_click`` and ``observe`` callbacks;
- anything else (an ``execute_request`` queued by "Run All", completions, inspections) is kept
  in order and handed back to the kernel's own dispatcher when the wait ends, where it queues
  behind the running cell exactly as if it had never been read.

This is what jupyter-ui-poll does through ``kernel.do_one_iteration()``, which ipykernel 7 no
longer has. Without a kernel (plain IPython, tests, scripts) there is nothing to poll and the
caller just sleeps; if the kernel looks different from what is expected, the poller switches
itself off rather than risk losing a message.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)

COMM_TYPES = frozenset({"comm_open", "comm_msg", "comm_close"})


def _main_shell_stream(kernel: Any) -> Any:
    if kernel is None:
        return None
    channel_thread = getattr(kernel, "shell_channel_thread", None)
    if channel_thread is not None:  # ipykernel >= 7: messages forwarded over an inproc pair
        pair = channel_thread.manager.get_shell_channel_to_subshell_pair(None)
        return pair.to_stream
    return getattr(kernel, "shell_stream", None)  # ipykernel 6


class KernelPoller:
    """Call :meth:`poll` repeatedly while blocking; :meth:`close` when done (always)."""

    def __init__(self, shell: Any) -> None:
        self.kernel = getattr(shell, "kernel", None)
        self.stream = None
        self.deferred: list[Any] = []
        self.handled = 0
        try:
            stream = _main_shell_stream(self.kernel)
            callback = getattr(stream, "_recv_callback", None)
            if stream is not None and callback is not None and getattr(self.kernel, "session", None):
                self.stream, self.socket, self.callback = stream, stream.socket, callback
        except Exception:  # noqa: BLE001 - an unknown kernel layout: fall back to no polling
            log.debug("widget polling unavailable", exc_info=True)

    @property
    def active(self) -> bool:
        return self.stream is not None

    def poll(self, timeout: float) -> int:
        """Waits up to `timeout` seconds for shell messages and processes what arrived."""
        if not self.active:
            return 0
        import zmq

        count = 0
        try:
            if not self.socket.poll(int(timeout * 1000), zmq.POLLIN):
                return 0
            while True:
                try:
                    frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(frames)
                count += 1
        except zmq.ZMQError:
            log.debug("widget polling stopped", exc_info=True)
            self.stream = None
        return count

    def _handle(self, frames: list[Any]) -> None:
        kernel = self.kernel
        try:
            _, parts = kernel.session.feed_identities(frames, copy=False)
            header = kernel.session.deserialize(parts, content=False, copy=False)["header"]
            msg_type = header.get("msg_type")
        except Exception:  # noqa: BLE001 - not a message we understand (e.g. "stop aborting")
            msg_type = None
        if msg_type not in COMM_TYPES:
            # Comm messages may overtake deferred requests (as with jupyter-ui-poll); deferred
            # requests keep their order among themselves.
            self.deferred.append(frames)
            return
        idents, parts = kernel.session.feed_identities(frames, copy=False)
        msg = kernel.session.deserialize(parts, content=True, copy=False)
        handler = kernel.shell_handlers.get(msg_type)
        if handler is None:
            return
        # The cell's parent header stays in place: output of a click handler lands in this cell.
        try:
            result = handler(self.stream, idents, msg)
            if inspect.isawaitable(result):
                asyncio.ensure_future(result)
        except Exception:  # noqa: BLE001 - same policy as the kernel: log, never kill the cell
            log.error("exception in widget message handler", exc_info=True)
        self.handled += 1

    def close(self) -> None:
        """Hands deferred messages back to the kernel's dispatcher, in arrival order."""
        deferred, self.deferred = self.deferred, []
        for frames in deferred:
            try:
                result = self.callback(frames)
                if inspect.isawaitable(result):
                    asyncio.ensure_future(result)
            except Exception:  # noqa: BLE001
                log.error("could not hand a deferred message back to the kernel", exc_info=True)
        self.stream = None
