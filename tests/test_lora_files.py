"""LoRA files for diffusers, ComfyUI and kohya/musubi: the same delta through each tool's reading,
Wan's native names for every layer of the 1.3B and 14B, conversion, and `lora.init_from`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import REPO
from safetensors import safe_open
from safetensors.torch import save_file

from radial_lora.configs.schema import AttentionConfig, ConfigError, LoraConfig, LoraFormat, ModelConfig
from radial_lora.models.attention import set_self_attention
from radial_lora.models.lora import add_lora, export_lora, init_lora_from, lora_weights
from radial_lora.models.lora_files import (
    FILE_NAMES,
    Adapter,
    LoraFileError,
    from_state_dict,
    load_lora,
    native_name,
    save_lora,
    to_state_dict,
)

# Every linear layer of a block, so each format's whole naming is exercised (and diffusers' musubi
# converter, which expects self-attention, cross-attention and the MLP in every block, reads it).
ALL_BLOCK_LAYERS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
TRAINED = LoraConfig(rank=4, alpha=12, target_modules=ALL_BLOCK_LAYERS)  # alpha != rank on purpose


def load(model_dir):
    from radial_lora.models.loading import load_pipeline

    return load_pipeline(ModelConfig(id="tiny-wan", path=str(model_dir)))


def inputs(pipe, seed=3):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    x = torch.randn(2, cfg.in_channels, 3, 8, 8, generator=g)
    return x, torch.tensor([100.0, 900.0]), torch.randn(2, 7, cfg.text_dim, generator=g)


def forward(transformer, x, t, text):
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def trained_pipe(model_dir, cfg=TRAINED, seed=1):
    """A tiny pipeline with LoRA whose A and B are random (B is zero at init, which hides bugs)."""
    pipe = load(model_dir)
    set_self_attention(pipe.transformer, AttentionConfig(backend="dense"))
    params = add_lora(pipe.transformer, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pipe


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """(folder with the three files, inputs, the trained transformer's output)."""
    pipe = trained_pipe(tiny_model_dir)
    x = inputs(pipe)
    folder = tmp_path_factory.mktemp("lora")
    path = export_lora(pipe.transformer, folder, formats=list(LoraFormat), info={"radial_lora.base_model": "tiny-wan"})
    assert path == (folder / FILE_NAMES[LoraFormat.diffusers]).resolve()
    return folder, x, forward(pipe.transformer, *x)


@pytest.mark.parametrize("fmt", list(LoraFormat))
def test_each_file_gives_diffusers_the_trained_output(exported, tiny_model_dir, fmt):
    """Each file through `WanPipeline.load_lora_weights` (for ComfyUI and kohya files: diffusers'
    own converters for non-diffusers Wan LoRAs, picked by their key prefixes) reproduces the
    trained transformer's output: alpha is applied once, not twice or never."""
    from diffusers import WanPipeline

    folder, x, trained = exported
    with safe_open(str(folder / FILE_NAMES[fmt]), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefix = {"diffusers": "transformer.blocks.", "comfyui": "diffusion_model.blocks.", "kohya": "lora_unet_blocks_"}
    assert all(k.startswith(prefix[fmt.value]) for k in keys)
    assert meta["radial_lora.base_model"] == "tiny-wan" and meta["radial_lora.rank"] == "4"
    assert meta["radial_lora.alpha"] == ("4" if fmt == LoraFormat.diffusers else "12")  # diffusers' B carries alpha/r

    fresh = WanPipeline.from_pretrained(tiny_model_dir)
    base = forward(fresh.transformer, *x)
    fresh.load_lora_weights(str(folder), weight_name=FILE_NAMES[fmt])
    loaded = forward(fresh.transformer, *x)
    assert (trained - base).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)


def test_comfyui_and_kohya_files_state_alpha_per_module(exported):
    folder, _, _ = exported
    with safe_open(str(folder / FILE_NAMES[LoraFormat.comfyui]), "pt") as f:
        assert f.get_tensor("diffusion_model.blocks.0.self_attn.q.alpha").item() == 12
        assert f.get_tensor("diffusion_model.blocks.1.ffn.2.lora_A.weight").shape == (4, 128)  # the tiny ffn_dim
    with safe_open(str(folder / FILE_NAMES[LoraFormat.kohya]), "pt") as f:
        assert f.get_tensor("lora_unet_blocks_1_cross_attn_o.alpha").item() == 12
        assert f.metadata()["ss_network_dim"] == "4" and f.metadata()["ss_network_alpha"] == "12"


@pytest.mark.parametrize(
    "model_id, blocks", [("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 30), ("Wan-AI/Wan2.1-T2V-14B-Diffusers", 40)]
)
def test_native_names_are_the_ones_wan_checkpoints_use(model_id, blocks):
    """Every linear layer of the 1.3B and 14B gets the name Wan's own checkpoints (which ComfyUI
    loads) give it: diffusers' single-file converter of those checkpoints maps each of our native
    names back to the layer. A LoRA on the default targets names all 30/40 blocks' q, k, v, o of
    both attentions, in ComfyUI's `diffusion_model.` and `lora_unet_` spellings."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from radial_lora.models.random_init import random_pipeline

    dtypes = {"transformer": torch.bfloat16, "vae": torch.float32, "text_encoder": torch.bfloat16}
    transformer = random_pipeline(model_id, dtypes, "meta", text_encoder=False).transformer
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 10 * blocks + 6
    native = {native_name(n) + ".weight": torch.empty(0) for n in linears}
    assert sorted(convert_wan_transformer_to_diffusers(dict(native))) == sorted(n + ".weight" for n in linears)

    targets = PeftLoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    adapted = [n for n in linears if check_target_module_exists(targets, n)]
    weights = {n: Adapter(down=torch.zeros(1, 1), up=torch.zeros(1, 1), alpha=1.0) for n in adapted}
    expected = {f"blocks.{i}.{attn}.{p}" for i in range(blocks) for attn in ("self_attn", "cross_attn") for p in "qkvo"}
    comfy, _ = to_state_dict(weights, LoraFormat.comfyui)
    assert {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in comfy if not k.endswith(".alpha")} == expected
    assert {k.removesuffix(".alpha") for k in comfy if k.endswith(".alpha")} == {
        f"diffusion_model.{e}" for e in expected
    }
    kohya, _ = to_state_dict(weights, LoraFormat.kohya)
    assert {k.split(".")[0] for k in kohya} == {"lora_unet_" + e.replace(".", "_") for e in expected}
    for fmt in LoraFormat:  # and every name reads back to its layer
        tensors, meta = to_state_dict(weights, fmt)
        assert from_state_dict(tensors, meta)[0].keys() == weights.keys()


def deltas(weights):
    return {m: a.delta() for m, a in weights.items()}


def test_convert_lora_between_all_formats_keeps_the_delta(exported, tmp_path):
    """`python -m scripts.convert_lora` diffusers -> comfyui -> kohya -> diffusers, and the
    trained files' deltas agree module by module."""
    folder, _, _ = exported
    source = folder / FILE_NAMES[LoraFormat.diffusers]
    reference = deltas(load_lora(source)[0])
    chain = [("comfyui", tmp_path / "a.safetensors"), ("kohya", tmp_path / "b.safetensors"), ("diffusers", tmp_path)]
    current = source
    for fmt, out in chain:
        proc = subprocess.run(
            [sys.executable, "-m", "radial_lora.scripts.convert_lora", str(current), str(out), "--to", fmt],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr
        current = out if out.suffix else out / FILE_NAMES[LoraFormat.diffusers]
        weights, read_as, meta = load_lora(current)
        assert read_as.value == fmt and meta["radial_lora.base_model"] == "tiny-wan"
        for module, delta in deltas(weights).items():
            torch.testing.assert_close(delta, reference[module], atol=1e-7, rtol=1e-6)
    for fmt in ("comfyui", "kohya"):  # and the exported files themselves
        for module, delta in deltas(load_lora(folder / FILE_NAMES[LoraFormat(fmt)])[0]).items():
            torch.testing.assert_close(delta, reference[module], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(
    "key, says",
    [
        ("diffusion_model.blocks.0.self_attn.q.diff_b", "not a LoRA down/up weight"),
        ("diffusion_model.patch_embedding.lora_A.weight", "not a linear layer of Wan's transformer"),
        ("lora_unet_blocks_0_self_attn_qq.lora_down.weight", "not a linear layer of Wan's transformer"),
        ("model.layers.0.q_proj.lora_A.weight", "not a Wan LoRA"),
    ],
)
def test_convert_lora_refuses_keys_it_cannot_place(tmp_path, key, says):
    tensors = {
        "diffusion_model.blocks.0.self_attn.k.lora_A.weight": torch.zeros(2, 8),
        "diffusion_model.blocks.0.self_attn.k.lora_B.weight": torch.zeros(8, 2),
        key: torch.zeros(2, 8),
    }
    if key.startswith("lora_unet_"):  # one format per file
        tensors = {
            "lora_unet_blocks_0_self_attn_k.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_blocks_0_self_attn_k.lora_up.weight": torch.zeros(8, 2),
            key: torch.zeros(2, 8),
        }
    save_file(tensors, str(tmp_path / "in.safetensors"))
    out = tmp_path / "out.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "radial_lora.scripts.convert_lora",
            str(tmp_path / "in.safetensors"),
            str(out),
            "--to",
            "diffusers",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode != 0 and not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], proc.stderr


def test_a_file_of_two_formats_or_without_an_up_weight_is_refused():
    with pytest.raises(LoraFileError, match="several LoRA formats"):
        from_state_dict(
            {"diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.zeros(1, 1), "lora_unet_x.alpha": torch.ones(())}
        )
    with pytest.raises(LoraFileError, match="up weight missing"):
        from_state_dict({"diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.zeros(1, 1)})


def test_init_from_any_format_gives_back_the_lora_at_another_alpha(exported, tiny_model_dir):
    """A LoRA trained at alpha 12 starts a run configured with alpha 2: the adapters are rescaled
    so the model computes what the file's LoRA computes (from each of the three formats)."""
    folder, x, trained = exported
    other_alpha = LoraConfig(rank=4, alpha=2, target_modules=ALL_BLOCK_LAYERS)
    for fmt in LoraFormat:
        pipe = load(tiny_model_dir)
        set_self_attention(pipe.transformer, AttentionConfig(backend="dense"))
        add_lora(pipe.transformer, other_alpha)
        weights, _, _ = load_lora(folder / FILE_NAMES[fmt])
        init_lora_from(pipe.transformer, weights, other_alpha, str(folder / FILE_NAMES[fmt]))
        torch.testing.assert_close(forward(pipe.transformer, *x), trained, atol=1e-5, rtol=0)
        for module, adapter in lora_weights(pipe.transformer).items():  # the delta, not just the output
            torch.testing.assert_close(adapter.delta(), weights[module].delta(), atol=1e-7, rtol=1e-6)


def test_init_from_refuses_another_rank_or_other_targets(exported, tiny_model_dir):
    folder, _, _ = exported
    weights, _, _ = load_lora(folder / FILE_NAMES[LoraFormat.comfyui])
    for cfg, says in (
        (LoraConfig(rank=8, alpha=8, target_modules=ALL_BLOCK_LAYERS), "rank 4, but lora.rank=8"),
        (LoraConfig(rank=4, alpha=4), "only in the file: blocks.0.ffn.net.0.proj"),
    ):
        pipe = load(tiny_model_dir)
        add_lora(pipe.transformer, cfg)
        with pytest.raises(ConfigError, match=f"lora.init_from=F: .*{says}"):
            init_lora_from(pipe.transformer, weights, cfg, "F")


def test_saved_files_read_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    weights = {
        "blocks.2.attn2.add_k_proj": Adapter(torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g), 6.0),
        "condition_embedder.time_proj": Adapter(torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g), 3.0),
        "proj_out": Adapter(torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g), 1.5),
    }
    for fmt in (LoraFormat.comfyui, LoraFormat.kohya):  # per-module alphas survive these two as they are
        back, read_as, _ = load_lora(save_lora(weights, tmp_path / f"{fmt.value}.safetensors", fmt))
        assert read_as == fmt and back.keys() == weights.keys()
        for m, a in weights.items():
            assert back[m].alpha == a.alpha and torch.equal(back[m].down, a.down) and torch.equal(back[m].up, a.up)
    back, _, _ = load_lora(save_lora(weights, tmp_path / "d.safetensors", LoraFormat.diffusers))
    for m, a in weights.items():  # diffusers: folded into B, alpha = rank
        assert back[m].alpha == 3 and torch.allclose(back[m].delta(), a.delta())
