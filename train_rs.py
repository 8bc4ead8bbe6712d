"""DeepRAFT with randomized smoothing: the scanner learns to tell [x, x'] apart under Gaussian noise,
[x, x'] + N(0, std²) (the noisy pair only), so that it can be certified with `python -m smoothing.certify` at
sigma = std.

    python train_rs.py --run_name rs050 --max_step 200000 --std 0.5 --train_path PATH/mirflickr
"""
from engine import build_parser, run_cli
from engine.cli import parse as parse_flags
from smoothing import add_std_flag, gaussian_noise_view


def parse(argv=None):
    """(parser, args, views): the flags and the views this script trains on (bench.py times them too)."""
    parser = build_parser(__doc__, "train_rs")
    add_std_flag(parser.add_argument_group("randomized smoothing"))
    args = parse_flags(parser, argv)
    return parser, args, gaussian_noise_view(args.std, args.rs_w)


def main(argv=None):
    return run_cli(*parse(argv))


if __name__ == "__main__":
    main()
