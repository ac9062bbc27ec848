"""Reading a pickle's opcodes without unpickling it: the globals it names and the storages it declares.

Used by :mod:`lightning_clipprune.checkpoint` before anything of a checkpoint is unpickled; public through
:func:`lightning_clipprune.checkpoint.pickle_globals`.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
from typing import Any

__all__ = ["PickleScan", "pickle_globals", "python3_name"]

_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_INT_OPS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_TUPLE_OPS = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_MARK = object()


class _Global(str):
    """A global named by the pickle, as it sits on the scanned stack (so a storage type can be told apart)."""


class PickleScan:
    """What a pickle's opcodes say without unpickling it: the globals it names and the storages it declares.

    A small stack machine over :func:`pickletools.genops`: strings, ints, globals, tuples and the memo are
    tracked; every other opcode's result is an opaque ``None`` of the right stack effect.
    """

    def __init__(self, data: bytes) -> None:
        self.globals: list[str] = []
        self.storages: list[tuple[str, str, str, int]] = []  # (storage type, key, location, numel) of each one
        self.stack: list[Any] = []
        self.memo: dict[int, Any] = {}
        for op, arg, _ in pickletools.genops(data):
            self._step(op, arg)

    def _pop(self) -> Any:
        return self.stack.pop() if self.stack else None

    def _pop_mark(self) -> list[Any]:
        items: list[Any] = []
        while self.stack:
            item = self.stack.pop()
            if item is _MARK:
                break
            items.append(item)
        return items[::-1]

    def _step(self, op: pickletools.OpcodeInfo, arg: Any) -> None:
        name, stack = op.name, self.stack
        if name in _STRING_OPS or name in _INT_OPS:
            stack.append(arg)
        elif name in ("GLOBAL", "INST", "STACK_GLOBAL"):
            if name == "STACK_GLOBAL":
                qual_name, module = self._pop(), self._pop()
                found = f"{module}.{qual_name}" if isinstance(module, str) and isinstance(qual_name, str) else "<unknown>"
            else:
                found = str(arg).replace(" ", ".")
                if name == "INST":  # INST also builds an object from the items above the mark
                    self._pop_mark()
            self.globals.append(found)
            stack.append(_Global(found) if name != "INST" else None)
        elif name == "TUPLE":
            stack.append(tuple(self._pop_mark()))
        elif name in _TUPLE_OPS:
            items = [self._pop() for _ in range(_TUPLE_OPS[name])][::-1]
            stack.append(tuple(items))
        elif name in ("BINPERSID", "PERSID"):
            pid = self._pop() if name == "BINPERSID" else arg
            if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
                kind, key, location, numel = pid[1:5]
                if isinstance(kind, str) and isinstance(key, str) and isinstance(numel, int):
                    self.storages.append((python3_name(kind), key, str(location), numel))
            stack.append(None)
        elif name in _PUT_OPS or name == "MEMOIZE":
            self.memo[arg if name in _PUT_OPS else len(self.memo)] = stack[-1] if stack else None
        elif name in _GET_OPS:
            stack.append(self.memo.get(arg))
        elif name == "DUP":
            stack.append(stack[-1] if stack else None)
        else:
            self._generic(op)

    def _generic(self, op: pickletools.OpcodeInfo) -> None:
        before = op.stack_before
        if pickletools.markobject in before:
            self._pop_mark()
            for _ in range(before.index(pickletools.markobject)):
                self._pop()
        else:
            for _ in before:
                self._pop()
        self.stack.extend(_MARK if item is pickletools.markobject else None for item in op.stack_after)


def pickle_globals(data: bytes) -> list[str]:
    """The ``module.name`` of every global a pickle names, read from its opcodes without unpickling anything.

    Raises:
        ValueError: ``data`` is not a pickle (an unknown opcode, or it ends early).
    """
    return list(dict.fromkeys(python3_name(n) for n in PickleScan(data).globals))


def python3_name(qualname: str) -> str:
    """``__builtin__.dict`` -> ``builtins.dict``: the name the unpickler resolves (protocol 2 writes Python 2 names)."""
    module, _, name = qualname.rpartition(".")
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"
