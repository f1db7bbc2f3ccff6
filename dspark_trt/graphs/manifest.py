"""An engine directory's contract: `manifest.json` and the files it lists (export/engines.py writes them).

The manifest is all a runtime needs besides the graph files: the model configs (target and DeepSpec
drafter config), tap layers, block size, mask token, a reduced draft vocabulary's size
(`draft_vocab_size`, only when the drafter has one), the DSparkVerify node ending the target graph
(`verify`: graph, node, op, the library that runs it), each graph's file, I/O names/shapes/dtypes and
sha256, and the versions that produced them. `build-engines` adds validation results, tokenizer files and the
drafter's STS calibration when the drafter has one stored (`calibration`: its file and sha256).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dspark_trt.errors import DSparkError
from dspark_trt.graphs.draft_graph import missing_graphs

MANIFEST = "manifest.json"
CALIBRATION = "calibration.json"  # the drafter's STS calibration, copied in by build-engines
FORMAT = "dspark-trt-engines/1"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def read_manifest(engine_dir: str | Path) -> dict:
    """The manifest of an engine directory; errors name the directory and what is wrong."""
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise DSparkError(f"{engine_dir}: no {MANIFEST} (build one with `dspark-trt build-engines`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DSparkError(f"{path}: not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise DSparkError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    for name, graph in manifest["graphs"].items():
        if not (Path(engine_dir) / graph["file"]).is_file():
            raise DSparkError(f"{engine_dir}: graph '{name}' file {graph['file']} is missing")
    return manifest


def engines_calibration(engine_dir: str | Path | None, manifest: dict | None = None) -> Path | None:
    """The drafter calibration build-engines copied into the engine directory, if its drafter had one
    (`manifest`: the directory's, when the caller has read it already)."""
    if engine_dir is None:
        return None
    entry = (manifest or read_manifest(engine_dir)).get("calibration")
    return Path(engine_dir) / entry["file"] if entry else None


def is_current_build(engine_dir: str | Path) -> bool:
    """Whether engine_dir holds a build this dspark-trt runs: a manifest it reads, naming every graph it loads
    (engines an older version built may lack one and must be rebuilt; a cache of builds checks this)."""
    try:
        return not missing_graphs(read_manifest(engine_dir))
    except DSparkError:
        return False


def load_engine_tokenizer(engine_dir: str | Path):
    """The tokenizer (with its chat template) that build-engines copied into the engine directory."""
    path = Path(engine_dir) / "tokenizer"
    if not path.is_dir():
        raise DSparkError(f"{engine_dir}: no tokenizer/ directory (built by `dspark-trt build-engines`)")
    return load_tokenizer_dir(path)


def load_tokenizer_dir(path: str | Path):
    """A tokenizer directory build-engines saved (tokenizer.json + chat template), as transformers' fast
    tokenizer: the class AutoTokenizer resolves for it too, but AutoTokenizer imports torch on the way
    (transformers' config modules), about 250 MB in each Triton model process that only tokenizes."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))
