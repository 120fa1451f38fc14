"""Find, download and check the ISBI 2012 stacks, or check a lab's own pages (data.py's command line).

    python data.py fetch                  # find the stacks, or download them where they are looked for
    python data.py download [--dest DIR]  # download the stacks that are not in DIR yet
    python data.py check [DIR]            # validate what is there and print the data report
    python data.py check --images A --labels B --split 0.2   # the same for your own pages (data.load_pages)
    python data.py example DEST           # write the README's example folder pair of PNGs
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

import cli
import data
import files


def make_example(dest: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                 size: tuple[int, int] = (700, 900), pages: tuple[int, ...] = tuple(range(6))) -> Path:
    """Write ISBI training `pages` resized to `size` (height, width) as a folder pair of PNGs,
    dest/images/page-NN.png and dest/masks/page-NN.png (0 = membrane, 255 = cell); return `dest`."""
    from PIL import Image

    stack, masks = data.load_isbi(data_dir)
    dest = Path(dest)
    for folder in ("images", "masks"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    zoom = (size[0] / stack.shape[1], size[1] / stack.shape[2])
    for i in pages:
        picture = np.clip(ndimage.zoom(stack[i].astype(np.float32), zoom, order=1), 0, 255).round().astype(np.uint8)
        mask = ndimage.zoom(masks[i], zoom, order=0)  # nearest neighbour: masks stay two-valued
        for folder, array in (("images", picture), ("masks", mask)):
            files.write_atomic(dest / folder / f"page-{i:02d}.png", Image.fromarray(array).save)
    return dest


def build_parser() -> argparse.ArgumentParser:
    """Return data.py's command line: the download, check and example commands."""
    parser = cli.parser(__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="find the ISBI 2012 stacks, downloading them if they are missing")
    fetch.add_argument("--data-dir", help=f"where to look and download to (default: ${data.DATA_ENV}, else data/)")
    get = sub.add_parser("download", help="download the ISBI 2012 stacks that are not in DEST yet")
    get.add_argument("--dest", default=str(data.DEFAULT_DATA_DIR))
    get.add_argument("--url", help=f"the folder URL of the three files (default: ${data.URL_ENV}, "
                                   f"else {data.DOWNLOAD_URL})")
    check = sub.add_parser("check", help="validate the stacks (or your own data) and print the data report")
    check.add_argument("data_dir", nargs="?")
    for flag in ("--images", "--labels", "--val-images", "--val-labels", "--split"):
        check.add_argument(flag)
    check.add_argument("--membrane-value", type=int)
    check.add_argument("--allow-unpaired", action="store_true")
    check.add_argument("--seed", type=int, default=0)
    example = sub.add_parser("example", help="write ISBI pages at 700x900 as a folder pair of PNGs (README)")
    example.add_argument("dest")
    example.add_argument("--data-dir")
    return parser


def run(args: argparse.Namespace) -> None:
    """Carry out the data command the parsed command line names; print what it did."""
    if args.command == "fetch":
        folder, downloaded = data.ensure_data(args.data_dir)
        print(f"data {'downloaded to' if downloaded else 'found in'} {folder}")
    elif args.command == "download":
        print(f"data ready in {data.download(args.dest, args.url)}")
    elif args.command == "example":
        dest = make_example(args.dest, args.data_dir)
        print(f"wrote {dest / 'images'} and {dest / 'masks'}")
    else:
        if args.images is None:
            data.load_isbi(args.data_dir)  # the ISBI stacks' own checks first
        _, report = data.load_pages(args.images, args.labels, args.val_images, args.val_labels, args.split,
                                    args.membrane_value, args.allow_unpaired, args.data_dir, args.seed)
        print(data.format_report(report))


def main(argv: list[str] | None = None) -> int:
    """Return the exit code of the data command in `argv` (default: sys.argv)."""
    return cli.run(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
