"""CAST's thresholds scaled by the achieved speedup (``adaptive_thresholds``) against unscaled, the gate held open
(run from the repository root)::

    RAY_AUTH_MODE=disabled PYTHONPATH=. python bench/results/tree_scale_ab/tree_scale_ab.py <dataset> <B> <groups> <variant JSON>...

``bench.ab``'s interleaved A/B on the tuning prompts, with the drafter quantized as the machine's profiles say
(``auto``: int8 where no mixed profile was measured) and ``DraftGate.should_draft`` made to draft every step, so
the arms differ in their trees alone. Prints each run and, per variant, its pooled speedup and its batch steps.
"""

import bench.ab as ab
from cast_core.gate import DraftGate

if __name__ == "__main__":
    DraftGate.should_draft = lambda self, b: (self._at(b), True)[1]
    ab.main(lambda variant: None, drafter_quantization="auto")
