"""Rebuild camelid's offline evaluation suite (camelid/eval/tasks/camelid-offline) from the `bigbench` package.

    pip download --no-deps --no-binary :all: bigbench==1.0.0   # the sdist (358 MB); its metadata step fails on a
    tar xzf bigbench-1.0.0.tar.gz                             # direct URL dependency, the download itself is fine
    python scripts/make_offline_suite.py bigbench-1.0.0/bigbench/benchmark_tasks

Each BIG-bench JSON task (examples with `target_scores`) becomes a JSONL file of {question, choices, label} and an
lm-evaluation-harness task YAML (`dataset_path: json` with a local `data_files`). The prompt follows BIG-bench's
own JSON-task formatting: task_prefix, then example_input_prefix (default "\\nQ: ") + input, the choices appended
when append_choices_to_input (default true) is set, then example_output_prefix (default "\\nA: "); the answer
choices are scored as continuations. BIG-bench is Apache-2.0 (Google LLC); each data file keeps the task's canary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS = ["human_organs_senses", "known_unknowns", "logical_sequence", "analytic_entailment"]
OUT = Path(__file__).resolve().parents[1] / "camelid" / "eval" / "tasks" / "camelid-offline"


def convert(task_dir: Path, name: str) -> int:
    task = json.loads((task_dir / name / "task.json").read_text())
    prefix = task.get("task_prefix", "")
    q_prefix = task.get("example_input_prefix", "\nQ: ")
    a_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append = task.get("append_choices_to_input", True)
    rows = []
    for ex in task["examples"]:
        choices = list(ex["target_scores"])
        scores = [ex["target_scores"][c] for c in choices]
        text = q_prefix + ex["input"]
        if append:
            text += "".join(choice_prefix + c for c in choices)
        text = (prefix + text + a_prefix).lstrip("\n").rstrip(" ")
        rows.append({"question": text, "choices": choices, "label": scores.index(max(scores))})
    with open(OUT / f"{name}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (OUT / f"{name}.yaml").write_text(f"""\
# BIG-bench task `{name}` ({task['description']}), {len(rows)} examples, from the `bigbench` 1.0.0 package on PyPI
# (Apache-2.0, Google LLC); converted by scripts/make_offline_suite.py. {task['canary']}
task: camelid_offline_{name}
tag: camelid-offline-tasks
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return len(rows)


def main() -> None:
    task_dir = Path(sys.argv[1])
    OUT.mkdir(parents=True, exist_ok=True)
    for name in TASKS:
        print(name, convert(task_dir, name))
    names = "\n".join(f"  - camelid_offline_{n}" for n in TASKS)
    (OUT / "camelid-offline.yaml").write_text(f"""\
# camelid's offline suite: small multiple-choice tasks of BIG-bench (Apache-2.0), shipped with camelid
group: camelid-offline
task:
{names}
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
metadata:
  version: 1.0
""")


if __name__ == "__main__":
    main()
