"""Load-time check of an engine directory: every file the manifest lists must be the file that was built.

`build-engines` records each graph's and tokenizer file's sha256 in manifest.json. A truncated copy,
a graph from another build or an edited manifest then fails when a served model loads, with the file
and the mismatch named, instead of as a protobuf error or, worse, wrong tokens mid-request.
Hashing costs about a second per GB, once per model load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from dspark_trt.errors import DSparkError
from dspark_trt.graphs.manifest import read_manifest, sha256


class CorruptEngineError(DSparkError):
    """A file of an engine directory does not match its manifest."""


def check_engine_files(engine_dir: str | Path, graphs: Iterable[str] | None = None) -> dict:
    """The manifest of engine_dir once the named graphs (default: all) and the tokenizer files match
    their recorded sha256; CorruptEngineError naming the file and both hashes otherwise."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    entries = [(f"graph '{name}'", entry) for name, entry in manifest["graphs"].items()
               if graphs is None or name in graphs]
    entries += [(f"graph '{name}' weights", entry["data"]) for name, entry in manifest["graphs"].items()
                if "data" in entry and (graphs is None or name in graphs)]
    entries += [("tokenizer file", entry) for entry in manifest.get("tokenizer", {}).get("files", [])]
    for what, entry in entries:
        path = engine_dir / entry["file"]
        if not path.is_file():
            raise CorruptEngineError(f"{path}: {what} listed in {engine_dir / 'manifest.json'} is missing")
        expected = entry.get("sha256")
        if expected is None:
            continue
        actual = sha256(path)
        if actual != expected:
            raise CorruptEngineError(
                f"{path}: {what} does not match {engine_dir / 'manifest.json'}: sha256 {actual[:16]}... "
                f"({path.stat().st_size} bytes), manifest says {expected[:16]}...; the file is truncated, corrupt "
                "or from another build: rebuild with `dspark-trt build-engines`")
    return manifest
