"""The RL trainer: its gradient against a per-completion reference, exact resume, settings checks, and what each
mode trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from interlayer import atomic
from interlayer.errors import UserError
from interlayer.models import load_model
from interlayer.steering.objectives import advantages
from interlayer.steering.policy import Policy, down_projections
from interlayer.steering.rollout import sample
from interlayer.steering.tasks import Task, TaskProblem
from interlayer.steering.trainer import (
    RLConfig,
    _gradient_step,
    _optimizer,
    rewards_of,
    step_problems,
    train_rl,
)
from interlayer.steering.vectors import SteeringVectors


def _vowel_reward(completion: str, _problem: TaskProblem) -> float:
    """A dense numeric reward: the share of vowels among the completion's letters."""
    letters = [c for c in completion.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / max(len(letters), 1)


def _task() -> Task:
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "dogs",
        "ran",
        "in",
        "the",
        "park",
        "under",
        "blue",
        "skies",
    ]
    train = [TaskProblem(" ".join(words[i : i + 3]), "", f"toy#{i}") for i in range(len(words) - 3)]
    return Task("toy", {"train": train, "validation": train[:3]}, _vowel_reward, 4)


def _cfg(**kw: object) -> RLConfig:
    base = {"steps": 4, "prompts_per_step": 3, "samples_per_prompt": 3, "lr": 0.05, "checkpoint_every": 2}
    return RLConfig(**(base | kw))  # type: ignore[arg-type]


def test_gradient_equals_a_per_completion_reference(tiny_models: dict[str, Path]) -> None:
    """The accumulated micro-batch gradient equals autograd of −(1/N)·Σ_i A_i·Σ_t log π(o_i,t), each
    completion scored alone without padding."""
    lm = load_model(str(tiny_models["llama"]))
    task = _task()
    cfg = _cfg(micro_batch=4, max_grad_norm=0.0)
    policy = Policy(lm.model, "vectors")
    with torch.no_grad():
        policy.vectors.S.copy_(0.3 * torch.randn(policy.vectors.S.shape))  # type: ignore[union-attr]
    problems = step_problems(task.problems["train"], 0, 1, 3)
    with policy.policy():
        rollout = sample(lm.model, lm.tokenizer, [p.prompt for p in problems], 3, 5, 4)
    adv = advantages(rewards_of(task, rollout, problems, 3), "rloo").flatten()
    optimizer = _optimizer(policy, 0.0)
    _gradient_step(policy, optimizer, rollout, adv, cfg)
    got = policy.vectors.S.grad.clone()  # type: ignore[union-attr]

    vectors: SteeringVectors = policy.vectors  # type: ignore[assignment]
    vectors.S.grad = None
    tokens = int(rollout.completion_mask_NC.sum())
    total = torch.zeros(())
    with vectors.applied(lm.model):
        for row in range(len(adv)):
            real = rollout.attention_mask_NT[row].bool()
            seq = rollout.sequences_NT[row][real][None]
            n_prompt = int(rollout.attention_mask_NT[row, : rollout.prompt_width].sum())
            logp = lm.model(input_ids=seq).logits[0].log_softmax(-1)
            token_logp = logp[n_prompt - 1 : -1].gather(-1, seq[0, n_prompt:, None]).sum()
            total = total - adv[row] * token_logp / tokens
    total.backward()
    torch.testing.assert_close(got, vectors.S.grad, rtol=1e-4, atol=1e-6)
    assert got.abs().sum() > 0


def test_resume_after_an_interruption_gives_the_same_vectors(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    task = _task()
    lm = load_model(str(tiny_models["llama"]))
    whole = train_rl(lm.model, lm.tokenizer, task, _cfg(), tmp_path / "whole", progress=False)
    assert whole["steps"] == 4 and whole["trainable_parameters"] == 3 * 32

    def crash(step: int, _record: dict[str, object]) -> None:
        if step == 3:  # after the step-2 checkpoint, before the next one
            raise KeyboardInterrupt

    lm2 = load_model(str(tiny_models["llama"]))
    with pytest.raises(KeyboardInterrupt):
        train_rl(lm2.model, lm2.tokenizer, task, _cfg(), tmp_path / "cut", progress=False, on_step=crash)
    assert atomic.read_json_object(tmp_path / "cut" / "checkpoint" / "state.json")["step"] == 2
    lm3 = load_model(str(tiny_models["llama"]))
    train_rl(lm3.model, lm3.tokenizer, task, _cfg(), tmp_path / "cut", progress=False)
    a = SteeringVectors.load(tmp_path / "whole" / "vectors")
    b = SteeringVectors.load(tmp_path / "cut" / "vectors")
    assert torch.equal(a.S, b.S) and a.S.abs().sum() > 0
    history_a = atomic.read_json(tmp_path / "whole" / "history.json")
    history_b = atomic.read_json(tmp_path / "cut" / "history.json")
    assert [r["reward"] for r in history_a] == [r["reward"] for r in history_b]


def test_more_steps_continue_a_finished_run(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    task = _task()
    lm = load_model(str(tiny_models["llama"]))
    train_rl(lm.model, lm.tokenizer, task, _cfg(steps=4), tmp_path / "long", progress=False)
    lm = load_model(str(tiny_models["llama"]))
    train_rl(lm.model, lm.tokenizer, task, _cfg(steps=2), tmp_path / "grown", progress=False)
    lm = load_model(str(tiny_models["llama"]))
    summary = train_rl(lm.model, lm.tokenizer, task, _cfg(steps=4), tmp_path / "grown", progress=False)
    assert summary["steps"] == 4
    a = SteeringVectors.load(tmp_path / "long" / "vectors")
    b = SteeringVectors.load(tmp_path / "grown" / "vectors")
    assert torch.equal(a.S, b.S)


def test_a_rerun_with_other_settings_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    task = _task()
    lm = load_model(str(tiny_models["llama"]))
    train_rl(lm.model, lm.tokenizer, task, _cfg(steps=1), tmp_path, progress=False)
    with pytest.raises(UserError, match=r"holds a run with lr=0.05, not 0.1; use another --out"):
        train_rl(lm.model, lm.tokenizer, task, _cfg(steps=1, lr=0.1), tmp_path, progress=False)


@pytest.mark.parametrize(
    ("family", "mode", "expected"),
    [
        ("llama", "single", 32),
        ("llama", "lowrank", 2 * (3 + 32)),
        ("llama", "lora", 3 * 4 * (64 + 32)),
        ("gpt2", "lora", 3 * 4 * (4 * 32 + 32)),
        ("gemma2", "lora", 3 * 4 * (64 + 32)),
        ("llama", "full", None),
    ],
)
def test_each_mode_trains_only_its_parameters(
    tiny_models: dict[str, Path], tmp_path: Path, family: str, mode: str, expected: int | None
) -> None:
    lm = load_model(str(tiny_models[family]))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    kl = 0.1 if mode in ("full", "lora") else 0.0
    summary = train_rl(
        lm.model, lm.tokenizer, _task(), _cfg(steps=2, mode=mode, kl_coef=kl), tmp_path, progress=False
    )
    total = sum(p.numel() for p in before.values())
    assert summary["trainable_parameters"] == (expected if expected is not None else total)
    # Adam keeps two moments per trainable number (and a step counter per tensor)
    assert summary["optimizer_state_bytes"] >= 8 * summary["trainable_parameters"]
    changed = {n for n, p in lm.model.named_parameters() if n in before and not torch.equal(p, before[n])}
    if mode in ("single", "lowrank"):
        assert not changed and (tmp_path / "vectors" / "vectors.json").is_file()
    elif mode == "lora":
        assert (tmp_path / "adapter").is_dir() and not any("lora" in n for n in before)
        # the merged model computes what the adapted one does
        ids = torch.randint(1000, 3000, (2, 6), generator=torch.Generator().manual_seed(0))
        merged = load_model(str(tmp_path / "model")).model
        torch.testing.assert_close(
            merged(input_ids=ids).logits, lm.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5
        )
        assert not torch.allclose(
            merged(input_ids=ids).logits, load_model(str(tiny_models[family])).model(input_ids=ids).logits
        )
    else:
        assert changed and (tmp_path / "model" / "config.json").is_file()
        reloaded = load_model(str(tmp_path / "model"))
        name = next(iter(changed))
        assert torch.equal(
            dict(reloaded.model.named_parameters())[name], dict(lm.model.named_parameters())[name]
        )


def test_down_projections_found_structurally(tiny_models: dict[str, Path]) -> None:
    expected = {
        "llama": "model.layers.0.mlp.down_proj",
        "gpt2": "transformer.h.0.mlp.c_proj",
        "gpt_neox": "gpt_neox.layers.0.mlp.dense_4h_to_h",
        "opt": "model.decoder.layers.0.fc2",
        "gemma2": "model.layers.0.mlp.down_proj",
    }
    for family, first in expected.items():
        paths = down_projections(load_model(str(tiny_models[family])).model)
        assert len(paths) == 3 and paths[0] == first


def test_bad_settings_are_one_line(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="mode must be one of"):
        RLConfig(mode="adapters")
    with pytest.raises(UserError, match="samples_per_prompt must be at least 2"):
        RLConfig(samples_per_prompt=1)
    lm = load_model(str(tiny_models["llama"]))
    with pytest.raises(UserError, match="prompts_per_step 50 is more than the 12 training problems"):
        train_rl(lm.model, lm.tokenizer, _task(), _cfg(prompts_per_step=50), tmp_path, progress=False)

    def broken(completion: str, problem: TaskProblem) -> bool:
        raise ZeroDivisionError("division by zero")

    task = Task("toy", _task().problems, broken, 4)
    with pytest.raises(
        UserError, match=r"verifier raised ZeroDivisionError: division by zero on problem toy#"
    ):
        train_rl(lm.model, lm.tokenizer, task, _cfg(), tmp_path / "b", progress=False)


def test_a_failed_first_run_does_not_claim_the_folder(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    lm = load_model(str(tiny_models["llama"]))
    for bad in (_cfg(sites="layers.9"), _cfg(prompts_per_step=50)):
        with pytest.raises(UserError):
            train_rl(lm.model, lm.tokenizer, _task(), bad, tmp_path, progress=False)
    assert not (tmp_path / "settings.json").exists()
    assert train_rl(lm.model, lm.tokenizer, _task(), _cfg(steps=1), tmp_path, progress=False)["steps"] == 1


def test_resume_with_other_training_problems_or_dtype_is_refused(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    lm = load_model(str(tiny_models["llama"]))
    task = _task()
    train_rl(lm.model, lm.tokenizer, task, _cfg(steps=1), tmp_path, progress=False)
    fewer = Task("toy", {"train": task.problems["train"][:8]}, task.verifier, 4)
    with pytest.raises(UserError, match="holds a run of train_problems 12, not 8"):
        train_rl(lm.model, lm.tokenizer, fewer, _cfg(steps=2), tmp_path, progress=False)
    half = load_model(str(tiny_models["llama"]), dtype="bfloat16")
    with pytest.raises(UserError, match="holds a run of dtype 'float32', not 'bfloat16'"):
        train_rl(half.model, half.tokenizer, task, _cfg(steps=2), tmp_path, progress=False)
    with pytest.raises(UserError, match="full fine-tuning needs float32 weights"):
        train_rl(half.model, half.tokenizer, task, _cfg(mode="full"), tmp_path / "f", progress=False)


def test_periodic_validation_scores_the_policy_of_that_step(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The last step's validation figure is the greedy accuracy of the saved vectors on those problems."""
    from interlayer.steering.evaluate import evaluate

    lm = load_model(str(tiny_models["llama"]))
    task = _task()
    train_rl(lm.model, lm.tokenizer, task, _cfg(eval_every=2, eval_problems=3), tmp_path, progress=False)
    history = atomic.read_json(tmp_path / "history.json")
    assert [r["step"] for r in history if "validation_greedy_accuracy" in r] == [2, 4]
    vectors = SteeringVectors.load(tmp_path / "vectors", lm.model)
    expected = evaluate(
        lm.model, lm.tokenizer, task.problems["validation"], _vowel_reward, 4, vectors, samples=0
    )
    assert history[-1]["validation_greedy_accuracy"] == expected.accuracy
    assert expected.accuracy > 0  # not a vacuous 0 == 0: the vowel reward is positive for most completions
