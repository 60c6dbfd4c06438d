"""Chat templates of several families, written here and set on the embedded model's tokenizer (no
download): the switches a template reads are set (thinking off unless --enable-thinking, judging
always off; Llama-3's date pinned), a template-less model without --chat-template is a one-line error,
and every chat prompt goes through ``harness.models.loading.prompt_ids``."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from harness.core.errors import HarnessError
from harness.models.loading import (
    chat_switches,
    configure_chat,
    load_hf_model,
    prompt_ids,
    template_variables,
)

ROOT = Path(__file__).resolve().parent.parent

MSGS = [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name a colour."}]

QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN3 = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and '</think>' in message.content %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- else %}{%- set content = message.content %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Granite-style: a ``thinking`` switch that adds a reasoning instruction
GRANITE_THINKING = (
    "{%- if thinking %}{{- '<|start_of_role|>system<|end_of_role|>Think before you answer.<|end_of_text|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content']"
    " + '<|end_of_text|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)

LLAMA3 = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Gemma-style: refuses a system message
GEMMA = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{%- endif %}{%- for message in messages %}{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] "
    "| trim + '<end_of_turn>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)


@pytest.fixture
def tok(embedded_dir):
    """A fresh copy of the embedded model's tokenizer (its template is swapped by the tests)."""
    from transformers import AutoTokenizer

    from harness.models.loading import prepare_tokenizer

    t = AutoTokenizer.from_pretrained(str(embedded_dir))
    prepare_tokenizer(t)
    return t


def text_of(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def with_template(tok, template, **kw):
    tok.chat_template = template
    configure_chat(tok, "tiny-test", **kw)
    return tok


def test_the_embedded_template_has_no_switches_and_renders_chatml(tok):
    info = configure_chat(tok, "smollm2")
    assert info["switches"] == {} and info["template"] == "model"
    assert text_of(tok, prompt_ids(tok, MSGS)) == (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_qwen25_style_template_renders_the_given_system_prompt(tok):
    with_template(tok, QWEN25)
    assert chat_switches(tok) == {}
    text = text_of(tok, prompt_ids(tok, MSGS))
    assert text.startswith("<|im_start|>system\nYou are a terse assistant.<|im_end|>") and "Qwen" not in text
    assert text.endswith("<|im_start|>assistant\n")
    no_system = text_of(tok, prompt_ids(tok, MSGS[1:]))
    assert "You are Qwen, created by Alibaba Cloud" in no_system


def test_qwen3_style_thinking_is_off_by_default_on_with_the_setting_and_always_off_for_judging(tok):
    assert "enable_thinking" in template_variables(QWEN3)
    with_template(tok, QWEN3)
    assert chat_switches(tok) == {"enable_thinking": False}
    assert text_of(tok, prompt_ids(tok, MSGS)).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with_template(tok, QWEN3, thinking=True)
    assert chat_switches(tok) == {"enable_thinking": True}
    assert text_of(tok, prompt_ids(tok, MSGS)).endswith("<|im_start|>assistant\n")
    judge_prompt = text_of(tok, prompt_ids(tok, MSGS[1:], thinking=False))
    assert judge_prompt.endswith("<think>\n\n</think>\n\n")


def test_granite_style_thinking_switch(tok):
    with_template(tok, GRANITE_THINKING)
    assert chat_switches(tok) == {"thinking": False}
    assert "Think before you answer" not in text_of(tok, prompt_ids(tok, MSGS))
    with_template(tok, GRANITE_THINKING, thinking=True)
    assert "Think before you answer" in text_of(tok, prompt_ids(tok, MSGS))
    assert "Think before you answer" not in text_of(tok, prompt_ids(tok, MSGS, thinking=False))


def test_llama3_style_date_is_pinned_so_the_prompt_is_the_same_every_day(tok):
    with_template(tok, LLAMA3)
    assert chat_switches(tok) == {"date_string": "26 Jul 2024"}
    text = text_of(tok, prompt_ids(tok, MSGS))
    assert "Today Date: 26 Jul 2024\n\nYou are a terse assistant.<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    # applied without the pinned switch, the template prints today's date (what the harness avoids)
    today = datetime.date.today().strftime("%d %b %Y")
    unpinned = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=False)
    assert f"Today Date: {today}" in unpinned


def test_a_template_with_transformers_only_tags_is_scanned_for_switches():
    tpl = ("{%- for m in messages %}{{ m['content'] }}{%- endfor %}{%- if add_generation_prompt %}"
           "{% generation %}{%- if enable_thinking is defined and not enable_thinking %}x{%- endif %}"
           "{% endgeneration %}{%- endif %}")
    assert "enable_thinking" in template_variables(tpl)
    assert "thinking" not in template_variables("{{ message['thinking'] }}{{ m.thinking }}")


def test_a_template_that_refuses_the_system_prompt_is_a_one_line_error_at_load(tok):
    tok.chat_template = GEMMA
    with pytest.raises(HarnessError, match="refused the prompt: System role not supported") as e:
        configure_chat(tok, "gemma-like")
    assert "--chat-template" in str(e.value) and "\n" not in str(e.value)


def test_a_template_with_a_syntax_error_is_a_one_line_error(tok):
    tok.chat_template = "{% for m in messages %}{{ m.content }}"
    with pytest.raises(HarnessError, match="syntax error") as e:
        configure_chat(tok, "broken")
    assert "\n" not in str(e.value)


def test_a_tokenizer_without_a_template_is_a_one_line_error_naming_the_model_and_the_fix(tok, tmp_path):
    tok.chat_template = None
    with pytest.raises(HarnessError, match="model 'acme/base' has no chat template") as e:
        configure_chat(tok, "acme/base")
    assert "--chat-template" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(HarnessError, match="has no chat template"):
        prompt_ids(tok, MSGS)
    # --chat-template: a file path or the template text
    f = tmp_path / "chatml.jinja"
    f.write_text(QWEN25)
    info = configure_chat(tok, "acme/base", chat_template=str(f))
    assert info["template"] == "given" and tok.chat_template == QWEN25
    tok.chat_template = None
    configure_chat(tok, "acme/base", chat_template=QWEN3)
    assert tok.chat_template == QWEN3
    with pytest.raises(HarnessError, match="--chat-template 'chatml.jinja': no such file, and not a Jinja template"):
        configure_chat(tok, "acme/base", chat_template="chatml.jinja")


@pytest.fixture
def baseless_dir(embedded_dir, tmp_path):
    """A saved tiny model whose tokenizer ships no chat template (a base model)."""
    from harness.testing import make_tiny_lm

    lm = make_tiny_lm(embedded_dir, layers=1, hidden=32)
    d = tmp_path / "base-model"
    lm.tokenizer.chat_template = None
    lm.model.save_pretrained(str(d))
    lm.tokenizer.save_pretrained(str(d))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_loading_a_model_without_a_template_needs_chat_template(baseless_dir, tmp_path):
    with pytest.raises(HarnessError, match="has no chat template"):
        load_hf_model(str(baseless_dir), device="cpu")
    f = tmp_path / "t.jinja"
    f.write_text(QWEN3)
    lm = load_hf_model(str(baseless_dir), device="cpu", chat_template=str(f))
    assert lm.info["chat"]["template"] == "given" and lm.info["chat"]["switches"] == {"enable_thinking": False}


def test_the_cli_names_the_model_and_the_fix_in_one_line(baseless_dir, mini_trait_dir, tmp_path, capsys,
                                                         monkeypatch):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--trait", "mini", "--model", str(baseless_dir), "--traits-dir", str(mini_trait_dir),
               "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--max-new-tokens", "2", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert f"model '{baseless_dir}' has no chat template" in err[0] and "--chat-template FILE" in err[0]


def test_generation_and_judging_use_the_switches(tiny_lm, embedded_dir):
    """The hf generator's prompts carry the configured switch; the local judge's never think."""
    from harness_plugins.generate_hf import HFGenerator
    from harness_plugins.judge_local import LocalJudge, NumberTrie, number_distribution

    from harness.core.config import Settings
    from harness.core.pipeline import RunContext
    from harness.core.records import GenerationRequest, JudgeItem
    from harness.testing import make_tiny_lm

    lm = make_tiny_lm(embedded_dir, layers=1, hidden=32)
    s = Settings(model=lm.model_id, device="cpu", progress=False)
    ctx = RunContext(settings=s, pm=None, models={lm.model_id: lm})
    req = GenerationRequest(id="q0", trait="t", split="extract", polarity="pos", question_index=0, question="Hi?",
                            instruction_index=0, sample_index=0, system_prompt="Be brief.", temperature=0.0,
                            top_p=1.0, max_new_tokens=2, seed=0)
    for thinking, tail in ((False, "<think>\n\n</think>\n\n"), (True, "<|im_start|>assistant\n")):
        with_template(lm.tokenizer, QWEN3, thinking=thinking)
        (g,) = HFGenerator(s).generate([req], ctx)
        assert text_of(lm.tokenizer, g.prompt_token_ids).endswith(tail)
    # configured for thinking, the judge still scores from a prompt without a thinking block
    item = JudgeItem(generation_id="q0", metric="coherence", question="Hi?", answer="Blue.", prompt="Rate 0-100: Blue.")
    (j,) = LocalJudge(s).judge([item], ctx)
    ids = prompt_ids(lm.tokenizer, [{"role": "user", "content": item.prompt}], thinking=False)
    assert text_of(lm.tokenizer, ids).endswith("<think>\n\n</think>\n\n")
    import torch

    with torch.inference_mode():
        probs, _ = number_distribution(lm.model, lm.tokenizer, NumberTrie(lm.tokenizer), [ids], lm.device)
    assert j.detail["mass"] == round(float(probs[0].sum()), 6)


def test_every_chat_template_is_applied_in_one_function():
    users = sorted(str(p.relative_to(ROOT)) for d in ("harness", "plugins") for p in (ROOT / d).rglob("*.py")
                   if "apply_chat_template" in p.read_text(encoding="utf-8"))
    assert users == ["harness/models/loading.py"], users
    text = (ROOT / "harness/models/loading.py").read_text(encoding="utf-8")
    assert text.count(".apply_chat_template(") == 1
