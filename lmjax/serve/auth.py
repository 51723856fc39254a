"""API keys and per-key rate limits for the HTTP server.

The keys file is TOML, one table per key:

    [[keys]]
    name = "alice"                 # shown in logs and metrics instead of the key
    key = "sk-lmjax-..."           # sent by clients as `Authorization: Bearer <key>`
    requests_per_minute = 60       # optional
    tokens_per_minute = 20000      # optional: prompt tokens plus max_tokens, counted when a request is admitted
    admin = true                   # optional: may call POST /admin/reload

Keys are compared in constant time against every entry; neither the file nor a key is ever logged. Limits are
moving one-minute windows (the `limits` library); tokens are reserved at admission (prompt + max_tokens), as
OpenAI counts them, so a request cannot overrun a key's budget by generating.
"""

import dataclasses
import hmac
import time
import tomllib
from pathlib import Path

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from lmjax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """One client's key and limits (None: unlimited)."""

    name: str
    key: str = dataclasses.field(repr=False)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    admin: bool = False


class RateLimited(Exception):
    """A key is over one of its limits; `retry_after` is in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def read_keys(path: str | Path) -> list[ApiKey]:
    """The keys of a TOML keys file; `ConfigError` naming the entry for a malformed one."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read the API keys file {path}: {e}") from None
    entries = data.get("keys")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected one or more [[keys]] tables")
    keys, names, secrets = [], set(), set()
    for i, entry in enumerate(entries):
        where = f"{path}: [[keys]] entry {i}"
        unknown = set(entry) - {f.name for f in dataclasses.fields(ApiKey)}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        name, key = entry.get("name"), entry.get("key")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: 'name' must be a non-empty string")
        if not isinstance(key, str) or len(key) < 16:
            raise ConfigError(f"{where} ({name}): 'key' must be a string of at least 16 characters")
        for limit in ("requests_per_minute", "tokens_per_minute"):
            value = entry.get(limit)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{where} ({name}): {limit!r} must be a positive integer")
        if not isinstance(entry.get("admin", False), bool):
            raise ConfigError(f"{where} ({name}): 'admin' must be true or false")
        if name in names or key in secrets:
            raise ConfigError(f"{where} ({name}): duplicate name or key")
        names.add(name)
        secrets.add(key)
        keys.append(ApiKey(**entry))
    return keys


class KeyRing:
    """Finds the key a request presents and enforces its limits."""

    def __init__(self, keys: list[ApiKey]):
        self.keys = keys
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._items: dict[tuple[str, str], RateLimitItem] = {}
        for k in keys:
            for kind in ("requests", "tokens"):
                limit = getattr(k, f"{kind}_per_minute")
                if limit is not None:
                    self._items[k.name, kind] = RateLimitItemPerMinute(limit)

    def find(self, presented: str) -> ApiKey | None:
        """The key equal to `presented`, comparing with every key in constant time."""
        found = None
        for k in self.keys:
            if hmac.compare_digest(k.key.encode(), presented.encode()):
                found = k
        return found

    def admit_request(self, key: ApiKey) -> None:
        """Counts one request against `key`; `RateLimited` if it is over its requests per minute."""
        self._hit(key, "requests", 1)

    def admit_tokens(self, key: ApiKey, tokens: int) -> None:
        """Reserves `tokens` against `key`; `RateLimited` if that would exceed its tokens per minute."""
        item = self._items.get((key.name, "tokens"))
        if item is not None and tokens > item.amount:
            raise RateLimited(f"the request needs {tokens} tokens but key {key.name!r} allows {item.amount} per "
                              "minute: lower max_tokens or shorten the prompt", 60)
        self._hit(key, "tokens", tokens)

    def _hit(self, key: ApiKey, kind: str, cost: int) -> None:
        item = self._items.get((key.name, kind))
        if item is None or self._limiter.hit(item, key.name, kind, cost=cost):
            return
        stats = self._limiter.get_window_stats(item, key.name, kind)
        retry = max(1, int(stats.reset_time - time.time()) + 1)
        raise RateLimited(f"key {key.name!r} is over its limit of {item.amount} {kind} per minute; "
                          f"retry in {retry} s", retry)
