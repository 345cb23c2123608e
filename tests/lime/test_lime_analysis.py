"""LIMe's analyses: matrix Rényi entropy on known spectra, value entropy from the values a layer really
attends over (LIMe's mixed ones), router shares and the expected retrieved layer on hand-set routers, the
report and the command's one-line refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import assert_user_error, run_cli
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from interlayer.errors import UserError
from interlayer.lime import LimeConfig, LimeForCausalLM
from interlayer.lime.analysis import (
    dynamic_router_shares,
    expected_retrieved_layer,
    renyi_entropy,
    router_shares,
    value_entropy_per_layer,
)
from interlayer.models import load_model

LLAMA = LlamaConfig(
    vocab_size=301,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def test_renyi_entropy_on_known_spectra() -> None:
    # four orthogonal rows of equal norm: p = (1/4, …) and S_α = log 4 for every α
    z = torch.eye(4, 6) * 3.0
    for alpha in (0.5, 1.0, 2.0):
        assert renyi_entropy(z, alpha) == pytest.approx(math.log(4), abs=1e-9)
    # rank one: every token on one line, S = 0
    assert renyi_entropy(torch.outer(torch.arange(1.0, 5.0), torch.ones(6)), 1.0) == pytest.approx(
        0, abs=1e-9
    )
    # two orthogonal rows with squared norms 3 and 1: p = (3/4, 1/4)
    z = torch.tensor([[math.sqrt(3), 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.double)
    assert renyi_entropy(z, 1.0) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-9)
    assert renyi_entropy(z, 2.0) == pytest.approx(-math.log(0.75**2 + 0.25**2), abs=1e-9)


@torch.no_grad()
def test_value_entropy_reads_the_mixed_values() -> None:
    """Llama: the entropy of v_proj's output; LIMe: of W_r's mix of every layer's v_proj output; with the
    official z-scoring of every feature over all tokens of all contexts, and without it."""
    torch.manual_seed(0)
    lime = LimeForCausalLM(LimeConfig(**LLAMA.to_dict())).eval()
    llama = LlamaForCausalLM(LLAMA).eval()
    ids = torch.randint(0, 301, (2, 10), generator=torch.Generator().manual_seed(0))
    for model in (lime, llama):
        values: list[torch.Tensor] = []

        def keep(_module: torch.nn.Module, _args: object, out: torch.Tensor, into: list = values) -> None:
            into.append(out)

        hooks = [layer.self_attn.v_proj.register_forward_hook(keep) for layer in model.model.layers]
        model(ids)
        for hook in hooks:
            hook.remove()
        plain, standardized = [], []
        for r, layer in enumerate(model.model.layers):
            v_BTC = values[r].double()
            router = getattr(layer.self_attn, "router", None)
            if router is not None:  # kv-head j = Σ_{m, i} W[j, m·R + i] · V_{m, i}
                sources = torch.stack(
                    [values[m].view(2, 10, 2, 8)[:, :, i] for m in range(r + 1) for i in range(2)]
                ).double()
                v_BTC = torch.einsum("jn,nbtc->btjc", router.weight.double(), sources).flatten(2)
            plain.append(sum(renyi_entropy(v_BTC[b], 2.0) for b in range(2)) / 2)
            flat = v_BTC.flatten(0, 1)
            z_BTC = (v_BTC - flat.mean(0)) / (flat.std(0) + 1e-5)
            standardized.append(sum(renyi_entropy(z_BTC[b], 0.5) for b in range(2)) / 2)
        ours = value_entropy_per_layer(model, ids, alpha=2.0, batch_size=1, standardize=False)
        assert ours == pytest.approx(plain, abs=1e-5)
        assert value_entropy_per_layer(model, ids, batch_size=1) == pytest.approx(standardized, abs=1e-5)
        assert standardized != pytest.approx(plain, abs=1e-2)


def test_router_shares_and_expected_layer_on_hand_set_routers() -> None:
    lime = LimeForCausalLM(LimeConfig(**LLAMA.to_dict()))
    with torch.no_grad():
        lime.routers()[0].weight.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        # layer 2: |W| sums 1 (layer 0), 3 (layer 1), 4 (layer 2)
        lime.routers()[1].weight.copy_(torch.tensor([[0.5, 0, -1, 0, 2, 0], [0, -0.5, 0, 2, 0, -2]]))
    shares = router_shares(lime)
    assert torch.allclose(shares, torch.tensor([[1, 0, 0], [1 / 3, 2 / 3, 0], [1 / 8, 3 / 8, 4 / 8]]))
    assert expected_retrieved_layer(shares) == pytest.approx([0, 2 / 3, 11 / 8])
    identity = LimeForCausalLM.from_llama(LlamaForCausalLM(LLAMA))
    assert expected_retrieved_layer(router_shares(identity)) == pytest.approx([0, 1, 2])


@torch.no_grad()
def test_dynamic_shares_start_at_the_static_ones() -> None:
    lime = LimeForCausalLM(LimeConfig(**LLAMA.to_dict(), lime_router="dynamic")).eval()
    ids = torch.randint(0, 301, (3, 8), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(dynamic_router_shares(lime, ids, batch_size=2), router_shares(lime), atol=1e-6)
    with pytest.raises(ValueError, match="static"):
        dynamic_router_shares(LimeForCausalLM(LimeConfig(**LLAMA.to_dict())), ids)


@pytest.fixture(scope="module")
def lime_folders(tmp_path_factory: pytest.TempPathFactory, tiny_mdlm: Path) -> dict[str, Path]:
    """A static LIMe, a dynamic LIMe and a Llama folder with the tiny zoo tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_mdlm))
    root = tmp_path_factory.mktemp("lime")
    folders = {}
    for name, model in (
        ("static", LimeForCausalLM(LimeConfig(**LLAMA.to_dict()))),
        ("dynamic", LimeForCausalLM(LimeConfig(**LLAMA.to_dict(), lime_router="dynamic"))),
        ("llama", LlamaForCausalLM(LLAMA)),
    ):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def test_analyze_writes_the_report(
    lime_folders: dict[str, Path], corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    out, model = tmp_path / "out", tmp_path / "a<b>"  # the model's name goes into the page: escaped
    shutil.copytree(lime_folders["dynamic"], model)
    result = run_cli(
        [
            "lime",
            "analyze",
            "--model",
            str(model),
            "--baseline",
            str(lime_folders["llama"]),
            "--data",
            str(corpus),
            "--contexts",
            "4",
            "--context-len",
            "16",
            "--dynamic",
            "--out",
            str(out),
            "--json",
        ],
        capsys,
    )
    code, stdout, stderr = result
    assert code == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert set(summary["value_entropy"]) == {"LIMe", "baseline"}
    assert len(summary["value_entropy"]["LIMe"]) == 3 and summary["contexts"] == 4
    assert summary["router_shares"][0] == [1.0, 0.0, 0.0]
    assert summary["expected_layer"] == pytest.approx(
        expected_retrieved_layer(torch.tensor(summary["router_shares"]))
    )
    page = (out / "report.html").read_text()
    assert page.count("<svg") == 4 and "Expected retrieved layer" in page
    assert "a&lt;b&gt;" in page and "a<b>" not in page
    assert json.loads((out / "analysis.json").read_text())["report"] == str(out / "report.html")


def test_a_checkpoint_of_another_architecture_is_refused(
    lime_folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_user_error(
        run_cli(["lime", "analyze", "--model", str(lime_folders["llama"]), "--out", str(tmp_path)], capsys),
        "is a llama checkpoint, not a LIMe one",
    )


def test_the_dynamic_option_on_a_static_checkpoint_is_refused(
    lime_folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_user_error(
        run_cli(
            ["lime", "analyze", "--model", str(lime_folders["static"]), "--dynamic", "--out", str(tmp_path)],
            capsys,
        ),
        "has static routers; the dynamic router option needs a checkpoint trained with dynamic routers",
    )


def test_a_router_shape_that_does_not_match_the_config_is_refused(
    lime_folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(lime_folders["static"], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.2.self_attn.router.weight"] = torch.zeros(2, 4)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    message = (
        "model.safetensors holds model.layers.2.self_attn.router.weight of shape [2, 4], but the config "
        "(3 layers, 2 kv-heads) needs [2, 6]"
    )
    assert_user_error(run_cli(["sites", "--model", str(folder)], capsys), message)
    with pytest.raises(UserError, match=r"needs \[2, 6\]"):
        load_model(str(folder))
    # a config that claims dynamic routers over static weights
    config = json.loads((lime_folders["static"] / "config.json").read_text())
    shutil.copytree(lime_folders["static"], tmp_path / "claims", dirs_exist_ok=True)
    (tmp_path / "claims" / "config.json").write_text(json.dumps(config | {"lime_router": "dynamic"}))
    assert_user_error(
        run_cli(["sites", "--model", str(tmp_path / "claims")], capsys),
        "model.layers.1.self_attn.router.dynamic.weight is missing, so this is not a dynamic-router checkpoint",
    )


def test_convert_makes_an_equivalent_lime_model(
    lime_folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(
        ["lime", "convert", "--model", str(lime_folders["llama"]), "--out", str(tmp_path), "--json"], capsys
    )
    code, stdout, stderr = result
    assert code == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["router_parameters"] == 2 * 4 + 2 * 6
    ids = torch.randint(0, 301, (2, 9), generator=torch.Generator().manual_seed(0))
    lime, llama = load_model(summary["model"]).model, load_model(str(lime_folders["llama"])).model
    assert isinstance(lime, LimeForCausalLM)
    assert torch.allclose(lime(ids).logits, llama(ids).logits, atol=1e-6, rtol=0)
    assert_user_error(
        run_cli(
            ["lime", "convert", "--model", str(lime_folders["static"]), "--out", str(tmp_path / "x")], capsys
        ),
        "is a lime model; lime convert takes a Llama one",
    )


def test_sae_training_runs_on_a_lime_model(
    lime_folders: dict[str, Path], corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every interlayer tool takes a LIMe folder as --model: an SAE at layers.1.attn trains on it, and its
    input width and site are the model's."""
    from test_cli import train_args

    args = train_args(
        lime_folders["static"], corpus, tmp_path / "sae", "--sites", "layers.1.attn", "--tokens", "512"
    )
    code, _out, err = run_cli(args, capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "sae" / "layers.1.attn" / "cfg.json").read_text())
    assert cfg["d_in"] == 32 and cfg["site"] == "layers.1.attn"


@torch.no_grad()
def test_dynamic_shares_average_the_per_token_mix() -> None:
    """With U_r ≠ 0: p_r(m) from |W_r + reshape(U_r · RMSNorm(x_t))| averaged over tokens, by hand."""
    torch.manual_seed(0)
    lime = LimeForCausalLM(LimeConfig(**LLAMA.to_dict(), lime_router="dynamic")).eval()
    for router in lime.routers():
        torch.nn.init.normal_(router.dynamic.weight, std=0.5)
    ids = torch.randint(0, 301, (3, 8), generator=torch.Generator().manual_seed(0))
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        lime.model.layers[r.layer_idx].input_layernorm.register_forward_hook(
            lambda _m, _a, out, layer=r.layer_idx: inputs.__setitem__(layer, out)
        )
        for r in lime.routers()
    ]
    lime(ids)
    for hook in hooks:
        hook.remove()
    expected = torch.zeros(3, 3)
    expected[0, 0] = 1
    for router in lime.routers():
        r = router.layer_idx
        mean_abs = torch.zeros(2, 2 * (r + 1))
        for b in range(3):
            for t in range(8):
                x = inputs[r][b, t]
                x = (
                    router.dynamic_norm.weight
                    * x
                    / torch.sqrt(x.pow(2).mean() + router.dynamic_norm.variance_epsilon)
                )
                mean_abs += (router.weight + (router.dynamic.weight @ x).view(2, 2 * (r + 1))).abs()
        per_layer = (mean_abs / 24).view(2, r + 1, 2).sum(dim=(0, 2))
        expected[r, : r + 1] = per_layer / per_layer.sum()
    shares = dynamic_router_shares(lime, ids, batch_size=2)
    assert torch.allclose(shares, expected, atol=1e-5)
    assert not torch.allclose(shares, router_shares(lime), atol=1e-3)


@torch.no_grad()
def test_a_static_checkpoint_opened_dynamic_starts_as_itself(lime_folders: dict[str, Path]) -> None:
    static = LimeForCausalLM.from_pretrained(lime_folders["static"]).eval()
    dynamic = LimeForCausalLM.from_pretrained(lime_folders["static"], lime_router="dynamic").eval()
    assert all(
        r.dynamic is not None and torch.equal(r.dynamic.weight, torch.zeros_like(r.dynamic.weight))
        for r in dynamic.routers()
    )
    ids = torch.randint(0, 301, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(dynamic(ids).logits, static(ids).logits, atol=1e-6)


def test_a_llama_checkpoint_opened_as_lime_gets_the_official_router_init(
    lime_folders: dict[str, Path],
) -> None:
    lime = LimeForCausalLM.from_pretrained(lime_folders["llama"])
    llama = LlamaForCausalLM.from_pretrained(lime_folders["llama"])
    assert torch.equal(lime.model.layers[1].mlp.up_proj.weight, llama.model.layers[1].mlp.up_proj.weight)
    for router in lime.routers():
        assert torch.equal(router.weight[:, -2:], torch.eye(2))
        earlier = router.weight[:, :-2]
        assert earlier.abs().max() <= math.sqrt(3 / router.sources) and earlier.abs().min() > 0


def test_other_bad_lime_folders_are_one_line(
    lime_folders: dict[str, Path], corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    typo = tmp_path / "typo"
    shutil.copytree(lime_folders["static"], typo)
    config = json.loads((typo / "config.json").read_text())
    (typo / "config.json").write_text(json.dumps(config | {"lime_router": "Dynamic"}))
    assert_user_error(
        run_cli(["sites", "--model", str(typo)], capsys),
        "config.json lime_router must be one of static, dynamic, not 'Dynamic'",
    )
    other_vocab = tmp_path / "vocab"
    LlamaForCausalLM(LlamaConfig(**{**LLAMA.to_dict(), "vocab_size": 64})).save_pretrained(other_vocab)
    AutoTokenizer.from_pretrained(str(lime_folders["llama"])).save_pretrained(other_vocab)
    args = [
        "lime",
        "analyze",
        "--model",
        str(lime_folders["static"]),
        "--data",
        str(corpus),
        "--out",
        str(tmp_path),
    ]
    assert_user_error(
        run_cli([*args, "--baseline", str(other_vocab)], capsys),
        "has a vocabulary of 64 tokens, the LIMe model 301",
    )
    # a shallower baseline is compared layer by layer where it has layers
    shallow = tmp_path / "shallow"
    LlamaForCausalLM(LlamaConfig(**{**LLAMA.to_dict(), "num_hidden_layers": 2})).save_pretrained(shallow)
    AutoTokenizer.from_pretrained(str(lime_folders["llama"])).save_pretrained(shallow)
    code, out, err = run_cli(
        [*args, "--baseline", str(shallow), "--contexts", "2", "--context-len", "16", "--json"], capsys
    )
    assert code == 0, err
    table = json.loads(out.strip().splitlines()[-1])["table"]
    assert [row["baseline"] is None for row in table] == [False, False, True]
