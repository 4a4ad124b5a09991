"""Named registries (judges, tokenizers) that built-in tasks fill when they are imported.

    JUDGES = Registry("judge")
    JUDGES.register("shapes", fn)     # done by jaxpref/tasks/shapes/__init__.py
    JUDGES.get("shapes")              # imports jaxpref.tasks.shapes first when nothing has that name yet

The library never imports a task by module path: a name not yet registered is looked up as the
package `jaxpref.tasks.<name>`, imported if it exists (so it registers itself), then looked up again.
This module imports nothing of jaxpref.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any


class Registry:
    """name -> object, with a task package of the same name imported on the first miss."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, Any] = {}

    def register(self, name: str, obj: Any) -> Any:
        """Adds `obj` under `name` (re-registering a name replaces it); returns `obj`."""
        self._items[name] = obj
        return obj

    def names(self) -> list[str]:
        return sorted(self._items)

    def find(self, name: str) -> Any | None:
        """The object registered as `name`, importing `jaxpref.tasks.<name>` first if there is such a
        task package and nothing has that name yet; None when there is none."""
        if name not in self._items and name.isidentifier() and _task_exists(name):
            importlib.import_module(f"jaxpref.tasks.{name}")
        return self._items.get(name)


def _task_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(f"jaxpref.tasks.{name}") is not None
    except ModuleNotFoundError:
        return False
