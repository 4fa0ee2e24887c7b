"""The refit's robust settings (issue 14, part 2) side by side on three domains, one model load per setting.

Each variant is pruned from the dense model (restored before every row) with the same seeded calibration windows
of the built-in corpus, then scored on the same windows of: the built-in held-out split (in-domain), `licenses`
(the out-of-domain test text) and `manpages` (the validation domain the settings are chosen on). One JSON line per
row is appended to --out as it finishes, so a killed run keeps its rows.

    python bench/refit_robust.py --setting 0.7 --nsamples 32 --max-eval-windows 16 --out rr70.jsonl
    python bench/refit_robust.py --setting 2:4 --variants sparsegpt,refit,shrink0.5 --out rr24.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

VARIANTS = {
    "sparsegpt": {},
    "refit": {"refine": ["refit"]},
    "ridge1": {"refine": ["refit"], "refit_ridge": 1.0},
    "ridge0.1": {"refine": ["refit"], "refit_ridge": 0.1},
    "shrink0.5": {"refine": ["refit"], "refit_shrink": 0.5},
    "shrink0.2": {"refine": ["refit"], "refit_shrink": 0.2},
    "iters5": {"refine": ["refit"], "refit_iters": 5},
    "rdamp0.1": {"refine": ["refit"], "refit_damp": 0.1},
    "fit200": {"refine": ["refit"], "refit_iters": 200, "refit_damp": 0.001},  # the other way: fit harder
    "dense": None,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="0.7", help="a sparsity (unstructured) or an N:M pattern")
    ap.add_argument("--variants", default="sparsegpt,refit,ridge1,shrink0.5,iters5,rdamp0.1",
                    help=f"from: {', '.join(VARIANTS)}")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-eval-windows", type=int, default=None, help="per domain")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True, help="JSON-lines file the rows are appended to")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    import torch

    import sparsecraft
    from sparsecraft.api import calibration_ids, make_recipe
    from sparsecraft.domains import VALIDATION_DATA, load_sources, windows_for
    from sparsecraft.evaluate import perplexity

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = sparsecraft.load_model("default")
    splits = sparsecraft.load_text("builtin")
    sources = load_sources(["builtin", "licenses", VALIDATION_DATA], splits, defaults_optional=False)
    windows = windows_for(sources, tokenizer, args.seqlen, args.max_eval_windows)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pattern = ({"pattern": args.setting} if ":" in args.setting
               else {"pattern": "unstructured", "sparsity": float(args.setting)})
    for name in names:
        model.load_state_dict(dense)
        extra = VARIANTS[name]
        recipe = None
        if extra is not None:
            recipe = make_recipe({"method": "sparsegpt", "nsamples": args.nsamples, "seqlen": args.seqlen,
                                  "seed": args.seed, **pattern, **extra})
            sparsecraft.prune(model, calibration_ids(splits, tokenizer, recipe), recipe, progress=False)
        ppl = {n: perplexity(model, w, batch_size=4, progress=False) for n, w in windows.items()}
        row = {"setting": args.setting, "name": name, "recipe": extra, "nsamples": args.nsamples,
               "seqlen": args.seqlen, "eval_windows": {n: int(w.shape[0]) for n, w in windows.items()}, "ppl": ppl}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
