"""A folder of synthetic captioned clips (the demo's generator), for trying the trainer without
real videos: other lengths, other sizes."""

from __future__ import annotations

from radial_lora.data.demo_videos import generate_demo_videos


def main(argv: list[str] | None = None) -> None:
    """`python -m scripts.synthetic_videos DIR [--clips N --frames MIN MAX --size PX]`: a synthetic dataset.

    For trying the trainer at other lengths without real videos, e.g. 4x-length clips for a GPU
    speed or memory run (`--frames 321 340`; the loader resizes the square clips to data.sizes).
    """
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", help="a new folder to write (one this command made before is kept as it is)")
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--frames", type=int, nargs=2, default=[33, 65], metavar=("MIN", "MAX"))
    parser.add_argument("--size", type=int, default=64, help="side of the square frames, pixels")
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.clips < 1 or not 1 <= args.frames[0] <= args.frames[1]:
        parser.error("--clips must be >= 1 and --frames MIN MAX must satisfy 1 <= MIN <= MAX")
    try:
        root = generate_demo_videos(
            args.root, args.clips, args.size, args.frames[0], args.frames[1], args.fps, args.seed
        )
    except FileExistsError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{len(list(root.glob('*.mp4')))} clips in {root}")


if __name__ == "__main__":
    main()
