"""Activation sparsity on the default model: held-out perplexity at each level for every method, in one process on
the same calibration and evaluation windows, with NNCF's `sparsify_activations` (torch backend) side by side.

Rows per level: teal (uniform), teal (greedy), cats, chess, wina, sparsecraft's best (wina scores with TEAL's greedy
allocation), nncf. Columns: perplexity on the calibration source's held-out split and on each out-of-domain source
(licenses by default) and their geometric mean, the measured activation sparsity per projection on the evaluation
windows (every token sparsified), and the share of the blocks' weight bytes a token skips.

    python bench/activation.py --levels 0.25,0.4,0.5 --markdown --json act.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

ROWS = {  # name -> (method, allocation)
    "teal": ("teal", "uniform"),
    "teal greedy": ("teal", "greedy"),
    "cats": ("cats", "uniform"),
    "chess": ("chess", "uniform"),
    "wina": ("wina", "uniform"),
    "sparsecraft best (wina greedy)": ("wina", "greedy"),
}


def nncf_row(model, ids, level: float):
    """NNCF's experimental activation sparsifier on every *_proj linear layer of a copy of `model`."""
    import nncf
    from nncf.experimental.torch.sparsify_activations import TargetScope, sparsify_activations

    sparse = copy.deepcopy(model)
    dataset = nncf.Dataset([ids[i:i + 1] for i in range(ids.shape[0])], lambda x: {"input_ids": x})
    return sparsify_activations(sparse, dataset, {TargetScope(patterns=[".*_proj.*"]): level})


def main() -> int:
    import torch

    import sparsecraft
    from sparsecraft.activation import activate, counting, remove
    from sparsecraft.activation.sites import short
    from sparsecraft.data import calibration_batch, tokenize
    from sparsecraft.domains import eval_specs, load_sources, windows_for
    from sparsecraft.evaluate import perplexity

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="builtin")
    p.add_argument("--eval-data", default="licenses")
    p.add_argument("--levels", default="0.25,0.4,0.5")
    p.add_argument("--rows", default=",".join(ROWS) + ",nncf", help="comma-separated row names")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-eval-windows", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="rewritten after every row")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [float(x) for x in args.levels.split(",")]
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    model, tokenizer = sparsecraft.load_model(args.model)
    splits = sparsecraft.load_text(args.data)
    ids = calibration_batch(tokenize(tokenizer, splits.calibration), args.nsamples, args.seqlen, args.seed)
    sources = load_sources(eval_specs([args.eval_data], args.data), splits)
    windows = windows_for(sources, tokenizer, args.seqlen, args.max_eval_windows)

    def score(m) -> dict:
        ppl = {name: perplexity(m, w, progress=False) for name, w in windows.items()}
        geo = float(torch.tensor(list(ppl.values())).log().mean().exp())
        return {"domains": ppl, "perplexity": next(iter(ppl.values())), "geomean": geo}

    results = {"dense": score(model), "rows": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    print(f"dense: {results['dense']}", file=sys.stderr, flush=True)
    for level in levels:
        for name in wanted:
            row = {"name": name, "level": level}
            if name == "nncf":
                try:
                    row.update(score(nncf_row(model, ids, level)))
                except Exception as exc:  # noqa: BLE001 - the external anchor may not run; say why
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            else:
                method, allocation = ROWS[name]
                _, report = activate(model, ids, method=method, sparsity=level, allocation=allocation,
                                     progress=False)
                with counting(model) as counter:
                    row.update(score(model))
                kinds: dict[str, list[float]] = {}
                for module, value in counter.result().items():
                    kinds.setdefault(short(module), []).append(value or 0.0)
                row["measured_eval"] = {k: sum(v) / len(v) for k, v in kinds.items()}
                row["measured_calibration"] = report.measured
                row["skipped_share_of_block_weights"] = report.bytes["skipped_share_of_dense"]
                row["seconds"] = report.seconds
                remove(model)
            results["rows"].append(row)
            save()
            print(json.dumps(row), file=sys.stderr, flush=True)
    dense = results["dense"]
    names = list(dense["domains"])
    print("dense: " + ", ".join(f"{n} {dense['domains'][n]:.3f}" for n in names) + f", geomean {dense['geomean']:.3f}")
    head = ["level", "method", *[f"ppl {n}" for n in names], "geomean", "Δ held-out vs dense", "skipped weights",
            "measured per projection (eval)"]
    lines = [head]
    for r in results["rows"]:
        if "error" in r:
            lines.append([f"{r['level']:.0%}", r["name"], "failed: " + r["error"], *[""] * (len(head) - 3)])
            continue
        per = ", ".join(f"{k} {v:.0%}" for k, v in r.get("measured_eval", {}).items()) or "-"
        skipped = f"{r['skipped_share_of_block_weights']:.1%}" if "skipped_share_of_block_weights" in r else "-"
        lines.append([f"{r['level']:.0%}", r["name"], *[f"{r['domains'][n]:.3f}" for n in names],
                      f"{r['geomean']:.3f}", f"{r['perplexity'] - dense['perplexity']:+.3f}", skipped, per])
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for line in lines[1:]:
            print("| " + " | ".join(line) + " |")
    else:
        for line in lines:
            print("  ".join(str(c) for c in line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
