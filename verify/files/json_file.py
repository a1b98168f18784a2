"""Reading a JSON file the user gave: parsed, or one line naming the file and what is wrong with it."""

from __future__ import annotations

import json
from pathlib import Path

from verify.errors import VerifyError


def read_json(path: Path):
    """The parsed contents of `path`; VerifyError when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise VerifyError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VerifyError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise VerifyError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
