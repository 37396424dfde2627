"""``kvtier bench``: the commands run from the installed package and leave their report behind
(JSON with the raw figures, the markdown that was printed, a plot per table). Tiny workloads; no
figure is judged here (benchmarks print numbers, they never fail on time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvtier.bench.report import markdown_tables
from kvtier.cli import app


def run(args: list[str]) -> str:
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.stdout


def test_policies_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    out = run(["policies", "--requests", "60", "--capacities", "0.05,0.1", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "policies.json").read_text())
    assert doc["bench"] == "policies" and set(doc["results"]["policies"]) >= {"lru", "s3fifo", "arc"}
    report = (tmp_path / "policies.md").read_text()
    headers, rows = markdown_tables(report)[0]
    assert headers[0] == "policy" and {r[0] for r in rows} >= {"lru", "arc", "unbounded"}
    assert report.strip() in out  # the file is what was printed
    assert (tmp_path / "policies-1.png").read_bytes()[:4] == b"\x89PNG"  # a plot of that table


def test_decode_on_a_tiny_model_reports_against_the_copy_ceiling(tmp_path: Path) -> None:
    args = ["decode", "--model", "synthetic:tiny", "--prompt-len", "8", "--output-len", "4", "--repeats", "1"]
    run([*args, "--threads", "1", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "decode.json").read_text())
    assert doc["ceilings"]["copy_bandwidth"] > 0  # measured in the same run
    assert doc["results"]["median"]["decode_tokens"] == 3
    headers, rows = markdown_tables((tmp_path / "decode.md").read_text())[0]
    assert headers[0] == "run" and [r[0] for r in rows] == ["run 1", "median"]


@pytest.mark.slow
def test_throughput_runs_the_hf_peer_on_the_same_workload(tmp_path: Path) -> None:
    """Hugging Face's continuous batching runs the same prompts and output lengths after kvtier."""
    args = ["throughput", "--model", "synthetic:tiny", "--num-requests", "4", "--min-len", "8"]
    out = run([*args, "--max-len", "24", "--hf-peer", "--no-ceilings", "--json", str(tmp_path / "t.json")])
    results = json.loads((tmp_path / "t.json").read_text())["results"]
    peer = results["hf_peer"]
    assert "error" not in peer, peer
    assert peer["output_tokens"] == results["output_tokens"] == results["expected_output_tokens"]
    assert peer["kvtier_over_hf"] == results["output_tokens_per_s"] / peer["output_tokens_per_s"]
    assert "HF continuous batching" in out


def test_help_lists_each_commands_options() -> None:
    assert "--prefix-len" in run(["prefix", "--help"])
    assert "--capacities" in run(["policies", "--help"])


def test_codec_tables_become_json_when_the_bench_writes_none(tmp_path: Path) -> None:
    args = ["codec", "--layers", "1", "--kv-heads", "1", "--head-dim", "8", "--budget", "0.01"]
    run([*args, "--stream-mib", "1", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "codec.json").read_text())
    headers = [t["headers"][0] for t in doc["tables"]]
    assert doc["bench"] == "codec" and "quant" in headers and len(doc["tables"]) == 3
    quant_rows = doc["tables"][headers.index("quant")]["rows"]
    assert {(r[0], r[1]) for r in quant_rows} >= {("none", "none"), ("fp8", "zstd"), ("int8", "lz4")}


def test_gpu_decode_runs_its_cpu_parts_and_skips_the_cuda_ones(tmp_path: Path) -> None:
    args = ["gpu-decode", "--device", "cpu", "--models", "synthetic:tiny", "--dtype", "float32"]
    out = run(
        [*args, "--kv-cache-memory", "16MiB", "--parts", "batch1,agree,attention", "--out", str(tmp_path)]
    )
    doc = json.loads((tmp_path / "gpu-decode.json").read_text())
    paths = doc["batch1"]["synthetic:tiny"]
    assert set(paths) == {"triton+graphs", "triton eager", "torch reference"}
    assert all(r["tok_s"] > 0 for r in paths.values())
    # the torch backend against itself on the CPU: the same tokens
    assert doc["agree"]["synthetic:tiny"]["triton_vs_torch"]["token_agreement"] == 1.0
    assert doc["attention_skipped"] == "needs CUDA" and "attention_error" not in doc
    assert "| model" in out


def test_gpu_decode_refuses_an_unknown_part() -> None:
    result = CliRunner().invoke(app, ["bench", "gpu-decode", "--parts", "batch1,speed"])
    assert result.exit_code != 0
    assert "unknown part(s) speed" in result.output + str(result.stderr_bytes or b"")


def test_bench_runs_without_the_tier_and_compression_packages(tmp_path: Path) -> None:
    """The GPU image has no lz4, zstandard, redis, hiredis or pymemcache: the engine benchmarks
    must not import them (the old script's command line, through the thin wrapper)."""
    block = "; ".join(
        f"sys.modules[{n!r}] = None"
        for n in ("lz4", "lz4.frame", "zstandard", "redis", "hiredis", "pymemcache")
    )
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu_decode.py"
    code = (
        f"import runpy, sys; {block}; sys.path.insert(0, {str(script.parent)!r}); "
        f"sys.argv = [{str(script)!r}, '--device', 'cpu', '--models', 'synthetic:tiny', '--kv-cache-memory', "
        f"'16MiB', '--parts', 'batch1', '--json', {str(tmp_path / 'out.json')!r}]; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    # One torch thread: on a busy 2-core machine two threads wait at a barrier per op, and this
    # run's ~700 tiny decode steps took 77-124 s in full-suite runs (3 s alone), under a 300 s limit.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out.json").read_text())["batch1"]["synthetic:tiny"]


def test_persist_prefill_compares_every_tier_configuration_the_device_has(tmp_path: Path) -> None:
    args = ["persist", "prefill", "--model", "synthetic:tiny", "--prompt-len", "40", "--repeats", "1"]
    run([*args, "--kv-cache-memory", "16MiB", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "persist.json").read_text())
    configs = doc["results"]["configs"]
    assert set(configs) == {"none", "disk write-through"}  # the CPU has no host tier to measure
    assert all(len(c["prefill_s"]) == 1 and c["dropped"] == 0 for c in configs.values())
    headers, rows = markdown_tables((tmp_path / "persist.md").read_text())[0]
    assert headers[:3] == ["tiers", "prefill ms", "x none"] and rows[0][2] == "1.000"


def test_hf_store_loads_the_shared_prefix_and_keeps_greedy_output(tmp_path: Path) -> None:
    args = ["hf", "--prefix-len", "48", "--suffix-len", "8", "--new-tokens", "2", "--rounds", "1"]
    run([*args, "--hidden", "64", "--layers", "1", "--vocab", "256", "--json", str(tmp_path / "hf.json")])
    results = json.loads((tmp_path / "hf.json").read_text())["results"]
    assert results["identical"] is True
    assert results["loaded_tokens"] >= 32  # the prefix's full blocks came from the store


def test_help_lists_the_one_off_benchmarks() -> None:
    assert "--src" in run(["startup", "--help"])
    assert "--changed" in run(["embed", "--help"])
    assert "--parts" in run(["gpu-decode", "--help"])


def test_prefix_tier_row_loads_from_a_write_back_host_tier(tmp_path: Path) -> None:
    """The host tier takes evicted blocks only (write-back, its default): the bench's tier row must
    evict the prefix through the pool's hook, or it measures a recompute."""
    args = ["prefix", "--model", "synthetic:tiny", "--tiers", "host", "--prefix-len", "64", "--repeats", "1"]
    run([*args, "--no-ceilings", "--threads", "1", "--json", str(tmp_path / "p.json")])
    results = json.loads((tmp_path / "p.json").read_text())["results"]
    assert results["tier_load"]["loaded_tokens_median"] >= 64


def test_chat_variants_run_in_every_round_with_their_own_settings(tmp_path: Path) -> None:
    """``--variant`` adds a tiers run with other settings to every round, the rotation covering it;
    ``--skip-no-caching`` leaves that run out and the ratios compare against the pool alone."""
    args = ["chat", "--model", "synthetic:tiny", "--device", "cpu", "--conversations", "3", "--turns", "2"]
    args += ["--clients", "2", "--max-tokens", "4", "--rounds", "2", "--skip-no-caching", "--tiers", "disk"]
    args += ["--variant", "none:tiers=none,load_policy=always", "--out", str(tmp_path)]
    out = run(args)
    results = json.loads((tmp_path / "chat.json").read_text())["results"]
    labels = [r["label"] for r in results["runs"]]
    assert labels == ["tiers", "tiers, none", "device pool only"]
    assert all(len(r["rounds"]) == 2 for r in results["runs"])
    orders = results["round_orders"]
    assert sorted(orders[0]) == sorted(labels) and orders[0] != orders[1]
    tiers, variant = results["runs"][0]["rounds"][0], results["runs"][1]["rounds"][0]
    assert tiers["hierarchy"] and not variant["hierarchy"]  # the variant's own settings: no tiers
    assert results["identical_outputs"]
    assert "tiers, none vs device pool only" in out and "no caching" not in out
    with pytest.raises(AssertionError, match="LABEL:NAME=VALUE"):
        run(["chat", "--model", "synthetic:tiny", "--variant", "no-colon"])
    with pytest.raises(AssertionError, match="given twice"):  # two rows nobody could tell apart
        run(["chat", "--model", "synthetic:tiny", "--variant", "a:x=1", "--variant", "a:x=2"])
