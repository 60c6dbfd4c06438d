"""Test helpers shipped for plugin authors: tiny random models and a static model loader.

``make_tiny_lm(tokenizer_dir)`` builds a random-weight causal LM from a config (no download) with a
real tokenizer; ``StaticModelPlugin(lm)`` answers ``harness_load_model`` with it for every id.
"""

from __future__ import annotations

from harness.core.hookspecs import hookimpl


def make_tiny_lm(embedded_dir, *, layers: int = 3, hidden: int = 64, seed: int = 0, model_type: str = "llama"):
    """A random-weight model from a config, with the embedded model's tokenizer (real chat template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from harness.models.loading import LoadedModel, prepare_tokenizer

    tok = AutoTokenizer.from_pretrained(str(embedded_dir))
    prepare_tokenizer(tok)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=2048, tie_word_embeddings=True,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, model_id=f"tiny-{model_type}-{layers}x{hidden}",
                       device=torch.device("cpu"), dtype=torch.float32, info={"class": type(model).__name__})


class StaticModelPlugin:
    """Serve a given LoadedModel for every model id (registered in tests that need it)."""

    def __init__(self, lm):
        self.lm = lm

    @hookimpl
    def harness_load_model(self, model_id, settings):
        return self.lm
