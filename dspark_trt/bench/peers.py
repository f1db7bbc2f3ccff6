"""Optional peers for `bench ar` and `bench speedup`: decoders of the same model that are not ours, run in
our process. llama.cpp is in bench/llama_cpp_peer.py; onnxruntime-genai is here.

onnxruntime-genai (`pip install -e '.[peers]'`): its model builder's int4 CPU model (GroupQueryAttention,
MatMulNBits, fused norms) of the SAME weights our target comes from. The GGUF is written out as a Hugging
Face directory with transformers (dequantized floats, `quantization_config` dropped), the builder turns it
into `model.onnx` + `genai_config.json`, and the result is cached under `cache_dir()/peers/`, keyed by the
sha256 of the weights, so it is built once. onnxruntime-genai loads the `onnxruntime` package's own shared
library, so it runs in this process next to our sessions.

Nothing here is imported by the rest of the package; where a peer is absent, `PeerUnavailable.reason`
says why and how to install it, and the benchmark reports the row as skipped with that reason.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dspark_trt.errors import DSparkError
from dspark_trt.cache import cache_dir
from dspark_trt.models.sources import ModelSource

GENAI_NAME = "onnxruntime-genai"
INSTALL_HINT = "pip install -e '.[peers]'  (or `make peers`)"
PEER_MANIFEST = "dspark_peer.json"  # written next to the builder's output once the build succeeded
BUILDER_LOG = "builder.log"


class PeerUnavailable(DSparkError):
    """A peer cannot run here; `reason` is one line for the benchmark row."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def import_peer(module: str, package: str):
    """The peer's module, or PeerUnavailable naming its package and the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PeerUnavailable(f"{package} not installed ({exc}): {INSTALL_HINT}") from exc


def import_genai():
    return import_peer("onnxruntime_genai", GENAI_NAME)


def check_builder_dependencies() -> None:
    """The model builder needs onnx_ir besides onnxruntime-genai (only to build, not to run)."""
    import_genai()
    try:
        import onnx_ir  # noqa: F401
    except ImportError as exc:
        raise PeerUnavailable(f"onnx_ir not installed ({exc}); the {GENAI_NAME} model builder needs it: "
                              f"{INSTALL_HINT}") from exc


def default_threads() -> int:
    """The intra-op threads our ONNX Runtime sessions use (graphs/ort_session.make_session)."""
    return len(os.sched_getaffinity(0))


def pin_threads() -> int:
    """The project's thread count (default_threads), torch's included, so that every row of a benchmark, ours
    on torch or ONNX Runtime, transformers and each peer, computes on the same number of threads."""
    import torch

    threads = default_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


# --- the model, built once ---------------------------------------------------------------------------------

def weights_sha256(source: ModelSource) -> str:
    """sha256 of the weights the model comes from: the .gguf file, or config.json + *.safetensors of an HF dir."""
    digest = hashlib.sha256()
    if source.kind == "gguf":
        files = [source.path]
    else:
        files = [source.path / "config.json", *sorted(source.path.glob("*.safetensors"))]
    for path in files:
        if source.kind != "gguf":
            digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def genai_model_dir(sha256: str, accuracy_level: int | None = None, root: Path | None = None) -> Path:
    """Where the int4 CPU model of the weights with this sha256 is cached."""
    root = Path(root) if root is not None else cache_dir() / "peers"
    suffix = "" if accuracy_level is None else f"-acc{accuracy_level}"
    return root / f"onnxruntime-genai-int4-cpu-{sha256[:16]}{suffix}"


def is_built(model_dir: Path) -> bool:
    return (model_dir / PEER_MANIFEST).is_file() and (model_dir / "genai_config.json").is_file()


def write_hf_dir(source: ModelSource, out: Path, loaded=None) -> None:
    """A Hugging Face directory of the source (fp32 weights + tokenizer) that the model builder reads.

    transformers dequantizes a GGUF on load but keeps a `quantization_config` (GGUF) on the config, which the
    builder would take for a quantized checkpoint: the model class is rebuilt from the config without it.
    `loaded`: the source already loaded with transformers (fp32), to skip loading it again."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from dspark_trt.models.sources import load_tokenizer

    if loaded is None:
        loaded = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file,
                                                      dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = type(loaded)(config)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.save_pretrained(out)
    load_tokenizer(source).save_pretrained(out)


def builder_command(hf_dir: Path, out: Path, accuracy_level: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-m", str(hf_dir),
               "-o", str(out), "-p", "int4", "-e", "cpu"]
    if accuracy_level is not None:
        command += ["--extra_options", f"int4_accuracy_level={accuracy_level}"]
    return command


def read_model_info(model_dir: Path) -> dict:
    """What the built graph is: MatMulNBits bits / block size / accuracy level and its operator counts."""
    from collections import Counter

    import onnx

    config = json.loads((model_dir / "genai_config.json").read_text())
    filename = config["model"]["decoder"]["filename"]
    graph = onnx.load(str(model_dir / filename), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    info: dict = {"operators": dict(sorted(ops.items())), "precision": "fp32", "bits": None, "block_size": None,
                  "accuracy_level": None}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            bits = int(attrs.get("bits", 4))
            info.update(precision=f"int{bits}", bits=bits, block_size=int(attrs.get("block_size", 0)) or None,
                        accuracy_level=int(attrs.get("accuracy_level", 0)))
            break
    return info


def prepare_genai_model(source: ModelSource, accuracy_level: int | None = None, root: Path | None = None,
                        progress=lambda msg: None, loaded=None) -> Path:
    """The cached onnxruntime-genai int4 CPU model of `source`, built first if missing (about a minute).
    `loaded`: the source already loaded with transformers in fp32 (see write_hf_dir)."""
    sha = weights_sha256(source)
    model_dir = genai_model_dir(sha, accuracy_level, root)
    if is_built(model_dir):
        return model_dir
    check_builder_dependencies()
    og = import_genai()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    work = model_dir.with_name(f"{model_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    hf_dir, out = work / "hf", work / "model"
    started = time.perf_counter()
    try:
        if source.kind == "gguf":
            progress(f"{GENAI_NAME} peer: writing {source.path.name} as a Hugging Face directory (fp32) in {hf_dir}")
            write_hf_dir(source, hf_dir, loaded)
        else:
            hf_dir = source.path
        command = builder_command(hf_dir, out, accuracy_level)
        log = work / BUILDER_LOG
        progress(f"{GENAI_NAME} peer: running its model builder (int4, cpu), log in {log}")
        with open(log, "w") as f:
            proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if proc.returncode != 0 or not (out / "genai_config.json").is_file():
            kept = model_dir.with_name(f"{model_dir.name}.failed.log")
            shutil.copyfile(log, kept)
            tail = "".join(kept.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise DSparkError(f"{GENAI_NAME} model builder failed (exit {proc.returncode}); command: "
                              f"{' '.join(command)}; full log in {kept}, its last lines:\n{tail}")
        info = read_model_info(out)
        # the work directories are gone once built: the command is recorded with their roles instead
        recorded = [{str(hf_dir): "HF_DIR", str(out): "OUT"}.get(arg, arg) for arg in command[1:]]
        manifest = {"peer": GENAI_NAME, "onnxruntime_genai": og.__version__, "source": str(source.path),
                    "source_sha256": sha, "hf_dir": "written from the source with transformers (fp32)"
                    if source.kind == "gguf" else str(source.path),
                    "builder_command": ["python", *recorded], "requested_accuracy_level": accuracy_level,
                    **info, "built": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "build_seconds": round(time.perf_counter() - started, 1)}
        (out / PEER_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.move(str(log), out / BUILDER_LOG)
        try:
            out.rename(model_dir)
        except OSError:
            if not is_built(model_dir):  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"{GENAI_NAME} peer: built {model_dir} in {time.perf_counter() - started:.0f} s")
    return model_dir


# --- running it ---------------------------------------------------------------------------------------------

@dataclass
class PeerRun:
    """One greedy generation: the new token ids, total seconds, and seconds to the first new token."""

    output_ids: list[int]
    seconds: float
    first_token_seconds: float

    @property
    def decode_seconds(self) -> float:
        return self.seconds - self.first_token_seconds


class GenaiPeer:
    """onnxruntime-genai on one model directory, CPU, with our sessions' intra-op thread count."""

    name = GENAI_NAME

    def __init__(self, model_dir: str | Path, threads: int | None = None):
        self.og = import_genai()
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "genai_config.json").is_file():
            raise DSparkError(f"{self.model_dir}: no genai_config.json (not an {GENAI_NAME} model directory)")
        self.threads = threads or default_threads()
        config = self.og.Config(str(self.model_dir))
        config.clear_providers()  # CPU
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": self.threads}}}}))
        self.model = self.og.Model(config)

    def generate(self, prompt_ids: list[int], max_tokens: int, stop_ids: tuple[int, ...] = ()) -> PeerRun:
        """Greedy new tokens. Without stop_ids exactly max_tokens (EOS masked until then, as transformers'
        min_new_tokens does); with them up to and including the first stop id (as our engine counts them)."""
        length = len(prompt_ids) + max_tokens
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=length, batch_size=1,
                                  **({} if stop_ids else {"min_length": length}))
        start = time.perf_counter()
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(list(prompt_ids))
        generator.generate_next_token()
        first = time.perf_counter()
        ids = [int(generator.get_next_tokens()[0])]
        while not generator.is_done() and ids[-1] not in stop_ids:
            generator.generate_next_token()
            ids.append(int(generator.get_next_tokens()[0]))
        end = time.perf_counter()
        return PeerRun(ids, end - start, first - start)

    def describe(self) -> dict:
        """Exactly what runs: versions, threads, precision, accuracy level, operators."""
        manifest_path = self.model_dir / PEER_MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        info = {k: manifest[k] for k in ("precision", "bits", "block_size", "accuracy_level", "operators")
                if k in manifest} or read_model_info(self.model_dir)
        import onnxruntime

        return {"onnxruntime_genai": self.og.__version__, "onnxruntime": onnxruntime.__version__,
                "execution_provider": "cpu", "intra_op_num_threads": self.threads, **info,
                "model_dir": str(self.model_dir), "source_sha256": manifest.get("source_sha256"),
                "builder_command": manifest.get("builder_command")}

    def summary(self) -> str:
        """One line for the benchmark's table: what ran."""
        described = self.describe()
        acc = described.get("accuracy_level")
        return (f"{GENAI_NAME} {described.get('onnxruntime_genai')}, {described.get('precision')} "
                f"(block {described.get('block_size')}, accuracy level {acc if acc is not None else '?'}), "
                f"{described.get('intra_op_num_threads')} threads")


def genai_peer(source, hf_model, accuracy_level: int | None, model_dir: str | None, threads: int, progress):
    """(GenaiPeer, None) or (None, the reason the row is skipped). model_dir: the user's model directory, else
    the one built and cached from `source` (`hf_model`: the source already loaded with transformers, fp32)."""
    try:
        import_genai()
        if model_dir is None:
            model_dir = prepare_genai_model(source, accuracy_level, progress=progress, loaded=hf_model)
        return GenaiPeer(model_dir, threads=threads), None
    except PeerUnavailable as exc:
        return None, exc.reason
    except DSparkError as exc:
        if model_dir is not None:  # the user named the model: their error, not a skip
            raise
        return None, f"{GENAI_NAME} model could not be built: {exc}"


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first position where the two sequences differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(ours: list[int], theirs: list[int]) -> dict:
    """Greedy agreement of a peer's tokens with ours."""
    at = first_divergence(ours, theirs)
    return {"token_identical": at is None, "first_divergence": at,
            "agreeing_prefix_tokens": len(ours) if at is None else at, "compared_tokens": len(ours)}
