"""Print the config reference table (every key, default, allowed values) from the schema, or
write it into README.md between its config-reference markers.

    python launch/config_reference.py                    # print the table
    python launch/config_reference.py --write README.md  # refresh the README's copy

Exit codes: 0 done; 2 the file has no config-reference block.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from launch.common import fail
from propulsion_ds.config import reference


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", metavar="FILE", help="replace the block between the markers in FILE")
    args = p.parse_args(argv)
    if args.write is None:
        print(reference.markdown(), end="")
        return
    path = Path(args.write)
    try:
        path.write_text(reference.replace_block(path.read_text()))
    except (OSError, ValueError) as e:
        fail(f"{path}: {e}")


if __name__ == "__main__":
    main()
