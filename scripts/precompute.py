"""`python -m scripts.precompute [+experiment=NAME] data.cache=DIR`: encode the run's clips once.

Takes the same Hydra config as training, lists the same usable clips, and writes each clip's VAE
posterior (of the window at the start of the video) and its caption's text embedding into
safetensors shards under `data.cache`, with an index (data/cache.py). Launched with
`accelerate launch` / `torchrun` on several GPUs, each process encodes its share of the clips and
writes its own shards; process 0 merges the index. Clips that fail to decode are recorded in the
index (and skipped by training, counted by reason).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from radial_lora.configs.schema import CONFIG_DIR, ConfigError, register_configs, typed_config, validate

register_configs()
SHARD_BYTES = 2 * 2**30  # start a new shard file after about this many bytes


def precompute(cfg) -> Path:
    """Encode this process's share of the clips into cfg.data.cache; returns the index path."""
    from accelerate import PartialState
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from radial_lora.data.cache import INDEX, entry_key
    from radial_lora.data.dataset import ClipDataset
    from radial_lora.data.policy import RejectCounts
    from radial_lora.data.setup import catalog_for, meta_for
    from radial_lora.data.video import BadVideo
    from radial_lora.models.image_conditioning import MASK_CHANNELS, takes_first_frame
    from radial_lora.models.loading import load_pipeline, torch_dtype
    from radial_lora.train.step import encode_captions, first_frame_inputs, posterior_params

    if not cfg.data.cache:
        raise ConfigError("data.cache must name the folder to write the cache to")
    state = PartialState(cpu=not torch.cuda.is_available())
    root = Path(cfg.data.cache)
    root.mkdir(parents=True, exist_ok=True)
    with state.main_process_first():
        catalog = catalog_for(cfg.data, seed=cfg.train.seed)
    mine = catalog.clips[state.process_index :: state.num_processes]
    # Decoded exactly as training decodes them, at the window a cache holds (the start).
    clips = ClipDataset(mine, fps=cfg.data.fps, decode_threads=cfg.data.decode_threads, random_window=False)
    with state.main_process_first():
        pipe = load_pipeline(cfg.model, transformer=False, device=state.device)
    pipe.to(state.device)
    dtype = torch_dtype(cfg.data.cache_dtype)

    entries, failed, shard, shard_bytes, n_shards = {}, {}, {}, 0, 0

    def shard_name() -> str:
        return f"shard_r{state.process_index:03d}_{n_shards:04d}.safetensors"

    def flush():
        nonlocal shard, shard_bytes, n_shards
        if shard:
            save_file(shard, str(root / shard_name()))
            n_shards, shard, shard_bytes = n_shards + 1, {}, 0

    for i, clip in enumerate(tqdm(mine, desc="encode", disable=not state.is_main_process)):
        try:
            pixels = clips.load(i, epoch=0)["frames"]
        except BadVideo as bad:
            failed[clip.video] = bad.reason
            continue
        params = posterior_params(pipe.vae, pixels[None])[0]
        text = encode_captions(pipe, [clip.caption], cfg.model.max_text_tokens, state.device)[0]
        length = len(pipe.tokenizer(clip.caption, max_length=cfg.model.max_text_tokens, truncation=True).input_ids)
        key = f"r{state.process_index}_{i}"
        tensors = {"latent_params": params, "text": text[:length]}
        image = first_frame_inputs(pipe, None, pixels[None], state.device)
        if image:  # the mask is rebuilt when read (it is the same for every clip)
            tensors["condition"] = image["condition"][0, MASK_CHANNELS:]
            if image["image_embeds"] is not None:
                tensors["image_embeds"] = image["image_embeds"][0]
        for name, tensor in tensors.items():
            shard[f"{key}.{name}"] = tensor.to("cpu", dtype).contiguous()
            shard_bytes += shard[f"{key}.{name}"].nbytes
        entries[clip.video] = {**entry_key(clip), "shard": shard_name(), "key": key}
        if image:
            entries[clip.video]["image"] = [n for n in ("condition", "image_embeds") if n in tensors]
        if shard_bytes > SHARD_BYTES:
            flush()
    flush()

    part = root / f"index_r{state.process_index:03d}.json"
    part.write_text(json.dumps({"entries": entries, "failed": failed}))
    state.wait_for_everyone()
    index_file = root / INDEX
    if state.is_main_process:
        meta = meta_for(cfg) | {"first_frame": takes_first_frame(pipe)}  # an image-to-video model's inputs
        merged = {"meta": meta, "entries": {}, "failed": {}}
        for p in sorted(root.glob("index_r*.json")):
            partial = json.loads(p.read_text())
            merged["entries"].update(partial["entries"])
            merged["failed"].update(partial["failed"])
            p.unlink()
        index_file.write_text(json.dumps(merged, indent=1))
        failures = RejectCounts()
        for reason in merged["failed"].values():
            failures.add(reason)
        print(
            f"cached {len(merged['entries'])} clips into {root.resolve()}; failed to decode: {failures.summary()}; "
            f"rejected before encoding: {catalog.counts.summary()}"
        )
    state.wait_for_everyone()
    return index_file


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def run(dict_cfg: DictConfig) -> None:
    try:
        cfg = typed_config(dict_cfg)
        validate(cfg)
        precompute(cfg)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


def main() -> None:
    """The console entry point: the same overrides as training, the same own-videos rule."""
    from radial_lora.train.help import own_videos_overrides

    sys.argv = [sys.argv[0], *own_videos_overrides(sys.argv[1:])[0]]
    run()


if __name__ == "__main__":
    main()
