"""The ``kvtier`` command: demo, run, serve, bench, cache."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import sys
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console

from kvtier.cache_cli import cache_app
from kvtier.config import ConfigError, EngineConfig, _resolve
from kvtier.engine.request import InvalidRequestError, RequestOutput

app = typer.Typer(add_completion=False, no_args_is_help=True, help="kvtier: never compute the same KV twice.")
console = Console()
app.add_typer(cache_app, name="cache")


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="model folder or synthetic:<name>")] = "synthetic:small",
    conversations: Annotated[int, typer.Option(help="concurrent chat conversations")] = 4,
    turns: Annotated[int, typer.Option(help="turns per conversation")] = 4,
    system_tokens: Annotated[int, typer.Option(help="length of the shared system prompt, in tokens")] = 768,
    max_tokens: Annotated[int, typer.Option(help="tokens generated per turn")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
) -> None:
    """Multi-turn chat, prefix caching off then on: same greedy text, far less prefill."""
    from kvtier.demo import DemoSpec, run_demo

    spec = DemoSpec(model, conversations, turns, system_tokens, max_tokens, device)
    ok = run_demo(spec, console)
    raise typer.Exit(0 if ok else 1)


@app.command()
def run(
    prompt: Annotated[str, typer.Option(help="the prompt text")],
    model: Annotated[str, typer.Option(help="model folder or synthetic:<name>")] = "synthetic:small",
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the model's chat template")] = False,
    device: str = "auto",
    kv_cache_memory: Annotated[int | None, typer.Option(help="bytes for the KV pool")] = None,
) -> None:
    """Generate from one prompt, streaming the text to the terminal."""
    from kvtier.engine.llm import LLM
    from kvtier.engine.request import SamplingParams

    with LLM(model, device=device, kv_cache_memory=kv_cache_memory) as llm:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
        source = llm.engine.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        reason, last = None, None
        for delta in llm.stream(source, params):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            reason, last = delta.finish_reason, delta.output
        sys.stdout.write("\n")
        console.print(f"[dim]finish reason: {reason}[/dim]")
        if last is not None:
            hierarchy = llm.engine.hierarchy
            loaded = dict(hierarchy.stats.per_tier_loaded) if hierarchy is not None else {}
            print(timings_line(last, loaded, llm.engine.layout.block_size), file=sys.stderr)


def timings_line(out: RequestOutput, blocks_loaded: dict[str, int], block_size: int) -> str:
    """One line of timings, as llama.cpp prints them: prompt tokens, how many were cached and
    where from (device pool or each tier), time to first token, output tokens per second."""
    tiers = {name: n * block_size for name, n in blocks_loaded.items() if n}
    device = out.num_cached_tokens - sum(tiers.values())
    where = ", ".join(f"{name} {n}" for name, n in {"device": device, **tiers}.items() if n)
    ttft = out.metrics.get("ttft")
    e2e = out.metrics.get("e2e")
    n_out = len(out.outputs[0].token_ids)
    rate = (n_out - 1) / (e2e - ttft) if n_out > 1 and ttft is not None and e2e and e2e > ttft else None
    return (
        f"prompt: {len(out.prompt_token_ids)} tokens, {out.num_cached_tokens} cached"
        + (f" ({where})" if where else "")
        + f" | TTFT: {'-' if ttft is None else f'{ttft * 1e3:.1f} ms'}"
        + f" | output: {n_out} tokens, {'-' if rate is None else f'{rate:.1f} tokens/s'}"
    )


def with_engine_settings(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command one ``--<setting>`` option per EngineConfig field (``--block-size``,
    ``--kv-cache-memory``, ``--tiers``...) and ``--config FILE``; the command receives them as
    ``engine_config: EngineConfig`` loaded the usual way (defaults < YAML < KVTIER_* < flags)."""
    sig = inspect.signature(func)
    hints = typing.get_type_hints(func, include_extras=True)  # this module's annotations are strings
    own = [p.replace(annotation=hints[p.name]) for p in sig.parameters.values() if p.name != "engine_config"]
    taken = {p.name for p in own}
    extra: list[inspect.Parameter] = []
    names: list[str] = []
    for part_name, part in EngineConfig().parts().items():
        for f in dataclasses.fields(part):
            if f.name in taken:
                continue
            hint = _resolve(f.type)
            base = next((a for a in getattr(hint, "__args__", ()) if a is not type(None)), hint)
            option = typer.Option(
                help=f"{part_name}: default {getattr(part, f.name)!r} (env KVTIER_{f.name.upper()})",
                rich_help_panel="Engine settings",
            )
            extra.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[base | None, option],
                )
            )
            names.append(f.name)
    config_opt = inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[str | None, typer.Option(help="YAML settings file (or KVTIER_CONFIG)")],
    )

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        overrides = {n: kwargs.pop(n) for n in names}
        yaml_path = kwargs.pop("config")
        kwargs["engine_config"] = EngineConfig.load(overrides, yaml_path=yaml_path)
        return func(*args, **kwargs)

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + [config_opt, *extra]
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


@app.command()
@with_engine_settings
def serve(
    host: Annotated[str, typer.Option(help="address to listen on", envvar="KVTIER_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on", envvar="KVTIER_PORT")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(help="require this key (tenant 'default')", envvar="KVTIER_API_KEY")
    ] = None,
    api_keys_file: Annotated[
        str | None,
        typer.Option(
            help="file mapping keys to tenant names (YAML/JSON, or '<key> <tenant>' lines)",
            envvar="KVTIER_API_KEYS_FILE",
        ),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="model name clients use", envvar="KVTIER_SERVED_MODEL_NAME")
    ] = None,
    max_pending_requests: Annotated[
        int,
        typer.Option(help="accepted, unfinished requests; then 503", envvar="KVTIER_MAX_PENDING_REQUESTS"),
    ] = 1024,
    max_request_bytes: Annotated[
        int,
        typer.Option(help="a larger request body gets 413", envvar="KVTIER_MAX_REQUEST_BYTES"),
    ] = 32 << 20,
    shutdown_timeout: Annotated[
        float,
        typer.Option(help="SIGTERM: seconds in-flight requests may take", envvar="KVTIER_SHUTDOWN_TIMEOUT"),
    ] = 30.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level", envvar="KVTIER_LOG_LEVEL")] = "info",
    step_handoff: Annotated[
        float | None,
        typer.Option(
            help="after a step, wait for its outputs to be sent: at most this x the step "
            "(0: never; default 1 on CPU, 0 on CUDA)",
            envvar="KVTIER_STEP_HANDOFF",
        ),
    ] = None,
    engine_process: Annotated[
        str,
        typer.Option(
            help="run the engine in its own process: on | off (a thread of the HTTP process) | auto (on)",
            envvar="KVTIER_ENGINE_PROCESS",
        ),
    ] = "auto",
    trace_stages: Annotated[
        bool,
        typer.Option(
            help="stamp each request at every stage (both processes); GET /debug/stages returns them",
            envvar="KVTIER_TRACE_STAGES",
        ),
    ] = False,
    join_window: Annotated[
        float | None,
        typer.Option(
            help="engine process: between steps, wait for new requests up to this fraction of the "
            "time the steps wait for the device (default 0: never; it hurt on the H200; none on a CPU)",
            envvar="KVTIER_JOIN_WINDOW",
        ),
    ] = None,
    *,
    engine_config: EngineConfig,
) -> None:
    """OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /metrics and more."""
    from kvtier.server.app import ServerSettings
    from kvtier.server.serve import run_server

    settings = ServerSettings(
        host=host,
        port=port,
        api_key=api_key,
        api_keys_file=api_keys_file,
        served_model_name=served_model_name,
        max_pending_requests=max_pending_requests,
        max_request_bytes=max_request_bytes,
        shutdown_timeout_s=shutdown_timeout,
        step_handoff=step_handoff,
        engine_process=engine_process,
        trace_stages=trace_stages,
        join_window=join_window,
    )
    run_server(engine_config, settings, log_level)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print numbers.")
app.add_typer(bench_app, name="bench")
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _bench_command(name: str, summary: str) -> None:
    """``kvtier bench <name> ...``: the options are kvtier.bench.cli's (``--help`` lists them)."""

    def run(ctx: typer.Context) -> None:
        from kvtier.bench.cli import main as bench_main

        bench_main([name, *ctx.args])

    bench_app.command(name, help=summary, context_settings=_PASS_THROUGH, add_help_option=False)(run)


for _name, _summary in (
    ("decode", "batch-1 decode tokens/s and weight bandwidth, next to the copy ceiling"),
    ("throughput", "offline throughput of many requests, next to the matmul ceiling"),
    ("prefix", "TTFT with a cached prefix vs cold, next to its floor"),
    ("tiers", "each tier's bandwidth vs the ceiling of its medium, same run"),
    ("memcached", "the memcached tier's put and get + decode vs plain pymemcache, same server"),
    ("chat", "multi-round chat: the tiers vs the device pool alone vs no caching"),
    ("policies", "hit ratio of every eviction policy on a chat trace"),
    ("codec", "size, speed and error of every stored-object codec, next to a memory copy"),
    ("gpu-decode", "GPU decode in one run: copy ceiling, batch 1 and 64, kernel, agreement, profile, HF"),
    ("persist", "what storing KV below the device costs a prefill, and how soon another process reads it"),
    ("startup", "seconds to import kvtier, to LLM ready, and of a short kvtier run, in fresh processes"),
    ("embed", "a corpus embedded cold, then partly changed: the per-input cache vs sentence-transformers"),
    ("hf", "Hugging Face generate with and without KVTierStore on prompts sharing a long prefix"),
):
    _bench_command(_name, _summary)


@bench_app.command("serve")
@with_engine_settings
def bench_serve(
    url: Annotated[str | None, typer.Option(help="server to load, e.g. http://127.0.0.1:8000")] = None,
    served_model: Annotated[
        str | None, typer.Option(help="model name for --url (default: its first)")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for --url")] = None,
    offline: Annotated[bool, typer.Option(help="also run the workload on an in-process engine")] = False,
    launch: Annotated[bool, typer.Option(help="also start `kvtier serve` with the engine settings")] = False,
    launch_as: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=FLAGS: also start `kvtier serve FLAGS` (run 'server-NAME'), e.g. "
            "'thread=--engine-process off'; repeat it to compare builds in the same rounds"
        ),
    ] = None,
    conversations: int = 32,
    turns: int = 4,
    system_prompts: Annotated[int, typer.Option(help="distinct shared system prompts")] = 2,
    system_words: Annotated[int, typer.Option(help="words per system prompt")] = 300,
    user_words: int = 12,
    max_tokens: int = 32,
    concurrency: Annotated[int, typer.Option(help="chats in flight")] = 16,
    request_rate: Annotated[float | None, typer.Option(help="chats started per second (Poisson)")] = None,
    ignore_eos: bool = True,
    json_out: Annotated[str | None, typer.Option("--json", help="write summaries and samples here")] = None,
    plot: Annotated[str | None, typer.Option(help="write latency CDFs here (SVG)")] = None,
    repeat: Annotated[int, typer.Option(help="runs of each kind (alternated); medians are reported")] = 1,
    client: Annotated[
        str, typer.Option(help="HTTP client: lean (loopback/LAN, costs little) or httpx (any URL)")
    ] = "lean",
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch CPU threads of the offline engine and of --launch's server (1: steadier "
            "on a shared machine, where a thread that loses its core stalls the others)"
        ),
    ] = None,
    stages: Annotated[
        bool,
        typer.Option(
            help="launched servers stamp each request at every stage (--trace-stages): "
            "prints where their TTFT goes"
        ),
    ] = False,
    *,
    engine_config: EngineConfig,
) -> None:
    """Multi-turn chat load on an OpenAI-compatible server (--url), kvtier's own (--launch), and/or
    the in-process engine (--offline): TTFT, TPOT, ITL p50/p99, throughput, cached-token share."""
    import asyncio
    import json

    from kvtier.bench import serve as bs

    if threads is not None:
        import os

        import torch

        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # what a launched server's torch starts with
    w = bs.Workload(
        conversations, turns, system_prompts, system_words, user_words, max_tokens, concurrency,
        request_rate, ignore_eos,
    )  # fmt: skip
    variants = [_variant(v) for v in launch_as or []]
    runs: dict[str, list[Any]] = {}
    loads: list[float] = []
    for r in range(repeat):  # alternated, so that each pair of runs sees the same machine load
        wr = dataclasses.replace(w, seed=w.seed + r)  # new system prompts: each repeat starts cold
        if offline:
            runs.setdefault("offline", []).append(bs.offline(wr, engine_config, stages))
        if launch:
            runs.setdefault("server", []).append(bs.served(wr, engine_config, client=client, stages=stages))
        for name, flags in variants:
            runs.setdefault(f"server-{name}", []).append(
                bs.served(wr, engine_config, client=client, extra_args=flags, stages=stages)
            )
        if url:
            model = served_model or _first_model(url, api_key)
            root = url.rstrip("/")
            asyncio.run(bs.run_http(bs.warmup_workload(wr), root, model, api_key, client=client))  # untimed
            samples, seconds = asyncio.run(bs.run_http(wr, root, model, api_key, client=client))
            if stages:  # a server started with --trace-stages
                bs.join_stages(samples, root, api_key)
            runs.setdefault("url", []).append((samples, seconds))
        loads.append(_load_average()[0] if _load_average() else float("nan"))
    if not runs:
        raise typer.BadParameter("nothing to run: give --url, --launch, --launch-as and/or --offline")
    body = bs.report(runs, w)
    body["machine"] = {
        "load_average": _load_average(),
        "load_1min_per_round": loads,
        "torch_threads": threads or "default",
    }
    console.print(bs.table(body))
    if stages:
        from kvtier.bench import serve_stages

        console.print(serve_stages.table(body))
    console.print(
        f"[dim]load average at the end: {body['machine']['load_average']}; 1-min load after each round: "
        f"{' '.join(f'{x:.1f}' for x in loads)}[/dim]"
    )
    if json_out:
        with open(json_out, "w") as f:
            json.dump(body, f, indent=1)
    if plot:
        from kvtier.bench.svg import plot_svg

        plot_svg(body, plot)


def _variant(spec: str) -> tuple[str, list[str]]:
    import shlex

    name, sep, flags = spec.partition("=")
    if not sep or not name.strip():
        raise typer.BadParameter(f"--launch-as takes NAME=FLAGS, got {spec!r}")
    return name.strip(), shlex.split(flags)


def _first_model(url: str, api_key: str | None) -> str:
    from kvtier.bench.serve import get_json

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return str(get_json(url.rstrip("/") + "/v1/models", headers)["data"][0]["id"])


def _load_average() -> list[float]:
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except (InvalidRequestError, ConfigError, ValueError, OSError) as e:
        # One line on stderr, no traceback: the message names the problem (and the file, the limit).
        text = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"error: {text}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
