"""Reading a recipe: a YAML file, strictly. At most `MAX_CONFIG_MB` MiB (`--max_config_mb` raises it), UTF-8 (a
byte-order mark is fine), no key given twice (YAML would keep the last one silently), no aliases (a few hundred
bytes of nested aliases expand into billions of values). Each refusal is one ConfigError naming the file."""

from __future__ import annotations

import codecs
import math
import os
from pathlib import Path
from typing import Any

import yaml

from tlm_base.errors import ConfigError

MAX_CONFIG_MB = 1.0
"""The most a config file may hold, in MiB (`tlm train --max_config_mb N` raises it)."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: `*name` refers to an `&name` anchor, and a few hundred bytes of
    aliases of aliases expand into billions of values ("billion laughs"); a recipe has no need of them."""

    recipe = "config file"

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"{self.recipe}, line {event.start_mark.line + 1}: YAML alias '*{event.anchor}' refused: "
                              "config files may not use anchors and aliases (nested aliases can expand a small file "
                              "into billions of values); write the values out")
        return super().compose_node(parent, index)


def _refuse_duplicates(node: Any, recipe: str, where: str = "") -> None:
    """Refuse a key given twice in one mapping (YAML would keep the last one and drop the first silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = f"{where}.{key.value}" if where else str(key.value)
            if isinstance(key, yaml.ScalarNode):
                line = key.start_mark.line + 1
                if (key.tag, key.value) in seen:
                    raise ConfigError(f"{recipe}: key '{name}' is given twice (lines {seen[key.tag, key.value]} and "
                                      f"{line}); YAML would keep the second and drop the first silently; keep one")
                seen[key.tag, key.value] = line
            _refuse_duplicates(value, recipe, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(item, recipe, f"{where}.{i}" if where else str(i))


def find_recipe(name: str | Path) -> Path:
    """A recipe file: `name` itself when it exists, else the bundled recipe of that name (`debug`, `tlm-26m`,
    `ablations/cpu`, with or without .yaml), which ships inside the package."""
    from tlm import RECIPES

    path = Path(name)
    if path.exists():
        return path
    for candidate in (RECIPES / path, RECIPES / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    return path


def bundled_recipes() -> list[str]:
    from tlm import RECIPES

    return sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.rglob("*.yaml"))


def read_recipe(path: str | Path, max_mb: float = MAX_CONFIG_MB) -> dict[str, Any]:
    """The sections of a YAML recipe, read strictly: a regular file of at most `max_mb` MiB, UTF-8 (a byte-order
    mark is fine), no key twice, no aliases. Each refusal is one ConfigError naming the file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file '{path}' " + ("is not a regular file" if file.exists() else
                                                      f"does not exist (bundled recipes: {', '.join(bundled_recipes())})"))
    if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not 0 < max_mb < math.inf:
        raise ConfigError(f"--max_config_mb must be a positive number of MiB, got {max_mb!r}")
    limit = int(max_mb * 2**20)
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(size + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise ConfigError(f"config file '{path}' holds {max(size, len(data)):,} bytes, over {max_mb:g} MiB, the bound "
                          "on a config file; raise it with --max_config_mb N if it really is a recipe")
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise ConfigError(f"config file '{path}' is not UTF-8 text: byte 0x{data[offset]:02x} at offset {offset} "
                          f"(line {line}); save it as UTF-8") from None
    loader = _StrictLoader(text)
    loader.recipe = f"config file '{path}'"
    try:
        node = loader.get_single_node()
        if node is not None:
            _refuse_duplicates(node, loader.recipe)
        tree = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise ConfigError(f"config file '{path}' is nested too deeply to be a recipe") from None
    finally:
        loader.dispose()
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return tree
