"""VaranModel: reduction to the last-layer head, what each fine-tuning mode trains, the CTC decoding rule, and a
planted encoder whose one informative layer the posterior must find."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from conftest import tiny_speech_config
from torch import nn

from interlayer.errors import UserError
from interlayer.speech.model import HeadConfig, VaranModel, greedy_ctc_decode, set_trainable


def _encoder(layers: int = 3, seed: int = 0) -> T.Wav2Vec2Model:
    torch.manual_seed(seed)
    return T.Wav2Vec2Model(tiny_speech_config(layers)).eval()


def _audio(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    values = torch.randn(batch, 6400)
    mask = torch.ones(batch, 6400, dtype=torch.long)
    mask[0, 4000:] = 0
    values[0, 4000:] = 0
    return values, mask


@pytest.mark.parametrize("task", ["classification", "ctc"])
def test_one_layer_varan_equals_the_last_layer_head(task: str) -> None:
    values, mask = _audio()
    outputs = {}
    for aggregation in ("varan", "last"):
        torch.manual_seed(5)
        model = VaranModel(_encoder(layers=1), HeadConfig(task, aggregation, 5, posterior_heads=4)).eval()
        output = model(values, mask)
        if task == "classification":
            loss, _ = model.loss(output, labels_B=torch.tensor([0, 3, 4]))
        else:
            loss, _ = model.loss(
                output, targets=torch.tensor([1, 2, 3, 4, 1]), target_lengths_B=torch.tensor([2, 2, 1])
            )
        outputs[aggregation] = (loss, model.scores(output))
    assert outputs["varan"][0].item() == pytest.approx(outputs["last"][0].item(), rel=1e-6)
    assert torch.allclose(outputs["varan"][1], outputs["last"][1], atol=1e-6)


def _trainable(model: nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


def test_each_mode_trains_exactly_its_parameters() -> None:
    d, inner, r, layers = 32, 64, 4, 3
    heads_and_posterior = None
    for mode in ("frozen", "lora", "full"):
        model = VaranModel(_encoder(), HeadConfig("classification", "varan", 4, posterior_heads=4))
        set_trainable(model, mode, lora_rank=r)
        trainable = _trainable(model)
        assert not model.encoder.feature_extractor._requires_grad  # no backward through the convolutions
        own = {n: c for n, c in trainable.items() if n.startswith(("heads.", "posterior."))}
        heads_and_posterior = heads_and_posterior or own
        assert own == heads_and_posterior and own  # every mode trains every head and the posterior
        encoder = {n: c for n, c in trainable.items() if n.startswith("encoder.")}
        if mode == "frozen":
            assert encoder == {}
        elif mode == "lora":
            assert all(".lora_" in n for n in encoder)
            # per layer: intermediate_dense (A r×d, B i×r) and output_dense (A r×i, B d×r)
            assert sum(encoder.values()) == layers * 2 * r * (d + inner)
        else:
            assert not any("feature_extractor" in n for n in encoder)
            total = sum(
                p.numel() for n, p in model.encoder.named_parameters() if "feature_extractor" not in n
            )
            assert sum(encoder.values()) == total


def test_lora_leaves_the_base_weights_and_moves_only_adapters() -> None:
    model = VaranModel(_encoder(), HeadConfig("classification", "varan", 4, posterior_heads=4))
    before = {n: p.detach().clone() for n, p in model.encoder.named_parameters()}
    set_trainable(model, "lora", lora_rank=4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    values, mask = _audio()
    for _ in range(2):  # LoRA's B starts at zero: A moves on the first step, B on the second
        loss, _ = model.loss(model(values, mask), labels_B=torch.tensor([0, 1, 2]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(model.encoder.named_parameters())
    for name, value in before.items():
        base = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        current = after.get(name, after.get(base))
        assert current is not None and torch.equal(current, value), name
    adapters = [p for n, p in after.items() if ".lora_B." in n]
    assert adapters and all(p.abs().sum() > 0 for p in adapters)


def test_specaugment_and_layerdrop_are_off_and_a_frozen_encoder_runs_in_eval_mode() -> None:
    encoder = _encoder()
    encoder.config.mask_time_prob, encoder.config.layerdrop = 0.5, 0.5  # a config that masks and drops
    model = VaranModel(encoder, HeadConfig("classification", "varan", 4, posterior_heads=4))
    set_trainable(model, "full")
    model.train()
    values, mask = _audio()
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)  # dropout's draws: the only randomness left
        outputs.append(model(values, mask).logits)
    assert torch.equal(outputs[0], outputs[1]) and encoder.training
    frozen = VaranModel(_encoder(), HeadConfig("classification", "varan", 4, posterior_heads=4))
    set_trainable(frozen, "frozen")
    frozen.train()
    assert frozen.heads.training and not frozen.encoder.training
    first = frozen(values, mask).logits
    assert torch.equal(first, frozen(values, mask).logits)  # no dropout in a frozen encoder


def test_greedy_ctc_decoding_and_the_q_weighted_frame_scores() -> None:
    # symbols: 0 blank, 1 "a", 2 "b"; frames a a blank a b b | padded
    best = torch.tensor([[1, 1, 0, 1, 2, 2, 1, 1]])
    scores = torch.nn.functional.one_hot(best, 3).float()
    mask = torch.tensor([[True] * 6 + [False] * 2])
    assert greedy_ctc_decode(scores, mask) == [[1, 1, 2]]
    model = VaranModel(_encoder(), HeadConfig("ctc", "varan", 3, posterior_heads=4))
    from interlayer.speech.model import HeadOutput

    logits = torch.randn(2, 3, 5, 3)
    posterior = torch.tensor([[0.0, 30.0, 0.0], [1.0, 2.0, 3.0]])
    frame_scores = model.scores(HeadOutput(logits, posterior, torch.ones(2, 5, dtype=torch.bool)))
    assert torch.allclose(frame_scores[0], logits[0, 1].log_softmax(-1), atol=1e-5)  # q one-hot on layer 2
    q = posterior[1].softmax(-1)
    by_hand = sum(q[i] * logits[1, i].log_softmax(-1) for i in range(3))
    assert torch.allclose(frame_scores[1], by_hand, atol=1e-6)


class PlantedEncoder(nn.Module):
    """A stand-in speech encoder with three layers: layer 2's frames carry the clip's class (an embedding of the
    label written in the first sample, plus noise), layers 1 and 3 are noise alone."""

    main_input_name = "input_values"

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=3, hidden_size=16, layerdrop=0.0)
        self.classes = torch.randn(4, 16) * 2

    def _get_feat_extract_output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths // 8

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = True,
    ) -> SimpleNamespace:
        batch, frames = input_values.shape[0], input_values.shape[1] // 8
        labels = input_values[:, 0].long()
        noise = [torch.randn(batch, frames, 16) for _ in range(4)]
        signal = self.classes[labels][:, None, :] + noise[2]
        return SimpleNamespace(hidden_states=(noise[0], noise[1], signal, noise[3]))


def test_the_posterior_finds_the_one_informative_layer() -> None:
    torch.manual_seed(0)
    model = VaranModel(
        PlantedEncoder(), HeadConfig("classification", "varan", 4, posterior_heads=4, prior="uniform")
    )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(300):
        labels = torch.randint(0, 4, (32,))
        values = torch.zeros(32, 80)
        values[:, 0] = labels.float()
        loss, _ = model.loss(model(values, torch.ones(32, 80)), labels_B=labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    labels = torch.arange(64) % 4
    values = torch.zeros(64, 80)
    values[:, 0] = labels.float()
    with torch.no_grad():
        output = model(values, torch.ones(64, 80))
        accuracy = (model.scores(output).argmax(-1) == labels).float().mean().item()
    q = output.head_weights_BN.mean(0)
    assert q[1] > 0.8 and accuracy > 0.95, (q, accuracy)


def test_a_text_model_or_a_posterior_that_does_not_fit_is_refused(tiny_models: dict[str, Path]) -> None:
    text = T.AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    with pytest.raises(UserError, match="not a speech encoder"):
        VaranModel(text, HeadConfig())
    with pytest.raises(UserError, match="must divide the encoder width"):
        VaranModel(_encoder(), HeadConfig(posterior_heads=5))
    with pytest.raises(UserError, match="unknown aggregation"):
        HeadConfig(aggregation="mean")
    with pytest.raises(UserError, match="geometric prior's p must be in"):
        HeadConfig(prior="geometric", prior_p=1.5)
    with pytest.raises(UserError, match="χ² prior needs df > 0"):
        HeadConfig(prior_df=float("nan"))


@pytest.mark.parametrize("family", ["Hubert", "WavLM", "Data2VecAudio"])
def test_every_wav2vec2_family_encoder_takes_the_heads_and_each_mode(family: str) -> None:
    fields = {k: v for k, v in tiny_speech_config().to_dict().items() if k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "conv_dim", "conv_kernel",
        "conv_stride", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "mask_time_prob")}  # fmt: skip
    config = getattr(T, f"{family}Config")(**fields)
    values, mask = _audio()
    for mode, encoder_params in (("lora", 3 * 2 * 4 * (32 + 64)), ("frozen", 0)):
        torch.manual_seed(0)
        encoder = getattr(T, f"{family}Model")(config)
        model = VaranModel(encoder, HeadConfig("ctc", "varan", 5, posterior_heads=4))
        set_trainable(model, mode, lora_rank=4)
        trainable = _trainable(model)
        assert sum(c for n, c in trainable.items() if n.startswith("encoder.")) == encoder_params
        output = model(values, mask)
        # frames: 6400 samples → (6400−10)//5+1 = 1279 → (1279−8)//8+1 = 159 → (159−4)//8+1 = 20; clip 0's 4000: 12
        assert output.logits.shape == (3, 3, 20, 5)
        assert output.frame_mask_BT.sum(-1).tolist() == [12, 20, 20]
