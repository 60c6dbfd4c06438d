"""The trait pipeline: trait -> generate -> judge -> filter -> extract, writing a run directory.

Every finished generation and judgment is stored in the content-addressed cache as soon as its
batch finishes, so an interrupted run resumes and an identical rerun recomputes nothing.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import os
import platform
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from harness import __version__
from harness.core.artifacts import append_jsonl, atomic_write_json, read_jsonl, save_vectors, write_jsonl
from harness.core.batching import run_with_oom_halving
from harness.core.cache import Cache, cache_key
from harness.core.config import Settings, validate_settings
from harness.core.locks import hold_run_dir, run_lock_scope
from harness.core import distributed as _dist
from harness.core.errors import HarnessError, NoEffectivePairsError, NonFiniteActivationError
from harness.core.model_ids import canonical_model_id, model_identity
from harness.core.plugins import build_registry, get_plugin_manager, lookup_trait, plugin_info
from harness.core.records import (
    LAYER_CONVENTION, Generation, GenerationRequest, Judgment, Selection, TraitSpec, VectorSet, peak_layer,
)
from harness.core.rubrics import COHERENCE, judge_items, system_prompt
from harness.core.runs import LATEST, allocate_run_dir, is_run_id, trait_root, write_latest

STAGES = ("generate", "judge", "filter", "extract")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def safe_name(name: str, what: str = "trait name") -> str:
    """Refuse names that could escape the run directory (path separators, '..', etc.)."""
    if not _SAFE_NAME.match(name) or ".." in name:
        raise HarnessError(f"{what} {name!r} is not allowed: use letters, digits, '_', '-', '.' (no '..', no slashes)")
    return name


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-.") or "model"


@dataclass
class RunContext:
    """What components get besides records: settings, the plugin manager, models, the run dir."""

    settings: Settings
    pm: Any
    trait: TraitSpec | None = None
    run_dir: Path | None = None
    cache: Cache | None = None
    models: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    progress: Callable | None = None
    identities: dict = field(default_factory=dict)

    def model_identity(self, model_id: str | None = None) -> dict:
        """``harness.core.model_ids.model_identity`` of a model (``settings.model`` by default), once per
        context: what the cache keys hold and run.json records. Needs no loaded model."""
        model_id = canonical_model_id(model_id or self.settings.model)
        if model_id not in self.identities:
            self.identities[model_id] = model_identity(model_id, self.settings)
        return self.identities[model_id]

    def model(self, model_id: str | None = None):
        """The loaded model (``settings.model`` by default), loaded once per context."""
        model_id = canonical_model_id(model_id or self.settings.model)
        if model_id not in self.models:
            t0 = time.perf_counter()
            lm = self.pm.hook.harness_load_model(model_id=model_id, settings=self.settings)
            if lm is None:
                raise HarnessError(f"no plugin could load model {model_id!r}")
            loaded = (getattr(lm, "info", None) or {}).get("fingerprint")
            keyed = self.identities.get(model_id, {}).get("fingerprint")
            if loaded is not None and keyed is not None and loaded != keyed:
                raise HarnessError(
                    f"model {model_id!r} changed after this run made its cache keys (fingerprint {keyed} "
                    f"then, {loaded} when loaded). Fix: run again once the checkpoint stops changing (a hub model: pin "
                    "--revision COMMIT)")
            self.models[model_id] = lm
            self.timings["load_model"] = self.timings.get("load_model", 0.0) + time.perf_counter() - t0
        return self.models[model_id]


@dataclass
class RunResult:
    trait: TraitSpec
    run_dir: Path
    generations: list[Generation]
    judgments: list[Judgment]
    selection: Selection | None
    vectors: VectorSet | None
    summary: dict


def build_requests(trait: TraitSpec, s: Settings, splits: Iterable[str] | None = None) -> list[GenerationRequest]:
    """Every question x instruction pair x sample x polarity, in a fixed order."""
    out = []
    pos_name = s.pos_name or trait.name
    for split in splits or s.splits:
        for qi, q in enumerate(trait.questions_for(split)):  # type: ignore[arg-type]
            for k, pair in enumerate(trait.instructions):
                for si in range(s.n_per_question):
                    for pol, name, ins in (("pos", pos_name, pair.pos), ("neg", s.neg_name, pair.neg)):
                        out.append(GenerationRequest(
                            id=f"{trait.name}_{split}_{qi}_{pol}_{k}_{si}", trait=trait.name, split=split,
                            polarity=pol, question_index=qi, question=q, instruction_index=k, sample_index=si,
                            system_prompt=system_prompt(name, ins), temperature=s.temperature, top_p=s.top_p,
                            max_new_tokens=s.max_new_tokens, seed=s.seed))
    return out


def _bar(ctx: RunContext, total: int, desc: str):
    if not ctx.settings.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, leave=False)


def _journal_path(ctx: RunContext, stage: str) -> Path | None:
    """Per-batch journal of an unfinished stage (flushed appends); removed when the stage ends."""
    name = {"generate": "generations", "judge": "judgments"}.get(stage, stage)
    return None if ctx.run_dir is None else Path(ctx.run_dir) / f"{name}.partial.jsonl"


def _journal_recover(ctx: RunContext, stage: str, wanted: set[str]) -> dict[str, dict]:
    """Finished records of an interrupted stage, by cache key, from its journal.

    A torn last line (the process died mid-append) is dropped with a warning. The journal is then
    rewritten atomically with the records kept, so later appends never follow a torn line.
    """
    path = _journal_path(ctx, stage)
    if path is None or not path.exists():
        return {}
    try:
        recs = {r["cache_key"]: r for r in read_jsonl(path) if isinstance(r, dict) and r.get("cache_key") in wanted}
    except (HarnessError, UnicodeDecodeError, OSError) as e:
        warnings.warn(f"{path}: unreadable journal ignored ({e}); its records are recomputed")
        recs = {}
    write_jsonl(path, recs.values())
    if recs and ctx.cache is not None:
        ctx.cache.put_many(stage, list(recs.items()))
    ctx.timings[f"{stage}_recovered"] = len(recs)
    return recs


def _journal_close(ctx: RunContext, stage: str) -> None:
    path = _journal_path(ctx, stage)
    if path is not None and path.exists():
        path.unlink()


def generation_key(ctx: RunContext, generator, r: GenerationRequest, *, config: dict | None = None, **extra) -> str:
    """Cache key of one generation: the generator (name and ``config()``, which carries its version),
    the model's identity (fingerprint, dtype, chat settings: ``RunContext.model_identity``) and the
    request. ``extra`` (e.g. a steering spec) is added as is."""
    return cache_key("generate", generator=generator.name, config=generator.config() if config is None else config,
                     model=ctx.model_identity(), messages=r.messages, temperature=r.temperature, top_p=r.top_p,
                     max_new_tokens=r.max_new_tokens, seed=r.seed, id=r.id, **extra)


def run_generate(ctx: RunContext, requests: Sequence[GenerationRequest], generator) -> list[Generation]:
    assert ctx.cache is not None
    cfg = generator.config()
    keys = {r.id: generation_key(ctx, generator, r, config=cfg) for r in requests}
    cached = ctx.cache.get_many(keys.values())
    done: dict[str, Generation] = {}
    for r in requests:
        v = cached.get(keys[r.id])
        if v is not None:
            done[r.id] = Generation.from_dict({**v, "cache_key": keys[r.id]})
    ctx.timings["generate_cached"] = len(done)
    recovered = _journal_recover(ctx, "generate", {keys[r.id] for r in requests if r.id not in done})
    for r in requests:
        if r.id not in done and keys[r.id] in recovered:
            done[r.id] = Generation.from_dict(recovered[keys[r.id]])
    todo = [r for r in requests if r.id not in done]
    if todo:
        bs = generator.batch_size(ctx)
        todo.sort(key=lambda r: (r.temperature, r.top_p, len(r.system_prompt) + len(r.question)))
        bar = _bar(ctx, len(todo), "generate")
        journal = _journal_path(ctx, "generate")

        def step(chunk: list[GenerationRequest]) -> list[Generation]:
            gens = generator.generate(chunk, ctx)
            recs = [{**g.to_dict(), "cache_key": keys[g.id]} for g in gens]
            ctx.cache.put_many("generate", [(keys[g.id], g.to_dict()) for g in gens])  # type: ignore[union-attr]
            if journal is not None:
                append_jsonl(journal, recs)
            for rec in recs:
                done[rec["id"]] = Generation.from_dict(rec)
            if bar is not None:
                bar.update(len(chunk))
            return gens

        # one generate() call needs one temperature and top_p; OOM halves the batch (harness.core.batching)
        for _, group in itertools.groupby(todo, key=lambda r: (r.temperature, r.top_p)):
            run_with_oom_halving(step, list(group), bs)
        if bar is not None:
            bar.close()
    return [done[r.id] for r in requests]


def run_judge(ctx: RunContext, trait: TraitSpec, gens: Sequence[Generation], judge,
              metrics: tuple[str, ...] | None = None) -> list[Judgment]:
    """Judgments of ``gens`` for ``metrics`` (default: the trait and coherence), one per (generation,
    metric) in that order, from the cache where possible."""
    s = ctx.settings
    assert ctx.cache is not None
    items = judge_items(trait.name, trait.eval_prompt, list(gens), metrics)
    jmodel = judge.model_id or s.judge_model
    cfg = judge.config()
    keys = [cache_key("judge", judge=judge.name, judge_model=jmodel, config=cfg, metric=it.metric, prompt=it.prompt)
            for it in items]
    cached = ctx.cache.get_many(keys)
    results: dict[int, Judgment] = {}
    # identical prompts share a key: the generation id always comes from the item, never the cache
    for i, k in enumerate(keys):
        if k in cached:
            results[i] = Judgment.from_dict({**cached[k], "generation_id": items[i].generation_id, "cache_key": k})
    ctx.timings["judge_cached"] = len(results)
    recovered = _journal_recover(ctx, "judge", {keys[i] for i in range(len(items)) if i not in results})
    for i, k in enumerate(keys):
        if i not in results and k in recovered:
            results[i] = Judgment.from_dict({**recovered[k], "generation_id": items[i].generation_id})
    todo = [i for i in range(len(items)) if i not in results]
    if todo:
        bs = judge.batch_size(ctx)
        # judge one metric (one rubric: a long shared prefix) and similar lengths together
        todo.sort(key=lambda i: (items[i].metric, len(items[i].prompt)))
        bar = _bar(ctx, len(todo), "judge")
        journal = _journal_path(ctx, "judge")

        def step(idx: list[int]) -> list[Judgment]:
            js = judge.judge([items[i] for i in idx], ctx)
            if len(js) != len(idx):
                raise HarnessError(f"judge {judge.name!r} returned {len(js)} judgments for {len(idx)} items")
            recs = [{**j.to_dict(), "cache_key": keys[i]} for i, j in zip(idx, js)]
            # a transient failure (timeout, connection, 429/5xx after retries) is not cached: a rerun asks again
            keep = [n for n, j in enumerate(js) if not (j.score is None and j.detail.get("transient"))]
            ctx.cache.put_many("judge", [(keys[idx[n]], js[n].to_dict()) for n in keep])  # type: ignore[union-attr]
            if journal is not None:
                append_jsonl(journal, [recs[n] for n in keep])
            for i, rec in zip(idx, recs):
                results[i] = Judgment.from_dict(rec)
            if bar is not None:
                bar.update(len(idx))
            return js

        run_with_oom_halving(step, todo, bs)
        if bar is not None:
            bar.close()
    return [results[i] for i in range(len(items))]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def score_summary(trait: TraitSpec, gens: Sequence[Generation], judgments: Sequence[Judgment], split: str = "extract") -> dict:
    pol = {g.id: g.polarity for g in gens if g.split == split}
    out: dict[str, Any] = {}
    for metric in (trait.name, COHERENCE):
        for p in ("pos", "neg"):
            xs = [j.score for j in judgments if j.metric == metric and pol.get(j.generation_id) == p and j.score is not None]
            out[f"{'trait' if metric == trait.name else 'coherence'}_{p}_mean"] = _mean(xs)  # type: ignore[arg-type]
    reasons: dict[str, int] = {}
    for j in judgments:
        if j.score is None and j.generation_id in pol:
            reasons[j.reason or "unknown"] = reasons.get(j.reason or "unknown", 0) + 1
    out["unscored"] = reasons
    return out


def norm_peak(vs: VectorSet, method: str = "response_avg_diff") -> dict:
    """Layer of max ||v[l]|| among 1..L-1; index L (after the final norm) is reported apart."""
    v = vs.tensors[method]
    norms = v.float().norm(dim=-1).tolist()
    L = len(norms) - 1
    peak = peak_layer(norms)
    return {"method": method, "peak_layer": peak, "num_layers": L, "relative_depth": peak / L if L else 0.0,
            "norms": [round(x, 6) for x in norms], "final_norm_index": L}


def run_folder(s: Settings, trait_name: str) -> Path:
    """Where a run writes: ``--out DIR`` exactly; else a new run folder ``RUNS_DIR/<model>/<trait>/<run-id>``
    (``harness.core.runs``), whose id the trait folder's ``latest`` file names once run.json is written.
    Only rank 0 of a torchrun job writes the real folder; other ranks get a throwaway one."""
    if s.out_dir:
        return _dist.private_run_dir(Path(s.out_dir))
    root = trait_root(s.runs_dir or "runs", slug(s.model), trait_name)
    if _dist.rank_world()[0] != 0:
        return _dist.private_run_dir(root)
    return allocate_run_dir(root)


@run_lock_scope
def run_trait(trait: str | TraitSpec, settings: Settings | None = None, *, pm=None, ctx: RunContext | None = None,
              stages: Sequence[str] = STAGES, splits: Sequence[str] | None = None) -> RunResult:
    """Run the pipeline for one trait and write its run directory."""
    s = settings or Settings()
    validate_settings(s)  # before any model loads
    pm = pm or get_plugin_manager(modules=s.plugins)
    t_start = time.perf_counter()
    if isinstance(trait, str):
        safe_name(trait)
        spec = lookup_trait(pm, trait, s)
    else:
        spec = trait
    safe_name(spec.name)
    splits = tuple(splits or s.splits)
    _dist.init()  # no-op unless launched by torchrun (WORLD_SIZE > 1)
    run_dir = run_folder(s, spec.name)  # --out DIR exactly, else a new RUNS_DIR/<model>/<trait>/<run-id>
    hold_run_dir(run_dir)  # creates it; one writing process at a time (harness.core.locks)
    ctx = ctx or RunContext(settings=s, pm=pm)
    ctx.trait, ctx.run_dir = spec, run_dir
    ctx.cache = ctx.cache or Cache(s.cache_dir)
    pm.hook.harness_run_started(run=ctx)
    gens: list[Generation] = []
    judgments: list[Judgment] = []
    selection: Selection | None = None
    vectors: VectorSet | None = None
    reg = {k: build_registry(pm, k) for k in ("generator", "judge", "filter", "extractor")}
    components: dict[str, str] = {}

    def timed(stage: str, fn):
        t0 = time.perf_counter()
        r = fn()
        ctx.timings[stage] = round(time.perf_counter() - t0, 3)
        return r

    if "generate" in stages:
        generator = reg["generator"].create(s.generator, s)
        requests = build_requests(spec, s, splits)
        gens = timed("generate", lambda: _dist.generate_sharded(ctx, requests, generator, run_generate))
        note_component(components, "generator", generator)
        write_jsonl(run_dir / "generations.jsonl", [g.to_dict() for g in gens])
        _journal_close(ctx, "generate")
        pm.hook.harness_stage_finished(run=ctx, stage="generate", records=gens)
    if "judge" in stages:
        judge = reg["judge"].create(s.judge, s)
        components["judge"] = s.judge
        judgments = timed("judge", lambda: _dist.on_main(lambda: run_judge(ctx, spec, gens, judge)))
        write_jsonl(run_dir / "judgments.jsonl", [j.to_dict() for j in judgments])
        _journal_close(ctx, "judge")
        pm.hook.harness_stage_finished(run=ctx, stage="judge", records=judgments)
    if "filter" in stages:
        filt = reg["filter"].create(s.filter, s)
        components["filter"] = s.filter
        ex_gens = [g for g in gens if g.split == "extract"]
        selection = timed("filter", lambda: filt.select(spec, ex_gens, judgments))
        atomic_write_json(run_dir / "selection.json", selection.to_dict())
        pm.hook.harness_stage_finished(run=ctx, stage="filter", records=[selection])
    if "extract" in stages:
        assert selection is not None
        old_vectors = run_dir / "vectors.safetensors"
        if old_vectors.exists():  # an earlier run's vector must not sit beside this run's records
            os.replace(old_vectors, run_dir / "vectors.previous.safetensors")
        if not selection.pairs:
            summary = _summary(spec, s, gens, judgments, selection, None, run_dir)
            _write_run_json(run_dir, s, pm, spec, components, ctx, summary, t_start, status="failed: no effective pairs")
            raise NoEffectivePairsError(
                f"{spec.name}: the filter kept 0 of {selection.candidates} pairs "
                f"(dropped: {selection.dropped}); no vector was written (an earlier run's is kept as "
                "vectors.previous.safetensors). Fix: lower --trait-threshold/"
                "--coherence-threshold, use a stronger judge, or generate more samples (--n-per-question)")
        extractor = reg["extractor"].create(s.extractor, s)
        note_component(components, "extractor", extractor)
        byid = {g.id: g for g in gens}
        pos = [byid[i] for i in selection.pos_ids]
        neg = [byid[i] for i in selection.neg_ids]
        try:
            vectors = timed("extract", lambda: _dist.extract(extractor, spec, pos, neg, ctx))
            note_component(components, "extractor", extractor)
        except NonFiniteActivationError as e:
            summary = _summary(spec, s, gens, judgments, selection, None, run_dir)
            _write_run_json(run_dir, s, pm, spec, components, ctx, summary, t_start, status="failed: non-finite activations")
            raise HarnessError(f"{spec.name}: extraction stopped, no vector was written: {e}") from None
        vectors.metadata.update({"method_default": "response_avg_diff", "pairs": len(selection.pairs),
                                 "candidates": selection.candidates, "trait_hash": spec.hash,
                                 "harness_version": __version__})
        save_vectors(run_dir / "vectors.safetensors", vectors)
        pm.hook.harness_stage_finished(run=ctx, stage="extract", records=[vectors])
    summary = _summary(spec, s, gens, judgments, selection, vectors, run_dir)
    _write_run_json(run_dir, s, pm, spec, components, ctx, summary, t_start)
    pm.hook.harness_run_finished(run=ctx, summary=summary)
    return RunResult(spec, run_dir, gens, judgments, selection, vectors, summary)


def _summary(spec, s, gens, judgments, selection, vectors, run_dir) -> dict:
    summary: dict[str, Any] = {"trait": spec.name, "model": s.model, "profile": s.profile_applied,
                               "profile_set": dict(s.profile_set)}
    summary["generations"] = len(gens)
    summary["empty_responses"] = sum(1 for g in gens if not g.response_token_ids)
    summary["judgments"] = len(judgments)
    if judgments:
        summary.update(score_summary(spec, gens, judgments))
        if any(g.split == "eval" for g in gens):
            summary["eval"] = score_summary(spec, gens, judgments, "eval")
    if selection is not None:
        summary["pairs_kept"] = len(selection.pairs)
        summary["pairs_candidates"] = selection.candidates
        summary["dropped"] = selection.dropped
    if vectors is not None:
        summary["norm_peak"] = norm_peak(vectors)
        summary["n_pos"], summary["n_neg"] = vectors.n_pos, vectors.n_neg
    summary["files"] = {n: str(run_dir / n) for n in ("run.json", "generations.jsonl", "judgments.jsonl",
                                                     "selection.json", "vectors.safetensors")
                        if (run_dir / n).exists() or n == "run.json"}
    return summary


def note_component(components: dict, kind: str, obj) -> None:
    """Record the component that ran (its name), and under ``choices`` why, when ``auto`` picked it or
    it fell back (the component's ``choice``: setting, chosen, reason)."""
    choice = getattr(obj, "choice", None)
    components[kind] = choice["chosen"] if choice else obj.name
    if choice:
        components.setdefault("choices", {})[kind] = dict(choice)


def _write_run_json(run_dir, s, pm, spec, components, ctx, summary, t_start, status="ok") -> None:
    summary.setdefault("components", components)
    cache = ctx.cache
    # a run folder of the history: allocated by run_folder, or named again with --out (a rerun into it)
    history = is_run_id(Path(run_dir).name) and (not s.out_dir or (Path(run_dir).parent / LATEST).is_file())
    lm = next(iter(ctx.models.values()), None)
    header = {
        "format": "persona-harness-run/1",
        "status": status,
        "harness_version": __version__,
        "trait": {"name": spec.name, "source": spec.source, "eval_source": spec.eval_source, "hash": spec.hash},
        # identity: the model fingerprint, dtype and chat settings the cache keys hold
        "model": {"id": s.model, "identity": ctx.model_identity(),
                  **({"class": lm.info.get("class"), "num_layers": lm.num_layers, "hidden_size": lm.hidden_size,
                      "device": str(lm.device), "dtype": str(lm.dtype), "chat": lm.info.get("chat")}
                     if lm is not None else {})},
        "components": components,
        "config": {k: v for k, v in s.to_dict().items()},
        "plugins": plugin_info(pm),
        "layer_convention": LAYER_CONVENTION,
        "counts": {"generations": summary.get("generations", 0), "judgments": summary.get("judgments", 0),
                   "pairs_kept": summary.get("pairs_kept"), "cache_hits": cache.hits if cache else 0,
                   "cache_misses": cache.misses if cache else 0},
        "timings": {**ctx.timings, "total": round(time.perf_counter() - t_start, 3)},
        "environment": _environment(s, lm),
        "run": {"id": run_dir.name if history else None, "dir": str(run_dir),
                "created": (_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=time.perf_counter() - t_start))
                .isoformat(timespec="seconds")},
        "summary": summary,
    }
    atomic_write_json(run_dir / "run.json", header)
    if history:  # a history run folder becomes its trait's latest; --out folders have no pointer
        write_latest(run_dir)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _environment(s: Settings, lm: Any) -> dict:
    """What run.json records about the software and the device (versions read without importing)."""
    return {"python": platform.python_version(), "platform": platform.platform(), "harness": __version__,
            **{d: _version(d) for d in ("torch", "transformers", "tokenizers")},
            "device": str(lm.device) if lm is not None else s.device,
            "dtype": str(lm.dtype) if lm is not None else s.dtype}
