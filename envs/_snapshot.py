"""Saving and restoring a Python simulator's state as plain tensors and values.

VMAS worlds and PettingZoo envs keep their state in ordinary Python objects (entities, agent layers,
numpy arrays, generators). :func:`capture` walks such an object graph and returns a nested structure
that ``torch.save`` writes and ``torch.load(weights_only=True)`` reads back: tensors, numbers,
strings and lists / dicts of them. :func:`restore` writes it back into a freshly built env of the
same configuration, so an episode interrupted by a checkpoint continues exactly where it stopped.

Nothing in a snapshot names code to run: classes are only looked up to check that the fresh env
has an object of the same type at the same place, or, for objects the snapshot has and the fresh
env lacks (e.g. an evader removed from a list), created with ``object.__new__`` of a class that a
simulator package defines. Callables, modules, types and rendering objects are left as the fresh
env built them.
"""

from __future__ import annotations

import enum
import importlib
import random
import types
from typing import Any

import numpy as np
import torch

TAG = "__snapshot__"
# Values stored as they are (weights_only accepts them).
_LEAVES = (bool, int, float, str, bytes, type(None), torch.device, torch.dtype, torch.Size)
# Objects the fresh env keeps as built: code, and state that only matters for drawing.
_KEEP_TYPES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType,
               type, enum.Enum, property, staticmethod, classmethod, types.GeneratorType)
_SKIP_ATTRIBUTES = frozenset({"viewer", "screen", "clock", "renderer", "window", "text_lines",
                              "headless", "visible_display", "render_mode", "closed"})
# Objects of these packages are never walked: they hold code or handles, not simulation state.
_OPAQUE_PACKAGES = ("torch", "torchrl", "tensordict", "pygame", "pyglet", "threading", "logging",
                    "_thread", "io", "weakref", "matplotlib", "PIL")


# Objects kept as built that hold no simulation state (dtypes, action spaces, fonts, drawing surfaces).
_STATELESS = ("numpy.dtypes.", "gym.spaces.", "gymnasium.spaces.", "pygame.freetype.",
              "pygame.surface.", "pygame.font.", "builtins.set")


def _module(cls: type) -> str:
    return getattr(cls, "__module__", None) or ""  # some extension types (Box2D) have none


def _package(obj: Any) -> str:
    return _module(type(obj)).partition(".")[0]


def _class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{_module(cls)}:{getattr(cls, '__qualname__', cls.__name__)}"


class _Capture:
    def __init__(self, packages: tuple[str, ...]):
        self.packages = packages
        self.memo: dict[int, int] = {}
        self.keep_alive: list[Any] = []  # ids stay unique while the walk runs
        self.unsaved: set[str] = set()  # types of objects kept as built that may hold state

    def _opaque(self, value: Any, ident: int | None = None) -> dict[str, Any]:
        name = _class_path(value).replace(":", ".")
        if not name.startswith(_STATELESS):
            self.unsaved.add(name)
        return {TAG: "keep"} if ident is None else {TAG: "keep", "id": ident}

    def _ref(self, obj: Any) -> dict[str, Any] | None:
        key = id(obj)
        if key in self.memo:
            return {TAG: "ref", "id": self.memo[key]}
        self.memo[key] = len(self.memo)
        self.keep_alive.append(obj)
        return None

    def __call__(self, value: Any) -> Any:
        if isinstance(value, np.generic):  # before the leaves: np.float64 is a float subclass
            return {TAG: "numpy_scalar", "dtype": value.dtype.str, "value": value.item()}
        if isinstance(value, _LEAVES) and not isinstance(value, enum.Enum):
            return value
        if isinstance(value, _KEEP_TYPES) or callable(value) and not hasattr(value, "__dict__"):
            return {TAG: "keep"}
        if isinstance(value, torch.Tensor):
            ref = self._ref(value)
            return ref or {TAG: "tensor", "id": self.memo[id(value)], "value": value.detach().clone()}
        if isinstance(value, torch.Generator):
            return {TAG: "torch_generator", "state": value.get_state()}
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                return {TAG: "object_array", "shape": list(value.shape),
                        "items": [self(v) for v in value.ravel().tolist()]}
            return {TAG: "ndarray", "dtype": value.dtype.str, "value": torch.from_numpy(value.copy())}
        if isinstance(value, np.random.Generator):
            return {TAG: "numpy_generator", "state": value.bit_generator.state}
        if isinstance(value, np.random.RandomState):
            kind, keys, pos, has_gauss, gauss = value.get_state()
            return {TAG: "numpy_randomstate", "keys": torch.from_numpy(keys.astype(np.int64)),
                    "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
        if isinstance(value, random.Random):
            version, internal, gauss_next = value.getstate()
            return {TAG: "python_random", "version": version, "internal": list(internal),
                    "gauss_next": gauss_next}
        if isinstance(value, (list, dict, set, tuple)) or hasattr(value, "__dict__"):
            ref = self._ref(value)
            if ref is not None:
                return ref
            ident = self.memo[id(value)]
            if isinstance(value, list):
                return {TAG: "list", "id": ident, "items": [self(v) for v in value]}
            if isinstance(value, tuple):
                return {TAG: "tuple", "id": ident, "items": [self(v) for v in value]}
            if isinstance(value, set):
                items = [self(v) for v in value]
                # Unordered: items kept as built (classes, functions) could not be matched back.
                if any(isinstance(v, dict) and v.get(TAG) == "keep" for v in items):
                    return self._opaque(value, ident)
                return {TAG: "set", "id": ident, "items": items}
            if isinstance(value, dict):
                return {TAG: "dict", "id": ident, "items": [[self(k), self(v)] for k, v in value.items()]}
            if _package(value) in _OPAQUE_PACKAGES or not self._walkable(value):
                return self._opaque(value, ident)  # later references to it are kept too
            return {TAG: "object", "id": ident, "class": _class_path(value),
                    "attributes": {name: self(attr) for name, attr in vars(value).items()
                                   if name not in _SKIP_ATTRIBUTES}}
        return self._opaque(value)

    def _walkable(self, value: Any) -> bool:
        # By base class too: VMAS loads scenario files as anonymous modules (``__module__ == ""``).
        return any(_module(cls).partition(".")[0] in self.packages for cls in type(value).__mro__)


def capture(root: Any, packages: tuple[str, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    """Snapshot ``root`` and every object it reaches that a package in ``packages`` (or ``root``'s
    own package) defines, as tensors and plain values.

    Returns the snapshot and the types of objects it had to leave out that may hold state (e.g.
    Box2D bodies, pygame rectangles): when that list is not empty the snapshot is incomplete.
    """
    walker = _Capture(tuple(packages) + (_package(root),))
    return walker(root), sorted(walker.unsaved)


class _Restore:
    def __init__(self, packages: tuple[str, ...]):
        self.packages = packages
        self.objects: dict[int, Any] = {}

    def __call__(self, snap: Any, current: Any) -> Any:
        """The value ``snap`` describes, reusing (and updating in place) ``current`` where it fits."""
        if not isinstance(snap, dict) or TAG not in snap:
            return snap
        kind = snap[TAG]
        if kind == "keep":
            if "id" in snap:
                self.objects[snap["id"]] = current
            return current
        if kind == "ref":
            if snap["id"] not in self.objects:
                raise ValueError("simulator snapshot refers to an object before defining it")
            return self.objects[snap["id"]]
        if kind == "tensor":
            device = current.device if isinstance(current, torch.Tensor) else snap["value"].device
            value = snap["value"].to(device)
            self.objects[snap["id"]] = value
            return value
        if kind == "torch_generator":
            generator = current if isinstance(current, torch.Generator) else torch.Generator()
            generator.set_state(snap["state"])
            return generator
        if kind == "ndarray":
            return snap["value"].numpy().astype(np.dtype(snap["dtype"]), copy=True)
        if kind == "object_array":
            flat = current.ravel().tolist() if isinstance(current, np.ndarray) else []
            items = [self(s, flat[i] if i < len(flat) else None) for i, s in enumerate(snap["items"])]
            array = np.empty(len(items), dtype=object)
            array[:] = items
            return array.reshape(snap["shape"])
        if kind == "numpy_scalar":
            return np.dtype(snap["dtype"]).type(snap["value"])
        if kind == "numpy_generator":
            state = snap["state"]
            if not isinstance(current, np.random.Generator) or \
                    current.bit_generator.state["bit_generator"] != state["bit_generator"]:
                current = np.random.Generator(getattr(np.random, _bit_generator(state))())
            current.bit_generator.state = state
            return current
        if kind == "numpy_randomstate":
            generator = current if isinstance(current, np.random.RandomState) else np.random.RandomState()
            generator.set_state(("MT19937", snap["keys"].numpy().astype(np.uint32), snap["pos"],
                                 snap["has_gauss"], snap["gauss"]))
            return generator
        if kind == "python_random":
            generator = current if isinstance(current, random.Random) else random.Random()
            generator.setstate((snap["version"], tuple(snap["internal"]), snap["gauss_next"]))
            return generator
        if kind == "list":
            target = current if isinstance(current, list) else []
            self.objects[snap["id"]] = target
            old = list(target)
            target[:] = [self(s, old[i] if i < len(old) else None) for i, s in enumerate(snap["items"])]
            return target
        if kind in ("tuple", "set"):
            old = list(current) if isinstance(current, (tuple, list)) else []
            items = [self(s, old[i] if i < len(old) else None) for i, s in enumerate(snap["items"])]
            if kind == "set":
                value = set(items)
            elif hasattr(current, "_fields"):  # a namedtuple keeps its type
                value = type(current)(*items)
            else:
                value = tuple(items)
            self.objects[snap["id"]] = value
            return value
        if kind == "dict":
            target = current if isinstance(current, dict) else {}
            self.objects[snap["id"]] = target
            old_values = list(target.values())
            old_keys = list(target.keys())
            items = []
            for i, (key_snap, value_snap) in enumerate(snap["items"]):
                key = self(key_snap, old_keys[i] if i < len(old_keys) else None)
                items.append((key, self(value_snap, target.get(key, old_values[i] if i < len(old_values) else None))))
            target.clear()
            target.update(items)
            return target
        if kind == "object":
            obj = current if _class_path(current) == snap["class"] else self._new(snap["class"])
            self.objects[snap["id"]] = obj
            for name, attr_snap in snap["attributes"].items():
                _setattr_plain(obj, name, self(attr_snap, vars(obj).get(name)))
            return obj
        raise ValueError(f"unknown entry {kind!r} in a simulator snapshot")

    def _new(self, class_path: str) -> Any:
        module_name, _, qualname = class_path.partition(":")
        if module_name.partition(".")[0] not in self.packages:
            raise ValueError(f"simulator snapshot names class {class_path}, outside {self.packages}")
        cls: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if not isinstance(cls, type):
            raise ValueError(f"simulator snapshot names {class_path}, which is not a class")
        return object.__new__(cls)


def _bit_generator(state: dict[str, Any]) -> str:
    name = state["bit_generator"]
    if name not in ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"):
        raise ValueError(f"unknown numpy bit generator {name!r} in a simulator snapshot")
    return name


def _setattr_plain(obj: Any, name: str, value: Any) -> None:
    """Set an instance attribute without going through a class's ``__setattr__`` hooks."""
    object.__setattr__(obj, name, value)


def capture_value(value: Any) -> Any:
    """Snapshot one value (a tensor, a generator, a dict of them...) without walking objects."""
    return _Capture(())(value)


def restore_value(snap: Any, current: Any = None) -> Any:
    """The value a :func:`capture_value` snapshot describes (updating ``current`` in place where it fits)."""
    return _Restore(())(snap, current)


def restore(root: Any, snap: dict[str, Any], packages: tuple[str, ...] = ()) -> None:
    """Write a :func:`capture` snapshot back into ``root`` (a fresh env of the same configuration)."""
    if not isinstance(snap, dict) or snap.get(TAG) != "object":
        raise ValueError("not a simulator snapshot")
    if snap["class"] != _class_path(root):
        raise ValueError(f"simulator snapshot is of {snap['class']}, not {_class_path(root)}")
    _Restore(tuple(packages) + (_package(root),))(snap, root)
