"""services: the Ray Serve deployment graph around ``cast_core`` (the only package that imports ray)."""
