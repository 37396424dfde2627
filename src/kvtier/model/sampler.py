"""Token sampling on device: greedy, temperature, top-k, top-p, min-p, seeds, penalties.

The sampler works on tensors only (``model`` never imports ``engine``): the engine turns each running
request's SamplingParams into one :class:`SamplingBatch` per step with :meth:`SamplingBatch.build`.

Order of operations, per row (Hugging Face ``generate`` order, vLLM/OpenAI penalty semantics):

1. OpenAI's ``logit_bias`` added to the raw logits, then the penalties: repetition (HF: over prompt
   and generated tokens, positive logits divided, negative multiplied), then frequency
   (``-= f * count``) and presence (``-= p * [count > 0]``), generated tokens only;
2. greedy rows (temperature 0) take the argmax of the penalised logits;
3. sampled rows: divide by temperature, top-k, top-p (keeps at least one token), min-p, then draw.

Nothing in :func:`sample` reads tensor values on the host (no ``.item()``, no branch on a tensor):
every "is this step needed" decision was made by :meth:`SamplingBatch.build` from the host-side lists,
so the engine synchronises once per step, when it reads the sampled tokens.

Draws use the exponential race, ``argmax(probs / E)`` with ``E ~ Exp(1)`` i.i.d. per token, which picks
token ``i`` with probability ``probs[i]``. A seeded row draws its ``E`` from its own generator, one
vocabulary-sized draw per step, so its tokens depend only on its seed, its logits and its step count,
never on the other rows of the batch.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Padding for token-id rows of unequal length. apply_penalties clamps ids to the vocabulary size V and
# scatters into V + 1 columns, then drops the last one: padding (and, as in HF, any id >= V) is ignored.
_PAD_ID = np.iinfo(np.int64).max
# Smallest Exp(1) noise used: exponential_() may return 0 on some devices, and 0 / 0 would be NaN,
# which argmax would pick.
_MIN_NOISE = float(torch.finfo(torch.float32).tiny)


@dataclass
class SamplingBatch:
    """Per-row sampling settings for one engine step, all tensors on the logits' device.

    Build it with :meth:`build`. The ``do_*`` / ``any_greedy`` flags and the ``*_ids`` tensors are
    host-side knowledge that :meth:`build` precomputes so that :func:`sample` never has to look at
    tensor values; a batch constructed by hand may leave them ``None`` ("unknown"), and the step is then
    applied to every row, which is exact for rows whose setting is neutral, only slower.
    """

    temperature: torch.Tensor  # [B] float32; 0 means greedy (argmax)
    top_k: torch.Tensor  # [B] int64; 0 means disabled
    top_p: torch.Tensor  # [B] float32; 1.0 means disabled
    min_p: torch.Tensor  # [B] float32; 0.0 means disabled
    repetition_penalty: torch.Tensor  # [B] float32; 1.0 disabled (HF: prompt and generated tokens)
    presence_penalty: torch.Tensor  # [B] float32; 0 disabled (OpenAI/vLLM: generated tokens only)
    frequency_penalty: torch.Tensor  # [B] float32; 0 disabled (generated tokens only, times count)
    generators: list[torch.Generator | None]  # per row; a seeded request has its own generator
    prompt_tokens: Sequence[Sequence[int]] | None = None  # needed only when some repetition penalty != 1
    output_tokens: Sequence[Sequence[int]] | None = None  # needed only when some penalty is active
    all_greedy: bool = False  # precomputed by the builder: skip all sampling work
    # Precomputed by build(); None means unknown (apply the step).
    any_greedy: bool | None = None
    do_top_k: bool | None = None
    max_top_k: int | None = None  # max of top_k when every row has top_k > 0: top-k without a full sort
    do_top_p: bool | None = None
    do_min_p: bool | None = None
    do_repetition: bool | None = None
    do_presence_frequency: bool | None = None
    # Token ids already on the device, [B, L] int64 padded with _PAD_ID (build() makes them with one
    # host-to-device copy); when None, apply_penalties makes them from prompt_tokens / output_tokens.
    prompt_ids: torch.Tensor | None = None
    output_ids: torch.Tensor | None = None
    # logit_bias of the rows that have one, flat: (rows, token ids) int64 and biases float32; None: none
    bias_at: tuple[torch.Tensor, torch.Tensor] | None = None
    bias_values: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        *,
        temperature: Sequence[float],
        top_k: Sequence[int],
        top_p: Sequence[float],
        min_p: Sequence[float],
        repetition_penalty: Sequence[float],
        presence_penalty: Sequence[float],
        frequency_penalty: Sequence[float],
        seeds: Sequence[int | None],
        logit_bias: Sequence[Mapping[int, float]] | None = None,
        prompt_tokens: Sequence[Sequence[int]] | None,
        output_tokens: Sequence[Sequence[int]] | None,
        device: torch.device,
        generators: list[torch.Generator | None] | None = None,
    ) -> SamplingBatch:
        """Make the step's batch from per-row host values (validated already by the engine).

        ``generators`` carries each row's generator over from the previous step (``batch.generators``
        of that step), so a seeded request continues its random stream; a row whose entry is None (or
        every row, when ``generators`` is None) gets a new generator iff its seed is not None. The engine
        keeps ``batch.generators[i]`` with request i for the next step.
        """
        device = torch.device(device)
        n = len(temperature)
        do_repetition = any(r != 1.0 for r in repetition_penalty)
        do_presence_frequency = any(p != 0.0 for p in presence_penalty) or any(
            f != 0.0 for f in frequency_penalty
        )
        # All per-row scalars travel in one host-to-device copy; top_k is exact in float32 up to 2**24,
        # far above any vocabulary, and larger values are clamped to the vocabulary anyway.
        scalars = _to_device(
            torch.tensor(
                [
                    list(temperature),
                    [float(min(k, 1 << 24)) for k in top_k],
                    list(top_p),
                    list(min_p),
                    list(repetition_penalty),
                    list(presence_penalty),
                    list(frequency_penalty),
                ],
                dtype=torch.float32,
            ).reshape(7, n),
            device,
        )
        prompt_ids, output_ids = _build_token_ids(
            prompt_tokens if do_repetition else None,
            output_tokens if (do_repetition or do_presence_frequency) else None,
            device,
        )
        bias_at, bias_values = _build_bias(logit_bias, device)
        old = generators if generators is not None else [None] * n
        gens = [
            g if g is not None or s is None else make_generator(s, device)
            for g, s in zip(old, seeds, strict=True)
        ]
        return cls(
            temperature=scalars[0],
            top_k=scalars[1].to(torch.int64),
            top_p=scalars[2],
            min_p=scalars[3],
            repetition_penalty=scalars[4],
            presence_penalty=scalars[5],
            frequency_penalty=scalars[6],
            generators=gens,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            all_greedy=all(t == 0.0 for t in temperature),
            any_greedy=any(t == 0.0 for t in temperature),
            do_top_k=any(k > 0 for k in top_k),
            max_top_k=max(top_k) if n and all(k > 0 for k in top_k) else None,
            do_top_p=any(p < 1.0 for p in top_p),
            do_min_p=any(p > 0.0 for p in min_p),
            do_repetition=do_repetition,
            do_presence_frequency=do_presence_frequency,
            prompt_ids=prompt_ids,
            output_ids=output_ids,
            bias_at=bias_at,
            bias_values=bias_values,
        )


def _build_bias(
    logit_bias: Sequence[Mapping[int, float]] | None, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """The rows' biases as flat (row, token) indices and values, one host-to-device copy each."""
    entries = [(row, t, b) for row, bias in enumerate(logit_bias or ()) for t, b in bias.items()]
    if not entries:
        return None, None
    rows, tokens, values = zip(*entries, strict=True)
    at = _to_device(torch.tensor([rows, tokens], dtype=torch.int64), device)
    return (at[0], at[1]), _to_device(torch.tensor(values, dtype=torch.float32), device)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (any Python int; taken modulo 2**64)."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(operator.index(seed) & 0xFFFF_FFFF_FFFF_FFFF)  # numpy integers too, never a str
    return gen


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Return float32 ``[B, V]`` logits with the batch's penalties applied; ``logits`` is not modified.

    Seen tokens become a ``[B, V]`` mask and counts by scatter on device, so the cost does not depend on
    the vocabulary size beyond a few elementwise passes.
    """
    out = logits.float()
    if batch.bias_at is not None and batch.bias_values is not None:
        out = out.index_put(batch.bias_at, batch.bias_values, accumulate=True)
    do_rep, do_pf = _penalty_steps(batch)
    if do_rep and not (_has_prompt(batch) and _has_output(batch)):
        raise ValueError("repetition penalty needs prompt_tokens and output_tokens in the SamplingBatch")
    if do_pf and not _has_output(batch):
        raise ValueError("presence/frequency penalties need output_tokens in the SamplingBatch")
    if not (do_rep or do_pf):
        return out

    num_rows, vocab = out.shape
    output_ids = _ids_on(batch.output_ids, batch.output_tokens, out.device).clamp(max=vocab)
    counts = torch.zeros(num_rows, vocab + 1, dtype=torch.float32, device=out.device)
    counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=torch.float32))
    counts = counts[:, :vocab]
    generated = counts > 0

    if do_rep:
        prompt_ids = _ids_on(batch.prompt_ids, batch.prompt_tokens, out.device).clamp(max=vocab)
        seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=out.device)
        seen.scatter_(1, prompt_ids, True)
        seen = seen[:, :vocab] | generated
        penalty = batch.repetition_penalty.unsqueeze(1)
        out = torch.where(seen, torch.where(out < 0, out * penalty, out / penalty), out)
    if do_pf:
        out = out - batch.frequency_penalty.unsqueeze(1) * counts
        out = out - batch.presence_penalty.unsqueeze(1) * generated.float()
    return out


def filter_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Top-k, then top-p, then min-p on float32 (temperature-scaled) logits; removed tokens get -inf.

    The surviving sets are those of HF's TopKLogitsWarper, TopPLogitsWarper and MinPLogitsWarper
    (min_tokens_to_keep=1) applied in that order: top-k keeps ties with the k-th largest logit, top-p
    drops the tokens whose ascending cumulative probability is <= 1 - top_p but always keeps the most
    likely one, min-p drops tokens with probability < min_p * max probability. Where top-p's cut falls
    inside a run of exactly equal logits, which of them survive follows the sort order, as in HF.
    """
    out = logits
    vocab = out.shape[-1]
    do_k = batch.do_top_k is not False
    do_p = batch.do_top_p is not False
    if do_k and not do_p and batch.max_top_k is not None:
        # Top-k alone with every row limited: the k-th largest values come from one topk() of the
        # largest k, far cheaper than sorting the vocabulary. Ties with the k-th value survive, as in HF.
        largest = out.topk(min(batch.max_top_k, vocab), dim=-1).values
        kth_largest = largest.gather(1, (batch.top_k.clamp(max=vocab) - 1).unsqueeze(1))
        out = out.masked_fill(out < kth_largest, -torch.inf)
    elif do_k or do_p:
        sorted_logits, order = out.sort(dim=-1)  # ascending, as HF's top-p
        if do_k:
            k = batch.top_k.clamp(max=vocab)
            k = torch.where(k <= 0, vocab, k)
            kth_largest = sorted_logits.gather(1, (vocab - k).unsqueeze(1))
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, -torch.inf)
        if do_p:
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - batch.top_p).unsqueeze(1)
            drop[:, -1] = False  # the most likely token always survives
            sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
        out = torch.empty_like(sorted_logits).scatter_(1, order, sorted_logits)
    if batch.do_min_p is not False:
        probs = out.softmax(dim=-1)
        threshold = batch.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        out = out.masked_fill(probs < threshold, -torch.inf)
    return out


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token per row: ``[B, V]`` logits (any float dtype) -> ``[B]`` int64 ids on the same device."""
    if batch.all_greedy:
        if not any(_penalty_steps(batch)) and batch.bias_at is None:
            return logits.argmax(dim=-1)  # exact: a float upcast preserves order
        return apply_penalties(logits, batch).argmax(dim=-1)

    penalised = apply_penalties(logits, batch)
    temperature = batch.temperature.unsqueeze(1)
    greedy_row = temperature == 0
    scaled = penalised / torch.where(greedy_row, 1.0, temperature)
    probs = filter_logits(scaled, batch).softmax(dim=-1)
    sampled = (probs / _exponential_noise(probs, batch.generators)).argmax(dim=-1)
    if batch.any_greedy is False:
        return sampled
    return torch.where(greedy_row.squeeze(1), penalised.argmax(dim=-1), sampled)


def _exponential_noise(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """``[B, V]`` Exp(1) noise: seeded rows from their own generator, the others from one shared draw."""
    noise = torch.empty_like(probs)
    if any(g is None for g in generators):
        noise.exponential_()
    for row, gen in enumerate(generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return noise.clamp_(min=_MIN_NOISE)


def _penalty_steps(batch: SamplingBatch) -> tuple[bool, bool]:
    """(repetition, presence/frequency): as build() said, or, when unknown, whether their inputs are given."""
    rep = batch.do_repetition
    pf = batch.do_presence_frequency
    if rep is None:
        rep = _has_prompt(batch) and _has_output(batch)
    if pf is None:
        pf = _has_output(batch)
    return rep, pf


def _has_prompt(batch: SamplingBatch) -> bool:
    return batch.prompt_ids is not None or batch.prompt_tokens is not None


def _has_output(batch: SamplingBatch) -> bool:
    return batch.output_ids is not None or batch.output_tokens is not None


def _ids_on(
    ids: torch.Tensor | None, tokens: Sequence[Sequence[int]] | None, device: torch.device
) -> torch.Tensor:
    if ids is not None:
        return ids
    if tokens is None:
        raise ValueError("token ids missing from the SamplingBatch")
    return _to_device(_pad_rows([tokens])[0], device)


def _build_token_ids(
    prompt_tokens: Sequence[Sequence[int]] | None,
    output_tokens: Sequence[Sequence[int]] | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Padded id tensors on ``device``; prompt and output share one host-to-device copy."""
    groups = [g for g in (prompt_tokens, output_tokens) if g is not None]
    if not groups:
        return None, None
    packed = _to_device(torch.cat(_pad_rows(groups), dim=1), device)
    widths = [max((len(r) for r in g), default=0) for g in groups]
    parts = iter(packed.split(widths, dim=1))
    prompt_ids = next(parts) if prompt_tokens is not None else None
    output_ids = next(parts) if output_tokens is not None else None
    return prompt_ids, output_ids


def _pad_rows(groups: list[Sequence[Sequence[int]]]) -> list[torch.Tensor]:
    """Each group of rows as a host ``[B, max len]`` int64 tensor padded with _PAD_ID."""
    tensors = []
    for rows in groups:
        width = max((len(r) for r in rows), default=0)
        array = np.full((len(rows), width), _PAD_ID, dtype=np.int64)
        for i, row in enumerate(rows):
            array[i, : len(row)] = row
        tensors.append(torch.from_numpy(array))
    return tensors


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without stalling the device: pinned memory and an asynchronous copy on CUDA."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
