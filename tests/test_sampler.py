"""Sampler: greedy, filters, draws, seeds and penalties, against HF's logits processors as the oracle."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvtier.model.sampler import (
    SamplingBatch,
    apply_penalties,
    filter_logits,
    make_generator,
    sample,
)

CPU = torch.device("cpu")
# Chi-square quantile at 1 - 1e-6 for 7 degrees of freedom (scipy.stats.chi2.ppf(1 - 1e-6, 7)).
CHI2_DF7_1E6 = 40.52


def build(n: int, device: torch.device = CPU, **per_row: Any) -> SamplingBatch:
    """A batch of n rows; every setting neutral unless given (a scalar for all rows, or a list)."""
    defaults: dict[str, Any] = {
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "seeds": None,
    }
    args: dict[str, Any] = {}
    for name, default in defaults.items():
        value = per_row.pop(name, default)
        args[name] = list(value) if isinstance(value, list) else [value] * n
    return SamplingBatch.build(
        **args,
        logit_bias=per_row.pop("logit_bias", None),
        prompt_tokens=per_row.pop("prompt_tokens", None),
        output_tokens=per_row.pop("output_tokens", None),
        generators=per_row.pop("generators", None),
        device=device,
    )


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=gen) * scale


def hf_filter(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    """HF generate's warper chain on one row [1, V]."""
    ids = torch.LongTensor([[0]])
    out = TemperatureLogitsWarper(temperature)(ids, logits.clone())
    if top_k > 0:
        out = TopKLogitsWarper(top_k)(ids, out)
    if top_p < 1.0:
        out = TopPLogitsWarper(top_p)(ids, out)
    if min_p > 0.0:
        out = MinPLogitsWarper(min_p)(ids, out)
    return out


# ---- greedy and its equivalents ----------------------------------------------------------------------


def test_greedy_is_argmax_and_all_greedy_flag() -> None:
    logits = random_logits(6, 50, seed=0)
    batch = build(6, temperature=0.0)
    assert batch.all_greedy
    tokens = sample(logits, batch)
    assert tokens.dtype == torch.int64 and tokens.shape == (6,)
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_greedy_rows_in_mixed_batch_are_argmax() -> None:
    logits = random_logits(8, 50, seed=1)
    temps = [0.0, 1.0, 0.0, 0.7, 0.0, 2.0, 0.0, 1.0]
    batch = build(8, temperature=temps, top_k=[5, 0, 0, 3, 2, 0, 1, 0], seeds=list(range(8)))
    assert not batch.all_greedy
    for _ in range(5):
        tokens = sample(logits, batch)
        for row, t in enumerate(temps):
            if t == 0.0:
                assert tokens[row] == logits[row].argmax()


def test_top_k_one_equals_greedy() -> None:
    logits = random_logits(64, 200, seed=2, scale=0.5)  # flat: sampling without top-k would differ
    tokens = sample(logits, build(64, temperature=1.5, top_k=1))
    assert torch.equal(tokens, logits.argmax(dim=-1))


@pytest.mark.parametrize("top_p", [1e-6, 0.0])
def test_tiny_top_p_equals_greedy(top_p: float) -> None:
    logits = random_logits(64, 200, seed=3, scale=0.5)
    tokens = sample(logits, build(64, temperature=1.0, top_p=top_p))
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_min_p_one_equals_greedy() -> None:
    logits = random_logits(64, 200, seed=5, scale=0.5)
    tokens = sample(logits, build(64, temperature=1.0, min_p=1.0))
    assert torch.equal(tokens, logits.argmax(dim=-1))


# ---- filters -----------------------------------------------------------------------------------------


def test_top_k_never_leaves_the_k_largest() -> None:
    rows, vocab, k = 4000, 100, 7
    logits = random_logits(1, vocab, seed=4, scale=0.3).expand(rows, vocab)
    tokens = sample(logits, build(rows, top_k=k))
    allowed = set(logits[0].topk(k).indices.tolist())
    drawn = set(tokens.tolist())
    assert drawn <= allowed
    assert len(drawn) == k  # near-flat logits: all k show up in 4000 draws


def test_min_p_drops_tokens_below_threshold() -> None:
    rows = 4000
    logits = torch.tensor([[2.0, 1.9, 0.0, -0.5, 1.5, -3.0]]).expand(rows, 6)
    min_p = 0.5
    probs = logits[0].softmax(-1)
    keep = probs >= min_p * probs.max()
    filtered = filter_logits(logits[:1], build(1, min_p=min_p))
    assert torch.equal(torch.isfinite(filtered[0]), keep)
    drawn = set(sample(logits, build(rows, min_p=min_p)).tolist())
    assert drawn == set(keep.nonzero().flatten().tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filters_match_hf_warpers(seed: int) -> None:
    rows, vocab = 24, 300
    gen = torch.Generator().manual_seed(100 + seed)
    scales = torch.rand(rows, 1, generator=gen) * 6  # from flat to peaked rows
    logits = random_logits(rows, vocab, seed=seed) * scales
    temperature = (torch.rand(rows, generator=gen) * 1.5 + 0.3).tolist()
    top_k = [[0, 1, 5, 40, 299, 300, 1000][i % 7] for i in range(rows)]
    top_p = [[1.0, 0.9, 0.5, 0.1, 0.99][i % 5] for i in range(rows)]
    min_p = [[0.0, 0.05, 0.3][i % 3] for i in range(rows)]
    batch = build(rows, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = filter_logits(logits / batch.temperature.unsqueeze(1), batch)
    removed_any = False
    for r in range(rows):
        theirs = hf_filter(logits[r : r + 1], temperature[r], top_k[r], top_p[r], min_p[r])[0]
        assert torch.equal(torch.isfinite(ours[r]), torch.isfinite(theirs)), f"row {r}"
        assert torch.isfinite(ours[r]).any()
        removed_any |= bool(torch.isinf(theirs).any())
    assert removed_any


def test_top_p_boundary_is_the_smallest_set_reaching_p() -> None:
    """Uniform over 4 tokens (exact in float32): top_p=0.5 keeps exactly 2 tokens, as HF does."""
    logits = torch.zeros(1, 4)
    ours = torch.isfinite(filter_logits(logits, build(1, top_p=0.5)))[0]
    assert int(ours.sum()) == 2
    assert torch.equal(ours, torch.isfinite(hf_filter(logits, 1.0, 0, 0.5, 0.0))[0])


@pytest.mark.parametrize(
    "top_k, top_p",
    [
        ([1, 3, 10, 60], 1.0),  # every row limited: the topk() path
        ([1, 3, 0, 60], 1.0),  # one row unlimited: the sort path
    ],
)
def test_top_k_keeps_ties_like_hf(top_k: list[int], top_p: float) -> None:
    gen = torch.Generator().manual_seed(8)
    logits = torch.randint(-3, 4, (4, 50), generator=gen).float()  # many ties at the k-th value
    batch = build(4, top_k=top_k, top_p=top_p)
    assert (batch.max_top_k is not None) == (0 not in top_k)
    ours = filter_logits(logits, batch)
    for r in range(4):
        theirs = hf_filter(logits[r : r + 1], 1.0, top_k[r], top_p, 0.0)[0]
        assert torch.equal(torch.isfinite(ours[r]), torch.isfinite(theirs)), f"row {r}"
    assert int(torch.isfinite(ours[0]).sum()) > 1  # the tie at the top survived with k=1


@pytest.mark.parametrize("which", ["top_k", "top_p", "min_p"])
def test_each_filter_alone_matches_hf(which: str) -> None:
    """build() skips the inactive filters: each one alone must still give HF's set."""
    rows, vocab = 8, 120
    logits = random_logits(rows, vocab, seed=7)
    setting: Any = {"top_k": 10, "top_p": 0.8, "min_p": 0.1}[which]
    batch = build(rows, **{which: setting})
    ours = filter_logits(logits, batch)
    hf_args: dict[str, Any] = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, which: setting}
    for r in range(rows):
        theirs = hf_filter(logits[r : r + 1], 1.0, **hf_args)[0]
        assert torch.equal(torch.isfinite(ours[r]), torch.isfinite(theirs))


# ---- draws --------------------------------------------------------------------------------------------


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    support = expected > 0
    assert counts[~support].sum() == 0, "drew a token of probability 0"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


def test_distribution_matches_softmax() -> None:
    torch.manual_seed(1234)
    draws = 200_000
    base = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, 0.2, -1.0, 1.2]])
    tokens = sample(base.expand(draws, 8), build(draws))
    probs = base[0].softmax(-1)
    assert chi_square(tokens, probs) < CHI2_DF7_1E6
    freq = torch.bincount(tokens, minlength=8).double() / draws
    assert (freq - probs.double()).abs().max() < 0.006  # ~5 standard deviations at N=200k


def test_distribution_with_temperature_and_filters_matches_hf_probabilities() -> None:
    torch.manual_seed(99)
    draws = 200_000
    base = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, 0.2, -1.0, 1.2, 0.9, -2.0, 0.4, 0.1]])
    tokens = sample(base.expand(draws, 12), build(draws, temperature=0.7, top_k=9, top_p=0.95, min_p=0.02))
    probs = hf_filter(base, 0.7, 9, 0.95, 0.02)[0].softmax(-1)
    assert (probs > 0).sum() == 8  # the filters did remove something
    assert chi_square(tokens, probs) < CHI2_DF7_1E6


def test_seeded_rows_draw_from_softmax() -> None:
    """Seeded rows use their own generators; their draws must follow the distribution too."""
    rows, steps = 50, 400
    base = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, 0.2, -1.0, 1.2]])
    batch = build(rows, seeds=list(range(rows)))
    tokens = torch.cat([sample(base.expand(rows, 8), batch) for _ in range(steps)])
    assert chi_square(tokens, base[0].softmax(-1)) < CHI2_DF7_1E6


# ---- seeds ----------------------------------------------------------------------------------------------


def seeded_stream(
    seed: int,
    logits_per_step: list[torch.Tensor],
    others: int,
    position: int,
    other_seeds: Sequence[int | None],
) -> list[int]:
    """Tokens of one seeded row over several steps, with `others` more rows around it in the batch."""
    rows = others + 1
    seeds: list[int | None] = list(other_seeds[:others])
    seeds.insert(position, seed)
    generators: list[torch.Generator | None] | None = None
    out = []
    for step, row_logits in enumerate(logits_per_step):
        other_logits = random_logits(others, row_logits.numel(), seed=1000 + step)
        logits = torch.cat([other_logits[:position], row_logits[None], other_logits[position:]])
        temps = [0.9 + 0.1 * i for i in range(rows)]
        temps[position] = 1.0
        top_k = [3 * i for i in range(rows)]
        top_k[position] = 0
        batch = build(rows, temperature=temps, top_k=top_k, seeds=seeds, generators=generators)
        generators = batch.generators
        out.append(int(sample(logits, batch)[position]))
    return out


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    vocab = 500
    steps = [random_logits(1, vocab, seed=s, scale=0.2)[0] for s in range(8)]
    alone = seeded_stream(42, steps, others=0, position=0, other_seeds=[])
    again = seeded_stream(42, steps, others=0, position=0, other_seeds=[])
    in_batch = seeded_stream(42, steps, others=5, position=3, other_seeds=[None, 7, None, 8, 9])
    in_other_batch = seeded_stream(42, steps, others=2, position=0, other_seeds=[42, None])
    assert alone == again == in_batch == in_other_batch
    assert len(set(alone)) > 1  # the stream moves on from step to step


def test_different_seeds_differ() -> None:
    vocab = 500
    steps = [random_logits(1, vocab, seed=s, scale=0.2)[0] for s in range(8)]
    a = seeded_stream(1, steps, others=0, position=0, other_seeds=[])
    b = seeded_stream(2, steps, others=0, position=0, other_seeds=[])
    assert a != b


def test_seeded_batch_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    sample(random_logits(3, 100, seed=0), build(3, seeds=[1, 2, 3]))
    assert torch.equal(torch.get_rng_state(), state)
    sample(random_logits(3, 100, seed=0), build(3, seeds=[1, None, 3]))
    assert not torch.equal(torch.get_rng_state(), state)


def test_build_keeps_generators_and_creates_only_missing_ones() -> None:
    kept = make_generator(5, CPU)
    batch = build(3, seeds=[5, None, 6], generators=[kept, None, None])
    assert batch.generators[0] is kept
    assert batch.generators[1] is None
    assert isinstance(batch.generators[2], torch.Generator)
    # A carried-over generator continues its stream: step 2 is not a replay of step 1.
    logits = random_logits(1, 1000, seed=0, scale=0.1)
    first = build(1, seeds=[5])
    second = build(1, seeds=[5], generators=first.generators)
    t1 = [int(sample(logits, first)[0]) for _ in range(3)]
    t2 = [int(sample(logits, second)[0]) for _ in range(3)]
    assert t1 != t2
    fresh = build(1, seeds=[5])
    assert [int(sample(logits, fresh)[0]) for _ in range(6)] == t1 + t2


# ---- penalties --------------------------------------------------------------------------------------------


def penalty_inputs() -> tuple[torch.Tensor, list[list[int]], list[list[int]]]:
    logits = random_logits(4, 40, seed=11)
    logits[0, 3] = 0.0
    prompts = [[1, 2, 3, 3, 5], [], [7, 8, 9, 10, 11, 12, 13], [0, 39]]
    outputs = [[5, 6, 6, 6], [1, 1, 2], [], [39, 39, 20]]
    return logits, prompts, outputs


def test_repetition_penalty_matches_hf() -> None:
    logits, prompts, outputs = penalty_inputs()
    penalties = [1.3, 0.7, 2.0, 1.0]
    batch = build(4, repetition_penalty=penalties, prompt_tokens=prompts, output_tokens=outputs)
    ours = apply_penalties(logits, batch)
    for r in range(4):
        ids = torch.tensor([prompts[r] + outputs[r]], dtype=torch.long).reshape(1, -1)
        theirs = RepetitionPenaltyLogitsProcessor(penalties[r])(ids, logits[r : r + 1].clone())[0]
        torch.testing.assert_close(ours[r], theirs, rtol=0, atol=0)
    assert not torch.equal(ours, logits)
    assert torch.equal(ours[3], logits[3])  # penalty 1.0 leaves the row alone


def test_logit_bias_matches_hf_and_comes_before_the_penalties() -> None:
    """OpenAI's logit_bias is HF's sequence bias on one-token sequences; rows without one are left
    alone; a +100 bias wins greedy and sampled rows alike; a penalty applies to the biased logit."""
    logits, _, outputs = penalty_inputs()
    biases: list[dict[int, float]] = [{5: 3.0, 7: -1.5}, {}, {39: 100.0}, {0: -100.0, 39: 2.0}]
    batch = build(4, logit_bias=biases)
    ours = apply_penalties(logits, batch)
    ids = torch.tensor([[1]])
    for r, bias in enumerate(biases):
        hf = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()]) if bias else None
        theirs = hf(ids, logits[r : r + 1].clone())[0] if hf else logits[r]
        torch.testing.assert_close(ours[r], theirs)
    assert torch.equal(ours[1], logits[1])
    greedy = sample(logits, build(4, temperature=0.0, logit_bias=biases))
    assert greedy[2] == 39 and torch.equal(greedy, ours.argmax(-1))
    assert not build(4, temperature=0.0).bias_at  # no bias: nothing built, the plain argmax path
    sampled = sample(logits, build(4, temperature=1.0, logit_bias=biases, seeds=[1, 2, 3, 4]))
    assert sampled[2] == 39
    both = build(4, logit_bias=biases, frequency_penalty=[0.0, 0.0, 0.0, 1.0], output_tokens=outputs)
    expected = ours.clone()
    expected[3, 39] -= 2.0  # row 3 generated 39 twice: the penalty is taken off the biased logit
    expected[3, 20] -= 1.0
    torch.testing.assert_close(apply_penalties(logits, both), expected)


def test_presence_and_frequency_penalties_match_reference() -> None:
    logits, _, outputs = penalty_inputs()
    presence = [0.5, -0.3, 1.0, 0.0]
    frequency = [0.2, 0.4, 0.0, 0.7]
    batch = build(4, presence_penalty=presence, frequency_penalty=frequency, output_tokens=outputs)
    assert batch.prompt_ids is None  # prompt tokens are not needed, so not sent
    expected = logits.clone()
    for r in range(4):
        for token in set(outputs[r]):  # prompt tokens are not penalised
            expected[r, token] -= presence[r] + frequency[r] * outputs[r].count(token)
    torch.testing.assert_close(apply_penalties(logits, batch), expected)


def test_all_penalties_together_and_greedy_after_them() -> None:
    logits, prompts, outputs = penalty_inputs()
    rep, presence, frequency = [1.5, 1.2, 1.1, 3.0], [0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.5, 1.0]
    kwargs: dict[str, Any] = {
        "repetition_penalty": rep,
        "presence_penalty": presence,
        "frequency_penalty": frequency,
        "prompt_tokens": prompts,
        "output_tokens": outputs,
    }
    expected = logits.clone()
    for r in range(4):
        ids = torch.tensor([prompts[r] + outputs[r]], dtype=torch.long).reshape(1, -1)
        expected[r] = RepetitionPenaltyLogitsProcessor(rep[r])(ids, expected[r : r + 1])[0]
        for token in set(outputs[r]):
            expected[r, token] -= presence[r] + frequency[r] * outputs[r].count(token)
    batch = build(4, temperature=0.0, **kwargs)
    torch.testing.assert_close(apply_penalties(logits, batch), expected)
    # Make the penalties decide the argmax: the repeated top token must lose.
    boosted = logits.clone()
    boosted[3, 39] = boosted[3].max() + 0.5
    assert sample(boosted, batch)[3] != 39
    assert torch.equal(sample(boosted, batch), apply_penalties(boosted, batch).argmax(-1))
    assert torch.equal(sample(logits, batch), expected.argmax(-1))
    # Greedy rows of a mixed batch take the argmax after the penalties too.
    mixed = build(4, temperature=[0.0, 1.0, 0.5, 0.0], seeds=[None, 1, 2, None], **kwargs)
    assert sample(boosted, mixed)[3] == apply_penalties(boosted, batch)[3].argmax()
    assert sample(logits, mixed)[0] == expected[0].argmax()


def test_penalties_do_not_modify_the_input() -> None:
    logits, prompts, outputs = penalty_inputs()
    before = logits.clone()
    apply_penalties(logits, build(4, repetition_penalty=1.5, prompt_tokens=prompts, output_tokens=outputs))
    assert torch.equal(logits, before)


def test_missing_tokens_for_an_active_penalty_is_an_error() -> None:
    logits = random_logits(2, 10, seed=0)
    with pytest.raises(ValueError, match="repetition penalty needs"):
        apply_penalties(logits, build(2, repetition_penalty=1.2, output_tokens=[[1], [2]]))
    with pytest.raises(ValueError, match="presence/frequency"):
        apply_penalties(logits, build(2, presence_penalty=0.5))


def test_hand_built_batch_without_flags_agrees_with_build() -> None:
    """Flags left None mean "apply everything": exact, only slower."""
    logits, prompts, outputs = penalty_inputs()
    built = build(
        4,
        temperature=[0.0, 0.8, 1.0, 1.2],
        top_k=[0, 5, 0, 3],
        top_p=[1.0, 0.9, 0.8, 1.0],
        min_p=[0.0, 0.0, 0.1, 0.0],
        repetition_penalty=[1.2, 1.0, 1.0, 1.5],
        frequency_penalty=[0.0, 0.3, 0.0, 0.0],
        seeds=[1, 2, 3, 4],
        prompt_tokens=prompts,
        output_tokens=outputs,
    )
    by_hand = SamplingBatch(
        temperature=built.temperature,
        top_k=built.top_k,
        top_p=built.top_p,
        min_p=built.min_p,
        repetition_penalty=built.repetition_penalty,
        presence_penalty=built.presence_penalty,
        frequency_penalty=built.frequency_penalty,
        generators=[make_generator(s, CPU) for s in (1, 2, 3, 4)],
        prompt_tokens=prompts,
        output_tokens=outputs,
    )
    torch.testing.assert_close(apply_penalties(logits, by_hand), apply_penalties(logits, built))
    for _ in range(4):
        assert torch.equal(sample(logits, by_hand), sample(logits, built))


# ---- dtypes and devices ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(dtype: torch.dtype) -> None:
    logits = random_logits(16, 64, seed=21).to(dtype)
    greedy = sample(logits, build(16, temperature=0.0))
    assert torch.equal(greedy, logits.float().argmax(-1))
    tokens = sample(logits, build(16, temperature=0.8, top_k=4, seeds=list(range(16))))
    assert tokens.dtype == torch.int64 and tokens.device == logits.device
    top4 = logits.float().topk(4, dim=-1).indices
    assert bool((top4 == tokens.unsqueeze(1)).any(dim=1).all())
    _, prompts, outputs = penalty_inputs()
    small = logits[:4]
    batch = build(
        4, repetition_penalty=1.3, frequency_penalty=0.2, prompt_tokens=prompts, output_tokens=outputs
    )
    assert apply_penalties(small, batch).dtype == torch.float32
    torch.testing.assert_close(apply_penalties(small, batch), apply_penalties(small.float(), batch))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sample_never_synchronises_and_matches_cpu() -> None:
    device = torch.device("cuda")
    logits, prompts, outputs = penalty_inputs()
    kwargs: dict[str, Any] = {
        "temperature": [0.0, 0.8, 1.0, 1.2],
        "top_k": [0, 5, 0, 3],
        "top_p": [1.0, 0.9, 0.8, 1.0],
        "min_p": [0.0, 0.0, 0.1, 0.0],
        "repetition_penalty": [1.2, 1.0, 1.0, 1.5],
        "presence_penalty": [0.0, 0.1, 0.0, 0.2],
        "frequency_penalty": [0.0, 0.3, 0.0, 0.0],
        "seeds": [1, None, 3, 4],
        "prompt_tokens": prompts,
        "output_tokens": outputs,
    }
    batch = build(4, device=device, **kwargs)
    on_device = logits.to(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample(on_device, batch)
        greedy = sample(on_device, build(4, device=device, temperature=0.0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.device.type == "cuda" and tokens.dtype == torch.int64
    assert torch.equal(greedy.cpu(), logits.argmax(-1))
    cpu_batch = build(4, **kwargs)
    torch.testing.assert_close(apply_penalties(on_device, batch).cpu(), apply_penalties(logits, cpu_batch))
    on_cpu = filter_logits(logits, cpu_batch)
    assert torch.equal(torch.isfinite(filter_logits(on_device, batch)).cpu(), torch.isfinite(on_cpu))
