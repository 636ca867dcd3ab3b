"""cast_core: cost-aware speculative tree decoding (CAST) in process.

``from cast_core import Engine`` is the embedded engine; the rest are its parts
(draft trees, KV state, policies, drafter, verifier, cost profiles). This
package never imports ray.
"""

from cast_core.engine import Engine, Generation, GenerationStats, TokenEvent
from cast_core.policy import CastConfig, CastPolicy, StaticConfig, StaticTreePolicy, make_policy
from cast_core.sampling import SamplingParams
from cast_core.tree import DraftTree

__all__ = [
    "CastConfig",
    "CastPolicy",
    "DraftTree",
    "Engine",
    "Generation",
    "GenerationStats",
    "SamplingParams",
    "StaticConfig",
    "StaticTreePolicy",
    "TokenEvent",
    "make_policy",
]
