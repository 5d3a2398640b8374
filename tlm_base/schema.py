"""Every file tlm reads back, and every config value it is given, is checked with pydantic before it is used.

One way, used everywhere: a pydantic model per file kind (declared next to the code that writes it), and
`parse` / `read_json` here, which turn the first validation error into one line naming the file, the key,
what is wrong with it and the way out. Types are strict (a "5" is not a 5), floats finite where noted, and
names of files that a manifest points to must be plain relative names inside their folder.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError,
)

from tlm_base.errors import TLMError

__all__ = ["Schema", "parse", "read_json", "coerce", "NonNegInt", "PosInt", "FiniteFloat", "Sha256", "RelativeFile",
           "StrictBool", "StrictInt", "StrictStr", "Field", "inside"]

T = TypeVar("T", bound=BaseModel)


class Schema(BaseModel):
    """Base of the file schemas: strict types, unknown keys kept (newer writers may add some)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=False)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _sha256(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("must be a sha256 digest (64 lowercase hex digits)")
    return value


def _relative_file(value: str) -> str:
    path = PurePosixPath(value)
    if not value or value.startswith("/") or "\\" in value or path.is_absolute() or any(
            part in ("", ".", "..") or part.startswith("~") for part in value.split("/")):
        raise ValueError("must be a plain file name inside the folder (no '/', '..' or '~' at the start, no '..' parts)")
    return value


NonNegInt = Annotated[StrictInt, Field(ge=0)]
PosInt = Annotated[StrictInt, Field(gt=0)]
FiniteFloat = Annotated[float, AfterValidator(_finite)]
Sha256 = Annotated[StrictStr, AfterValidator(_sha256)]
RelativeFile = Annotated[StrictStr, AfterValidator(_relative_file)]


def inside(root: Path, name: str) -> Path:
    """`root / name`, refused when it resolves outside `root` (a symlink out of the folder)."""
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"'{name}' resolves outside {root}")
    return path


def _clip(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "tuple", "none", "is-instance", "literal"}


def describe(error: ValidationError) -> str:
    """The first problem of a ValidationError as 'key X: what (got Y)'."""
    first = error.errors(include_url=False)[0]
    # A union's branches appear in `loc` as type names (str, TokenEntry, function-after[...]): not keys.
    parts = [str(p) for p in first["loc"] if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or p[:1].isupper()))]
    loc = ".".join(parts)
    message = first["msg"].removeprefix("Value error, ")
    where = f"key '{loc}'" if loc else "the top level"
    if first["type"] == "missing":
        return f"{where} is missing"
    extra = f" ({len(error.errors())} problems in all)" if len(error.errors()) > 1 else ""
    return f"{where}: {message[:1].lower() + message[1:]} (got {_clip(first.get('input'))}){extra}"


def parse(schema: type[T], data: Any, where: str, error: type[TLMError] = TLMError, fix: str = "") -> T:
    """`data` validated as `schema`, or `error` with one line: 'WHERE: key K: problem (got V); FIX'."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise error(f"{where}: {describe(e)}" + (f"; {fix}" if fix else "")) from None


def load_json_text(path: Path, error: type[TLMError], fix: str = "") -> Any:
    """The JSON value of a file; a file that is missing, not a regular file, not UTF-8 or not JSON is one line."""
    if not path.exists():
        raise error(f"{path} is missing" + (f"; {fix}" if fix else ""))
    if not path.is_file():
        raise error(f"{path} is not a regular file" + (f"; {fix}" if fix else ""))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({str(e)[:120]})" + (f"; {fix}" if fix else "")) from None


def read_json(path: Path, schema: type[T], error: type[TLMError] = TLMError, fix: str = "") -> T:
    """Read a JSON file and validate it as `schema`."""
    return parse(schema, load_json_text(Path(path), error, fix), str(path), error, fix)


# --- config values: one coercion path for the model and the training config ------------------------------------

_ADAPTERS: dict[Any, TypeAdapter] = {}


def _adapter(annotation: Any) -> TypeAdapter:
    if annotation not in _ADAPTERS:
        _ADAPTERS[annotation] = TypeAdapter(annotation, config=ConfigDict(strict=True))
    return _ADAPTERS[annotation]


def _allowed(annotation: Any) -> tuple:
    args = typing.get_args(annotation)
    return args if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)


def _spelled(value: Any, annotation: Any) -> Any:
    """The command line's and YAML's spellings of a value: 'true'/'false' for a bool, '5e-4' for a float (YAML 1.1
    reads it as a string), 'null'/'none' for an optional value, a list for a tuple."""
    allowed = _allowed(annotation)
    if isinstance(value, str):
        low = value.strip().lower()
        if type(None) in allowed and low in ("null", "none"):
            return None
        if bool in allowed and low in ("true", "false"):
            return low == "true"
        if float in allowed:
            try:
                return float(value)
            except ValueError:
                pass
    if isinstance(value, list) and any(typing.get_origin(a) is tuple for a in allowed):
        return tuple(value)
    return value


def _type_name(annotation: Any) -> str:
    names = [getattr(a, "__name__", str(a)) for a in _allowed(annotation) if a is not type(None)]
    return " or ".join(names)


def coerce(value: Any, annotation: Any, key: str, error: type[TLMError], prefix: str = "config key") -> Any:
    """`value` checked against a config field's type annotation (strict: a "5" is not an int, True is not a
    count), after the spellings of `_spelled`; a `Literal` lists the choices. One line naming the key otherwise."""
    if annotation is Any:
        return value
    try:
        return _adapter(annotation).validate_python(_spelled(value, annotation))
    except ValidationError as e:
        literal = [x for x in e.errors(include_url=False) if x["type"] == "literal_error"]
        if literal:
            choices = next(typing.get_args(a) for a in _allowed(annotation) if typing.get_origin(a) is typing.Literal)
            raise error(f"{prefix} '{key}' must be one of {choices}, got {value!r}") from None
        if any(typing.get_origin(a) is tuple for a in _allowed(annotation)):
            raise error(f"{prefix} '{key}' must be a list of {len(typing.get_args(annotation))} numbers, "
                        f"got {value!r}") from None
        raise error(f"{prefix} '{key}' must be {_type_name(annotation)}, got {value!r}") from None
