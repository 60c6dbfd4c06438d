"""HF transformers generator: batched, left-padded, seeded per request.

Sampling uses ``harness.models.sampling`` (Gumbel-max with counter-based noise) inside HF ``generate``
through a logits processor, so a request's tokens depend on its seed and id only, not on the
batch it lands in. At temperature 0 it is plain greedy ``generate``.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from harness.core.hookspecs import hookimpl
from harness.core.protocols import BaseGenerator
from harness.models.batch import left_padded
from harness.models.loading import end_token_ids, prompt_ids
from harness.core.records import Generation, GenerationRequest
from harness.models.sampling import row_seed, seeded_logits_processor


def split_response(ids: list[int], end_ids: set[int], pad_id: int | None) -> tuple[list[int], str]:
    """Cut generated ids at the first end-of-turn token; return (ids, finish_reason)."""
    for i, t in enumerate(ids):
        if t in end_ids:
            return ids[:i], "stop"
    if pad_id is not None:
        while ids and ids[-1] == pad_id and pad_id in end_ids:
            ids = ids[:-1]
    return ids, "length"


#: changes whenever the same request could come out differently: it enters the cache keys
HF_GENERATOR_VERSION = "hf/2"


class HFGenerator(BaseGenerator):
    name = "hf"

    def __init__(self, settings: Any):
        super().__init__(settings)
        # plugin_config {"hf": {"ignore_eos": true}}: every response runs to max_new_tokens (benchmarks)
        self.ignore_eos = bool((getattr(settings, "plugin_config", {}) or {}).get("hf", {}).get("ignore_eos", False))

    def config(self) -> dict:
        return {"version": HF_GENERATOR_VERSION, "ignore_eos": self.ignore_eos}

    def batch_size(self, ctx) -> int:
        if self.settings.batch_size:
            return self.settings.batch_size
        return 64 if ctx.model().device.type == "cpu" else 256

    def generate(self, requests: Sequence[GenerationRequest], ctx) -> list[Generation]:
        import torch
        from transformers import GenerationConfig

        lm = ctx.model()
        tok, model = lm.tokenizer, lm.model
        ends = end_token_ids(tok, model)
        pad = tok.pad_token_id if tok.pad_token_id is not None else ends[0]
        prompts = [prompt_ids(tok, r.messages) for r in requests]
        ids, mask = left_padded(prompts, pad)
        P = ids.shape[1]
        temps = {r.temperature for r in requests}
        tps = {r.top_p for r in requests}
        if len(temps) != 1 or len(tps) != 1:
            raise ValueError("one generate() call needs one temperature and top_p")
        temperature, top_p = temps.pop(), tps.pop()
        max_new = max(r.max_new_tokens for r in requests)
        gc = GenerationConfig(max_new_tokens=max_new, do_sample=False, num_beams=1,
                              eos_token_id=None if self.ignore_eos else ends, pad_token_id=pad)
        procs = []
        if temperature > 0:
            seeds = torch.tensor([row_seed(r.seed, r.id) for r in requests], dtype=torch.int64, device=lm.device)
            procs.append(seeded_logits_processor(seeds, P, temperature, top_p))
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                 generation_config=gc, logits_processor=procs)
        self.last_seconds = time.perf_counter() - t0
        gen = out[:, P:].tolist()
        result = []
        for r, p, g in zip(requests, prompts, gen):
            resp, finish = (g[: r.max_new_tokens], "length") if self.ignore_eos else \
                split_response(g[: r.max_new_tokens], set(ends), pad)
            result.append(Generation(
                id=r.id, trait=r.trait, split=r.split, polarity=r.polarity, question_index=r.question_index,
                question=r.question, instruction_index=r.instruction_index, sample_index=r.sample_index,
                system_prompt=r.system_prompt, response=tok.decode(resp, skip_special_tokens=True),
                response_token_ids=tuple(resp), prompt_token_ids=tuple(p), finish_reason=finish,
                model_id=lm.model_id, generator=self.name,
            ))
        return result


@hookimpl
def harness_register_generators(register):
    register("hf", HFGenerator, description="transformers generate, batched, seeded per request")
