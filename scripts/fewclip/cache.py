"""``fewclip cache verify [DIR]``: the full check of every store, on demand.

Loads check sizes, modification times and manifests (``caches/FORMAT.md``); this command hashes every byte of
every store and bank chunk under DIR and compares with the manifests. Exit code 0 when everything matches, 1 when
a store is damaged (each listed with the recorded and found figures), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fewclip.console import quiet_logging


def default_cache_dir() -> str:
    """The run config's default: ``$FEWCLIP_CACHE_DIR``, else ``./.fewclip_cache``."""
    return os.environ.get("FEWCLIP_CACHE_DIR", ".fewclip_cache")


def verify_main(argv: list[str]) -> int:
    from caches.store import verify_tree

    p = argparse.ArgumentParser(prog="fewclip cache verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default=None,
                   help="a cache directory or any folder inside one (default: $FEWCLIP_CACHE_DIR or ./.fewclip_cache)")
    p.add_argument("-v", "--verbose", action="store_true", help="also list the stores that verify")
    args = p.parse_args(argv)
    quiet_logging()
    root = Path(args.dir or default_cache_dir())
    if not root.is_dir():
        sys.stderr.write(f"fewclip cache verify: {root} is not a directory\n")
        return 2
    t = time.perf_counter()
    reports = verify_tree(root)
    size = sum(f.stat().st_size for r in reports for f in r.path.iterdir() if f.is_file())
    for r in reports:
        if r.status == "bad":
            sys.stdout.write(f"DAMAGED {r.path}: {r.detail}\n")
        elif r.status == "old":
            sys.stdout.write(f"old     {r.path}: {r.detail}\n")
        elif args.verbose:
            sys.stdout.write(f"ok      {r.path}\n")
    counts = {s: sum(r.status == s for r in reports) for s in ("ok", "bad", "old")}
    sys.stdout.write(f"{len(reports)} stores under {root} ({size / 1e9:.2f} GB hashed in "
                     f"{time.perf_counter() - t:.1f} s): {counts['ok']} verified, {counts['bad']} damaged, "
                     f"{counts['old']} of an older format (unused, can be deleted)\n")
    if counts["bad"]:
        sys.stdout.write("Damaged stores are rebuilt from the feature banks by the next run that needs them; "
                         "a damaged bank chunk's images are encoded again.\n")
    return 1 if counts["bad"] else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["verify"]:
        return verify_main(argv[1:])
    sys.stderr.write("usage: fewclip cache verify [DIR] [-v]\n")
    return 2
