"""Writes the Python files a checkpoint needs to load with `trust_remote_code=True`.

In this repository the shipped modules live in two folders (`configuration/`, `modeling/`) that are
installed as sub-packages of `llava_token_reduction`. transformers' remote code wants them flat, each
import a single-dot sibling (`from .name import ...`). This module copies the closure of relative
imports of the given modules into a checkpoint directory and rewrites every relative import to the flat
form. It is itself shipped, so a model loaded from the hub with remote code saves the same files again
(there the imports are already flat and the rewrite changes nothing).
"""

import importlib.util
import os
import re
import sys


_RELATIVE_IMPORT = re.compile(r"^(\s*)from\s+(\.+)([\w.]*)\s+import\s", flags=re.MULTILINE)


def _module_file(module_name: str) -> str:
    module = sys.modules.get(module_name)
    if module is not None and getattr(module, "__file__", None):
        return module.__file__
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"cannot locate the source of module {module_name!r} to ship with the checkpoint")
    return spec.origin


def _relative_targets(source: str, package: str) -> list[str]:
    targets = []
    for match in _RELATIVE_IMPORT.finditer(source):
        dots, path = match.group(2), match.group(3)
        if not path:
            raise ValueError(f"`from {dots} import ...` cannot be shipped as remote code (in package {package})")
        targets.append(importlib.util.resolve_name(dots + path, package))
    return targets


def _flatten_imports(source: str) -> str:
    return _RELATIVE_IMPORT.sub(lambda m: f"{m.group(1)}from .{m.group(3).split('.')[-1]} import ", source)


def write_checkpoint_code(save_directory: str | os.PathLike, module_names: list[str]) -> list[str]:
    """Copy `module_names` and every module they import relatively into `save_directory`, flat.

    Returns the written file names. Raises `ValueError` if two shipped modules share a basename, since
    flat files would overwrite each other.
    """
    pending = list(module_names)
    written: dict[str, str] = {}  # basename -> module name
    while pending:
        module_name = pending.pop()
        basename = module_name.rsplit(".", 1)[-1]
        if basename in written:
            if written[basename] != module_name:
                raise ValueError(
                    f"modules {written[basename]} and {module_name} would both be shipped as {basename}.py"
                )
            continue
        written[basename] = module_name
        with open(_module_file(module_name), encoding="utf-8") as handle:
            source = handle.read()
        package = module_name.rsplit(".", 1)[0]
        pending.extend(_relative_targets(source, package))
        with open(os.path.join(save_directory, f"{basename}.py"), "w", encoding="utf-8") as handle:
            handle.write(_flatten_imports(source))
    return sorted(f"{name}.py" for name in written)


def auto_map_entry(cls: type) -> str:
    """`"<module basename>.<ClassName>"`, the form `auto_map` uses for flat remote code."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
