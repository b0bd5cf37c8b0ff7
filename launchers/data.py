"""guard-fast data prepare-digits | to-ffcv | inspect: dataset preparation commands."""

from __future__ import annotations

import argparse
import sys

from guard_fast.runtime.errors import GuardFastError
from launchers.cli import run


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like config errors
        raise GuardFastError(f"{self.prog}: {message}")


def main(argv: list[str]) -> int:
    p = _Parser(prog="guard-fast data", description="dataset preparation")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("prepare-digits", help="write scikit-learn's handwritten digits as an RGB PNG ImageFolder")
    d.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    d.add_argument("--size", type=int, default=32, help="image side in pixels (8x8 originals upscaled, bicubic)")
    d.add_argument("--val-fraction", type=float, default=0.2, help="fraction of each class held out for val")
    d.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    f = sub.add_parser("to-ffcv", help="convert an ImageFolder to an FFCV .beton file")
    f.add_argument("--src", required=True, help="ImageFolder root (class-per-folder)")
    f.add_argument("--out", required=True, help="output .beton path")
    f.add_argument("--mode", choices=("raw", "jpg", "smart", "proportion"), default="raw",
                   help="image storage: raw (lossless pixels), jpg, or FFCV's smart/proportion mixes")
    f.add_argument("--max-resolution", type=int, default=0, help="longest side after resize, pixels (0 = keep)")
    f.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 for jpg/smart/proportion")
    f.add_argument("--workers", type=int, default=2, help="writer processes")
    args = p.parse_args(argv)

    if args.cmd == "prepare-digits":
        from guard_fast.data.digits import prepare_digits

        if args.size < 8:
            raise GuardFastError(f"--size {args.size}: must be >= 8 (the originals are 8x8)")
        m = prepare_digits(args.out, args.size, args.val_fraction, args.seed)
        print(f"digits: {m['train']} train + {m['val']} val images, {args.size} px, 10 classes -> {args.out}")
    elif args.cmd == "to-ffcv":
        from guard_fast.data.ffcv_backend import write_beton

        n = write_beton(args.src, args.out, mode=args.mode, max_resolution=args.max_resolution,
                        jpeg_quality=args.jpeg_quality, workers=args.workers)
        print(f"wrote {n} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast data"))
