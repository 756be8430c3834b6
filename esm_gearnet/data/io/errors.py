"""The error the structure reader raises, and other libraries' messages cut to their first line."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional


class StructureError(ValueError):
    """A structure file that cannot be turned into a protein; the message names the file and the reason."""
    __module__ = "esm_gearnet.data.io"  # its public home: tracebacks and pickles name it there


def _first_line(error: BaseException, path: Optional[Path] = None) -> str:
    text = str(error).strip().splitlines()
    line = text[0].strip() if text else type(error).__name__
    if path is not None and line.startswith(str(path)):  # gemmi repeats the path: "file.cif:1:0(0): ..."
        line = line[len(str(path)):].lstrip(":")
    line = re.sub(r"^string:(\d+):\d+\(\d+\):", r"line \1:", line)  # gemmi's place in text it was given
    return line.rstrip(":").strip() or type(error).__name__
