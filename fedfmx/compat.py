"""What Python 3.11 added that the package uses, for JetPack 6's Python 3.10.

`StrEnum`: members are their values as strings (`str(m) == f"{m}" == m.value`), as in 3.11.
`Self`: the typing alias (typing_extensions on 3.10). Import these from here, never from
`enum` / `typing` directly (`ruff --target-version py310` and `mypy --python-version 3.10`
in CI keep other 3.11-only names out).
"""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum
    from typing import Self
else:  # pragma: no cover - exercised on Python 3.10 only
    from typing_extensions import Self

    class StrEnum(str, Enum):
        """3.11's StrEnum: `str()` and `format()` give the value, not `Class.member`."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return str(self.value).__format__(spec)


__all__ = ["Self", "StrEnum"]
