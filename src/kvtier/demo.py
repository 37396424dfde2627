"""``kvtier demo``: a multi-turn chat workload run twice, prefix caching off then on.

Conversations share one long system prompt and each turn resends the whole history, which is how
chat clients talk to an OpenAI-style server. The history is extended at the token level (previous
prompt + generated tokens + the template's next user turn), as a server holding the conversation
would, so the random weights of a synthetic model cannot break the reuse by emitting bytes that do
not round-trip through text.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvtier.config import EngineConfig
from kvtier.engine.engine import Engine, resolve_device
from kvtier.engine.request import SamplingParams
from kvtier.model.loader import LoadedModel, load_model

WORDS = [
    "cache",
    "prefix",
    "token",
    "block",
    "layer",
    "memory",
    "tier",
    "disk",
    "host",
    "redis",
    "model",
    "answer",
    "question",
    "context",
    "system",
    "user",
    "assistant",
    "prompt",
    "policy",
    "evict",
    "load",
    "compute",
    "attention",
    "key",
    "value",
    "page",
    "batch",
    "schedule",
    "decode",
    "prefill",
]


@dataclass
class DemoSpec:
    model: str = "synthetic:small"
    conversations: int = 4
    turns: int = 4
    system_tokens: int = 768
    max_tokens: int = 32
    device: str = "auto"
    seed: int = 0


@dataclass
class RunResult:
    label: str
    ttft: list[float] = field(default_factory=list)
    wall: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _workload(spec: DemoSpec, engine: Engine) -> tuple[list[list[int]], list[list[list[int]]]]:
    """First-turn prompts per conversation and the later user turns' template tokens."""
    rng = random.Random(spec.seed)
    tok = engine.tokenizer
    system = tok.decode(tok.encode(_text(rng, spec.system_tokens))[: spec.system_tokens])
    first, later = [], []
    for c in range(spec.conversations):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": f"{c}: {_text(rng, 12)}"}]
        first.append(engine.apply_chat_template(msgs))
        end = tok.convert_tokens_to_ids(["<|end|>"]) if "<|end|>" in tok.get_vocab() else [tok.eos_token_id]
        later.append(
            [
                end + engine.apply_chat_template([{"role": "user", "content": _text(rng, 10)}])
                for _ in range(spec.turns - 1)
            ]
        )
    return first, later


def _run(label: str, engine: Engine, spec: DemoSpec, progress: Progress) -> RunResult:
    result = RunResult(label)
    first, later = _workload(spec, engine)
    params = SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True)
    prompts = first
    task = progress.add_task(label, total=spec.conversations * spec.turns)
    start = time.perf_counter()
    for turn in range(spec.turns):
        ids = [engine.add_request(p, params)[0] for p in prompts]
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
                    progress.advance(task)
        outs = [done[i] for i in ids]
        for p, o in zip(prompts, outs, strict=True):
            result.ttft.append(o.metrics["ttft"])
            result.prompt_tokens += len(p)
            result.cached_tokens += o.num_cached_tokens
            result.output_tokens += len(o.outputs[0].token_ids)
            result.outputs.append(o.outputs[0].token_ids)
        if turn + 1 < spec.turns:
            prompts = [
                p + o.outputs[0].token_ids + later[c][turn]
                for c, (p, o) in enumerate(zip(prompts, outs, strict=True))
            ]
    result.wall = time.perf_counter() - start
    engine.pool.assert_idle()
    return result


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _table(results: list[RunResult]) -> Table:
    table = Table(title="kvtier demo: multi-turn chat, prefix caching off vs on")
    for col in (
        "run",
        "TTFT p50",
        "TTFT p95",
        "output tok/s",
        "prompt tokens computed",
        "reused",
        "hit rate",
        "wall",
    ):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r.label,
            f"{statistics.median(r.ttft) * 1e3:.0f} ms",
            f"{_percentile(r.ttft, 0.95) * 1e3:.0f} ms",
            f"{r.output_tokens / r.wall:.1f}",
            f"{r.computed_tokens:,}",
            f"{r.cached_tokens:,}",
            f"{r.cached_tokens / r.prompt_tokens:.1%}",
            f"{r.wall:.1f} s",
        )
    return table


def run_demo(spec: DemoSpec, console: Console) -> bool:
    device = resolve_device(spec.device)
    console.print(f"loading [bold]{spec.model}[/bold] on {device} ...")
    loaded: LoadedModel = load_model(spec.model, device)
    results = []
    with Progress(console=console, transient=True) as progress:
        for label, caching in (("caching off", False), ("caching on", True)):
            config = EngineConfig.load(
                {
                    "model": spec.model,
                    "device": spec.device,
                    "enable_prefix_caching": caching,
                    "kv_cache_memory": 512 << 20,
                }
            )
            results.append(_run(label, Engine(config, loaded), spec, progress))
    off, on = results
    console.print(_table(results))
    same = off.outputs == on.outputs
    console.print(
        f"TTFT p50 {statistics.median(off.ttft) / statistics.median(on.ttft):.1f}x shorter, "
        f"{off.computed_tokens / max(on.computed_tokens, 1):.1f}x fewer prompt tokens computed, "
        f"wall {off.wall / on.wall:.1f}x shorter with caching on."
    )
    if same:
        console.print(f"[green]identical greedy output in both runs[/green] ({len(on.outputs)} completions)")
    else:
        console.print("[red]the runs produced different greedy output[/red]")
    return same
