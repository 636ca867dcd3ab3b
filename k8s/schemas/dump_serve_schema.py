"""Write Ray Serve's config schema (``ServeDeploySchema``) as JSON Schema, for the installed Ray.

    python k8s/schemas/dump_serve_schema.py   # -> k8s/schemas/serve-deploy-schema.ray-<version>.json

That schema is what ``serveConfigV2`` in k8s/rayservice.yaml must satisfy (``serve deploy`` and
KubeRay both validate against the same pydantic model). tests/test_k8s.py validates with the model
itself and checks that this vendored copy still matches the installed Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def serve_schema() -> tuple[str, dict[str, Any]]:
    """The installed Ray's version and ``ServeDeploySchema``'s JSON Schema (pydantic v2 API)."""
    import ray
    from ray.serve.schema import ServeDeploySchema

    return ray.__version__, ServeDeploySchema.model_json_schema()


def vendored_path(ray_version: str) -> Path:
    """Where the schema for ``ray_version`` is vendored."""
    return HERE / f"serve-deploy-schema.ray-{ray_version}.json"


def main() -> None:
    """Write the schema of the installed Ray next to this script."""
    version, schema = serve_schema()
    document = {"$comment": f"ray.serve.schema.ServeDeploySchema.model_json_schema(), ray=={version}", **schema}
    out = vendored_path(version)
    out.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
