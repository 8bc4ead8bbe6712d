"""Baseline DeepRAFT: the scanner learns to tell [x, x'] apart as they are (no noise, no corruptions).

    python train.py --run_name baseline --max_step 200000 --train_path PATH/mirflickr
"""
from engine import build_parser, plain_view, run_cli


def parse(argv=None):
    """(parser, args, views): the flags and the views this script trains on (bench.py times them too)."""
    parser = build_parser(__doc__)
    return parser, parser.parse_args(argv), plain_view


def main(argv=None):
    return run_cli(*parse(argv))


if __name__ == "__main__":
    main()
