"""Benchmarks of CAST against vanilla decoding, EAGLE-2 static trees and transformers.

``cast bench`` runs them (:mod:`bench.cli`); results and plots live in ``bench/results``.
"""
