"""Test-only plugin for tests/test_mutations.py: an extractor that returns a deliberately broken vector.

Registered as extractor ``mutant`` (``--plugin mutation_plugin`` / ``plugins = ["mutation_plugin"]``
with tests/ on PYTHONPATH). It runs the real ``mean-diff`` extraction on the embedded model and then
breaks the paper's vector (``response_avg_diff``) as ``PERSONA_HARNESS_TEST_MUTATION`` says:

  none               the true vector (the control: every enforced check passes)
  other:TRAIT        another trait's vector (its stored reference for this model)
  prompt_last        the last-prompt-token vector (the wrong extraction method)
  prompt_avg         the prompt-mean vector (the wrong tokens averaged)
  flip               the sign-flipped vector
  random             a random direction with the same per-layer norms
  shuffled           pos/neg labels shuffled among the kept pairs before the means are taken
  layer_shift        every layer's vector taken from the layer above (an off-by-one layer index)
  pos_only           the mean of the pos responses alone, nothing subtracted
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from harness.core.hookspecs import hookimpl
from harness_plugins.extract_mean_diff import MeanDiffExtractor, mean_activations, mean_diff_vectors

MUTATION_ENV = "PERSONA_HARNESS_TEST_MUTATION"
TRAITS = Path(__file__).resolve().parent.parent / "traits"


class MutantExtractor(MeanDiffExtractor):
    name = "mutant"

    def config(self) -> dict:
        return {"mutation": os.environ.get(MUTATION_ENV, "none")}

    def extract(self, trait, pos, neg, ctx):
        import dataclasses

        import torch

        mode = os.environ.get(MUTATION_ENV, "none")
        lm = ctx.model()
        if mode in ("shuffled", "pos_only"):
            both = list(pos) + list(neg)
            if mode == "shuffled":
                random.Random(0).shuffle(both)
            a, b = both[: len(both) // 2], both[len(both) // 2:]
            psum, npos = mean_activations(lm, a, self.settings.extract_batch_size)
            nsum, nneg = mean_activations(lm, b, self.settings.extract_batch_size)
            vs = mean_diff_vectors(trait, lm, psum, npos, nsum, nneg, self.name)
            if mode == "pos_only":
                psum, npos = mean_activations(lm, list(pos), self.settings.extract_batch_size)
                vs.tensors["response_avg_diff"] = (psum["response_avg"] / npos).cpu()
            return vs
        vs = super().extract(trait, pos, neg, ctx)
        v = vs.tensors["response_avg_diff"].float()
        if mode == "none":
            new = v
        elif mode.startswith("other:"):
            from harness.analysis.checks import load_reference

            new = load_reference(TRAITS / mode.split(":", 1)[1] / "reference" / "smollm2.safetensors")[
                "response_avg_diff"].float()
        elif mode in ("prompt_last", "prompt_avg"):
            new = vs.tensors[f"{mode}_diff"].float().clone()  # its own storage: safetensors refuses shared tensors
        elif mode == "flip":
            new = -v
        elif mode == "random":
            g = torch.Generator().manual_seed(0)
            r = torch.randn(v.shape, generator=g)
            new = r / r.norm(dim=-1, keepdim=True) * v.norm(dim=-1, keepdim=True)
        elif mode == "layer_shift":
            new = torch.cat([v[1:], v[-1:]], 0)
        else:
            raise ValueError(f"unknown {MUTATION_ENV}={mode!r}")
        return dataclasses.replace(vs, tensors={**vs.tensors, "response_avg_diff": new.contiguous()})


@hookimpl
def harness_register_extractors(register):
    register("mutant", MutantExtractor, description="test-only: a deliberately broken vector")
