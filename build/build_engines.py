#!/usr/bin/env python3
"""Entry script for `dspark-trt build-engines` (same arguments; see --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dspark_trt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["build-engines", *sys.argv[1:]]))
