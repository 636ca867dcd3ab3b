"""Benchmark prompts: HumanEval and MT-bench, split into tuning and reported subsets.

* **HumanEval** (OpenAI, MIT): the ``prompt`` field of each task, fed raw (a code
  completion prompt, no chat template).
* **MT-bench** (LMSYS FastChat, Apache-2.0): the first turn of each question,
  rendered through the target's chat template with the generation prompt added.

Both files are vendored in ``bench/data`` (see its README for licences).

Split: each dataset is put in a fixed order — a shuffle seeded by the dataset
name (MT-bench: shuffled within each category, then taken round-robin over
categories, so any prefix covers as many categories as it can). The first
:data:`TUNING_SIZE` items form the *tuning* subset (threshold sweeps only), the
rest the *reported* subset (benchmarks). Reported prompts are used in that order,
so ``--prompts N`` always means the same N prompts.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerBase

DATA_DIR: Path = Path(__file__).with_name("data")
HUMANEVAL_FILE = "HumanEval.jsonl.gz"
MTBENCH_FILE = "mt_bench_question.jsonl"
DATASET_NAMES = ("humaneval", "mtbench")
TUNING_SIZE = 16
"""Items per dataset reserved for threshold tuning (never reported)."""

Subset = Literal["tuning", "reported"]


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt.

    Attributes:
        dataset: ``"humaneval"`` or ``"mtbench"`` (or a test's own name).
        id: the item's id in its dataset (``HumanEval/12``, ``mtbench/81``).
        text: the exact text to tokenize (chat template already applied where used).
    """

    dataset: str
    id: str
    text: str


@dataclass(frozen=True)
class _Item:
    id: str
    group: str
    content: str


def _read_jsonl(path: Path) -> list[dict]:
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _humaneval_items(data_dir: Path) -> list[_Item]:
    return [_Item(row["task_id"], "code", row["prompt"]) for row in _read_jsonl(data_dir / HUMANEVAL_FILE)]


def _mtbench_items(data_dir: Path) -> list[_Item]:
    return [
        _Item(f"mtbench/{row['question_id']}", row["category"], row["turns"][0])
        for row in _read_jsonl(data_dir / MTBENCH_FILE)
    ]


def _ordered(items: list[_Item], seed: str) -> list[_Item]:
    """Deterministic order: shuffle within each group (seeded), then round-robin over groups.

    Groups are visited in order of first appearance, so the result depends only
    on the file's content and ``seed``.
    """
    rng = random.Random(seed)
    groups: dict[str, list[_Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    for members in groups.values():
        rng.shuffle(members)
    out: list[_Item] = []
    for i in range(max(len(m) for m in groups.values())):
        out.extend(m[i] for m in groups.values() if i < len(m))
    return out


def load_prompts(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    subset: Subset = "reported",
    limit: int | None = None,
    data_dir: Path = DATA_DIR,
) -> list[Prompt]:
    """The ``subset`` of dataset ``name`` in its fixed order, at most ``limit`` prompts.

    ``tokenizer`` renders MT-bench questions through its chat template (it must have one).

    Raises:
        ValueError: unknown dataset name or subset.
    """
    if name == "humaneval":
        items = _ordered(_humaneval_items(data_dir), seed=name)
    elif name == "mtbench":
        items = _ordered(_mtbench_items(data_dir), seed=name)
    else:
        raise ValueError(f"dataset must be one of {', '.join(DATASET_NAMES)}; got {name!r}")
    if subset == "tuning":
        chosen = items[:TUNING_SIZE]
    elif subset == "reported":
        chosen = items[TUNING_SIZE:]
    else:
        raise ValueError(f"subset must be 'tuning' or 'reported'; got {subset!r}")
    chosen = chosen[:limit] if limit is not None else chosen
    if name == "humaneval":
        return [Prompt(name, item.id, item.content) for item in chosen]
    return [
        Prompt(
            name,
            item.id,
            tokenizer.apply_chat_template(
                [{"role": "user", "content": item.content}], tokenize=False, add_generation_prompt=True
            ),
        )
        for item in chosen
    ]
