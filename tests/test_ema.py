"""train.ema_decay: the average's arithmetic, its round trip through a checkpoint, and a full run
whose export is the average, resumed bit-identically."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, run_train
from safetensors.torch import load_file

from radial_lora.train.ema import EMA_FILE, WeightAverage


def expected_average(history: list[torch.Tensor], decay: float) -> torch.Tensor:
    """The EMA by its definition: update n (from 1) mixes in the weights with 1 - d_n, where
    d_n = min(decay, (n)/(9 + n)) after the first update (which copies)."""
    avg = history[0].clone()  # the average starts as the weights it was made from
    for n, w in enumerate(history[1:], start=1):
        k = n - 1  # diffusers counts the warm-up from the update before
        d = 0.0 if k <= 0 else min(decay, (1 + k) / (10 + k))
        avg = d * avg + (1 - d) * w
    return avg


def test_the_average_follows_its_definition_and_swaps_in_and_out(tmp_path):
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    ema = WeightAverage([w], ["w"], decay=0.9)
    history = [w.detach().float().clone()]
    for step in range(1, 30):
        with torch.no_grad():
            w.copy_(torch.full((3,), float(step)))
        history.append(w.detach().float().clone())
        ema.update()
    want = expected_average(history, 0.9)
    with ema.swapped_in():
        assert torch.allclose(w.float(), want.to(torch.bfloat16).float())
    assert torch.equal(w.float(), torch.full((3,), 29.0)), "the trained weights come back"
    # fp32 average of bf16 weights: the small late updates are not rounded away
    assert torch.allclose(ema.ema.shadow_params[0], want, atol=1e-4)

    ema.save(tmp_path)
    other = WeightAverage([torch.nn.Parameter(torch.zeros(3))], ["w"], decay=0.9)
    assert other.load(tmp_path) and other.steps == ema.steps == 29
    assert torch.equal(other.ema.shadow_params[0], ema.ema.shadow_params[0])
    assert not other.load(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="does not match"):
        WeightAverage([torch.nn.Parameter(torch.zeros(3))], ["v"], decay=0.9).load(tmp_path)


@pytest.mark.slow
def test_a_full_run_exports_the_average_and_resumes_it_exactly(tmp_path):
    from diffusers import WanPipeline

    import radial_lora.models.pixel_wan  # noqa: F401  the identity VAE's class, for from_pretrained

    common = [
        "+experiment=sprites_base",
        "model=pixel_wan_toy",
        "trainer.mixed_precision=no",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.frames=[5]",
        "logger.mode=disabled",
        "train.ema_decay=0.9",
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.keep_last=0",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    whole = run_train(REPO, *common, f"output_root={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "weight average: decay 0.9, 0 updates so far" in whole.stdout
    run = tmp_path / "whole/sprites_base"
    exported = WanPipeline.from_pretrained(str(run / "model")).transformer.state_dict()
    last = load_file(str(run / "checkpoints/step_000004/trainable.safetensors"))
    average = load_file(str(run / f"checkpoints/step_000004/{EMA_FILE}"))
    names = [k for k in average if k in exported]
    assert len(names) == len(average) == len(last)
    assert all(torch.equal(exported[k], average[k]) for k in names), "the export is the average"
    assert any(not torch.equal(average[k], last[k]) for k in names), "the average is not the last weights"

    # Stopped after step 2, then resumed: the same average and the same export as one run.
    half = run_train(REPO, *common, f"output_root={tmp_path / 'half'}", "train.stop_after_step=2")
    assert half.returncode == 0, half.stderr[-3000:]
    rest = run_train(REPO, *common, f"output_root={tmp_path / 'half'}", "train.resume=latest")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "weight average: decay 0.9, 2 updates so far" in rest.stdout
    resumed = load_file(str(tmp_path / f"half/sprites_base/checkpoints/step_000004/{EMA_FILE}"))
    assert all(torch.equal(resumed[k], average[k]) for k in average)
