"""Keep a source checkpoint's code out of a conversion.

A tokenizer, processor or image-processor config can name Python code with an `auto_map` entry
(`"AutoTokenizer": [null, "owner/repo--module.Class"]`, or a module next to the config). transformers runs that
code when the directory is loaded with `trust_remote_code=True`, which is how users load our checkpoints, and
`save_pretrained` copies the entry into every copy. So a converted checkpoint must carry `auto_map` entries only
for the modules we write ourselves (our model, config and processor code), and the converter reads its inputs
with `trust_remote_code=False` and checks the output before loading it.
"""

import json
from pathlib import Path


def own_code_modules() -> set[str]:
    """Basenames of the modules our checkpoints ship (`modeling_*`, `configuration_*`, `processing_*` and what
    they import): every `.py` file of this package's `modeling` and `configuration` folders."""
    package = Path(__file__).resolve().parent.parent
    return {path.stem for folder in ("modeling", "configuration") for path in (package / folder).glob("*.py")
            if path.stem != "__init__"}


def _references(value) -> list[str]:
    """The class references of one `auto_map` value: a string, or a [slow, fast] pair with nulls."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [item for item in items if item is not None]


def _is_own(reference, directory: Path, own: set[str]) -> bool:
    if not isinstance(reference, str) or "--" in reference or reference.count(".") != 1:
        return False  # "repo--module.Class" points outside the checkpoint; "a.b.C" is a package path
    module = reference.split(".")[0]
    return module in own and (directory / f"{module}.py").is_file()


def _walk_auto_maps(node, visit) -> None:
    """Call `visit(mapping)` on every dict that holds an `auto_map` key, at any depth (processor configs nest
    their image processor's and tokenizer's settings)."""
    if isinstance(node, dict):
        if "auto_map" in node:
            visit(node)
        for value in node.values():
            _walk_auto_maps(value, visit)
    elif isinstance(node, list):
        for value in node:
            _walk_auto_maps(value, visit)


def _json_files(directory):
    """(path, parsed content) of every readable JSON file under `directory`, subfolders included."""
    for path in sorted(Path(directory).rglob("*.json")):
        try:
            yield path, json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue


def foreign_code_references(directory, own: set[str] | None = None) -> list[str]:
    """`file: reference` for every `auto_map` entry under `directory` (all JSON files, subfolders included) that
    does not name one of our modules written next to that file."""
    own = own_code_modules() if own is None else own
    found = []
    for path, data in _json_files(directory):

        def visit(mapping, path=path):
            auto_map = mapping["auto_map"]
            if not isinstance(auto_map, dict):
                found.append(f"{path.name}: auto_map {auto_map!r}")
                return
            for reference in (r for value in auto_map.values() for r in _references(value)):
                if not _is_own(reference, path.parent, own):
                    found.append(f"{path.relative_to(directory)}: {reference}")

        _walk_auto_maps(data, visit)
    return found


def strip_foreign_code(directory, own: set[str] | None = None) -> list[str]:
    """Remove from every JSON file under `directory` the `auto_map` entries that do not name our own modules
    (and `auto_map` dicts left empty). Returns the files changed, relative to `directory`."""
    own = own_code_modules() if own is None else own
    changed = []
    for path, data in _json_files(directory):
        edits = []

        def visit(mapping, path=path, edits=edits):
            auto_map = mapping["auto_map"]
            kept = {} if not isinstance(auto_map, dict) else {
                name: value for name, value in auto_map.items()
                if _references(value) and all(_is_own(r, path.parent, own) for r in _references(value))
            }
            if kept != auto_map:
                edits.append(1)
                if kept:
                    mapping["auto_map"] = kept
                else:
                    del mapping["auto_map"]

        _walk_auto_maps(data, visit)
        if edits:
            path.write_text(json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n", encoding="utf-8")
            changed.append(str(path.relative_to(directory)))
    return changed


__all__ = ["own_code_modules", "foreign_code_references", "strip_foreign_code"]
