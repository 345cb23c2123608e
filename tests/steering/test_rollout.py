"""Left-padded sampling and scoring: masks, seeds, and log-probabilities equal to an unpadded forward."""

from __future__ import annotations

from pathlib import Path

import torch

from interlayer.models import load_model
from interlayer.steering.rollout import (
    _completion_mask,
    completion_logprobs,
    encode_prompts,
    left_pad,
    sample,
)

PROMPTS = ["the cat sat on", "a", "numbers and words go here"]


def test_completion_mask_stops_after_the_first_eos() -> None:
    completion = torch.tensor([[5, 6, 2, 7, 2], [2, 5, 5, 5, 5], [5, 5, 5, 5, 5]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(_completion_mask(completion, 2), expected)
    assert torch.equal(_completion_mask(completion, None), torch.ones_like(completion))


def test_left_pad_right_aligns() -> None:
    ids, mask = left_pad([[1, 2, 3], [4]], pad=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_samples_are_seeded_and_prompt_major(tiny_models: dict[str, Path]) -> None:
    lm = load_model(str(tiny_models["llama"]))
    a = sample(lm.model, lm.tokenizer, PROMPTS, samples=3, seed=7, max_new_tokens=5)
    b = sample(lm.model, lm.tokenizer, PROMPTS, samples=3, seed=7, max_new_tokens=5)
    c = sample(lm.model, lm.tokenizer, PROMPTS, samples=3, seed=8, max_new_tokens=5)
    assert torch.equal(a.sequences_NT, b.sequences_NT)
    assert not torch.equal(a.sequences_NT, c.sequences_NT)
    assert a.sequences_NT.shape == (9, a.prompt_width + 5)
    encoded = encode_prompts(lm.tokenizer, PROMPTS)
    for row in range(9):
        ids = encoded[row // 3]
        assert a.sequences_NT[row, a.prompt_width - len(ids) : a.prompt_width].tolist() == ids
        assert a.attention_mask_NT[row, : a.prompt_width].sum().item() == len(ids)
    # the caller's global random stream is left alone
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    sample(lm.model, lm.tokenizer, PROMPTS, samples=2, seed=1, max_new_tokens=3)
    assert torch.equal(torch.rand(3), before)


def test_greedy_sampling_matches_generate_per_prompt(tiny_models: dict[str, Path]) -> None:
    lm = load_model(str(tiny_models["gpt2"]))
    rollout = sample(lm.model, lm.tokenizer, PROMPTS, samples=1, seed=0, max_new_tokens=6, temperature=0)
    for row, ids in enumerate(encode_prompts(lm.tokenizer, PROMPTS)):
        alone = lm.model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        assert rollout.sequences_NT[row, rollout.prompt_width :].tolist() == alone[0, len(ids) :].tolist()


def test_padded_logprobs_equal_unpadded_forward(tiny_models: dict[str, Path]) -> None:
    """Scored through the LM head on the completion rows only (``logits_to_keep``) and left-padded, each row's
    log-probabilities equal a full forward of that row alone."""
    for family in ("llama", "gpt2", "gpt_neox", "opt", "bloom", "gemma2"):
        lm = load_model(str(tiny_models[family]))
        rollout = sample(lm.model, lm.tokenizer, PROMPTS, samples=2, seed=3, max_new_tokens=4)
        logp = completion_logprobs(lm.model, rollout)
        for row in range(len(rollout.completions)):
            real = rollout.attention_mask_NT[row].bool()
            seq = rollout.sequences_NT[row][real][None]
            n_prompt = int(rollout.attention_mask_NT[row, : rollout.prompt_width].sum())
            logits = lm.model(input_ids=seq).logits[0].log_softmax(-1)
            expected = logits[n_prompt - 1 : -1].gather(-1, seq[0, n_prompt:, None]).squeeze(-1)
            torch.testing.assert_close(logp[row, : len(expected)], expected, rtol=0, atol=1e-5)


def test_the_checkpoints_generation_config_never_changes_sampling(tiny_models: dict[str, Path]) -> None:
    """A repetition penalty and an n-gram ban shipped in generation_config are set aside: greedy "sampling"
    and greedy_completions equal the argmax loop, and the model's own config is restored afterwards."""
    from interlayer.arithmetic import greedy_completions

    lm = load_model(str(tiny_models["llama"]))
    lm.model.generation_config.repetition_penalty = 5.0
    lm.model.generation_config.no_repeat_ngram_size = 1
    ids = encode_prompts(lm.tokenizer, PROMPTS[:1])[0]
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, lm.model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    rollout = sample(lm.model, lm.tokenizer, PROMPTS[:1], samples=1, seed=0, max_new_tokens=6, temperature=0)
    assert rollout.sequences_NT[0, rollout.prompt_width :].tolist() == seq[0, len(ids) :].tolist()
    assert greedy_completions(lm.model, lm.tokenizer, PROMPTS[:1], 6) == [
        lm.tokenizer.decode(seq[0, len(ids) :])
    ]
    assert lm.model.generation_config.repetition_penalty == 5.0


def test_logprobs_at_a_temperature_are_those_of_the_tempered_distribution(
    tiny_models: dict[str, Path],
) -> None:
    lm = load_model(str(tiny_models["llama"]))
    rollout = sample(
        lm.model, lm.tokenizer, PROMPTS[:1], samples=1, seed=2, max_new_tokens=3, temperature=0.5
    )
    logp = completion_logprobs(lm.model, rollout, temperature=0.5)
    seq = rollout.sequences_NT[0][rollout.attention_mask_NT[0].bool()][None]
    n_prompt = int(rollout.attention_mask_NT[0, : rollout.prompt_width].sum())
    tempered = (lm.model(input_ids=seq).logits[0] / 0.5).log_softmax(-1)
    expected = tempered[n_prompt - 1 : -1].gather(-1, seq[0, n_prompt:, None]).squeeze(-1)
    torch.testing.assert_close(logp[0], expected, rtol=0, atol=1e-5)
