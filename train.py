"""Baseline DeepRAFT: the scanner learns to tell [x, x'] apart as they are (no noise, no corruptions).

    python train.py --run_name baseline --max_step 200000 --train_path PATH/mirflickr
"""
from engine import build_parser, plain_view, run_cli


def main(argv=None):
    parser = build_parser(__doc__)
    args = parser.parse_args(argv)
    run_cli(parser, args, plain_view)


if __name__ == "__main__":
    main()
