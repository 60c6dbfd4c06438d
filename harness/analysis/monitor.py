"""Monitoring: project mean response activations onto the vector; per-layer separation of pos vs neg.

For an example (prompt ids, response ids) and hidden_states index L the monitor value is the scalar
projection of the mean response activation onto the vector (the reference's ``proj``):

    proj[L] = (a[L] . v[L]) / ||v[L]||,   a[L] = mean of hidden_states[L] over the response tokens

Separation per layer between pos and neg examples (the evaluation split by default):
AUROC = P(proj_pos > proj_neg) + 0.5 P(tie) (Mann-Whitney), and Cohen's d with the pooled SD.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from harness.analysis.metrics import auroc, cohens_d, finite_or_none, inner_layers, pearson
from harness.core.errors import HarnessError

MONITOR_FILE = "monitor.json"
PROJECTIONS_FILE = "projections.jsonl"


def scalar_projection(acts: Any, v: Any) -> Any:
    """(a . v) / ||v|| over the last dimension (NaN where ||v|| = 0)."""
    import torch

    a = torch.as_tensor(acts).float()
    v = torch.as_tensor(v).float().to(a.device)
    n = v.norm(dim=-1)
    return (a * v).sum(-1) / torch.where(n > 0, n, torch.full_like(n, float("nan")))


def separation(pos_proj: Sequence[Sequence[float]], neg_proj: Sequence[Sequence[float]]) -> list[dict]:
    """Per layer: AUROC, Cohen's d and means. Inputs are [n_examples][num_layers + 1] projections."""
    if not pos_proj or not neg_proj:
        raise HarnessError(f"separation needs pos and neg examples (got {len(pos_proj)} pos, {len(neg_proj)} neg)")
    out = []
    for L in range(len(pos_proj[0])):
        p = [r[L] for r in pos_proj]
        q = [r[L] for r in neg_proj]
        out.append({"layer": L, "auroc": finite_or_none(auroc(p, q)), "cohens_d": finite_or_none(cohens_d(p, q)),
                    "pos_mean": finite_or_none(sum(p) / len(p)), "neg_mean": finite_or_none(sum(q) / len(q))})
    return out


# -- turning records into (prompt ids, response ids) ----------------------------------------------
def record_example(lm: Any, rec: dict, where: str = "record") -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a generation record, a ``{"messages": [...]}`` conversation
    whose last message is the assistant's answer, or ``{"prompt"/"question", "answer"/"response"}``."""
    from harness.models.loading import prompt_ids

    tok = lm.tokenizer
    if rec.get("prompt_token_ids") is not None and rec.get("response_token_ids") is not None:
        return list(rec["prompt_token_ids"]), list(rec["response_token_ids"])
    if isinstance(rec.get("messages"), list) and rec["messages"]:
        msgs = rec["messages"]
        if msgs[-1].get("role") != "assistant":
            raise HarnessError(f"{where}: field 'messages': the last message must be the assistant's answer "
                               f"(role 'assistant'), got role {msgs[-1].get('role')!r}")
        return prompt_ids(tok, msgs[:-1]), tok.encode(msgs[-1].get("content", ""), add_special_tokens=False)
    q = rec.get("question", rec.get("prompt"))
    a = rec.get("answer", rec.get("response"))
    if q is None or a is None:
        raise HarnessError(f"{where}: needs prompt_token_ids+response_token_ids, 'messages', or "
                           "'question'/'prompt' with 'answer'/'response'. Fix: add those fields")
    msgs = ([{"role": "system", "content": rec["system_prompt"]}] if rec.get("system_prompt") else []) + \
        [{"role": "user", "content": q}]
    return prompt_ids(tok, msgs), tok.encode(a, add_special_tokens=False)


def project_examples(lm: Any, examples: Sequence[tuple[Sequence[int], Sequence[int]]], vectors: Any, *,
                     batch_size: int = 8, method: str = "response_avg") -> list[list[float]]:
    """Scalar projections ``[n_examples][num_layers + 1]`` of each example's mean activation."""
    import torch

    from harness.models.activations import example_means

    v = torch.as_tensor(vectors).float()
    if v.dim() != 2 or v.shape[0] != lm.num_layers + 1 or v.shape[1] != lm.hidden_size:
        raise HarnessError(f"vector tensor has shape {tuple(v.shape)} but the model needs "
                           f"({lm.num_layers + 1}, {lm.hidden_size}). Fix: use vectors extracted with this model")
    out: list[list[float]] = []
    for batch in example_means(lm, list(examples), batch_size, methods=(method,)):
        out.extend(scalar_projection(batch[method], v.to(batch[method].device)).cpu().tolist())
    return out


def monitor_run(run_dir: str | Path, lm: Any, *, split: str = "eval", method: str = "response_avg_diff",
                batch_size: int = 8, write: bool = True, force: bool = False) -> dict:
    """Project the run's pos/neg generations of ``split`` onto its vectors; per-layer separation.

    Writes ``monitor.json`` (per-layer AUROC, Cohen's d, means, correlation with trait scores) and
    ``projections.jsonl`` (one line per generation) into the run directory.
    """
    from harness.core.artifacts import atomic_write_json, load_vectors, read_jsonl, write_jsonl
    from harness.core.records import LAYER_CONVENTION

    run_dir = Path(run_dir)
    vs = load_vectors(run_dir / "vectors.safetensors", expect_shape=(lm.num_layers + 1, lm.hidden_size))
    if method not in vs.tensors:
        raise HarnessError(f"{run_dir / 'vectors.safetensors'} has no {method!r} (has {', '.join(sorted(vs.tensors))})")
    gens = [g for g in read_jsonl(run_dir / "generations.jsonl")
            if g.get("split") == split and g.get("polarity") in ("pos", "neg") and g.get("response_token_ids")]
    if not gens:
        raise HarnessError(f"{run_dir / 'generations.jsonl'} has no {split!r} generations with a response. Fix: run "
                           f"'persona-harness run --splits extract,eval' (or monitor --split extract, in-sample)")
    proj = project_examples(lm, [(g["prompt_token_ids"], g["response_token_ids"]) for g in gens], vs[method],
                            batch_size=batch_size)
    pos = [p for g, p in zip(gens, proj) if g["polarity"] == "pos"]
    neg = [p for g, p in zip(gens, proj) if g["polarity"] == "neg"]
    layers = separation(pos, neg)
    scores: dict[str, float] = {}
    jp = run_dir / "judgments.jsonl"
    trait = vs.trait
    if jp.exists():
        for j in read_jsonl(jp):
            if j.get("metric") == trait and j.get("score") is not None:
                scores[j["generation_id"]] = float(j["score"])
    scored = [(p, scores[g["id"]]) for g, p in zip(gens, proj) if g["id"] in scores]
    for row in layers:
        L = row["layer"]
        row["trait_corr"] = finite_or_none(pearson([p[L] for p, _ in scored], [s for _, s in scored])) if scored else None
    inner = [r for r in layers if r["layer"] in inner_layers(len(layers)) and r["auroc"] is not None] or layers
    best = max(inner, key=lambda r: (r["auroc"] or 0.0, abs(r["cohens_d"] or 0.0)))
    result = {"split": split, "method": method, "n_pos": len(pos), "n_neg": len(neg), "n_scored": len(scored),
              "layers": layers, "best_layer": best["layer"], "layer_convention": LAYER_CONVENTION,
              "projection": "(mean response activation . v) / ||v||", "trait": trait}
    if write:
        from harness.core.artifacts import old_count, refuse_fewer

        n_ex = lambda r: int(r["n_pos"]) + int(r["n_neg"])  # noqa: E731
        refuse_fewer(run_dir / MONITOR_FILE, n_ex(result), old_count(run_dir / MONITOR_FILE, n_ex), force=force,
                     unit="projected examples")
        atomic_write_json(run_dir / MONITOR_FILE, result)
        write_jsonl(run_dir / PROJECTIONS_FILE, [
            {"id": g["id"], "split": g["split"], "polarity": g["polarity"], "trait_score": scores.get(g["id"]),
             "proj": [round(x, 5) for x in p]} for g, p in zip(gens, proj)])
    return result


def load_records(path: str | Path) -> list[dict]:
    """Records from a .jsonl file (generations, conversations) or a .json list."""
    from harness.core.artifacts import read_jsonl

    path = Path(path)
    if not path.exists():
        raise HarnessError(f"{path} does not exist")
    if path.suffix == ".jsonl":
        return list(read_jsonl(path))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HarnessError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise HarnessError(f"{path}: expected a JSON list of records")
    return data


def project_records(lm: Any, records: Iterable[dict], vectors: Any, layers: Sequence[int], *,
                    source: str = "input", batch_size: int = 8) -> list[dict]:
    """Monitor any conversations: ``[{index, id, proj: {layer: value}}]`` at the given layers."""
    records = list(records)
    ex = [record_example(lm, r, f"{source} record {i}") for i, r in enumerate(records)]
    empty = [i for i, (_, r) in enumerate(ex) if not r]
    if empty:
        raise HarnessError(f"{source}: records {empty[:10]} have an empty response; there is nothing to average")
    proj = project_examples(lm, ex, vectors, batch_size=batch_size)
    return [{"index": i, "id": r.get("id", i), "proj": {int(L): round(p[L], 5) for L in layers}}
            for i, (r, p) in enumerate(zip(records, proj))]
