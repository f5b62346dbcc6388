"""The embedded default's generated secrets: made once, kept with mode 600 in the data directory, so a
first run needs no configuration and a restart keeps the tokens it minted valid."""

from __future__ import annotations

import os
from pathlib import Path

DEV_SECRET_FILE = "dev-secret"
DEV_API_KEY_FILE = "dev-api-key"


def dev_secret(data_dir: Path, name: str = DEV_SECRET_FILE) -> str:
    """The secret in ``data_dir / name``, generated (48 random bytes, URL-safe) when the file is missing."""
    path = data_dir / name
    if path.exists():
        return path.read_text().strip()
    import secrets  # ~5 ms (hmac, random): only on the first run of the embedded default

    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    # O_EXCL with the mode: the file is never readable by others, not even between create and chmod.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value
