"""The ``manualbp`` command line.

    manualbp verify     the hand-derived gradients against native autograd and float64 finite differences,
                        over a matrix of configurations (exit status 1 on any failure)
    manualbp explain    one forward and backward pass of a tiny network, every quantity of the notes'
                        worked example with its value and a check against autograd

Testing hook: ``--inject-bug NAME`` (both commands) breaks one hand-derived formula for the run
(``sigmoid_missing_derivative`` or ``weight_grad_transposed``, see ``manualbp.verify.BUGS``), to show that
the checks catch it; the test suite uses it to prove that ``manualbp verify`` exits 1 on a wrong backward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn, Optional, Sequence

from . import __version__


class _Parser(argparse.ArgumentParser):
    """Usage errors as one clear line (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _csv(kind: type = str):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    from .functional import ACTIVATIONS
    from .verify import BUGS, DTYPES, LOSSES

    parser = _Parser(
        prog="manualbp",
        description="Hand-derived backpropagation for PyTorch: verify the manual gradients and explain them.",
    )
    parser.add_argument("--version", action="version", version=f"manualbp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bug_help = f"testing hook: break one hand-derived formula for this run ({', '.join(BUGS)}); the checks must fail"

    v = sub.add_parser(
        "verify",
        help="check the hand-derived gradients over a matrix of configurations",
        description=(
            "For every configuration (activation x loss x depth x dtype x device): the manual MLP against its "
            "native nn.Sequential twin (loss, output, every gradient and every intermediate of the two-pass "
            "algorithm) and float64 finite differences (gradcheck and gradgradcheck). Exit status 1 on any failure."
        ),
    )
    v.add_argument(
        "--activations",
        type=_csv(),
        default=["sigmoid", "tanh", "relu", "leaky_relu", "identity"],
        help=f"comma-separated, from {','.join(sorted(ACTIVATIONS))} (default: all)",
    )
    v.add_argument("--losses", type=_csv(), default=list(LOSSES), help=f"from {','.join(LOSSES)} (default: all)")
    v.add_argument("--depths", type=_csv(int), default=[1, 2], help="numbers of hidden layers (default: 1,2)")
    v.add_argument(
        "--dtypes",
        type=_csv(),
        default=["float64", "float32"],
        help=f"from {','.join(DTYPES)} (default: float64,float32)",
    )
    v.add_argument("--devices", type=_csv(), default=None, help="from cpu,cuda (default: every available device)")
    v.add_argument("--width", type=int, default=4, help="hidden layer width (default: 4)")
    v.add_argument("--batch", type=int, default=4, help="examples per batch (default: 4)")
    v.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: 0)")
    v.add_argument("--no-finite-differences", action="store_true", help="skip the float64 gradcheck/gradgradcheck")
    v.add_argument("--json", metavar="PATH", help="write every configuration's full report as JSON")
    v.add_argument("--inject-bug", choices=sorted(BUGS), help=bug_help)

    e = sub.add_parser(
        "explain",
        help="every quantity of the notes' worked example, on a tiny network",
        description=(
            "One forward and backward pass of a tiny network, printed in the order of the notes "
            "(forward: z_i, a_i, o_k, L; backward: dL/dL = 1, dL/do_k, dL/dw2_ki, dL/db2_k, dL/da_i, dL/dz_i, "
            "dL/dw1_ij, dL/db1_i), each value with a check against native autograd."
        ),
    )
    e.add_argument(
        "--widths", type=_csv(int), default=[2, 3, 2], help="layer sizes input,hidden...,output (default: 2,3,2)"
    )
    e.add_argument("--activation", default="sigmoid", choices=sorted(ACTIVATIONS), help="default: sigmoid")
    e.add_argument("--loss", default="squared_error", choices=list(LOSSES), help="default: squared_error")
    e.add_argument("--seed", type=int, default=0, help="seed of the weights and the example (default: 0)")
    e.add_argument("--format", default="text", choices=["text", "markdown", "json"], help="default: text")
    e.add_argument("--inject-bug", choices=sorted(BUGS), help=bug_help)
    return parser


def _progress_bar(total: int):
    """A tqdm bar on stderr, silent when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc="verify", unit="config", disable=None, leave=False, file=sys.stderr)


def run_verify(args: argparse.Namespace) -> int:
    from .verify import available_devices, verify_matrix

    devices = args.devices or available_devices()
    total = len(args.activations) * len(args.losses) * len(args.depths) * len(args.dtypes) * len(devices)
    bar = _progress_bar(total)
    try:
        result = verify_matrix(
            args.activations,
            args.losses,
            args.depths,
            args.dtypes,
            devices,
            finite_differences=not args.no_finite_differences,
            width=args.width,
            batch=args.batch,
            seed=args.seed,
            bug=args.inject_bug,
            progress=lambda r: bar.update(1),
        )
    finally:
        bar.close()
    if args.inject_bug:
        print(f"(testing hook: injected bug {args.inject_bug!r}; the checks are expected to fail)")
    print(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2)
        print(f"full results: {args.json}")
    return 0 if result.ok else 1


def _can_encode(text: str) -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def run_explain(args: argparse.Namespace) -> int:
    from .verify import explain, inject_bug

    with inject_bug(args.inject_bug):
        result = explain(args.widths, args.activation, args.loss, args.seed)
    if args.format == "json":
        print(json.dumps(result.to_dict(), indent=2))
    elif args.format == "markdown":
        print(result.to_markdown())
    else:
        marks = ("✓", "✗") if _can_encode("✓✗") else ("ok", "X")
        print(result.to_text(*marks))
    return 0 if result.ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "verify":
            return run_verify(args)
        return run_explain(args)
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, OSError) as exc:  # bad input: one clear line, no traceback
        print(f"manualbp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
