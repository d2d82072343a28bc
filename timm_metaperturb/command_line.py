"""How the entry points (`train/*.py`, `hub/*.py`, `python -m timm_metaperturb`) end on a user's mistake: one
line that says what was wrong and what to do, and a non-zero exit status. The traceback is for developers:
`--debug` or TIMM_METAPERTURB_DEBUG=1 shows it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

DEBUG_FLAG = "--debug"
DEBUG_SWITCH = "TIMM_METAPERTURB_DEBUG"


def run_main(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Call `main(argv)` (default: the command line); on an exception print `error: <message>` and exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_SWITCH, "0") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        main(argv)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr)
        sys.exit(1)
