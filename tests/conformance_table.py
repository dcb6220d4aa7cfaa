"""Write the conformance table: every causal LM family of the installed transformers, and
whether qstar_mini supports it (every check of tests/test_conformance.py passes), refuses it
(with its one-line reason), fails it (which check, by how much) or cannot test it (why).

    python tests/conformance_table.py docs/conformance.md          # one implementation per family
    python tests/conformance_table.py docs/conformance.md --full   # eager and sdpa (a few minutes)

The checks are those of the test suite (tests/conformance_models.py), run the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="where to write the markdown table")
    parser.add_argument("--full", action="store_true",
                        help="test both attention implementations of every family (as QSTAR_CONFORMANCE=full)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.full:
        os.environ["QSTAR_CONFORMANCE"] = "full"
    import conformance_models as cm      # after the environment variable: it reads it on import

    start = time.perf_counter()

    def progress(model_type, impl, status):
        if not args.quiet:
            print(f"{time.perf_counter() - start:6.1f}s  {model_type:28s} {impl:5s} {status}", file=sys.stderr)

    text = cm.table(full=args.full or cm.FULL, progress=progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} ({len(text.splitlines()) - 4} families, {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
