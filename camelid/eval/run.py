"""`camelid eval`: lm-evaluation-harness tasks on camelid models (one, or several side by side with --compare).

Tasks are harness names (wherever the user has their data), local task YAML files (`dataset_path: json` with local
`data_files`, relative paths read from the YAML's folder), or `camelid-offline`, the suite shipped in
camelid/eval/tasks (BIG-bench multiple-choice tasks), which needs no network at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from ..errors import CamelidError, first_line

SUITES = Path(__file__).parent / "tasks"
INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'camelid[eval]' (or pip install lm_eval)"
QUANTS = ("auto", "int8", "int4", "none")


# ---------------------------------------------------------------- tasks

def _absolute_data_files(cfg: dict, folder: Path, where: str) -> dict:
    """cfg with local data_files as absolute paths (relative ones read from `folder`, else the working directory);
    a missing file is an error naming it."""
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if files is None:
        return cfg

    def fix(p: str) -> str:
        path = Path(p).expanduser()
        if not path.is_absolute():
            path = folder / path if (folder / path).exists() or not path.exists() else path
        if not path.exists():
            raise CamelidError(f"{where}: data file not found: {p} (looked in {folder})")
        return str(path.resolve())

    if isinstance(files, str):
        files = fix(files)
    elif isinstance(files, list):
        files = [fix(f) for f in files]
    elif isinstance(files, dict):
        files = {k: fix(v) if isinstance(v, str) else [fix(f) for f in v] for k, v in files.items()}
    return {**cfg, "dataset_kwargs": {**kwargs, "data_files": files}}


def _suite_folder(name: str, tmp: Path) -> Path:
    """A shipped suite's YAML files rewritten with absolute data_files into tmp/name (lm-eval reads relative
    data_files from the working directory)."""
    import yaml

    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted((SUITES / name).glob("*.yaml")):
        cfg = _absolute_data_files(yaml.safe_load(f.read_text()), SUITES / name, str(f))
        (out / f.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def resolve_tasks(specs: list[str], tmp: Path):
    """(task list for lm_eval.simple_evaluate, TaskManager, whether every task is local)."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    names = [t.strip() for s in specs for t in s.split(",") if t.strip()]
    if not names:
        raise CamelidError("--tasks needs at least one task name or YAML file")
    include, tasks, local = [], [], True
    for name in names:
        if (SUITES / name).is_dir():
            include.append(str(_suite_folder(name, tmp)))
            tasks.append(name)
        elif name.endswith((".yaml", ".yml")) or Path(name).is_file():
            path = Path(name).expanduser()
            if not path.is_file():
                raise CamelidError(f"no such task file: {name}")
            try:
                cfg = load_yaml(path)
            except Exception as e:  # yaml errors, a bad include or !function: one line
                raise CamelidError(f"{name}: cannot read the task YAML: {first_line(e)}") from None
            if "task" not in cfg:
                raise CamelidError(f"{name}: a task YAML needs a 'task' name (groups: pass their folder's tasks by name)")
            tasks.append(_absolute_data_files(cfg, path.resolve().parent, name))
            local = local and cfg.get("dataset_path") in ("json", "csv", "parquet", "text", "arrow")
        else:
            tasks.append(name)
            local = False
    manager = TaskManager(include_path=include or None)
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    for t in tasks:
        if isinstance(t, str) and t not in known:
            raise CamelidError(f"unknown task {t!r}: not a harness task, group or tag, nor a YAML file "
                               "(`lm_eval ls tasks` lists them; camelid-offline is the shipped suite)")
    return tasks, manager, local


# ---------------------------------------------------------------- models

def available_memory() -> int | None:
    """Bytes of memory available now (Linux /proc/meminfo), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits_memory(path: Path, quant: str | None) -> None:
    """A one-line error before a load that would not fit in memory: the float32 reference path holds 4 bytes per
    weight, the fast path about the file's size."""
    from ..formats import read

    ckpt = read(path)
    params = sum(_numel(t.shape) for t in ckpt.tensors.values())
    need = params * 4 if quant is None else min(params * 4, max(_size(path), params))
    have = available_memory()
    if have is not None and need > have:
        how = "the float32 reference path (--quant none)" if quant is None else f"--quant {quant}"
        raise CamelidError(f"{path.name} does not fit: {how} needs about {need / 2**30:.1f} GiB and {have / 2**30:.1f} GiB "
                           "are available" + ("; try --quant auto, int8 or int4" if quant is None else "; try --quant int4"))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def parse_candidate(spec: str, base: dict) -> dict:
    """One --compare entry: a model (store name or path), or comma-separated key=value of model, adapter, quant
    over the command's own MODEL / --adapter / --quant."""
    out = dict(base)
    for part in spec.split(","):
        key, eq, value = part.partition("=")
        if not eq:
            out["model"] = part
        elif key in ("model", "adapter", "quant"):
            out[key] = value or None
        else:
            raise CamelidError(f"--compare entry {spec!r}: unknown key {key!r} (model, adapter, quant)")
    if out.get("quant") not in (*QUANTS, None):
        raise CamelidError(f"--compare entry {spec!r}: quant must be one of {', '.join(QUANTS)}")
    return out


def _label(c: dict) -> str:
    parts = [Path(str(c["model"])).name if c.get("model") else "default"]
    if c.get("adapter"):
        parts.append(f"+{Path(c['adapter']).name}")
    parts.append(f"[{c.get('quant') or 'none'}]")
    return "".join(parts)


# ---------------------------------------------------------------- running

def evaluate(candidate: dict, tasks, manager, args) -> dict:
    """lm-eval's results for one candidate (model, adapter, quant) on the resolved tasks."""
    import lm_eval

    from ..store import resolve
    from .harness import CamelidLM

    path = resolve(candidate.get("model"))
    quant = None if candidate.get("quant") in (None, "none") else candidate["quant"]
    check_fits_memory(path, quant)
    if candidate.get("adapter") and not Path(candidate["adapter"]).is_dir():
        raise CamelidError(f"no such adapter folder: {candidate['adapter']}")
    lm = CamelidLM(str(path), adapter=candidate.get("adapter"), quant=quant or "none", batch_size=args.batch_size,
                   threads=args.threads)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
                                  limit=int(args.limit) if args.limit and args.limit >= 1 else args.limit,
                                  apply_chat_template=args.apply_chat_template,
                                  log_samples=False, bootstrap_iters=1000, verbosity="ERROR")
    if lm.truncated:
        print(f"camelid: note: {lm.truncated} requests were cut on the left to the context of {lm.max_length} tokens "
              "(as lm-eval's hf backend does)", file=sys.stderr)
    return out


def rows_of(results: dict) -> list[dict]:
    """[{task, metric, value, stderr, n}] from lm-eval's results: acc (else the first metric) per task and group."""
    rows = []
    n_samples = results.get("n-samples", {})
    for task, metrics in results["results"].items():
        keys = [k for k in metrics if "," in k and not k.split(",")[0].endswith("_stderr")]
        if not keys:
            continue
        key = next((k for k in keys if k.startswith("acc,")), keys[0])
        name, filt = key.split(",", 1)
        stderr = metrics.get(f"{name}_stderr,{filt}")
        rows.append({"task": task, "metric": name, "value": metrics[key],
                     "stderr": stderr if isinstance(stderr, (int, float)) else None,
                     "n": (n_samples.get(task) or {}).get("effective")})
    return rows


def _pct(v, se) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{100 * v:6.2f}" + (f" ± {100 * se:5.2f}" if isinstance(se, (int, float)) else "        ")


def table(labels: list[str], per: list[list[dict]]) -> str:
    """One row per task: each candidate's score ± stderr (percent) and, for 2+, the difference from the first."""
    tasks = [r["task"] for r in per[0]]
    head = f"{'task':40} {'metric':7} {'n':>4} " + " ".join(f"{lab[:22]:>22}" for lab in labels)
    if len(labels) > 1:
        head += " " + " ".join(f"{'Δ ' + str(i + 1):>8}" for i in range(1, len(labels)))
    lines = [head]
    for t in tasks:
        cells = [next((r for r in rows if r["task"] == t), None) for rows in per]
        first = cells[0]
        line = f"{t[:40]:40} {first['metric']:7} {first['n'] or '':>4} "
        line += " ".join(f"{_pct(c['value'], c['stderr']) if c else '-':>22}" for c in cells)
        if len(labels) > 1:
            line += " " + " ".join(f"{100 * (c['value'] - first['value']):+8.2f}" if c else f"{'-':>8}" for c in cells[1:])
        lines.append(line)
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise CamelidError(INSTALL_HINT) from None
    if args.limit is not None and args.limit <= 0:
        raise CamelidError(f"--limit must be > 0, got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise CamelidError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.threads is not None and args.threads < 1:
        raise CamelidError(f"--threads must be >= 1, got {args.threads}")
    base = {"model": args.model, "adapter": args.adapter, "quant": args.quant}
    candidates = [parse_candidate(s, base) for s in args.compare] if args.compare else [base]
    if args.compare is not None and len(candidates) < 2:
        raise CamelidError("--compare needs at least two entries (models, adapter=DIR or quant=MODE)")
    _quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="camelid-eval-") as tmp:
        tasks, manager, local = resolve_tasks(args.tasks, Path(tmp))
        if local:  # nothing to fetch: never wait on a network that is not there
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        results = []
        for i, c in enumerate(candidates):
            if len(candidates) > 1:
                print(f"camelid: evaluating {i + 1}/{len(candidates)}: {_label(c)}", file=sys.stderr, flush=True)
            try:
                results.append(evaluate(c, tasks, manager, args))
            except CamelidError:
                raise
            except (FileNotFoundError, ValueError, KeyError) as e:  # a dataset lm-eval cannot read, a bad config
                raise CamelidError(f"the evaluation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    labels = [_label(c) for c in candidates]
    per = [rows_of(r) for r in results]
    doc = {"candidates": [{"label": lab, **c} for lab, c in zip(labels, candidates)],
           "tasks": [{"task": row["task"], "metric": row["metric"], "n": row["n"],
                      "scores": [{"value": r["value"], "stderr": r["stderr"]} for r in
                                 [next((x for x in rows if x["task"] == row["task"]), {"value": None, "stderr": None})
                                  for rows in per]]} for row in per[0]],
           "config": {"limit": args.limit, "num_fewshot": args.num_fewshot, "tasks": args.tasks}}
    for t in doc["tasks"]:
        v0 = t["scores"][0]["value"]
        t["diff"] = [s["value"] - v0 if isinstance(s["value"], (int, float)) else None for s in t["scores"][1:]]
    if args.out:
        full = {**doc, "lm_eval": [{k: r[k] for k in ("results", "groups", "configs", "versions", "n-shot", "n-samples")
                                    if k in r} for r in results]}
        Path(args.out).write_text(json.dumps(full, indent=1, default=str))
    print(json.dumps(doc, indent=1) if args.json else table(labels, per))


def _quiet_libraries() -> None:
    """lm-eval and datasets log at INFO/WARNING by default; camelid prints its own table and progress."""
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-stage bars; camelid's own bar has the ETA
    for name in ("lm_eval", "lm-eval", "datasets", "huggingface_hub", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def add_parser(sub, model_help: str) -> None:
    """`camelid eval` in the top-level parser."""
    p = sub.add_parser("eval", help="lm-evaluation-harness tasks (or the shipped offline suite) on a model, or several side by side")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.add_argument("--tasks", action="append", required=True, metavar="NAMES_OR_YAML",
                   help="comma-separated harness task names, task YAML files, or camelid-offline (the shipped suite)")
    p.add_argument("--adapter", metavar="DIR", default=None, help="a LoRA adapter folder (peft's format)")
    p.add_argument("--quant", choices=QUANTS, default="none",
                   help="none (default: the float32 reference path, every weight dequantized; an evaluation is a "
                        "measurement), auto (GGUF Q4_0/Q4_1/Q8_0 kept quantized, bf16 products), int8 or int4")
    p.add_argument("--limit", type=float, default=None, metavar="N", help="at most N examples per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--compare", nargs="+", default=None, metavar="SPEC",
                   help="evaluate several: each SPEC a model, or key=value[,key=value] of model, adapter, quant")
    p.add_argument("--batch-size", type=int, default=16, metavar="N")
    p.add_argument("--threads", type=int, default=None, metavar="N")
    p.add_argument("--json", action="store_true", help="the scores as JSON on stdout")
    p.add_argument("--out", metavar="FILE", default=None, help="write the scores and lm-eval's full results as JSON")
    p.set_defaults(func=cmd_eval)
