"""Pretrained models start without initialising what their file replaces (`checkpoint.skipping_init` and
`load_state_dict_checked(..., assign=True)`): fair-esm files, Hugging Face folders and checkpoints of a run give the
same module as building it and then loading, draw no random number for the weights they replace, keep tied
weights tied and the module's dtypes."""
import json
from pathlib import Path

import pytest
import torch
from test_models import _write_official_checkpoint

from esm_gearnet import load_config
from esm_gearnet.assembly import build_task
from esm_gearnet.checkpoint import CheckpointError, load_state_dict_checked, skipping_init
from esm_gearnet.data import ProteinBatch
from esm_gearnet.models import ESM
from esm_gearnet.models.esm import build_esm2

from conftest import randomized_weights

DEMO = Path(__file__).resolve().parents[1] / "config" / "demo" / "esm_gearnet.yaml"


def _rng_untouched(build):
    """build() with the global RNG state compared before and after."""
    before = torch.random.get_rng_state()
    result = build()
    return result, torch.equal(before, torch.random.get_rng_state())


def test_skipping_init_skips_only_parameter_fills():
    with skipping_init():
        linear = torch.nn.Linear(4, 3)
        norm = torch.nn.BatchNorm1d(3)
        buffer = torch.empty(3).fill_(7.0)  # not a parameter: filled
    assert torch.equal(norm.running_var, torch.ones(3)) and torch.equal(buffer, torch.full((3,), 7.0))
    state = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    load_state_dict_checked(linear, state, "test", assign=True)
    assert linear.weight.data_ptr() == state["weight"].data_ptr()  # taken, not copied
    assert isinstance(linear.weight, torch.nn.Parameter) and linear.weight.requires_grad
    with pytest.raises(CheckpointError, match="missing keys: bias"):
        load_state_dict_checked(torch.nn.Linear(4, 3), {"weight": torch.randn(3, 4)}, "test", assign=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fair_esm_file_builds_without_drawing_random_weights(tmp_path, all_proteins, dtype):
    reference = randomized_weights(_write_official_checkpoint(tmp_path, "esm2_t2_32_test"), seed=3)
    state = torch.load(tmp_path / "esm2_t2_32_test.pt", weights_only=False)
    state["model"] = {k: v.to(dtype) for k, v in randomized_weights(reference, seed=3).state_dict().items()}
    state["model"] = {("encoder." if k.startswith("lm_head") else "encoder.sentence_encoder.") + k: v
                      for k, v in state["model"].items() if not k.startswith("contact_head")}
    torch.save(state, tmp_path / "esm2_t2_32_test.pt")
    esm, untouched = _rng_untouched(lambda: ESM(path=str(tmp_path), model="esm2_t2_32_test").eval())
    assert untouched, "building from the file drew random numbers: some weights were initialised"
    assert esm.model.lm_head.weight is esm.model.embed_tokens.weight  # tied, as fair-esm builds it
    assert all(p.dtype == torch.float32 for p in esm.parameters())
    for key, value in reference.state_dict().items():
        if not key.startswith("contact_head"):
            assert torch.equal(esm.model.state_dict()[key], value.to(dtype).float()), key
    batch = ProteinBatch.pack(all_proteins[:2])
    with torch.no_grad():
        tokens, window, column = esm.tokenize(batch)
        expected = reference.to(dtype).float().eval()(tokens, repr_layers=[2])["representations"][2][window, column]
        torch.testing.assert_close(esm(batch)["residue_feature"], expected, atol=1e-5, rtol=1e-5)


def test_hugging_face_folder_builds_without_drawing_random_weights(tmp_path):
    from safetensors.torch import save_file

    model, _ = build_esm2(2, 32, 4)
    randomized_weights(model, seed=4)
    hf = {"embeddings.word_embeddings.weight": model.embed_tokens.weight,
          "encoder.emb_layer_norm_after.weight": model.emb_layer_norm_after.weight,
          "encoder.emb_layer_norm_after.bias": model.emb_layer_norm_after.bias}
    names = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
             "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
             "self_attn_layer_norm": "attention.LayerNorm", "fc1": "intermediate.dense", "fc2": "output.dense",
             "final_layer_norm": "LayerNorm"}
    for i in range(2):
        for fair, theirs in names.items():
            for p in ("weight", "bias"):
                hf[f"encoder.layer.{i}.{theirs}.{p}"] = model.state_dict()[f"layers.{i}.{fair}.{p}"]
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "esm", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "position_embedding_type": "rotary", "token_dropout": True, "vocab_size": 33,
        "pad_token_id": 1, "mask_token_id": 32, "layer_norm_eps": 1e-5, "emb_layer_norm_before": False,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "model.safetensors"))
    esm, untouched = _rng_untouched(lambda: ESM(path=str(tmp_path)))
    assert untouched and esm.model.lm_head.weight is esm.model.embed_tokens.weight
    for key, value in model.state_dict().items():
        if not key.startswith(("lm_head", "contact_head")):  # the folder has no heads: zeros
            assert torch.equal(esm.model.state_dict()[key], value), key


def test_a_run_checkpoint_builds_the_task_without_initialising_it(tmp_path):
    cfg = load_config(str(DEMO), {"num_protein": 8, "batch_norm": True, "num_epoch": 1, "batch_size": 4,
                                  "output_dir": None})
    torch.manual_seed(0)
    trained = build_task(cfg, [0])
    randomized_weights(trained, seed=5)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    rebuilt, untouched = _rng_untouched(lambda: build_task(cfg, [0], state, "run/last.pth"))
    assert untouched
    old = build_task(cfg, [0])  # the old path: build (random weights), then copy the state in
    old.load_state_dict(state)
    assert rebuilt.state_dict().keys() == old.state_dict().keys()
    for key, value in old.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    assert [p.requires_grad for p in rebuilt.parameters()] == [p.requires_grad for p in old.parameters()]
    with pytest.raises(CheckpointError, match="run/last.pth does not fit"):
        build_task(cfg, [0], {k: v for k, v in state.items() if "mlp" not in k}, "run/last.pth")
