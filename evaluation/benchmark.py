"""fedseg's benchmarks behind one entry point: ``python -m evaluation.benchmark NAME [...]``.

NAME is ``heterogeneity`` (strategies vs pooled and local-only training), ``privacy`` (Dice
against epsilon under user-level differential privacy), ``deployment``
(round overhead on Flower's deployment engine), ``harmonise`` or ``metrics``; the options
after it are that benchmark's own (``--help``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

BENCHMARKS = ("heterogeneity", "privacy", "deployment", "harmonise", "metrics", "predict")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in BENCHMARKS:
        print(__doc__, file=sys.stderr)
        print(f"choose one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"evaluation.benchmark_{args[0]}")
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
