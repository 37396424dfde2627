"""The ``kvtier`` command: demo, run (and, as they land, serve, bench, cache)."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from rich.console import Console

from kvtier.cache_cli import cache_app
from kvtier.config import ConfigError
from kvtier.engine.request import InvalidRequestError

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

    llm = LLM(model, device=device, kv_cache_memory=kv_cache_memory)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
    source = llm.engine.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    reason = None
    for delta in llm.stream(source, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        reason = delta.finish_reason
    sys.stdout.write("\n")
    console.print(f"[dim]finish reason: {reason}[/dim]")


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
