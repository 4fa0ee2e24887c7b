"""End-to-end greedy decode in one run: sparsecraft's lean loop on its CPU kernels vs torch generate vs llama.cpp,
all on the same weights, each row in its own subprocess (so its peak RSS is its own).

Models: `default` (SmolLM2-135M-Instruct, bf16) and `llama1b`, a LLaMA-shaped model with random weights (hidden
2048, intermediate 5632, 22 layers, 32 heads / 4 KV heads, 2048 positions, untied lm_head, ~1.1B parameters) with
SmolLM2's vocabulary (49,152) and tokenizer, so that llama.cpp's converter takes it; seeded, bf16; speed only.

Preparation, in --workdir (default ~/.cache/sparsecraft/bench-decode/<model>/; what is there is reused; every file
and directory is written atomically, so a killed run leaves nothing half-written):

* dense/                    the dense model as a Hugging Face directory with its tokenizer
* <method>-<level>/bitmask/ pruned to each --sparsities level (--method: magnitude for llama1b, whose weights are
                            random; wanda with 32 x 512 calibration tokens of the builtin text for default) and
                            exported in the bitmask format (sparsecraft.export); bitmask-int8/ the same with int8
                            values and one float32 scale per row (when this sparsecraft has export(dtype="int8"))
* <method>-<level>/hf/      the pruned model as an HF directory: kept only with --llama-cpp-pruned (the converter's
                            input; decompressed from bitmask/ bit for bit when it is gone)
* dense-<type>.gguf         the dense model converted by llama.cpp's convert_hf_to_gguf.py (--gguf-types); with
                            --llama-cpp-pruned also <method>-<level>/<type>.gguf

Rows, all at --threads, greedy, --tokens new tokens, prefill excluded (the first new token comes with the prompt and
is timed apart), one warm-up then the best of --repeats:

* torch generate       the dense bf16 model on nn.Linear, Hugging Face generate
* lean dense           the lean decode loop (sparsecraft.runtime.decode.decoder_for: native, else fast, else hf)
                       with every layer on the kernels' dense path
* lean <level>         the bitmask directory loaded by sparsecraft.load (kernels on), the lean loop
* lean <level> int8    the same with int8 values
* llama.cpp <TYPE>     llama-cpp-python on the dense GGUF: llama.cpp runs pruned weights dense, so this is its speed
                       for every level; --llama-cpp-pruned adds `llama.cpp <level> <TYPE>` rows (for perplexity)

Columns: `x fastest dense 16-bit` divides by the fastest of lean dense, llama.cpp F16 and llama.cpp BF16 of the same
model; `x llama.cpp Q8_0` by llama.cpp Q8_0. `peak RSS` is the row's subprocess up to the end of the timed runs
(VmHWM; model load included: a bitmask directory is decompressed before it is packed), `decode RSS` its
resident memory right after them (VmRSS: what decoding holds). `ppl` (--ppl): held-out perplexity over
--max-eval-windows windows of 512 tokens of the builtin text, sparsecraft.evaluate for sparsecraft rows and
llama.cpp's logits on the same token windows for llama.cpp rows ('-' for llama1b: random weights).
`same tokens` is the fraction of greedy tokens equal to torch generate's on the same weights (torch generate dense
for lean dense and llama.cpp F16/BF16; torch generate on the pruned, or dequantized int8, weights for the pruned
rows, run in the row's subprocess after the timing; --no-token-check skips those; for int8 that is the dequantized
weights rounded to bf16, while the kernels use q * scale in float32), informational: bf16 results differ in rounding
between implementations.
`lean act N%` rows (--activation-sparsities, default 0.4,0.5): the dense model with TEAL thresholds (policy decode,
calibrated on the builtin text; llama1b on 4 windows) loaded with kernels=True, i.e. its thresholded layers on the
column-skipping kernel, decoded by the fast decoder (the native step does not apply thresholds).
--split adds a table of per-token milliseconds in linear layers / attention / other (sparsecraft.runtime.profile).

  python bench/decode.py                                   # both models (llama1b: run it on a quiet machine)
  python bench/decode.py --models default --quick --ppl --markdown
  python bench/decode.py --models llama1b --tokens 128 --repeats 3 --json out.json
  python bench/decode.py --rows 'lean|Q8_0' --split         # only some rows (a regex on the run name)
  python bench/decode.py --prepare-only                    # build the work directory now, time later
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, run_isolated  # noqa: E402

SCRIPT = Path(__file__).resolve()
EVAL_SEQLEN = 512
CALIBRATION = {"nsamples": 32, "seqlen": 512}  # for methods that need data (default model)
DENSE_16BIT = ("lean dense", "llama.cpp F16", "llama.cpp BF16")
LLAMA1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----- host facts ---------------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def kernel_isa() -> str:
    from sparsecraft.kernels import info

    facts = info()
    if not facts["built"]:
        return "not built"
    if facts["path"] != "auto":
        return f"{facts['path']} (forced)"
    if facts["avx512"]:
        extras = [name for key, name in (("avx512_vbmi2", "VBMI2"), ("avx512_bf16", "BF16"), ("avx512_vnni", "VNNI"))
                  if facts.get(key)]
        return " + ".join(["avx512", *extras])
    return "avx2" if facts["avx2"] else "scalar"


def int8_problem() -> str | None:
    """Why the int8 rows cannot run with this sparsecraft (None when they can)."""
    import sparsecraft
    from sparsecraft import compressed
    from sparsecraft.kernels import sparsify_model

    if "dtype" not in inspect.signature(sparsecraft.export).parameters or \
            "int8" not in getattr(compressed, "VALUE_DTYPES", ()) or \
            "quantize" not in inspect.signature(sparsify_model).parameters:
        return "int8 rows not available: this sparsecraft has no int8 bitmask values (export(..., dtype='int8'))"
    return None


def llama_cpp_problem(src: str | None) -> str | None:
    from sparsecraft.errors import ConfigError
    from sparsecraft.runtime import llamacpp

    if not llamacpp.available():
        return "llama.cpp rows skipped: llama-cpp-python is not importable here"
    try:
        llamacpp.find_converter(src)
    except ConfigError as exc:
        return f"llama.cpp rows skipped: {exc}"
    return None


# ----- levels -------------------------------------------------------------------------------------------------------

def parse_level(text: str) -> dict:
    """'0.5' -> 50% unstructured, '2:4' -> the N:M pattern: {label, key, prune kwargs}."""
    text = text.strip()
    if ":" in text:
        return {"label": text, "key": text.replace(":", "of"), "prune": {"pattern": text}}
    value = float(text)
    if not 0.0 < value < 1.0:
        sys.exit(f"--sparsities: {text} is not a fraction in (0, 1) or an N:M pattern such as 2:4")
    pct = f"{value * 100:g}"
    return {"label": f"{pct}%", "key": pct, "prune": {"sparsity": value}}


# ----- preparation (in this process; every output is written atomically and reused) ----------------------------------

class Workdir:
    def __init__(self, args, name: str):
        self.args, self.name = args, name
        self.layers = args.layers if name == "llama1b" else None
        key = name if name in ("default", "llama1b") else Path(name).expanduser().resolve().name
        self.root = Path(args.workdir).expanduser() / (f"{key}-L{self.layers}" if self.layers else key)
        self.method = args.method or ("magnitude" if name == "llama1b" else "wanda")
        self.random = name == "llama1b"

    @property
    def dense(self) -> Path:
        path = self.root / "dense"
        if not (path / "config.json").is_file():
            self._make_dense(path)
        return path

    def _make_dense(self, path: Path) -> None:
        import torch

        import sparsecraft

        if self.name == "llama1b":
            log(f"{self.name}: building the random LLaMA ({self.layers or LLAMA1B['num_hidden_layers']} layers) ...")
            model, tokenizer = llama1b(self.layers)
        else:
            log(f"{self.name}: loading ...")
            model, tokenizer = sparsecraft.load_model(self.name, dtype=torch.bfloat16)
        sparsecraft.save(model, path, tokenizer=tokenizer, source=self.name, force=True)
        log(f"  wrote {path}")

    def method_key(self) -> str:
        from sparsecraft.api import make_recipe

        data = make_recipe(method=self.method).needs_data
        return f"{self.method}{CALIBRATION['nsamples']}x{CALIBRATION['seqlen']}" if data else self.method

    def level_dir(self, level: dict) -> Path:
        return self.root / f"{self.method_key()}-{level['key']}"

    def pruned(self, level: dict) -> Path:
        """The pruned model as an HF directory: pruned now, or decompressed from its bitmask export (bit for bit)
        when only that is kept."""
        path = self.level_dir(level) / "hf"
        if (path / "config.json").is_file():
            return path
        import torch

        import sparsecraft
        from sparsecraft.api import make_recipe

        bitmask = self.level_dir(level) / "bitmask"
        if (bitmask / "config.json").is_file():
            log(f"{self.name}: decompressing {level['label']} for llama.cpp's converter ...")
            model, tokenizer = sparsecraft.load_model(bitmask)
            sparsecraft.save(model, path, tokenizer=tokenizer, source=str(bitmask), force=True)
            return path
        dense = self.dense
        log(f"{self.name}: pruning to {level['label']} ({self.method}) ...")
        model, tokenizer = sparsecraft.load_model(dense, dtype=torch.bfloat16)
        fields = {"method": self.method, **level["prune"]}
        calibration = None
        if make_recipe(**fields).needs_data:
            fields.update(CALIBRATION)
            calibration = "builtin"
        _, report = sparsecraft.prune(model, calibration, tokenizer=tokenizer, progress=False, **fields)
        sparsecraft.save(model, path, tokenizer=tokenizer, report=report, source=str(dense), force=True)
        log(f"  wrote {path} ({report.seconds:.0f}s)")
        return path

    def exported(self, level: dict, values: str) -> Path:
        """The bitmask export (values 'bf16': the model's own; 'int8': exported from the bf16 one). The pruned HF
        directory is deleted once exported, unless --llama-cpp-pruned needs it."""
        path = self.level_dir(level) / ("bitmask" if values == "bf16" else f"bitmask-{values}")
        if (path / "config.json").is_file():
            return path
        import sparsecraft

        src = self.pruned(level) if values == "bf16" else self.exported(level, "bf16")
        log(f"{self.name}: exporting {level['label']} as bitmask ({values}) ...")
        if values == "bf16":
            sparsecraft.export(src, path, "bitmask", force=True)
            if not self.args.llama_cpp_pruned:
                shutil.rmtree(src)
        else:
            sparsecraft.export(src, path, "bitmask", force=True, dtype=values)
        return path

    def activated(self, sparsity: float) -> Path:
        """The dense model with TEAL thresholds for `sparsity` activation sparsity (policy 'decode': prefill stays
        dense), calibrated on the builtin text; loaded with kernels=True its thresholded layers run the
        column-skipping kernel."""
        path = self.root / f"teal-act{sparsity * 100:g}"
        if (path / "config.json").is_file():
            return path
        import torch

        import sparsecraft
        from sparsecraft.activation import activate, save_activation

        log(f"{self.name}: calibrating TEAL thresholds for {sparsity:.0%} activation sparsity ...")
        model, tokenizer = sparsecraft.load_model(self.dense, dtype=torch.bfloat16)
        # llama1b (random weights: only the speed means anything): 4 windows, not 16 (its calibration runs each
        # block four times over the windows, ~25 min on 2 cores at 16)
        activate(model, "builtin", tokenizer=tokenizer, method="teal", sparsity=sparsity, policy="decode",
                 nsamples=4 if self.random else 16, progress=False)
        save_activation(model, path, tokenizer=tokenizer, source=str(self.dense), force=True)
        log(f"  wrote {path}")
        return path

    def gguf(self, level: dict | None, outtype: str) -> Path:
        from sparsecraft.runtime import llamacpp

        path = self.root / f"dense-{outtype}.gguf" if level is None else self.level_dir(level) / f"{outtype}.gguf"
        if path.is_file():
            return path
        src = self.dense if level is None else self.pruned(level)
        log(f"{self.name}: converting {src.relative_to(self.root)} to GGUF {outtype.upper()} ...")
        return llamacpp.convert(src, outtype, path, self.args.llama_cpp_src)


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from sparsecraft.models import default_model_file

    gguf = default_model_file()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def llama1b(layers: int | None = None):
    """(model, tokenizer): the random LLaMA-1.1B shape with SmolLM2's tokenizer, seeded, bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **{**LLAMA1B, **({"num_hidden_layers": layers}
                                                                               if layers else {})})
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return model, tokenizer


def file_mib(path: Path) -> float:
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2**20


# ----- one row, in its own process ------------------------------------------------------------------------------------

def _status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status in MiB: VmHWM (peak RSS) or VmRSS (now)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that across fork + exec, so a row's
    subprocess would report at least the parent's RSS; VmHWM belongs to the process's own address space."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    from sparsecraft.api import peak_rss_mb as maxrss

    return maxrss()


def worker(spec: dict) -> dict:
    """Time one row: spec = {kind: torch|lean|llama.cpp, path, dense, threads, tokens, repeats, ppl, windows,
    split, reference}."""
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import AutoTokenizer

    from sparsecraft.kernels.speed import DEFAULT_PROMPT

    tokenizer = AutoTokenizer.from_pretrained(spec["dense"])
    ids = tokenizer(DEFAULT_PROMPT, return_tensors="pt").input_ids
    n, repeats = spec["tokens"], spec["repeats"]
    row: dict = {"prompt_tokens": int(ids.shape[1])}

    def eval_tokens():
        import sparsecraft
        from sparsecraft.data import tokenize

        return tokenize(tokenizer, sparsecraft.load_text("builtin").evaluation)

    if spec["kind"] == "llama.cpp":
        from sparsecraft.runtime import llamacpp

        r = llamacpp.decode_speed(spec["path"], ids, n, spec["threads"], repeats)
        row.update(tokens_per_s=r["tokens_per_s"], prefill_s=r["prefill_s"], tokens=r["tokens"],
                   peak_rss_mb=peak_rss_mb(), rss_mb=_status_mb("VmRSS"))
        if spec["ppl"]:
            row["perplexity"] = llamacpp.perplexity(spec["path"], eval_tokens(), EVAL_SEQLEN, spec["threads"],
                                                    spec["windows"])
        return row

    import sparsecraft
    from sparsecraft.kernels import densify_model, kernel_layers, sparsify_model
    from sparsecraft.kernels.speed import _generate, greedy_decode
    from sparsecraft.runtime.decode import decoder_for
    from sparsecraft.runtime.profile import split

    if spec["kind"] == "torch":
        model = sparsecraft.load_model(spec["path"], dtype=torch.bfloat16)[0]
        r = greedy_decode(model, ids, n, repeats)
        row.update(tokens_per_s=r.tokens_per_s, prefill_s=r.prefill_seconds, tokens=r.tokens.tolist(),
                   peak_rss_mb=peak_rss_mb(), rss_mb=_status_mb("VmRSS"))
        if spec["split"]:
            row["split_ms"] = split(lambda k: _generate(model, ids, k), model, n)
    else:
        if spec["path"] == spec["dense"]:
            model = sparsecraft.load_model(spec["path"], dtype=torch.bfloat16)[0]
            sparsify_model(model, bitmask=False)
        else:
            model = sparsecraft.load(spec["path"], dtype=torch.bfloat16, kernels=True)
        layers = kernel_layers(model).values()
        row["layers"] = {"bitmask": sum(m.format == "bitmask" for m in layers),
                         "dense": sum(m.format != "bitmask" for m in layers)}
        decoder = decoder_for(model)
        row["decoder"] = decoder.name
        decoder.generate(ids, 2, stop_at_eos=False)  # warm-up
        best = None
        for _ in range(repeats):
            g = decoder.generate(ids, n, stop_at_eos=False)
            best = g if best is None or g.tokens_per_s > best.tokens_per_s else best
        row.update(tokens_per_s=best.tokens_per_s, prefill_s=best.prefill_seconds, tokens=list(best.tokens),
                   peak_rss_mb=peak_rss_mb(), rss_mb=_status_mb("VmRSS"))
        if spec["split"]:
            row["split_ms"] = split(lambda k: decoder.generate(ids, k, stop_at_eos=False), model, n, decoder)
    if spec["ppl"]:
        result = sparsecraft.evaluate(model, "builtin", tokenizer=tokenizer, seqlen=EVAL_SEQLEN,
                                      max_windows=spec["windows"], progress=False)
        row.update(perplexity=result["perplexity"], eval_tokens=result["tokens"], sparsity=result["sparsity"])
    if spec["reference"]:  # torch generate on the same weights (densified: nn.Linear, int8 dequantized)
        densify_model(model)
        row["reference_tokens"] = _generate(model, ids, n).tolist()
    return row


# ----- the run ------------------------------------------------------------------------------------------------------

def plan(args, wd: Workdir, levels: list[dict], int8: bool, llama_cpp: bool) -> list[dict]:
    """The rows of one model, each with a `prepare()` giving the path it runs on."""
    rows = [{"run": "torch generate", "kind": "torch", "weights": "bf16 nn.Linear", "prepare": lambda: wd.dense},
            {"run": "lean dense", "kind": "lean", "weights": "bf16 dense kernels", "prepare": lambda: wd.dense}]
    for level in levels:
        for values in ("bf16", "int8") if int8 else ("bf16",):
            rows.append({"run": f"lean {level['label']}" + (" int8" if values == "int8" else ""), "kind": "lean",
                         "weights": f"{values} bitmask", "level": level["label"],
                         "prepare": lambda lv=level, v=values: wd.exported(lv, v)})
    for act in activation_levels(args):
        label = f"act {act * 100:g}%"
        rows.append({"run": f"lean {label}", "kind": "lean", "weights": "bf16 dense, TEAL thresholds (colskip)",
                     "level": label, "prepare": lambda a=act: wd.activated(a)})
    if llama_cpp:
        types = [t.strip().lower() for t in args.gguf_types.split(",") if t.strip()]
        pruned = levels if args.llama_cpp_pruned else []
        for level in [None, *pruned]:
            for t in types:
                name = "llama.cpp " + (f"{level['label']} " if level else "") + t.upper()
                rows.append({"run": name, "kind": "llama.cpp", "weights": f"GGUF {t.upper()}", "outtype": t,
                             "level": level["label"] if level else None,
                             "prepare": lambda lv=level, t=t: wd.gguf(lv, t)})
    if args.rows:
        rows = [r for r in rows if re.search(args.rows, r["run"])]
    return rows


def activation_levels(args) -> list[float]:
    text = (args.activation_sparsities or "").strip().lower()
    if text in ("", "none"):
        return []
    out = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = -1.0
        if not 0.0 < value < 1.0:
            sys.exit(f"--activation-sparsities: {part!r} is not a fraction in (0, 1)")
        out.append(value)
    return out


def same_tokens(tokens, reference) -> str:
    if not tokens or not reference:
        return "-"
    n = min(len(tokens), len(reference))
    same = [a == b for a, b in zip(tokens[:n], reference[:n])]
    first = next((i for i, s in enumerate(same) if not s), None)
    return f"{sum(same) / n:.0%}" + ("" if first is None else f" (from {first})")


def run_model(args, name: str, levels: list[dict], int8: bool, llama_cpp: bool) -> list[dict]:
    wd = Workdir(args, name)
    rows = plan(args, wd, levels, int8, llama_cpp)
    for r in rows:  # everything first, so the rows run back to back
        r["path"] = str(r.pop("prepare")())
        r["file_mib"] = file_mib(Path(r["path"]))
    if args.prepare_only:
        return []
    out = []
    for p in range(args.passes):  # every row once per pass: each row meets the host's bandwidth swings
        for i, r in enumerate(rows):
            first = p == 0
            spec = {"name": f"{name}: {r['run']}" + (f" (pass {p + 1}/{args.passes})" if args.passes > 1 else ""),
                    "kind": r["kind"], "path": r["path"], "dense": str(wd.dense),
                    "threads": args.threads, "tokens": args.tokens, "repeats": args.repeats,
                    "ppl": bool(first and args.ppl and not wd.random), "windows": args.max_eval_windows,
                    "split": bool(first and args.split and r["kind"] != "llama.cpp"),
                    "reference": bool(first and r.get("level") and r["kind"] == "lean" and not args.no_token_check)}
            try:
                result = run_isolated(spec, SCRIPT, ("--worker",))
            except SystemExit as exc:  # run_isolated exits on a failed row: report it, go on with the others
                log(str(exc.code))
                result = {"error": str(exc.code).splitlines()[-1] if str(exc.code).strip() else "failed"}
            if first:
                row = {"model": name, **{k: v for k, v in r.items() if k != "kind"}, "kind": r["kind"],
                       "method": wd.method if r.get("level") else None, **result}
                out.append(row)
            else:  # a later pass: keep the faster timing, the larger peak RSS, the first pass's ppl and references
                row = out[i]
                if result.get("tokens_per_s", 0) > row.get("tokens_per_s", 0):
                    row.update({k: v for k, v in result.items() if k not in ("perplexity", "reference_tokens",
                                                                              "split", "peak_rss_mb")})
                    row.pop("error", None)
                if "peak_rss_mb" in result:
                    row["peak_rss_mb"] = max(row.get("peak_rss_mb", 0), result["peak_rss_mb"])
            if "tokens_per_s" in result:
                log(f"  {r['run']}: {result['tokens_per_s']:.2f} tok/s, peak RSS {result['peak_rss_mb']:.0f} MiB")
    by_run = {r["run"]: r for r in out}
    torch_tokens = by_run.get("torch generate", {}).get("tokens")
    references = {r["level"]: r.get("reference_tokens") for r in out if r.get("level") and r["kind"] == "lean"
                  and "int8" not in r["run"]}
    dense16 = [by_run[k]["tokens_per_s"] for k in DENSE_16BIT if by_run.get(k, {}).get("tokens_per_s")]
    q8 = by_run.get("llama.cpp Q8_0", {}).get("tokens_per_s")
    for r in out:
        if r["run"] == "torch generate":
            ref = None
        elif r["kind"] == "lean":
            ref = r.get("reference_tokens") if r.get("level") else torch_tokens
        else:  # llama.cpp: the 16-bit files hold the bf16 weights; Q8_0 holds other weights
            ref = None if r["outtype"] == "q8_0" else references.get(r["level"]) if r["level"] else torch_tokens
        r["same_tokens"] = same_tokens(r.get("tokens"), ref)
        tps = r.get("tokens_per_s")
        r["x_fastest_dense_16bit"] = tps / max(dense16) if tps and dense16 else None
        r["x_llama_cpp_q8_0"] = tps / q8 if tps and q8 else None
    return out


def table_rows(results: list[dict]) -> list[list[str]]:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], r["run"], r["weights"], f"{r['file_mib']:.0f}", "failed: " + r["error"][:60],
                         "-", "-", "-", "-", "-", "-"])
            continue
        rows.append([r["model"], r["run"], r["weights"], f"{r['file_mib']:.0f}", f"{r['tokens_per_s']:.2f}",
                     num(r["x_fastest_dense_16bit"], ".2f") + ("x" if r["x_fastest_dense_16bit"] else ""),
                     num(r["x_llama_cpp_q8_0"], ".2f") + ("x" if r["x_llama_cpp_q8_0"] else ""),
                     f"{r['peak_rss_mb']:.0f}", num(r.get("rss_mb"), ".0f"), num(r.get("perplexity"), ".3f"),
                     r["same_tokens"]])
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,llama1b", help="comma-separated: default, llama1b (or an HF model "
                                                                "directory)")
    ap.add_argument("--sparsities", default="0.5,0.7,2:4", help="fractions and/or N:M patterns (default 0.5,0.7,2:4)")
    ap.add_argument("--method", default=None, help="pruning method (default: magnitude for llama1b, wanda otherwise)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per run (default 64, --quick 16)")
    ap.add_argument("--activation-sparsities", default="0.4,0.5",
                    help="activation (TEAL) sparsities of the `lean act` rows: dense weights, thresholded inputs on "
                         "the column-skipping kernel (default 0.4,0.5; 'none' for no such rows)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every row (default 2)")
    ap.add_argument("--passes", type=int, default=1,
                    help="run every row this many times, one after another, keeping each row's best (rows then "
                         "meet the same bandwidth swings of a shared host; default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per row after one warm-up, best kept "
                                                              "(default 3, --quick 1)")
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat")
    ap.add_argument("--ppl", action="store_true", help="held-out perplexity per row (not for llama1b)")
    ap.add_argument("--max-eval-windows", type=int, default=8, help="windows of 512 tokens for --ppl (default 8)")
    ap.add_argument("--gguf-types", default="f16,bf16,q8_0", help="llama.cpp GGUF types (default f16,bf16,q8_0)")
    ap.add_argument("--llama-cpp-src", default=None, help="llama.cpp's converter: the script, a source tree or the "
                                                          "llama-cpp-python sdist (default: the cached one)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="no llama.cpp rows")
    ap.add_argument("--llama-cpp-pruned", action="store_true",
                    help="also convert the pruned models to GGUF (llama.cpp's perplexity of them; speed as dense)")
    ap.add_argument("--no-token-check", action="store_true",
                    help="skip torch generate on the pruned weights (the `same tokens` reference of pruned rows)")
    ap.add_argument("--split", action="store_true", help="per-token time split (linear/attention/other) table")
    ap.add_argument("--rows", default=None, help="regex on the run name: run only the rows it matches")
    ap.add_argument("--workdir", default=str(Path("~/.cache/sparsecraft/bench-decode")))
    ap.add_argument("--prepare-only", action="store_true", help="build the work directory and stop")
    ap.add_argument("--json", default=None, help="write every row (tokens included) to this file")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)  # llama1b with N layers (smoke test)
    args = ap.parse_args()
    args.tokens = args.tokens or (16 if args.quick else 64)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.tokens < 2 or args.repeats < 1 or args.threads < 1 or args.passes < 1:
        sys.exit("--tokens must be >= 2, --repeats, --passes and --threads >= 1")
    if args.rows:
        try:
            re.compile(args.rows)
        except re.error as exc:
            sys.exit(f"--rows {args.rows!r} is not a regular expression ({exc})")
    from sparsecraft.runtime import llamacpp

    bad = [t for t in args.gguf_types.split(",") if t.strip().lower() not in llamacpp.OUTTYPES]
    if bad:
        sys.exit(f"--gguf-types: {', '.join(bad)} not one of {', '.join(llamacpp.OUTTYPES)}")
    levels = [parse_level(s) for s in args.sparsities.split(",") if s.strip()]
    notes = [n for n in (int8_problem(), None if args.no_llama_cpp else llama_cpp_problem(args.llama_cpp_src)) if n]
    int8 = int8_problem() is None
    llama_cpp = not args.no_llama_cpp and llama_cpp_problem(args.llama_cpp_src) is None
    for note in notes:
        log(note)
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        results += run_model(args, name, levels, int8, llama_cpp)
    if args.prepare_only:
        log(f"prepared in {Path(args.workdir).expanduser()}")
        return
    print_table(["model", "run", "weights", "file MiB", "decode tok/s", "x fastest dense 16-bit", "x llama.cpp Q8_0",
                 "peak RSS MiB", "decode RSS MiB", "ppl", "same tokens"], table_rows(results), args.markdown)
    split_rows = [[r["model"], r["run"], *(f"{r['split_ms'][k]:.2f}" for k in ("ms_per_token", "linear_ms",
                                                                                "attention_ms", "other_ms"))]
                  for r in results if "split_ms" in r]
    if split_rows:
        print()
        print_table(["model", "run", "ms/token", "linear", "attention", "other"], split_rows, args.markdown)
    facts = {"cpu": cpu_name(), "kernel_isa": kernel_isa(), "threads": args.threads, "dtype": "bfloat16",
             "tokens": args.tokens, "repeats": args.repeats, "passes": args.passes, "os_cpus": os.cpu_count()}
    methods = sorted({f"{r['model']}: {r['method']}" for r in results if r.get("method")})
    decoders = sorted({r["decoder"] for r in results if r.get("decoder")})
    passes = f", best of {args.passes} passes over the rows" if args.passes > 1 else ""
    print(f"\nCPU: {facts['cpu']} ({facts['os_cpus']} logical CPUs); kernels: {facts['kernel_isa']}; "
          f"threads={args.threads}; dtype=bfloat16; {args.tokens} new tokens, greedy, prefill excluded, best of "
          f"{args.repeats} after a warm-up{passes}; lean loop: {'/'.join(decoders) or '-'} decoder; pruning: "
          f"{', '.join(methods) or '-'}"
          + (f"; ppl: {args.max_eval_windows} x {EVAL_SEQLEN} held-out builtin tokens (none for llama1b: random "
             "weights)" if args.ppl else ""))
    for note in notes:
        print(note)
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({**facts, "notes": notes, "rows": results}, indent=1))
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
