#!/usr/bin/env python3
"""Which estimator ``auto`` picks for every torchvision classifier and a list of timm architectures,
and what one diagonal costs as a multiple of one gradient (issue 20 item 5).

    nice -n 10 python scripts/coverage.py --out results/coverage      # ~20 min on 2 cores
    python scripts/coverage.py --only resnet18,vit_tiny_patch16_224    # a few models

For each architecture (``torchvision.models.list_models(module=torchvision.models)``: every
classification model; ``TIMM`` below when timm is installed, it is not a dependency): the model is
built with random weights, 10 classes, eval mode, BatchNorm running statistics randomised, float32, at
the smallest square input of ``SIZES`` its forward accepts (ViT-like models whose constructor fixes the
input size are built for a small one, ``TORCHVISION_CONFIG``/``TIMM``); then

* ``auto``'s choice (``resolve_estimator``): ``exact`` (the graph is piecewise linear in each weight,
  the Hessian diagonal), ``ggn`` (the Gauss-Newton diagonal) with the first operation that is not
  piecewise linear, or the refusal line of both;
* the time of one gradient of the mean CE over ``--samples`` samples (forward + backward) and of the
  diagonal of the chosen estimator over the same samples (one batch, the plan built beforehand),
  interleaved, median of ``--repeats``; the ratio is the cost in gradients.

Models above ``--max-params`` parameters are not built for real ("too big for this CPU"): their plan
is read on the meta device (the choice needs no weights), no timing. Each model has ``--time-limit``
seconds. Rows go to ``OUT/coverage.jsonl`` as they are measured (``--resume`` skips those present);
``OUT/coverage.md`` is the table with summary counts, regenerated from the jsonl at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nfm_cli.curvature.estimators import make_estimator, resolve_estimator  # noqa: E402
from nfm_cli.curvature.graph import clear_tensor_caches  # noqa: E402
from nfm_cli.errors import NfmError  # noqa: E402

SIZES = (32, 64, 96, 128, 160, 224, 299)
CLASSES = 10
# torchvision constructors whose input size is fixed at construction: built for a small input.
TORCHVISION_CONFIG = {
    "vit_b_16": dict(image_size=32), "vit_b_32": dict(image_size=32), "vit_l_16": dict(image_size=32),
    "vit_l_32": dict(image_size=32), "vit_h_14": dict(image_size=28),
}
# timm architectures: (name, constructor options); img_size where the constructor fixes the input size.
TIMM: list[tuple[str, dict]] = [
    ("resnet18", {}), ("resnet50d", {}), ("resnext26ts", {}), ("seresnet18", {}), ("wide_resnet50_2", {}),
    ("res2net50_14w_8s", {}), ("resnest14d", {}), ("skresnet18", {}), ("vgg11_bn", dict(mlp_ratio=0.0625)),
    ("densenet121", {}),
    ("dla34", {}), ("dpn68", {}), ("regnetx_002", {}), ("regnety_002", {}), ("regnetz_b16", {}),
    ("cspresnet50", {}), ("cspdarknet53", {}), ("repvgg_a0", {}), ("selecsls42b", {}), ("hrnet_w18_small", {}),
    ("inception_v3", {}), ("xception41", {}), ("nf_resnet26", {}), ("mobilenetv2_035", {}),
    ("mobilenetv3_small_050", {}), ("mnasnet_050", {}), ("efficientnet_b0", {}), ("efficientnet_lite0", {}),
    ("tinynet_e", {}), ("mixnet_s", {}), ("fbnetc_100", {}), ("spnasnet_100", {}), ("lcnet_050", {}),
    ("ghostnet_100", {}), ("rexnet_100", {}), ("hgnetv2_b0", {}), ("repvit_m1", {}), ("fastvit_t8", {}),
    ("convnext_atto", {}), ("convnextv2_atto", {}), ("edgenext_xx_small", {}), ("inception_next_tiny", {}),
    ("poolformer_s12", {}), ("vit_tiny_patch16_224", dict(img_size=32)), ("deit_tiny_patch16_224",
                                                                          dict(img_size=32)),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32)), ("cait_xxs24_224", dict(img_size=32)),
    ("xcit_nano_12_p16_224", dict(img_size=32)), ("eva02_tiny_patch14_224", dict(img_size=28)),
    ("pit_ti_224", dict(img_size=64)), ("levit_128s", dict(img_size=64)),
    ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=2)),
    ("swinv2_tiny_window8_256", dict(img_size=64, window_size=2)), ("pvt_v2_b0", {}),
    ("twins_svt_small", {}), ("coat_lite_tiny", {}), ("mobilevit_xxs", {}), ("mobilevitv2_050", {}),
    ("efficientformer_l1", dict(img_size=64)), ("efficientformerv2_s0", dict(img_size=64)),
    ("mixer_s16_224", dict(img_size=32)), ("resmlp_12_224", dict(img_size=32)), ("gmlp_ti16_224",
                                                                                 dict(img_size=32)),
    ("convmixer_768_32", {}), ("maxvit_tiny_tf_224", dict(img_size=64)), ("coatnet_0_rw_224",
                                                                          dict(img_size=64)),
    ("davit_tiny", {}), ("focalnet_tiny_srf", {}), ("visformer_tiny", dict(img_size=64)),
    ("sequencer2d_s", {}), ("tnt_s_patch16_224", dict(img_size=32)),
]


class OverTime(Exception):
    """The per-model time limit ran out."""


def _alarm(signum, frame):
    raise OverTime


def torchvision_models() -> list[tuple[str, str, dict]]:
    """(family, name, constructor options) of every torchvision classification model."""
    import torchvision
    return [("torchvision", n, TORCHVISION_CONFIG.get(n, {})) for n in torchvision.models.list_models(
        module=torchvision.models)]


def timm_models() -> list[tuple[str, str, dict]]:
    """(family, name, constructor options) of ``TIMM`` where timm is installed, else none."""
    try:
        import timm  # noqa: F401
    except ImportError:
        return []
    return [("timm", name, config) for name, config in TIMM]


def construct(family: str, name: str, config: dict) -> torch.nn.Module:
    """The architecture with random weights and ``CLASSES`` outputs, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if family == "torchvision":
            import torchvision
            model = torchvision.models.get_model(name, weights=None, num_classes=CLASSES, **config)
        else:
            import timm
            model = timm.create_model(name, pretrained=False, num_classes=CLASSES, **config)
    return model.eval()


def unweighted(family: str, name: str, config: dict) -> torch.nn.Module:
    """The architecture on the meta device (no memory, no init) where it builds there, else for real
    (some initialisers copy data)."""
    try:
        with torch.device("meta"):
            return construct(family, name, config)
    except Exception:  # noqa: BLE001
        return construct(family, name, config)


def randomize_batchnorm(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-trivial running statistics (fresh ones are 0 and 1, which hides scale errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def smallest_input(model: torch.nn.Module, samples: int, built_for: int | None = None) -> int:
    """The smallest size of ``SIZES`` (and ``built_for``, the size the constructor was given) whose square
    RGB input the forward accepts (ValueError if none)."""
    problem = None
    for size in sorted(set(SIZES) | ({built_for} if built_for else set())):
        try:
            with torch.no_grad():
                out = model(torch.zeros(samples, 3, size, size))
            if isinstance(out, torch.Tensor) and out.shape == (samples, CLASSES):
                return size
            problem = f"output {type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
        except Exception as exc:  # noqa: BLE001 -- too small an input raises anything
            problem = f"{type(exc).__name__}: {str(exc).strip()[:120]}"
    raise ValueError(f"no input size of {SIZES} accepted ({problem})")


def choice(model: torch.nn.Module) -> tuple[str, str]:
    """(``exact``/``ggn``/``refused``, the reason) of ``auto`` for ``model``."""
    try:
        used, why = resolve_estimator("auto", model)
    except NfmError as exc:
        return "refused", str(exc)
    return used, why or ""


def timings(model, used: str, x: torch.Tensor, y: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of one gradient and of one diagonal (interleaved, after a warm-up each), and the
    seconds of building the estimator (tracing and planning, once per run)."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    est = make_estimator(used, model, x, y, "ce", batch_size=len(y))
    plan = time.perf_counter() - start

    def gradient():
        clear_tensor_caches(model)     # timm's eval-mode attention-bias caches keep the last forward's graph
        torch.autograd.grad(F.cross_entropy(model(x), y), params, allow_unused=True)   # aux heads: unused

    def diagonal():
        state = est.initial_state()
        for unit in range(est.units_total):
            est.run_unit(unit, state)
        est.finish(state)
    times = {"gradient": [], "diagonal": []}
    for fn in (gradient, diagonal):
        fn()
    for _ in range(repeats):
        for name, fn in (("gradient", gradient), ("diagonal", diagonal)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {"gradient_s": statistics.median(times["gradient"]), "diagonal_s": statistics.median(times["diagonal"]),
            "plan_s": plan}


def probe(row: dict, args) -> None:
    """Fill ``row`` (family, name, config) in as it goes (see the module docstring)."""
    family, name, config = row["family"], row["name"], row["config"]
    shell = unweighted(family, name, config)
    count = sum(p.numel() for p in shell.parameters())
    row["params"] = count
    if count > args.max_params:
        row["auto"], row["why"] = choice(shell)
        row["note"] = f"not timed: {count / 1e6:.0f}M parameters, too big for this CPU (--max-params)"
        return
    torch.manual_seed(0)
    model = randomize_batchnorm(construct(family, name, config))
    row["input"] = smallest_input(model, args.samples, config.get("img_size") or config.get("image_size"))
    row["auto"], row["why"] = choice(model)
    if row["auto"] == "refused":
        return
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(args.samples, 3, row["input"], row["input"], generator=gen)
    y = torch.randint(0, CLASSES, (args.samples,), generator=gen)
    row.update(timings(model, row["auto"], x, y, args.repeats))


def measured(family: str, name: str, config: dict, args) -> dict:
    """``probe`` under the time limit; failures become rows saying what failed."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.time_limit)
    start = time.perf_counter()
    row = {"family": family, "name": name, "config": config}
    try:
        probe(row, args)
    except OverTime:
        row["note"] = f"over the time limit of {args.time_limit} s on this CPU"
    except Exception as exc:  # noqa: BLE001 -- the table reports whatever breaks
        text = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else ""
        row["note"] = f"{type(exc).__name__}: {text}"
    finally:
        signal.alarm(0)
    row["wall_s"] = time.perf_counter() - start
    return row


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _input(row: dict) -> str:
    size = row.get("input")
    built = ", ".join(f"{k}={v}" for k, v in row["config"].items())
    return (f"{size}x{size}" if size else "-") + (f" (built with {built})" if built else "")


def _status(row: dict) -> str:
    if "diagonal_s" in row:
        return row["auto"]
    if "auto" in row and row["auto"] != "refused" and "note" in row:
        return f"{row['auto']} (not timed)"
    return row.get("auto", "error") if "note" not in row or "auto" in row else "error"


def markdown(rows: list[dict], header: str) -> str:
    """The table and its summary counts."""
    lines = [header, "", "| family | architecture | params (M) | input | auto | why (first non-piecewise-linear "
             "operation, or the refusal) | gradient (ms/sample) | diagonal / gradient |", "|---|---|---:|---|---|---|"
             "---:|---:|"]
    for row in rows:
        why = row.get("why", "")
        for said in (": using the Gauss-Newton diagonal (ggn), not the Hessian's", " (not piecewise linear, or not on "
                     "the list of supported operations)", " (not piecewise linear, or not a supported layer type)"):
            why = why.replace(said, "")
        why = "piecewise linear" if row.get("auto") == "exact" else why
        why = "; ".join(t for t in (why, row.get("note", "")) if t)
        grad = f"{1000 * row['gradient_s'] / row['samples']:.1f}" if "gradient_s" in row else "-"
        ratio = f"{row['diagonal_s'] / row['gradient_s']:.1f}" if "diagonal_s" in row else "-"
        params = f"{row['params'] / 1e6:.1f}" if "params" in row else "-"
        lines.append(f"| {row['family']} | {row['name']} | {params} | {_cell(_input(row))} | {_status(row)} | "
                     f"{_cell(why)} | {grad} | {ratio} |")
    lines += ["", *summary(rows)]
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> list[str]:
    """Counts per family: measured by auto (exact, ggn), refused, errors, not timed."""
    out = []
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        picks = {k: sum(r.get("auto") == k for r in mine) for k in ("exact", "ggn", "refused")}
        timed = sum("diagonal_s" in r for r in mine)
        errors = sum("auto" not in r or ("note" in r and "diagonal_s" not in r and r.get("auto") != "refused"
                                          and "too big" not in r["note"]) for r in mine)
        out.append(f"- {family}: {len(mine)} architectures; auto picks exact for {picks['exact']}, ggn for "
                   f"{picks['ggn']}, refuses {picks['refused']}; {timed} diagonals measured and timed; "
                   f"{errors} failed or ran out of time after the choice (see the rows)")
    return out


README_BEGIN = "<!-- coverage table: generated by `python scripts/coverage.py --readme README.md` from " \
               "results/coverage/coverage.jsonl -->"
README_END = "<!-- end of coverage table -->"


def readme_table(rows: list[dict]) -> str:
    """README's summary of the rows: per family, what auto picks, the cost in gradients, the refusals."""
    lines = ["| family | architectures | exact | ggn | refused | timed | diagonal / gradient, exact: median "
             "(range) | ggn: median (range) |", "|---|---:|---:|---:|---:|---:|---|---|"]
    refusals = []
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        picks = {k: sum(r.get("auto") == k for r in mine) for k in ("exact", "ggn", "refused")}
        cells = []
        for kind in ("exact", "ggn"):
            ratios = [r["diagonal_s"] / r["gradient_s"] for r in mine if r.get("auto") == kind and "diagonal_s" in r]
            cells.append(f"{statistics.median(ratios):.1f} ({min(ratios):.1f}-{max(ratios):.1f})" if ratios else "-")
        lines.append(f"| {family} | {len(mine)} | {picks['exact']} | {picks['ggn']} | {picks['refused']} | "
                     f"{sum('diagonal_s' in r for r in mine)} | {cells[0]} | {cells[1]} |")
        refusals += [f"- {family} `{r['name']}`: {_cell(r.get('why', ''))}" for r in mine if r.get("auto") == "refused"]
    return "\n".join([README_BEGIN, *lines, "", *refusals, README_END])


def write_readme(path: Path, rows: list[dict]) -> None:
    """Replace the block between README_BEGIN and README_END in ``path`` by ``readme_table(rows)``."""
    text = path.read_text()
    begin, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text[:begin] + readme_table(rows) + text[end:])
    tmp.replace(path)


def read_rows(path: Path) -> list[dict]:
    """The rows of a coverage.jsonl (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    """Measure the architectures asked for, row by row, then write the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/coverage", help="folder of coverage.jsonl and coverage.md")
    parser.add_argument("--only", help="comma-separated architecture names")
    parser.add_argument("--family", choices=("all", "torchvision", "timm"), default="all")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-params", type=float, default=150e6)
    parser.add_argument("--time-limit", type=int, default=90)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="keep the rows already in coverage.jsonl")
    parser.add_argument("--readme", type=Path, help="also rewrite this README's coverage block from the rows")
    parser.add_argument("--tables-only", action="store_true", help="measure nothing: rewrite the tables from "
                        "coverage.jsonl")
    args = parser.parse_args()
    if args.tables_only:
        args.resume, args.only = True, ""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "coverage.jsonl"
    todo = (torchvision_models() if args.family in ("all", "torchvision") else []) + (
        timm_models() if args.family in ("all", "timm") else [])
    if args.only is not None:
        wanted = set(args.only.split(","))
        todo = [t for t in todo if t[1] in wanted]
    rows = read_rows(jsonl) if args.resume else []
    redo = {t[:2] for t in todo} if args.only else set()      # --only with --resume: measure those again
    done = {(r["family"], r["name"]) for r in rows} - redo
    started = time.time()
    with jsonl.open("a" if args.resume else "w") as f:
        for family, name, config in todo:
            if (family, name) in done:
                continue
            row = measured(family, name, config, args)
            row["samples"] = args.samples
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"{family} {name}: {_status(row)} {row.get('note', '')} ({row['wall_s']:.0f} s)", flush=True)
    rows = list({(r["family"], r["name"]): r for r in rows}.values())     # the last row of each model
    order = {(f, n): i for i, (f, n, _) in enumerate(torchvision_models() + timm_models())}
    rows.sort(key=lambda r: order.get((r["family"], r["name"]), len(order)))
    tmp = out / ".coverage.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(jsonl)
    header = (f"Last run: `python scripts/coverage.py {' '.join(sys.argv[1:])}` ({time.time() - started:.0f} s; "
              f"with --resume the rows of earlier runs are kept); the rows took {sum(r['wall_s'] for r in rows):.0f} s "
              f"in all; {args.samples} samples, {CLASSES} classes, float32, {args.threads} torch thread(s), median "
              f"of {args.repeats} interleaved runs; load average at the end {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores shared with other work; torch {torch.__version__}.")
    if args.tables_only:
        header = (out / "coverage.md").read_text().split("\n", 1)[0] if (out / "coverage.md").exists() else header
    tmp = out / ".coverage.md.tmp"
    tmp.write_text(markdown(rows, header))
    tmp.replace(out / "coverage.md")
    if args.readme:
        write_readme(args.readme, rows)


if __name__ == "__main__":
    main()
