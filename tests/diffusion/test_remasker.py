"""G-Star's remasker: error labels from a stand-in denoiser with known mistakes, the three losses against hand
loops, detection scores by hand, and the remasker built from, saved for and refused by a denoiser."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from interlayer.diffusion.denoiser import Denoiser, load_denoiser
from interlayer.diffusion.remasker import (
    Remasker,
    RemaskerConfig,
    detection_scores,
    error_labels,
    load_remasker,
    remasker_loss,
    save_remasker,
)
from interlayer.errors import UserError

VOCAB, MASK = 16, 15


class WrongAt(nn.Module):
    """Logits +40 on x0's token, except at the positions ``wrong_L`` where they sit on (x0 + 1) mod 15 (never
    the [MASK] id): the draw there is always wrong, elsewhere always right. Records each input x_t."""

    def __init__(self, x0_BL: torch.Tensor, wrong_L: torch.Tensor) -> None:
        super().__init__()
        self.target_BL = torch.where(wrong_L, (x0_BL + 1) % MASK, x0_BL)
        self.lm_head = nn.Linear(1, VOCAB, bias=False)
        self.config = SimpleNamespace(to_dict=lambda: {"name": "wrong-at"})
        self.inputs: list[torch.Tensor] = []

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        self.inputs.append(input_ids.clone())
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits.scatter_(-1, self.target_BL.unsqueeze(-1), 40.0)
        return SimpleNamespace(logits=logits)


def test_error_labels_on_a_denoiser_with_known_mistakes() -> None:
    generator = torch.Generator().manual_seed(0)
    x0_BL = torch.randint(0, MASK, (64, 12), generator=generator)
    wrong_L = torch.zeros(12, dtype=torch.bool)
    wrong_L[[0, 3, 4, 9]] = True  # position 0 is "wrong" too, but it is never masked, so never an error
    network = WrongAt(x0_BL, wrong_L)
    x_hat_BL, errors_BL, maskable_BL = error_labels(
        Denoiser(network, MASK, name="wrong-at"), x0_BL, torch.Generator().manual_seed(1)
    )
    (x_t_BL,) = network.inputs
    masked_BL = x_t_BL == MASK
    assert not masked_BL[:, 0].any() and not maskable_BL[:, 0].any() and maskable_BL[:, 1:].all()
    assert torch.equal(x_t_BL[~masked_BL], x0_BL[~masked_BL])  # only [MASK] was written
    # every case of the labels occurs: masked-and-wrong, masked-and-right, unmasked at a "wrong" position
    assert (masked_BL & wrong_L).sum() > 20 and (masked_BL & ~wrong_L).sum() > 20
    assert (~masked_BL[:, 1:] & wrong_L[1:]).sum() > 20
    expected_x_hat_BL = torch.where(masked_BL, network.target_BL, x0_BL)
    assert torch.equal(x_hat_BL, expected_x_hat_BL)
    assert torch.equal(errors_BL, masked_BL & wrong_L)
    # times are spread over (0, 1): some rows almost clean, some almost all masked
    fraction_B = masked_BL[:, 1:].float().mean(1)
    assert fraction_B.min() < 0.2 and fraction_B.max() > 0.8


def _loss_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    logits_BL = torch.randn(4, 7, generator=generator, dtype=torch.float64) * 2
    errors_BL = torch.rand(4, 7, generator=generator) < 0.4
    errors_BL[2] = False  # row 2: no error at all (one class)
    errors_BL[3, 1:] = True  # row 3: only errors among its maskable positions
    errors_BL[0, 1:4] = torch.tensor([True, False, True])  # rows 0 and 1 hold both classes
    errors_BL[1, 1:4] = torch.tensor([False, True, False])
    where_BL = torch.ones(4, 7, dtype=torch.bool)
    where_BL[:, 0] = False
    where_BL[1, 5] = False
    return logits_BL, errors_BL, where_BL


def _bce(g: float, y: bool) -> float:
    p = 1 / (1 + math.exp(-g))
    return -math.log(p) if y else -math.log(1 - p)


def test_bce_and_balanced_losses_by_hand() -> None:
    logits_BL, errors_BL, where_BL = _loss_case()
    cells = [
        (float(logits_BL[b, i]), bool(errors_BL[b, i])) for b in range(4) for i in range(7) if where_BL[b, i]
    ]
    n = len(cells)
    positives = sum(y for _, y in cells)
    assert n == 23 and 0 < positives < n
    bce = sum(_bce(g, y) for g, y in cells) / n
    assert float(remasker_loss(logits_BL, errors_BL, where_BL, "bce")) == pytest.approx(bce, rel=1e-6)
    w_pos, w_neg = n / (2 * positives), n / (2 * (n - positives))
    balanced = sum((w_pos if y else w_neg) * _bce(g, y) for g, y in cells) / n
    got = float(remasker_loss(logits_BL, errors_BL, where_BL, "balanced"))
    assert got == pytest.approx(balanced, rel=1e-6) and abs(balanced - bce) > 1e-3


def test_balanced_loss_on_a_small_example() -> None:
    logits_BL = torch.tensor([[0.0, 2.0, -1.0, 0.5]], dtype=torch.float64)
    errors_BL = torch.tensor([[False, True, False, False]])
    where_BL = torch.tensor([[False, True, True, True]])
    # N = 3, one error: weight 3/2 on it, 3/4 on each of the two others
    expected = (1.5 * _bce(2.0, True) + 0.75 * _bce(-1.0, False) + 0.75 * _bce(0.5, False)) / 3
    got = float(remasker_loss(logits_BL, errors_BL, where_BL, "balanced"))
    assert got == pytest.approx(expected, rel=1e-6)


def test_ranking_loss_is_the_pairwise_double_loop() -> None:
    logits_BL, errors_BL, where_BL = _loss_case()
    per_sequence = []
    for b in range(4):
        errors = [float(logits_BL[b, i]) for i in range(7) if where_BL[b, i] and errors_BL[b, i]]
        rest = [float(logits_BL[b, j]) for j in range(7) if where_BL[b, j] and not errors_BL[b, j]]
        if not errors or not rest:
            continue
        pairs = [math.log1p(math.exp(s_j - s_i)) for s_i in errors for s_j in rest]
        per_sequence.append(sum(pairs) / len(pairs))
    assert len(per_sequence) == 2  # rows 2 and 3 hold one class each and are left out
    got = float(remasker_loss(logits_BL, errors_BL, where_BL, "ranking"))
    assert got == pytest.approx(sum(per_sequence) / 2, rel=1e-6)
    # raising an error's score lowers the loss; a row with one class has no pairs and no gradient
    logits_BL.requires_grad_(True)
    remasker_loss(logits_BL, errors_BL, where_BL, "ranking").backward()
    assert logits_BL.grad is not None
    assert (logits_BL.grad[:2][errors_BL[:2] & where_BL[:2]] < 0).all()
    assert (logits_BL.grad[:2][~errors_BL[:2] & where_BL[:2]] > 0).all()
    assert torch.equal(logits_BL.grad[2:], torch.zeros(2, 7, dtype=torch.float64))
    # no sequence with both classes: a zero loss that still backpropagates
    only_rest = remasker_loss(logits_BL, torch.zeros_like(errors_BL), where_BL, "ranking")
    assert float(only_rest.detach()) == 0.0 and only_rest.requires_grad


def test_detection_scores_by_hand() -> None:
    logits_BL = torch.tensor([[9.0, 1.0, -1.0, 2.0, -3.0], [9.0, 0.5, 0.0, -2.0, 4.0]])
    errors_BL = torch.tensor([[False, True, True, False, False], [True, True, False, True, False]])
    where_BL = torch.ones(2, 5, dtype=torch.bool)
    where_BL[:, 0] = False  # position 0 (logit 9, and an "error" in row 1) is not scored
    where_BL[1, 4] = False
    # scored: predicted > 0 at (0,1) (0,3) (1,1); errors at (0,1) (0,2) (1,1) (1,3); hits (0,1) (1,1)
    scores = detection_scores(logits_BL, errors_BL, where_BL)
    precision, recall = 2 / 3, 2 / 4
    assert scores["precision"] == pytest.approx(precision)
    assert scores["recall"] == pytest.approx(recall)
    assert scores["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert scores["error_rate"] == pytest.approx(4 / 7)
    nothing = detection_scores(torch.full((2, 5), -1.0), errors_BL, where_BL)
    assert nothing["precision"] == nothing["recall"] == nothing["f1"] == 0.0


@pytest.fixture(scope="module")
def tiny_denoiser(tiny_mdlm: Path) -> Denoiser:
    denoiser, _ = load_denoiser(str(tiny_mdlm))
    return denoiser


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_untrained_remasker_scores_zero_and_trains_what_init_says(tiny_denoiser: Denoiser) -> None:
    before = tiny_denoiser.fingerprint()
    remasker = Remasker(tiny_denoiser, "all")
    x_BL = _ids(3, 32)
    assert torch.equal(remasker(x_BL), torch.zeros(3, 32))
    trainable = {name for name, p in remasker.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in remasker.named_parameters()} and len(trainable) > 2
    head_only = Remasker(tiny_denoiser, "head")
    trainable = {name for name, p in head_only.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    # a copy: the denoiser's own weights stay frozen and untouched
    with torch.no_grad():
        next(remasker.backbone.parameters()).add_(1.0)
    assert not any(p.requires_grad for p in tiny_denoiser.network.parameters())
    assert tiny_denoiser.fingerprint() == before


def test_init_first_keeps_exactly_the_first_blocks() -> None:
    from transformers import ModernBertForMaskedLM, ModernBertModel

    from interlayer.zoo import masked_lm_config

    torch.manual_seed(0)
    network = ModernBertForMaskedLM(masked_lm_config(40, 16, 3, 2, 32, 12, 0, 1)).eval()
    denoiser = Denoiser(network, 39, name="three-blocks")
    remasker = Remasker(denoiser, "first", layers=2)
    assert len(remasker.backbone.layers) == 2 and remasker.backbone.config.num_hidden_layers == 2
    assert len(network.model.layers) == 3 and network.config.num_hidden_layers == 3
    # the reference: a 2-block model holding the denoiser's embeddings, blocks 0 and 1 and final norm
    config = masked_lm_config(40, 16, 2, 2, 32, 12, 0, 1)
    reference = ModernBertModel(config).eval()
    kept = {k: v for k, v in network.model.state_dict().items() if not k.startswith("layers.2.")}
    reference.load_state_dict(kept)
    torch.manual_seed(1)
    nn.init.normal_(remasker.head.weight)
    x_BL = torch.randint(0, 39, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=x_BL).last_hidden_state @ remasker.head.weight[0] + remasker.head.bias
        torch.testing.assert_close(remasker(x_BL), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="--layers 4 exceeds the denoiser's 3 blocks"):
        Remasker(denoiser, "first", layers=4)


def test_save_load_round_trip_and_refusal_for_another_denoiser(
    tiny_mdlm: Path, tiny_denoiser: Denoiser, tmp_path: Path
) -> None:
    remasker = Remasker(tiny_denoiser, "all")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in remasker.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_remasker(remasker, tiny_denoiser, tmp_path / "r", RemaskerConfig(steps=3), {"data": "x"})
    loaded = load_remasker(tmp_path / "r", tiny_denoiser)
    x_BL = _ids(4, 32, seed=5)
    with torch.no_grad():
        expected = remasker.eval()(x_BL)
        assert expected.abs().min() > 0
        assert torch.equal(loaded(x_BL), expected)
    assert not any(p.requires_grad for p in loaded.parameters())

    other = tmp_path / "other"
    shutil.copytree(tiny_mdlm, other)
    weights = load_file(str(other / "model.safetensors"))
    name = sorted(k for k in weights if "layers.0" in k and weights[k].ndim == 2)[0]
    weights[name] = weights[name].clone()
    weights[name][0, 0] += 1e-3
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    other_denoiser, _ = load_denoiser(str(other))
    with pytest.raises(UserError, match="was trained for denoiser .* not for .*other"):
        load_remasker(tmp_path / "r", other_denoiser)


def test_the_fingerprint_survives_loading_in_bfloat16(tiny_mdlm: Path) -> None:
    full, _ = load_denoiser(str(tiny_mdlm))
    half, _ = load_denoiser(str(tiny_mdlm), dtype="bfloat16")
    assert full.fingerprint() == half.fingerprint()
    with torch.no_grad():
        next(full.network.parameters()).view(-1)[0] += 0.5
    assert full.fingerprint() != half.fingerprint()


def test_the_fingerprint_ignores_where_the_model_was_loaded_from(tiny_mdlm: Path, tmp_path: Path) -> None:
    copy = tmp_path / "moved"
    shutil.copytree(tiny_mdlm, copy)
    here, _ = load_denoiser(str(tiny_mdlm))
    there, _ = load_denoiser(str(copy))
    assert here.fingerprint() == there.fingerprint()
