"""The architecture equalities of tests/test_engine_architectures.py on CUDA, for every supported type.

python benchmarks/gpu_arch_check.py OUT.json [--types llama,qwen2,...] [--dtypes float32,bfloat16]
                                    [--fused auto,off] [--hf-attn eager|sdpa] [--device cuda|cpu]

For each model type on ``harness.engine.SUPPORTED_MODEL_TYPES`` and each dtype, the tiny random model of
``harness.engine.conformance.CONFIGS`` is checked with the engine as the pipeline runs it (``fused="auto"``:
compiled kernels, Triton sampler, CUDA graphs) and with ``fused="off"``: greedy tokens vs HF ``generate``,
sampled tokens vs HF ``generate`` with the harness's seeded sampler, extraction sums vs the reference
extractor (HF with its eager attention unless ``--hf-attn sdpa``). fp32 must match exactly (tokens) and
within 1e-3 (sums); bf16 results are recorded (the engine's attention and HF's round differently, so
near-ties may part: ``greedy.divergence`` gives HF's own logit gap there). Needs only torch, transformers
and the harness (run from the repository root). Writes OUT.json after every type; exits 1 when an fp32
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FP32_EXTRACT_TOL = 1e-3


def fp32_ok(res: dict) -> bool:
    return bool(res["greedy"]["equal"] and res["sampled"]["equal"] and res["extract"]["finite"]
                and res["extract"]["max_rel_err"] < FP32_EXTRACT_TOL)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--types", default="", help="comma-separated model types (default: every supported type)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--fused", default="auto,off", help="engine fused modes to check")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke run of this script")
    ap.add_argument("--hf-attn", default="eager", help="HF's attention for the reference (eager: the reference "
                                                      "implementation; sdpa: HF's default)")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import torch
    import transformers

    from harness.engine import SUPPORTED_MODEL_TYPES
    from harness.engine.conformance import compare, tiny_model

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_arch_check: no CUDA device (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    types = [t for t in a.types.split(",") if t] or sorted(SUPPORTED_MODEL_TYPES)
    name = torch.cuda.get_device_name(torch.device(a.device)) if a.device.startswith("cuda") else "cpu"
    report: dict = {"device": name, "torch": torch.__version__, "hf_attention": a.hf_attn,
                    "transformers": transformers.__version__, "results": {}, "fp32_failures": []}
    for mt in types:
        for dt in a.dtypes.split(","):
            for fused in a.fused.split(","):
                key = f"{mt}/{dt}/fused={fused}" + ("" if a.hf_attn == "eager" else f"/hf={a.hf_attn}")
                t0 = time.perf_counter()
                try:
                    lm = tiny_model(mt, dtype=dt, device=a.device, attn_implementation=a.hf_attn)
                    res = compare(lm, fused=fused)
                    res["ok"] = fp32_ok(res) if dt == "float32" else None
                except Exception:
                    res = {"error": traceback.format_exc()[-3000:], "ok": False if dt == "float32" else None}
                res["seconds"] = round(time.perf_counter() - t0, 2)
                report["results"][key] = res
                if res["ok"] is False:
                    report["fp32_failures"].append(key)
                line = res.get("error", "").strip().splitlines()[-1:] or [
                    f"greedy {res['greedy']['match']:.3f} sampled {res['sampled']['match']:.3f} "
                    f"extract rel {res['extract']['max_rel_err']:.1e} norm {res['extract']['rel_norm_err']:.1e} "
                    f"graphs {res['stats'].get('graphs')} {res['stats'].get('graph_error', '')[:80]}"]
                print(f"{key:36s} ok={res['ok']} {line[0]}", flush=True)
                with open(a.out, "w") as fh:
                    json.dump(report, fh, indent=1, default=str)
    print(f"fp32 failures: {report['fp32_failures'] or 'none'}")
    return 1 if report["fp32_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
