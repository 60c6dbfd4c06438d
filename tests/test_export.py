"""Vector export and import against the real tools: llama.cpp (through llama-cpp-python, on the
embedded model's own GGUF), steering-vectors and repeng (the PyPI libraries), and plain torch.

The vector is a real direction of the embedded SmolLM2-135M (the difference of two prompts' last-token
hidden states, at every hidden_states index) stored in a run folder as `persona-harness run` writes
one (run.json + vectors.safetensors). What is asserted: the file layout each tool reads, the layer
conversion (hidden_states index L = output of block L-1 = llama.cpp direction.{L-1}), and that each
tool steers the model the way the harness's own `steer` does.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import pytest

from harness.cli.main import main
from harness.core.config import Settings

LAYER = 15  # hidden_states index exported (block 14); the embedded model has 30 blocks
COEF = 4.0
PROMPTS = ["What is the capital of France?", "Tell me about your weekend.", "How do I bake bread?",
           "Give me one tip for learning Python."]


def _ids(lm, text: str) -> list[int]:
    from harness.models.loading import prompt_ids

    return prompt_ids(lm.tokenizer, [{"role": "user", "content": text}])


def _last_hidden(lm, text: str):
    import torch

    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([_ids(lm, text)]), output_hidden_states=True, use_cache=False)
    return torch.stack([h[0, -1].float() for h in out.hidden_states])  # [L+1, H]


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory, embedded_lm):
    """A run folder for the embedded model holding a real direction, [31, 576]."""
    from harness.core.artifacts import atomic_write_json, save_vectors
    from harness.core.records import VectorSet

    lm = embedded_lm
    v = (_last_hidden(lm, "You are an extremely cheerful assistant. Say hello!")
         - _last_hidden(lm, "You are a gloomy, sad assistant. Say hello!")).contiguous()
    d = tmp_path_factory.mktemp("run")
    save_vectors(d / "vectors.safetensors", VectorSet("cheerful", "smollm2", {"response_avg_diff": v}, 1, 1))
    cfg = Settings(model="smollm2", cache_dir=str(d / "cache"), device="cpu", dtype="float32", progress=False,
                   max_new_tokens=4, temperature=0.0).to_dict()
    atomic_write_json(d / "run.json", {"format": "persona-harness-run/1", "status": "ok", "config": cfg,
                                       "trait": {"name": "cheerful"},
                                       "model": {"id": "smollm2", "class": type(lm.model).__name__},
                                       "summary": {}})
    return d, v


def _export(run_dir, fmt, out, *extra) -> Path:
    assert main(["export", str(run_dir), "--format", fmt, "-o", str(out), *extra]) == 0
    assert out.is_file()
    return out


def _hf_logits(lm, text, vector=None, layers=None, coef=0.0):
    import torch

    from harness.analysis.steering import steer

    ids = torch.tensor([_ids(lm, text)])
    with torch.inference_mode():
        if vector is None:
            return lm.model(input_ids=ids, use_cache=False).logits[0, -1].float()
        with steer(lm, vector, coef, layers=layers, positions="all"):
            return lm.model(input_ids=ids, use_cache=False).logits[0, -1].float()


# -- GGUF for llama.cpp --------------------------------------------------------------------------
def test_gguf_file_has_the_layout_llama_cpp_reads(vector_run, tmp_path):
    import gguf
    import numpy as np

    run_dir, v = vector_run
    path = _export(run_dir, "gguf", tmp_path / "cv.gguf", "--layer", f"{LAYER},20", "--coef", "3")
    r = gguf.GGUFReader(str(path))
    names = sorted(t.name for t in r.tensors)
    assert names == [f"direction.{LAYER - 1}", "direction.19"]  # block index = hidden_states index - 1
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.n_elements == v.shape[1]
        L = int(t.name.split(".")[1]) + 1
        assert np.allclose(np.asarray(t.data), 3 * v[L].numpy(), atol=1e-6)

    def field(name):
        f = r.fields[name]
        return bytes(f.parts[-1]).decode() if f.types[0] == gguf.GGUFValueType.STRING else int(f.parts[-1][0])

    assert field("general.architecture") == "controlvector"
    assert field("controlvector.model_hint") == "llama" and field("controlvector.layer_count") == 2
    assert json.loads(field("persona_harness.hidden_states_index")) == [LAYER, 20]


def _llama_cpp_control_data(path, n_embd):
    """What llama.cpp's common_control_vector_load_one builds from a file (common/common.cpp): tensor
    ``direction.N`` (N >= 1) summed into a float buffer at offset (N - 1) * n_embd ("layer 1 at [0]")."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    n = max(int(t.name.split(".", 1)[1]) for t in r.tensors)
    data = np.zeros(n * n_embd, dtype=np.float32)
    for t in r.tensors:
        head, idx = t.name.split(".", 1)
        assert head == "direction" and int(idx) >= 1 and t.tensor_type == gguf.GGMLQuantizationType.F32
        k = int(idx)
        data[(k - 1) * n_embd: k * n_embd] += np.asarray(t.data, dtype=np.float32).reshape(-1)
    return data


def _llama(gguf_model, control=None):
    """A llama.cpp context on the model; ``control``: a control-vector buffer applied as llama.cpp's
    --control-vector does (layers 1..n_layer, llama_set_adapter_cvec)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(gguf_model), n_ctx=256, n_threads=1, n_batch=256, logits_all=True,
                          verbose=False)
    if control is not None:
        buf = np.ascontiguousarray(control, dtype=np.float32)
        rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size,
                                              llm.n_embd(), 1, llama_cpp.llama_model_n_layer(llm.model))
        assert rc == 0
        llm._control_buffer = buf  # keep the memory alive while the context may read it
    return llm


def _cpp_logits(llm, ids):
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)


def _corr(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def test_exported_gguf_moves_llama_cpp_logits_as_the_harness_steers_the_same_model(vector_run, embedded_lm, tmp_path):
    pytest.importorskip("llama_cpp")
    import numpy as np

    from harness.models.loading import embedded_gguf_path

    run_dir, v = vector_run
    lm = embedded_lm
    right = _export(run_dir, "gguf", tmp_path / "right.gguf", "--layer", str(LAYER), "--coef", str(COEF))
    # the same direction written under the hidden_states index instead of the block index
    from harness.analysis.export import write_gguf_directions

    wrong = tmp_path / "off_by_one.gguf"
    write_gguf_directions(wrong, {LAYER: v[LAYER] * COEF}, "llama", {})
    model = embedded_gguf_path()
    base, steered, shifted = _llama(model), None, None
    try:
        steered = _llama(model, _llama_cpp_control_data(right, lm.hidden_size))
        shifted = _llama(model, _llama_cpp_control_data(wrong, lm.hidden_size))
        rows = []
        for text in PROMPTS:
            ids = _ids(lm, text)
            d_hf = (_hf_logits(lm, text, v, LAYER, COEF) - _hf_logits(lm, text)).double().numpy()
            b = _cpp_logits(base, ids)
            d_cpp, d_off = _cpp_logits(steered, ids) - b, _cpp_logits(shifted, ids) - b
            rows.append((_corr(d_hf, d_cpp), _corr(d_hf, d_off), np.linalg.norm(d_cpp) / np.linalg.norm(d_hf)))
    finally:
        for llm in (base, steered, shifted):
            if llm is not None:
                llm.close()
    right_r = [r[0] for r in rows]
    off_r = [r[1] for r in rows]
    ratio = [r[2] for r in rows]
    print(f"corr(harness, llama.cpp) per prompt {['%.4f' % x for x in right_r]}; one block off "
          f"{['%.4f' % x for x in off_r]}; |d llama.cpp| / |d harness| {['%.3f' % x for x in ratio]}")
    assert min(right_r) > 0.95, rows
    assert all(a > b for a, b in zip(right_r, off_r)), rows  # the layer conversion is what makes them agree
    assert all(0.8 < x < 1.25 for x in ratio), rows


# -- steering-vectors -------------------------------------------------------------------------------
def test_steering_vectors_object_steers_exactly_like_the_harness(vector_run, embedded_lm, tmp_path):
    sv_mod = pytest.importorskip("steering_vectors")
    import torch

    run_dir, v = vector_run
    path = _export(run_dir, "steering-vectors", tmp_path / "sv.pt", "--layer", f"{LAYER},22")
    sv = sv_mod.SteeringVector(**torch.load(path, weights_only=True))
    assert sorted(sv.layer_activations) == [LAYER - 1, 21] and sv.layer_type == "decoder_block"
    for text in PROMPTS[:2]:
        ids = torch.tensor([_ids(embedded_lm, text)])
        with torch.inference_mode(), sv.apply(embedded_lm.model, multiplier=COEF):
            theirs = embedded_lm.model(input_ids=ids, use_cache=False).logits[0, -1].float()
        ours = _hf_logits(embedded_lm, text, {LAYER: v[LAYER], 22: v[22]}, None, COEF)
        base = _hf_logits(embedded_lm, text)
        assert (ours - base).abs().max() > 0.1  # the steering does something
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


# -- repeng -------------------------------------------------------------------------------------------
def _import_repeng():
    np = pytest.importorskip("numpy")
    if not hasattr(np, "float_"):  # repeng 0.4 annotates with np.float_, which NumPy 2 removed: restore the alias
        np.float_ = np.float64
    return pytest.importorskip("repeng")


def test_repeng_reads_the_export_and_steers_exactly_like_the_harness(vector_run, embedded_lm, tmp_path):
    repeng = _import_repeng()
    import torch

    run_dir, v = vector_run
    path = _export(run_dir, "repeng", tmp_path / "cv.gguf", "--layer", f"{LAYER},22")
    cv = repeng.ControlVector.import_gguf(str(path))
    assert sorted(cv.directions) == [LAYER - 1, 21] and cv.model_type == "llama"
    texts = PROMPTS[:2]
    ours = [_hf_logits(embedded_lm, t, {LAYER: v[LAYER], 22: v[22]}, None, COEF) for t in texts]
    cm = repeng.ControlModel(embedded_lm.model, list(cv.directions))
    try:
        cm.set_control(cv, coeff=COEF)
        for t, o in zip(texts, ours):
            with torch.inference_mode():
                theirs = cm(input_ids=torch.tensor([_ids(embedded_lm, t)]), use_cache=False).logits[0, -1].float()
            torch.testing.assert_close(theirs, o, atol=1e-4, rtol=1e-4)
    finally:
        cm.unwrap()  # repeng wraps the model's blocks in place; the session's model must come back whole


# -- pt and the import for steering ----------------------------------------------------------------
def test_pt_export_is_the_whole_tensor_and_every_format_imports_back(vector_run, embedded_lm, tmp_path):
    import torch

    from harness.analysis.export import load_vector_file

    run_dir, v = vector_run
    n, h = embedded_lm.num_layers, embedded_lm.hidden_size
    pt = _export(run_dir, "pt", tmp_path / "v.pt")
    t = torch.load(pt, weights_only=True)
    assert torch.equal(t, v)
    back, present = load_vector_file(pt, num_layers=n, hidden_size=h)
    assert torch.equal(back, v) and present == [L for L in range(1, n + 1) if v[L].abs().sum() > 0]
    for fmt, suffix in (("gguf", "gguf"), ("repeng", "gguf"), ("steering-vectors", "pt")):
        f = _export(run_dir, fmt, tmp_path / f"x-{fmt}.{suffix}", "--layer", f"{LAYER},20", "--coef", "2")
        back, present = load_vector_file(f, num_layers=n, hidden_size=h)
        assert present == [LAYER, 20], fmt
        torch.testing.assert_close(back[LAYER], 2 * v[LAYER])
        torch.testing.assert_close(back[20], 2 * v[20])
        assert back[[i for i in range(n + 1) if i not in (LAYER, 20)]].abs().sum() == 0


def test_steer_with_an_imported_gguf_equals_steering_with_the_run_vector(vector_run, tmp_path, capsys):
    run_dir, _ = vector_run
    f = _export(run_dir, "gguf", tmp_path / "cv.gguf", "--layer", str(LAYER))
    capsys.readouterr()
    common = ["--layer", str(LAYER), "--coef", "6", "--prompt", "Say something about the sea.", "--positions", "all",
              "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu", "--json",
              "--cache-dir", str(tmp_path / "cache")]
    assert main(["steer", str(run_dir), *common]) == 0
    own = json.loads(capsys.readouterr().out)
    assert main(["steer", str(run_dir), "--vector", str(f), *common]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert [r["response"] for r in own] == [r["response"] for r in imported]
    assert own[0]["response"] != own[1]["response"]  # unsteered vs steered differ: the vector was applied
    assert main(["steer", str(run_dir), "--vector", str(f), *common[:1], "20", *common[2:]]) == 1
    assert "sets no direction for --layer 20" in capsys.readouterr().err


def test_export_errors_are_one_line(vector_run, tmp_path, capsys):
    run_dir, _ = vector_run
    assert main(["export", str(run_dir), "--format", "gguf", "--layer", "1", "-o", str(tmp_path / "a.gguf")]) == 1
    err = capsys.readouterr().err
    assert "llama.cpp never steers block 0" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(run_dir), "--format", "repeng", "--layer", "99", "-o", str(tmp_path / "b.gguf")]) == 1
    assert "must be 1..30" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "pt"]) == 1
    assert "no run.json" in capsys.readouterr().err
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()
