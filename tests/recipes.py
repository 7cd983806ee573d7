"""Load a script of recipes/ as a module, for tests of its functions."""

import importlib.util
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name: str):
    """recipes/NAME.py as module NAME, registered in ``sys.modules`` (pickling functions for
    worker processes needs it)."""
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
