"""Extra code prompts, as the prompts README asks: the shipped code sets are short of the paper's
~39% code share, so we add (1) the code tasks restated for other languages and (2) prompts built
from the Python standard library's own functions (signature + first docstring line). Everything is
deterministic: same Python version, same prompts.
"""
from __future__ import annotations

import importlib
import inspect
import re

from dspark_trt.training.data import Prompt

LANGUAGES = ("C++", "Java", "JavaScript", "Go", "Rust")

# a default like `<function copy2 at 0x7f4e...>` carries a memory address that changes per process
_OBJECT_REPR = re.compile(r"<(?:built-in )?(?:function|class|method) ([\w.]+)(?: at 0x[0-9a-fA-F]+)?>")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

# Pure-Python modules with small, well-documented functions (no platform-specific ones).
STDLIB_MODULES = ("bisect", "heapq", "textwrap", "string", "statistics", "fractions", "itertools", "functools",
                  "collections", "json", "csv", "difflib", "fnmatch", "shlex", "base64", "calendar", "colorsys",
                  "html", "ipaddress", "keyword", "operator", "posixpath", "random", "copy", "glob", "re",
                  "datetime", "decimal", "math", "os", "shutil", "urllib.parse", "zlib", "hashlib")


def other_language_prompts(code_prompts: list[Prompt], languages: tuple[str, ...] = LANGUAGES) -> list[Prompt]:
    """Each "write a Python function" style task asked again for one other language (round-robin)."""
    out = []
    for i, prompt in enumerate(code_prompts):
        language = languages[i % len(languages)]
        out.append(Prompt(f"{prompt.text}\n\nWrite the solution in {language} instead of Python.", "code"))
    return out


def stdlib_prompts(modules: tuple[str, ...] = STDLIB_MODULES) -> list[Prompt]:
    """Two prompts per documented public function: implement it from its summary, explain it."""
    out = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            summary = (inspect.getdoc(obj) or "").strip().split("\n\n")[0].replace("\n", " ")
            try:
                signature = _ADDRESS.sub("", _OBJECT_REPR.sub(r"\1", f"{name}{inspect.signature(obj)}"))
            except (TypeError, ValueError):
                continue
            if len(summary) < 20:
                continue
            qualified = f"{module_name}.{name}"
            out.append(Prompt(f"Write a Python function `{signature}` that does the following, without using "
                              f"`{qualified}` itself: {summary}", "code"))
            out.append(Prompt(f"Explain what the Python standard library function `{qualified}{signature[len(name):]}`"
                              f" does, and give a short usage example.", "code"))
    return out
