"""What every absl script in experiments/ and bench/ shares: its ``main``.

Scripts parse flags and call the library; a bad input ends in one line on stderr
(``<script>: <file>: <problem>``) and exit status 1, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def absl_main(name: str, run: Callable[[], int]) -> Callable[[list[str]], int]:
    """An ``app.run`` main that rejects stray arguments and prints cmmas errors in one line.

    Args:
        name: the script's name, prefixed to error messages.
        run: the script's body, reading ``absl.flags.FLAGS``; returns the exit status.
    """
    from absl import app

    def main(argv: list[str]) -> int:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        from cmmas.errors import CmmasError

        try:
            return run()
        except CmmasError as err:
            print(f"{name}: {err}", file=sys.stderr)
            return 1

    return main
