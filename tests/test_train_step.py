"""The loop's seams, in the test process: `build(cfg)` makes a run, `train_step(run, batches)` takes
one optimizer step. (The loop as a user runs it, signals and restarts: tests/test_train.py.)"""

from __future__ import annotations

import signal

import pytest
import torch
from conftest import DEMO_DATA, REPO

from radial_lora.train.preemption import STOP_SIGNALS, stop_signals

STEPS = ["train.steps=3", "optim.warmup_steps=2", "optim.lr=1e-3"]


@pytest.fixture
def composed(tmp_path, tiny_model_dir, demo_videos_dir):
    """A typed config of the tiny model on the demo clips, its run folder under tmp_path; the stop
    signal handlers that build() installs are put back afterwards."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from radial_lora.configs.schema import register_configs, typed_config

    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def make(*overrides: str):
        register_configs()
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    "data=videos",
                    f"model.path={tiny_model_dir}",
                    f"data.root={demo_videos_dir}",
                    *DEMO_DATA,
                    "data.frames=[9]",
                    "data.sizes=[[32,32]]",
                    "data.num_workers=0",
                    "logger.mode=disabled",
                    f"output_root={tmp_path}",
                    *STEPS,
                    *overrides,
                ],
            )
        return typed_config(cfg), OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)

    yield make
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    stop_signals.cache_clear()


def lora_state(run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.transformer.named_parameters() if "lora_" in n}


def test_a_step_trains_the_lora_only_with_one_collective(composed, monkeypatch):
    from radial_lora.train.loop import build, train_step

    run = build(*composed("name=steps"))
    frozen = {n: p.detach().clone() for n, p in run.transformer.named_parameters() if "lora_" not in n}
    before = lora_state(run)
    reduces = []
    original = run.accelerator.reduce
    monkeypatch.setattr(run.accelerator, "reduce", lambda *a, **k: reduces.append(1) or original(*a, **k))
    rates = []
    for expected_step in (1, 2):
        result = train_step(run, [next(run.batches)])
        assert run.state.step == expected_step and run.state.batches_seen == expected_step
        assert result.losses.shape == (1,) and torch.isfinite(result.losses).all() and not result.stop
        rates.append(run.lr_scheduler.get_last_lr()[0])
    assert len(reduces) == 2  # divergence and stop signals: one collective per step
    assert rates == pytest.approx([5e-4, 1e-3])  # linear warm-up over 2 steps to optim.lr
    after = lora_state(run)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    for name, p in run.transformer.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, frozen[name]), name


def test_a_diverged_step_raises_before_the_schedule_moves(composed):
    from radial_lora.train.loop import TrainingDiverged, build, train_step

    run = build(*composed("name=nan"))
    with torch.no_grad():  # what too high a learning rate leaves behind
        next(p for n, p in run.transformer.named_parameters() if "lora_B" in n).fill_(float("inf"))
    with pytest.raises(TrainingDiverged, match=r"non-finite loss or gradient at step 1 .* No checkpoint yet"):
        train_step(run, [next(run.batches)])
    assert run.state.step == 0 and run.lr_scheduler.last_epoch == 0


def test_a_stop_signal_on_any_process_ends_the_step_with_stop(composed):
    from radial_lora.train.loop import build, train_step

    run = build(*composed("name=stop"))
    assert not train_step(run, [next(run.batches)]).stop
    run.stop.received = "SIGTERM"  # what the handler records
    assert train_step(run, [next(run.batches)]).stop and run.state.step == 2


def test_steps_called_one_by_one_train_what_the_loop_trains(composed):
    """build + train_step x 3 + export gives the LoRA file train() writes for the same config:
    the loop is these seams and nothing else that changes the weights."""
    from safetensors.torch import load_file

    from radial_lora.train.loop import build, train, train_step

    cfg, resolved = composed("name=by_steps")
    run = build(cfg, resolved)
    for _ in range(3):
        train_step(run, [next(run.batches)])
    by_steps = load_file(run.export(run.run_dir / "lora"))
    run.accelerator.end_training()
    looped_cfg, looped_resolved = composed("name=looped", "train.checkpoint_every=0")
    looped = load_file(train(looped_cfg, looped_resolved).lora_file)
    assert by_steps.keys() == looped.keys() and all(torch.equal(by_steps[k], looped[k]) for k in by_steps)


def test_compiled_blocks_train_like_eager_ones(composed, capsys):
    """model.compile_blocks with gradient checkpointing: the same LoRA as eager blocks (aot_eager
    traces the graphs torch.compile would run, without generating code; the GPU uses inductor)."""
    from safetensors.torch import load_file

    from radial_lora.train.loop import build, train_step

    torch._dynamo.reset()
    trained = {}
    for name, extra in (("eager", []), ("compiled", ["model.compile_blocks=true", "model.compile_backend=aot_eager"])):
        run = build(*composed(f"name={name}", "model.gradient_checkpointing=true", *extra))
        for _ in range(3):
            train_step(run, [next(run.batches)])
        trained[name] = load_file(run.export(run.run_dir / "lora"))
        run.accelerator.end_training()
    assert "transformer blocks: torch.compile, backend aot_eager" in capsys.readouterr().out
    a, b = trained["eager"], trained["compiled"]
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)
    assert any(float(t.abs().max()) > 0 for t in b.values())  # it trained


def test_init_from_starts_the_run_from_a_lora_file(composed, tmp_path):
    """lora.init_from: a run starts from an exported ComfyUI file (trained at another alpha) with
    the same weight change per module; a file of another rank is refused in one line."""
    from radial_lora.configs.schema import ConfigError
    from radial_lora.models.lora import lora_weights
    from radial_lora.models.lora_files import FILE_NAMES, LoraFormat, load_lora
    from radial_lora.train.loop import build, train_step

    cfg, resolved = composed("name=first", "lora.rank=4", "lora.alpha=8")
    first = build(cfg, resolved)
    for _ in range(2):
        train_step(first, [next(first.batches)])
    first.export(tmp_path / "exported")
    source = tmp_path / "exported" / FILE_NAMES[LoraFormat.comfyui]
    expected = {m: a.delta() for m, a in load_lora(source)[0].items()}

    cfg, resolved = composed("name=second", "lora.rank=4", "lora.alpha=2", f"lora.init_from={source}")
    second = build(cfg, resolved)
    started = lora_weights(second.accelerator.unwrap_model(second.transformer))
    assert started.keys() == expected.keys()
    for module, adapter in started.items():
        torch.testing.assert_close(adapter.delta(), expected[module], atol=1e-7, rtol=1e-6)

    cfg, resolved = composed("name=third", "lora.rank=8", f"lora.init_from={source}")
    with pytest.raises(ConfigError, match="rank 4, but lora.rank=8"):
        build(cfg, resolved)
    cfg, resolved = composed("name=fourth", f"lora.init_from={tmp_path / 'missing.safetensors'}")
    with pytest.raises(ConfigError, match="lora.init_from: .*no such file"):
        build(cfg, resolved)


def test_held_out_clips_are_not_trained_on_and_score_the_same_twice(composed):
    """data.val_clips sets clips apart (never in the training list) and the held-out loss is a
    fixed function of the LoRA: the same twice, and a different number once the LoRA moves."""
    from radial_lora.train.loop import build, train_step
    from radial_lora.train.validation import held_out_losses

    cfg, resolved = composed("data.val_clips=2")
    run = build(cfg, resolved)
    assert len(run.held_out) == 2 and len(run.clips) == 22
    assert not {c.video for c in run.held_out} & {c.video for c in run.clips}

    def score():
        run.transformer.eval()
        losses = held_out_losses(run.transformer, run.held_out, [0.25, 0.75], 0, run.model_dtype, "cpu")
        run.transformer.train()
        return losses

    before = score()
    assert list(before) == ["val/loss_9f"] and before == score()
    for _ in range(2):  # the first step's learning rate is 0 (warm-up)
        train_step(run, [next(run.batches)])
    assert score() != before


def test_validation_says_when_it_has_nothing_to_do_and_refuses_what_it_cannot(composed, tmp_path, capsys):
    from radial_lora.configs.schema import ConfigError
    from radial_lora.train.loop import build

    cfg, resolved = composed("validation.every=1")  # no prompts, no held-out clips
    build(cfg, resolved)
    assert "no held-out clips (data.val_clips): nothing to validate" in capsys.readouterr().out
    from radial_lora.train.validation import check_validation

    cfg, _ = composed("validation.every=1", "validation.prompts=[a]", "trainer=zero3")
    with pytest.raises(ConfigError, match="validation sample videos render on rank 0 alone"):
        check_validation(cfg, text_encoder_loaded=True)
    cfg, _ = composed("validation.every=1", "validation.prompts=[a]")
    with pytest.raises(ConfigError, match="need the text encoder, which a latent cache"):
        check_validation(cfg, text_encoder_loaded=False)
    assert check_validation(cfg, text_encoder_loaded=True) is None
