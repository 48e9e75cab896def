"""Frozen JSON documents with typed sections: the machinery of the typed model card.

:class:`JsonSection` is a frozen dataclass read from a JSON object by
:meth:`~JsonSection.from_json` and written back by :meth:`~JsonSection.to_json` key for
key: keys a section does not model are kept in ``extra``, the keys its document had
are remembered in ``json_keys`` so that absent keys stay absent. JSON arrays become
tuples and objects read-only :class:`FrozenMap` s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, ClassVar, TypeVar

# --- read-only JSON values ---------------------------------------------------------


class FrozenMap(Mapping[str, Any]):
    """A read-only, hashable JSON object: nested objects are FrozenMaps, arrays tuples.

    Compares equal to any mapping with the same items (a plain ``dict`` included).
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data: dict[str, Any] = {k: freeze(v) for k, v in (data or {}).items()}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


def freeze(value: Any) -> Any:
    """A JSON value made read-only: objects -> :class:`FrozenMap`, arrays -> tuples."""
    if isinstance(value, FrozenMap | JsonSection):
        return value
    if isinstance(value, Mapping):
        return FrozenMap(value)
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain JSON value (dicts and lists) of a frozen value or section."""
    if isinstance(value, JsonSection):
        return value.to_json()
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value


# --- sections ----------------------------------------------------------------------

_S = TypeVar("_S", bound="JsonSection")


def nested(kind: str, cls: type, depth: int = 1, **kw: Any) -> Any:
    """A field holding a section (``one``), a tuple of them (``tuple``) or a mapping of
    them (``map``; ``depth`` 2 is a mapping of mappings)."""
    return field(metadata={"kind": kind, "cls": cls, "depth": depth}, **kw)


def empty_map() -> FrozenMap:
    return FrozenMap()


@dataclass(frozen=True)
class JsonSection:
    """A JSON object with typed fields (named as their keys).

    ``extra`` holds the keys this version does not model, verbatim (read-only);
    ``json_keys`` the keys of the document it was read from, in order (``None``
    when built in code), so that absent keys stay absent in :meth:`to_json`.
    """

    extra: Mapping[str, Any] = field(default_factory=empty_map, kw_only=True)
    json_keys: tuple[str, ...] | None = field(default=None, kw_only=True, repr=False, compare=False)

    #: Where the section sits in its document (error messages).
    PATH: ClassVar[str] = "section"
    #: What a malformed document raises.
    ERROR: ClassVar[type[ValueError]] = ValueError

    @classmethod
    def _typed_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.name not in ("extra", "json_keys")]

    def __post_init__(self) -> None:
        for f in self._typed_fields():
            value = getattr(self, f.name)
            kind = f.metadata.get("kind")
            if value is None or kind == "one":
                continue
            if kind == "tuple":
                value = tuple(value)
            elif kind == "map":
                value = FrozenMap(value)
            else:
                value = freeze(value)
            object.__setattr__(self, f.name, value)
        object.__setattr__(self, "extra", FrozenMap(self.extra))
        if self.json_keys is not None:
            object.__setattr__(self, "json_keys", tuple(self.json_keys))

    @classmethod
    def from_json(cls: type[_S], doc: Mapping[str, Any], where: str | None = None) -> _S:
        """The section of a JSON object; raises ``cls.ERROR`` if it is not an
        object or lacks a key the section cannot do without."""
        where = where or cls.PATH
        if not isinstance(doc, Mapping):
            raise cls.ERROR(f"{where} must be a JSON object")
        typed = cls._typed_fields()
        missing = [f.name for f in typed if f.name not in doc and _required(f)]
        if missing:
            raise cls.ERROR(f"{where} lacks {missing}")
        kwargs = {
            f.name: _load(cls, f, doc[f.name], f"{where}.{f.name}") for f in typed if f.name in doc
        }
        names = {f.name for f in typed}
        extra = FrozenMap({k: v for k, v in doc.items() if k not in names})
        return cls(**kwargs, extra=extra, json_keys=tuple(doc))

    def to_json(self) -> dict[str, Any]:
        """The JSON object: the document it was read from, key for key, with changes."""
        present = set(self.json_keys or ())
        values: dict[str, Any] = {}
        for f in self._typed_fields():
            value = getattr(self, f.name)
            if f.name in present or _required(f) or value != _default(f):
                values[f.name] = value
        out: dict[str, Any] = {}
        for key in (*(self.json_keys or ()), *values, *self.extra):
            if key in out:
                continue
            if key in values:
                out[key] = thaw(values[key])
            elif key in self.extra:
                out[key] = thaw(self.extra[key])
        return out


def _required(f: dataclasses.Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def _load(owner: type[JsonSection], f: dataclasses.Field, value: Any, where: str) -> Any:
    kind = f.metadata.get("kind")
    if value is None or kind is None:
        return freeze(value)
    cls = f.metadata["cls"]
    if kind == "one":
        return cls.from_json(value, where)
    if kind == "tuple":
        if not isinstance(value, list | tuple):
            raise owner.ERROR(f"{where} must be a JSON array")
        return tuple(cls.from_json(v, f"{where}[{i}]") for i, v in enumerate(value))
    return _load_map(cls, value, where, f.metadata["depth"])


def _load_map(cls: type[JsonSection], value: Any, where: str, depth: int) -> FrozenMap:
    if not isinstance(value, Mapping):
        raise cls.ERROR(f"{where} must be a JSON object")
    if depth == 1:
        return FrozenMap({k: cls.from_json(v, f"{where}.{k}") for k, v in value.items()})
    return FrozenMap({k: _load_map(cls, v, f"{where}.{k}", depth - 1) for k, v in value.items()})
