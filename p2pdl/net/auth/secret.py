"""The swarm's shared secret: loaded once from an environment variable or a file, never shown.

:class:`Secret` holds the key bytes and refuses to be printed, formatted, hashed or pickled, so
it cannot leak into a log line, a repr or a message by accident. The trade-off is friction: code
that needs the bytes must ask for them by name (:meth:`Secret.reveal`), which only the HMAC does.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from pathlib import Path
from typing import Any, Final, NoReturn

from p2pdl.errors import AuthConfigError

log = logging.getLogger(__name__)

MIN_SECRET_BYTES: Final = 16
MAX_SECRET_BYTES: Final = 64 * 1024  # a bigger "secret file" is almost surely the wrong file


class Secret:
    """The swarm's shared key. Its repr and str are redacted; it cannot be pickled."""

    __slots__ = ("_key",)
    _key: bytes

    def __init__(self, key: bytes, *, source: str = "the secret") -> None:
        if not isinstance(key, bytes):
            raise TypeError(f"Secret wants bytes, got {type(key).__name__}")
        if len(key) < MIN_SECRET_BYTES:
            raise AuthConfigError(
                [
                    f"{source} is {len(key)} bytes; at least {MIN_SECRET_BYTES} are required "
                    "(make one with `openssl rand -hex 32`)"
                ]
            )
        object.__setattr__(self, "_key", key)

    def reveal(self) -> bytes:
        """The key bytes, for HMAC only. Never log or send them."""
        return self._key

    @property
    def size(self) -> int:
        return len(self._key)

    def __repr__(self) -> str:
        return f"Secret(<redacted>, {len(self._key)} bytes)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    __hash__ = None  # type: ignore[assignment]  # a hash of the key would leak a fingerprint

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("a Secret cannot be pickled or serialised; pass it in memory only")

    def __copy__(self) -> Secret:
        return self  # immutable

    def __deepcopy__(self, memo: object) -> Secret:
        return self


def load_secret(*, env: str | None, file: Path | None) -> Secret:
    """Read the swarm secret from exactly one of an environment variable or a file.

    One trailing newline (``\\n`` or ``\\r\\n``) is stripped, so ``openssl rand -hex 32 > f``
    works. The bytes are used as they are (hex text is a fine key). A file readable by group or
    others gets a warning. Raises AuthConfigError, whose message never contains the secret.
    """
    if (env is None) == (file is None):
        raise AuthConfigError(["give exactly one of a secret environment variable or a secret file"])
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise AuthConfigError([f"secret: environment variable {env} is not set"])
        # os.fsencode undoes the surrogateescape decoding of os.environ: the exact bytes.
        raw = os.fsencode(value)
        source = f"secret from environment variable {env}"
    else:
        assert file is not None
        raw = _read_secret_file(file)
        source = f"secret file {str(file)!r}"
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    if not raw:
        raise AuthConfigError([f"{source} is empty"])
    return Secret(raw, source=source)


def _read_secret_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise AuthConfigError([f"secret file {str(path)!r} is not a regular file"])
            raw = handle.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise AuthConfigError([f"cannot read secret file {str(path)!r}: {exc.strerror}"]) from exc
    if len(raw) > MAX_SECRET_BYTES:
        raise AuthConfigError([f"secret file {str(path)!r} is over {MAX_SECRET_BYTES} bytes; is it the right file?"])
    if os.name == "posix" and mode & 0o077:
        log.warning(
            "secret file %s is readable by group or others (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    return raw
