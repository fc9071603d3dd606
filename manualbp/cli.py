"""The ``manualbp`` command line.

    manualbp verify     the hand-derived gradients against native autograd and float64 finite differences,
                        over a matrix of configurations (exit status 1 on any failure)
    manualbp explain    one forward and backward pass of a tiny network, every quantity of the notes'
                        worked example with its value and a check against autograd
    manualbp check      the conformance suite (manualbp.verify.check_function) on your own autograd.Function,
                        ``manualbp check mypkg.ops:MyLinear --shapes 8x3,4x3,4``, or on manualbp's own
                        (``--builtin``); exit status 1 when a property fails
    manualbp check-intermediates
                        a script's hand-written backward (dNAME for each NAME), gradient by gradient, against
                        autograd, with the bug site; exit status 1 when a gradient is wrong

Testing hook: ``--inject-bug NAME`` (both commands) breaks one hand-derived formula for the run (any name of
``manualbp.verify.BUGS``; ``verify --bugs`` runs every one against every path, the mutation matrix), to show that
the checks catch it; the test suite uses it to prove that ``manualbp verify`` exits 1 on a wrong backward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn, Optional, Sequence

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
    parser = _Parser(
        prog="manualbp",
        description="Hand-derived backpropagation for PyTorch: verify the manual gradients and explain them.",
    )
    parser.add_argument("--version", action="version", version=f"manualbp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_verify_parser(sub)
    _add_explain_parser(sub)
    _add_check_parser(sub)
    _add_check_intermediates_parser(sub)
    _add_lr_find_parser(sub)
    return parser


def _bug_help() -> str:
    from .verify import BUGS

    return f"testing hook: break one hand-derived formula for this run ({', '.join(BUGS)}); the checks must fail"


def _add_verify_parser(sub) -> None:
    from .registry import activation_names, loss_names
    from .verify import BUGS, DTYPES

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
        default=list(activation_names()),
        help=f"comma-separated, from {','.join(activation_names())} (default: all)",
    )
    v.add_argument(
        "--losses", type=_csv(), default=list(loss_names()), help=f"from {','.join(loss_names())} (default: all)"
    )
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
    v.add_argument("--inject-bug", choices=sorted(BUGS), help=_bug_help())
    v.add_argument(
        "--bugs",
        action="store_true",
        help="the mutation matrix instead: every bug of the catalogue against every execution path; prints per path "
        "how many the checks caught (exit status 1 when a reached bug is missed)",
    )


def _add_explain_parser(sub) -> None:
    from .registry import activation_names, loss_names
    from .verify import BUGS

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
    e.add_argument("--activation", default="sigmoid", choices=activation_names(), help="default: sigmoid")
    e.add_argument("--loss", default="squared_error", choices=loss_names(), help="default: squared_error")
    e.add_argument("--seed", type=int, default=0, help="seed of the weights and the example (default: 0)")
    e.add_argument("--format", default="text", choices=["text", "markdown", "json"], help="default: text")
    e.add_argument("--inject-bug", choices=sorted(BUGS), help=_bug_help())


def _add_check_intermediates_parser(sub) -> None:
    i = sub.add_parser(
        "check-intermediates",
        help="your hand-written backward, gradient by gradient, against autograd (the backprop-ninja check)",
        description=(
            "Run SCRIPT (a Python file with a forward pass and your manual backward, as in 'becoming a backprop "
            "ninja') recording every tensor that requires grad under its variable's name; then compare each "
            "gradient dNAME the script computed with autograd's gradient of the loss with respect to NAME, print "
            "the table (exact, approx, max diff) and the bug site. loss.backward() in the script keeps the graph. "
            "Exit status 1 when a gradient is wrong."
        ),
    )
    i.add_argument("script", help="path to a Python file")
    i.add_argument("--loss", default="loss", help="the script's variable holding the scalar loss (default: loss)")
    i.add_argument("--format", default="text", choices=["text", "json"], help="default: text")


def _add_check_parser(sub) -> None:
    from .verify import CHECKS

    c = sub.add_parser(
        "check",
        help="conformance of a custom autograd.Function (gradcheck, double backward, transforms, layouts, ...)",
        description=(
            "Run manualbp.verify.check_function on TARGET (module.path:Name or path/to/file.py:Name: an "
            "autograd.Function subclass or a callable built on one) with random float64 inputs of the given "
            "shapes. One row per property: pass, fail or skip, the largest error, and a hint how to fix a "
            f"failure. Properties: {', '.join(CHECKS)}. Exit status 1 when any fails."
        ),
    )
    c.add_argument("target", nargs="?", help="module.path:Name or file.py:Name")
    c.add_argument(
        "--shapes",
        type=_csv(),
        help="the tensor inputs in order: 8x3 (float64, requires grad), 8x3:nograd, 8:int10 (int64 in [0,10)), scalar",
    )
    c.add_argument("--args", default="", help="Python literals passed after the tensors, e.g. \"'mean', True\"")
    c.add_argument("--skip", type=_csv(), default=[], help="properties to leave out, e.g. torch.compile,cuda")
    c.add_argument("--checks", type=_csv(), default=None, help="run only these properties")
    c.add_argument("--batched", type=_csv(int), default=None, help="positions of the inputs whose dim 0 is the batch")
    c.add_argument("--compile-backend", default="aot_eager", help="torch.compile backend, or none (default: aot_eager)")
    c.add_argument("--seed", type=int, default=0, help="seed of the inputs, cotangents and directions (default: 0)")
    c.add_argument("--builtin", action="store_true", help="check every Function of manualbp itself instead")
    c.add_argument("--format", default="text", choices=["text", "markdown", "json"], help="default: text")


def _progress_bar(total: int):
    """A tqdm bar on stderr, silent when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc="verify", unit="config", disable=None, leave=False, file=sys.stderr)


def run_verify(args: argparse.Namespace) -> int:
    from .verify import available_devices, mutation_matrix, verify_matrix

    if args.bugs:
        mutation = mutation_matrix()
        print(mutation)
        _write_results(args.json, mutation)
        return 0 if mutation.ok else 1

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
    _write_results(args.json, result)
    return 0 if result.ok else 1


def _write_results(path: Optional[str], result: Any) -> None:
    """``--json PATH``: the whole result (``to_dict()``) as JSON, and where it went."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2)
        print(f"full results: {path}")


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


def _load_target(target: str):
    """``module.path:Name`` or ``path/to/file.py:Name`` (Name may be dotted: ``MyFunction.apply``)."""
    import importlib
    import importlib.util

    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise ValueError(f"target: expected module.path:Name or file.py:Name, got {target!r}")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ValueError(f"target: no file {where!r}")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the user's own package in this directory
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"target: cannot import {where!r} ({e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"target: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _print_report(report, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(report.to_dict(), indent=2))
    elif fmt == "markdown":
        print(f"**{report.title}**\n")
        print("| property | result | max error | detail |\n|---|---|---|---|")
        for r in report:
            err = "-" if r.error is None else f"{r.error:.2e}"
            print(f"| {r.name} | {r.status} | {err} | {r.detail.replace('|', '/')} |")
        print(f"\n{report.summary()}")
    else:
        print(report)


def run_check(args: argparse.Namespace) -> int:
    import ast

    import torch

    from .verify.conformance import builtin_subjects, check_function, parse_input_spec, summary_table

    backend = None if args.compile_backend.lower() == "none" else args.compile_backend
    options = {"checks": args.checks, "compile_backend": backend, "seed": args.seed}
    if args.builtin:
        if args.target:
            raise ValueError("target: --builtin checks manualbp's own Functions; give no target with it")
        reports = []
        for name, fn, inputs, kw in _progress(builtin_subjects(args.seed), "check"):
            skip = {**{n: "skipped by the caller (--skip)" for n in args.skip}, **kw.pop("skip", {})}
            reports.append((name, check_function(fn, *inputs, skip=skip, **kw, **options)))
        if args.format == "json":
            print(json.dumps({name: r.to_dict() for name, r in reports}, indent=2))
        else:
            print(summary_table(reports, markdown=args.format == "markdown"))
        return 0 if all(r.ok for _, r in reports) else 1
    if not args.target or not args.shapes:
        raise ValueError("target and --shapes: expected `manualbp check module:Function --shapes 8x3,...` (or --builtin)")
    gen = torch.Generator().manual_seed(args.seed)
    tensors = [parse_input_spec(t, gen) for t in args.shapes]
    try:
        extra = ast.literal_eval(f"({args.args},)") if args.args.strip() else ()
    except (ValueError, SyntaxError):
        raise ValueError(f"--args: expected comma-separated Python literals, got {args.args!r}") from None
    report = check_function(_load_target(args.target), *tensors, *extra, skip=args.skip, batched=args.batched, **options)
    _print_report(report, args.format)
    return 0 if report.ok else 1


def run_check_intermediates(args: argparse.Namespace) -> int:
    from unittest import mock

    import torch

    from .verify.intermediates import record

    if not os.path.isfile(args.script):
        raise ValueError(f"script: no file {args.script!r}")
    with open(args.script, encoding="utf-8") as f:
        code = compile(f.read(), args.script, "exec")
    namespace: dict = {"__name__": "__main__", "__file__": args.script}
    backward = torch.Tensor.backward

    def keep_graph(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        return backward(self, gradient, True, create_graph, inputs)  # the comparison needs the graph

    with mock.patch.object(torch.Tensor, "backward", keep_graph), record(namespace=namespace) as rec:
        exec(code, namespace)
    loss = namespace.get(args.loss)
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"--loss: the script has no tensor named {args.loss!r} (pass --loss NAME)")
    for name in rec.names:  # a gradient dx computed in grad mode was recorded too: it is not an intermediate
        if name.startswith("d") and name[1:] in rec.names:
            rec.forget(name)
    report = rec.compare(loss, namespace)
    print(json.dumps(report.to_dict(), indent=2) if args.format == "json" else report)
    return 0 if report.ok else 1


def _progress(items: list, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="Function", disable=None, leave=False, file=sys.stderr)


def _lr_find_options(p: argparse.ArgumentParser, defaults: Optional[argparse.Namespace] = None) -> None:
    """The options of ``lr-find`` (on its subparser, and on the parser of what follows the first override)."""
    from .train.lr_finder import SUGGESTIONS

    d = vars(defaults) if defaults is not None else {}
    p.add_argument("--min-lr", type=float, default=d.get("min_lr", 1e-6), help="the first step's rate (default: 1e-6)")
    p.add_argument("--max-lr", type=float, default=d.get("max_lr", 10.0), help="the last step's rate (default: 10)")
    p.add_argument("--steps", type=int, default=d.get("steps", 100), help="minibatch steps (default: 100)")
    p.add_argument(
        "--suggestion",
        default=d.get("suggestion", "steep"),
        choices=list(SUGGESTIONS),
        help="steep (fastest descent against log lr), valley (fastai's default) or min10 (default: steep)",
    )
    p.add_argument(
        "--smoothing", type=float, default=d.get("smoothing", 0.98), help="beta of the loss's moving average (default: 0.98)"
    )
    p.add_argument(
        "--diverge-factor",
        type=float,
        default=d.get("diverge_factor", 4.0),
        help="stop when the smoothed loss exceeds this x its best (default: 4)",
    )
    p.add_argument("--plot", metavar="PATH", default=d.get("plot"), help="write the loss-vs-rate figure (png, pdf, svg)")
    p.add_argument("--json", metavar="PATH", default=d.get("json"), help="write the curve and the suggestions as JSON")
    p.add_argument(
        "--mark",
        metavar="LABEL=RATE",
        action="append",
        default=d.get("mark"),
        help="a rate to draw and tabulate beside the suggestion, e.g. --mark 2/lambda_max=0.58 (repeatable)",
    )


def _add_lr_find_parser(sub) -> None:
    p = sub.add_parser(
        "lr-find",
        help="the learning-rate range test (Smith; fastai's lr_find, Lightning's Tuner.lr_find) on a training config",
        description=(
            "Train the network of a training config (manualbp.train.run's, changed by Hydra-style KEY=VALUE "
            "overrides such as data=digits model.hidden=[64] optim.batch_size=32 backend=autograd) for one short "
            "run whose rate grows exponentially from --min-lr to --max-lr; print the suggested rate and the "
            "stop reason; optionally plot loss against rate and write the curve as JSON."
        ),
    )
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="config overrides (dotted keys)")
    _lr_find_options(p)


def _dotted_overrides(items: Sequence[str]) -> dict:
    """``["model.hidden=[64]", "data=digits"]`` -> ``{"model": {"hidden": [64]}, "data": "digits"}`` (values by YAML)."""
    import yaml

    config: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ValueError(f"override {item!r}: expected KEY=VALUE with a dotted KEY, e.g. optim.batch_size=32")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"override {item!r}: cannot parse the value {text!r} ({problem})") from None
        node = config
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[: depth + 1])} was already set to a value")
        if isinstance(node.get(parts[-1]), dict):
            raise ValueError(f"override {item!r}: {key} already has keys set by other overrides")
        node[parts[-1]] = value
    return config


def run_lr_find(args: argparse.Namespace) -> int:
    from .train.lr_finder import lr_find

    # the options may follow the overrides: parse what comes after the first override again
    rest = _Parser(prog="manualbp lr-find", add_help=False)
    rest.add_argument("overrides", nargs="*")
    _lr_find_options(rest, args)
    args = rest.parse_intermixed_args(args.overrides)
    marks = {}
    for item in args.mark or []:
        label, sep, value = item.rpartition("=")
        try:
            marks[label] = float(value)
        except ValueError:
            sep = ""
        if not sep or not label or not marks[label] > 0:
            raise ValueError(f"--mark: expected LABEL=RATE with a positive RATE, got {item!r}")
    result = lr_find(
        _dotted_overrides(args.overrides),
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        num_steps=args.steps,
        smoothing=args.smoothing,
        diverge_factor=args.diverge_factor if args.diverge_factor > 0 else None,
        suggestion=args.suggestion,
    )
    cfg = result.config
    print(
        f"lr-find: {cfg['data']['name']}, hidden {cfg['model']['hidden']} {cfg['model']['activation']}, "
        f"{cfg['optim']['name']} batch {cfg['optim']['batch_size']}, backend {cfg['backend']}: {result.stop_reason}"
    )
    print(result.table(marks))
    if args.plot:
        result.plot(args.plot, marks=marks)
        print(f"plot: {args.plot}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**result.to_dict(), "marks": marks}, f, indent=2)
        print(f"json: {args.json}")
    print(f"suggested learning rate ({result.method}): {result.suggestion if result.suggestion is not None else 'none'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "verify":
            return run_verify(args)
        if args.command == "check":
            return run_check(args)
        if args.command == "check-intermediates":
            return run_check_intermediates(args)
        if args.command == "lr-find":
            return run_lr_find(args)
        return run_explain(args)
    except BrokenPipeError:  # output piped into `head`: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, OSError) as exc:  # bad input: one clear line, no traceback
        print(f"manualbp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
