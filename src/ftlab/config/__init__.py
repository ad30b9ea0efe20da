from ftlab.config.load import load_recipe, to_yaml
from ftlab.config.schema import EMBEDDED_MODEL, Recipe

__all__ = ["load_recipe", "to_yaml", "EMBEDDED_MODEL", "Recipe"]
