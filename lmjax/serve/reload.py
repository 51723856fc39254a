"""The engine a server sends requests to, and its replacement by another run (`POST /admin/reload`) without
dropping requests: the new run loads and compiles beside the live one, then takes the new requests; requests
already running finish on the old engine, which is closed once idle."""

import threading
import time

from lmjax.config import LmjaxError
from lmjax.serve.engine import ChatEngine
from lmjax.serve.errors import ApiError


class LiveEngine:
    """Holds the live `ChatEngine` (`current`); `replace` switches it to another run, `close` closes it and every
    engine still being retired."""

    def __init__(self, engine: ChatEngine):
        self.current = engine
        self._reloading = threading.Lock()
        self._closing = threading.Event()  # set at shutdown: engines being retired close at once
        self._retiring: list[threading.Thread] = []

    def replace(self, workdir: str | None, step: int | None) -> ChatEngine:
        """Loads and compiles `workdir` (default: the live run's) at `step`, then makes it live; the old engine
        finishes its running requests and is closed once idle. Same tokenizer and context only. 409 while another
        reload runs; 400 for a run that cannot be loaded or does not fit."""
        if not self._reloading.acquire(blocking=False):
            raise ApiError(409, "a reload is already running", code="reload_in_progress")
        try:
            live = self.current
            path = workdir or (str(live.workdir.path) if live.workdir else None)
            if path is None:
                raise ApiError(400, "name the run directory to load ('workdir')", "workdir")
            try:
                new = ChatEngine.from_workdir(path, step, num_slots=live.engine.num_slots)
            except LmjaxError as e:
                raise ApiError(400, f"cannot load {path}: {e}", "workdir", "bad_run") from None
            if new.tokenizer.fingerprint != live.tokenizer.fingerprint or new.context != live.context:
                raise ApiError(400, f"{path} has another tokenizer or context than the live run; start a new server "
                               "for it", "workdir", "incompatible_run")
            new.start(warmup=True)
            self.current = new
            retire = threading.Thread(target=_retire, args=(live, self._closing), daemon=True, name="lmjax-retire")
            self._retiring.append(retire)
            retire.start()
            return new
        finally:
            self._reloading.release()

    def close(self) -> None:
        """Closes the live engine and, at once, every engine still being retired (server shutdown)."""
        self._closing.set()
        for retire in self._retiring:
            retire.join()
        self.current.close()


def _retire(engine: ChatEngine, closing: threading.Event, grace: float = 1.0) -> None:
    """Closes a replaced engine once it has had no work for `grace` seconds (requests that picked it just
    before the switch still get submitted and served), or at once when the server shuts down (`closing`)."""
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < grace and not closing.wait(0.1):
        if engine.engine.has_work():
            idle_since = time.monotonic()
    engine.close()
