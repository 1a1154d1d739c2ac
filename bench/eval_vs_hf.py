"""camelid's lm-eval backend next to lm-eval's own `hf` backend (transformers) on the same model and tasks.

Both read the same GGUF: transformers dequantizes it to float32 at load (`gguf_file=`), and camelid runs it on its
float32 reference path (`--quant none`: every weight dequantized), so the weights are the same numbers. Same harness,
same task YAML, same prompts; batch size 1 for hf (no padding), camelid's own batching.

    python bench/eval_vs_hf.py [GGUF] [--tasks camelid-offline] [--limit N] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="?", default=None)
    ap.add_argument("--tasks", default="camelid-offline")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write both results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    from camelid.eval.harness import CamelidLM
    from camelid.eval.run import _quiet_libraries, resolve_tasks, rows_of
    from camelid.store import resolve

    torch.set_num_threads(args.threads)
    _quiet_libraries()
    gguf = Path(resolve(args.gguf))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tasks, manager, _ = resolve_tasks([args.tasks], Path(tmp))
        for name, make in (("camelid", lambda: CamelidLM(str(gguf), quant="none")),
                           ("hf", lambda: HFLM(pretrained=str(gguf.parent), gguf_file=gguf.name, dtype="float32",
                                               batch_size=1, device="cpu"))):
            t0 = time.perf_counter()
            lm = make()
            r = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit, log_samples=False,
                                        bootstrap_iters=1000, verbosity="ERROR")
            out[name] = {"rows": rows_of(r), "seconds": time.perf_counter() - t0}
            del lm
    print(f"{gguf.name}, tasks {args.tasks}, limit {args.limit}; camelid --quant none vs lm-eval hf (transformers, GGUF "
          "dequantized to float32)")
    print(f"{'task':40} {'n':>4} {'camelid acc':>16} {'hf acc':>16} {'diff':>7}")
    for a in out["camelid"]["rows"]:
        b = next(x for x in out["hf"]["rows"] if x["task"] == a["task"])
        se = lambda r: f" ± {100 * r['stderr']:5.2f}" if r["stderr"] is not None else ""  # noqa: E731
        print(f"{a['task'][:40]:40} {a['n'] or '':>4} {100 * a['value']:8.2f}{se(a)} {100 * b['value']:8.2f}{se(b)} "
              f"{100 * (a['value'] - b['value']):+7.2f}")
    print(f"time: camelid {out['camelid']['seconds']:.0f} s, hf {out['hf']['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
