"""`camelid bench` and the GPU bandwidth script, run small: the figures exist, are positive and add up."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as G
from gguf_factory import Spec, byte_level_vocab, write_gguf

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_json_keys(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, Spec(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, context_length=1024),
               byte_level_vocab(), G.Q4_0)
    out = subprocess.run([sys.executable, "-m", "camelid", "bench", str(path), "--json", "--repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb"):
        assert result[key] > 0


def test_bench_refuses_bad_values(tmp_path):
    out = subprocess.run([sys.executable, "-m", "camelid", "bench", str(tmp_path / "missing.gguf")], capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_gpu_bandwidth_script_on_a_tiny_model():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "bench_gpu.py")
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    result = bench_gpu.main(["--device", "cpu", "--presets", "tiny", "--tokens", "4", "--repeats", "1"])
    tiny = result["models"]["tiny"]
    assert result["copy_bandwidth_gb_s"] > 0 and tiny["decode_tok_s"] > 0
    assert tiny["achieved_gb_s"] == pytest.approx(tiny["weight_gb"] * tiny["decode_tok_s"])
