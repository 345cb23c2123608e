"""Steering vectors trained with reinforcement learning (arXiv:2505.18706) and the tools that explain what they
do (arXiv:2509.06608). Stands on the core alone.

>>> from interlayer.steering import RLConfig, SteeringVectors, evaluate, load_task, train_rl
>>> summary = train_rl(lm.model, lm.tokenizer, load_task("arith", train=5000, validation=0, test=0),
...                    RLConfig(mode="vectors", steps=100), "runs/vectors")
>>> vectors = SteeringVectors.load("runs/vectors/vectors", lm.model)
>>> with vectors.applied(lm.model):
...     out = lm.model.generate(input_ids, max_new_tokens=48)
"""

from interlayer.steering.analysis import (
    LensResult,
    PathPatching,
    PersistenceCurve,
    TokenSubstitution,
    logit_lens,
    path_patching,
    persistence,
    token_substitution,
)
from interlayer.steering.analysis_run import run_analysis, transfer
from interlayer.steering.evaluate import EvalResult, evaluate
from interlayer.steering.objectives import ALGORITHMS, advantages, kl_k3, policy_loss
from interlayer.steering.policy import MODES, Policy
from interlayer.steering.rollout import Rollout, completion_logprobs, sample
from interlayer.steering.tasks import (
    Task,
    TaskProblem,
    Verifier,
    answers_equal,
    extract_boxed,
    extract_hash_answer,
    final_answer,
    load_task,
    run_verifier,
)
from interlayer.steering.trainer import RLConfig, train_rl
from interlayer.steering.vectors import KINDS, SteeringHandle, SteeringVectors, VectorsMeta

__all__ = [
    "ALGORITHMS",
    "KINDS",
    "MODES",
    "EvalResult",
    "LensResult",
    "PathPatching",
    "PersistenceCurve",
    "Policy",
    "RLConfig",
    "Rollout",
    "SteeringHandle",
    "SteeringVectors",
    "Task",
    "TaskProblem",
    "TokenSubstitution",
    "VectorsMeta",
    "Verifier",
    "advantages",
    "answers_equal",
    "completion_logprobs",
    "evaluate",
    "extract_boxed",
    "extract_hash_answer",
    "final_answer",
    "kl_k3",
    "load_task",
    "logit_lens",
    "path_patching",
    "persistence",
    "policy_loss",
    "run_analysis",
    "run_verifier",
    "sample",
    "token_substitution",
    "train_rl",
    "transfer",
]
