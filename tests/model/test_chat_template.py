"""Chat templates render like transformers', inside the sandbox and within the output/time limits."""

from __future__ import annotations

import json
import time
from datetime import datetime

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from longctx.errors import LongctxError
from longctx.model import tokenizer as tokenizer_mod
from longctx.model.tokenizer import Tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(template: str | None = CHATML) -> Tokenizer:
    """A byte-level BPE tokenizer with no merges plus ChatML special tokens."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    return Tokenizer(tok, {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"})


def render(template: str, messages: list | None = None, **kwargs) -> str:
    return make_tokenizer(template).apply_chat_template(messages or [{"role": "user", "content": "hi"}], **kwargs)


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert message.startswith("chat template error: ")
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_tojson_keeps_key_order_and_non_ascii() -> None:
    value = {"zeta": "ünïcødé <b>&", "alpha": [1, 2], "mid": None}
    parts = [{"type": "text", "text": "ü", "z": 1, "a": 2}]
    out = render("{{ messages[0]['content'] | tojson }}", [{"role": "user", "content": parts}])
    assert out == json.dumps(parts, ensure_ascii=False)
    tok = make_tokenizer("{{ data | tojson }}|{{ data | tojson(indent=2) }}")
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}], data=value)
    assert out == json.dumps(value, ensure_ascii=False) + "|" + json.dumps(value, ensure_ascii=False, indent=2)
    assert out.index("zeta") < out.index("alpha")  # not sorted
    assert "ünïcødé <b>&" in out  # neither \\u-escaped nor HTML-escaped


def test_break_and_continue() -> None:
    out = render(
        "{% for i in range(10) %}{% if i == 1 %}{% continue %}{% endif %}{% if i == 4 %}{% break %}"
        "{% endif %}{{ i }}{% endfor %}"
    )
    assert out == "023"


def test_strftime_now_renders_today() -> None:
    out = render("{{ strftime_now('%Y-%m-%d') }}")
    assert out == datetime.now().strftime("%Y-%m-%d")
    assert out.startswith(str(datetime.now().year))


def test_tools_are_rendered() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t | tojson }};{% endfor %}{% endif %}{{ messages[0].content }}"
    )
    assert render(template, tools=tools) == f"TOOLS:{json.dumps(tools[0])};hi"
    assert render(template) == "hi"


def test_template_kwargs_reach_the_template() -> None:
    template = "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}go"
    assert render(template, enable_thinking=False) == "<think></think>go"
    assert render(template, enable_thinking=True) == "go"
    assert render(template) == "go"


def test_system_and_multi_turn() -> None:
    tok = make_tokenizer()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    expected = (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected.removesuffix(
        "<|im_start|>assistant\n"
    )
    ids = tok.encode_messages(messages)
    assert tok.decode(ids, skip_special_tokens=False) == expected
    assert ids.count(tok.tok.token_to_id("<|im_start|>")) == 5
    chat_ids = tok.encode_chat("hi", system="be brief")
    assert tok.decode(chat_ids, skip_special_tokens=False) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_bos_eos_tokens_available() -> None:
    assert render("{{ bos_token }}x{{ eos_token }}") == "<s>x</s>"


def test_raise_exception_passes_through() -> None:
    with pytest.raises(LongctxError) as excinfo:
        render("{{ raise_exception('roles must alternate') }}")
    assert str(excinfo.value) == "chat template error: roles must alternate"


def test_division_by_zero_is_one_line_error() -> None:
    with pytest.raises(LongctxError) as excinfo:
        render("{{ 1/0 }}")
    assert_one_line_error(excinfo, "ZeroDivisionError")


def test_syntax_error_is_one_line_error() -> None:
    with pytest.raises(LongctxError) as excinfo:
        render("{% for x in %}")
    assert_one_line_error(excinfo, "TemplateSyntaxError")


def test_sandbox_still_refuses_unsafe_access() -> None:
    with pytest.raises(LongctxError) as excinfo:
        render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}")
    assert_one_line_error(excinfo)
    with pytest.raises(LongctxError) as excinfo:
        render("{% set ns = namespace(_x=1) %}{{ ns._x }}")
    assert_one_line_error(excinfo, "SecurityError")


def test_nested_range_loops_hit_the_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer_mod, "MAX_TEMPLATE_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(LongctxError) as excinfo:
        render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    assert time.monotonic() - start < 10
    assert str(excinfo.value) == "chat template error: rendering took longer than 0.5 s"


def test_huge_output_hits_the_size_limit() -> None:
    limit = tokenizer_mod.MAX_TEMPLATE_OUTPUT_CHARS
    for template in ("{{ 'x' * 10**7 }}", "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}"):
        with pytest.raises(LongctxError) as excinfo:
            render(template)
        assert str(excinfo.value) == f"chat template error: output exceeds {limit} characters"


def test_output_just_under_the_limit_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer_mod, "MAX_TEMPLATE_OUTPUT_CHARS", 1000)
    assert render("{% for i in range(10) %}{{ 'y' * 100 }}{% endfor %}") == "y" * 1000
    with pytest.raises(LongctxError, match="output exceeds 1000 characters"):
        render("{% for i in range(10) %}{{ 'y' * 100 }}{% endfor %}!")


def test_range_is_still_bounded() -> None:
    with pytest.raises(LongctxError) as excinfo:
        render("{% for i in range(10**9) %}{% endfor %}")
    assert_one_line_error(excinfo, "OverflowError")
    assert render("{{ range(5) | length }}{{ range(3) | reverse | list }}{{ range(2, 8, 3) | list }}") == (
        "5[2, 1, 0][2, 5]"
    )


def test_recursive_macro_is_one_line_error() -> None:
    with pytest.raises(LongctxError) as excinfo:
        render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    assert_one_line_error(excinfo, "RecursionError")
    assert len(str(excinfo.value)) < 300


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ("hi", "messages must be a list of dicts, got str"),
        ([{"role": "user", "content": "a"}, "b"], "messages[1] must be a dict, got str"),
        ([{"content": "a"}], "messages[0]['role'] must be a str, got NoneType"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": 5}], "messages[1]['content']"),
    ],
)
def test_bad_messages_are_refused(messages: object, needle: str) -> None:
    with pytest.raises(LongctxError) as excinfo:
        make_tokenizer().apply_chat_template(messages)  # type: ignore[arg-type]
    assert_one_line_error(excinfo, needle)


def test_content_may_be_none_or_a_list_of_parts() -> None:
    template = (
        "{% for m in messages %}{% if m.content is string %}{{ m.content }}{% elif m.content is none %}-"
        "{% else %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}|{% endfor %}"
    )
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "c"},
    ]
    assert render(template, messages) == "ab|-|c|"


def test_no_template_is_an_error() -> None:
    with pytest.raises(LongctxError, match="no chat template"):
        make_tokenizer(None).apply_chat_template([{"role": "user", "content": "hi"}])


PARITY_TEMPLATE = """{%- if tools %}
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
{% endif %}
{%- set ns = namespace(n=0) %}
{% for message in messages %}
{% if message.role == 'user' %}{% set ns.n = ns.n + 1 %}{% endif %}
{% if ns.n > 2 %}{% break %}{% endif %}
<|im_start|>{{ message.role }}
{% if message.content is string %}{{ message.content }}{% else %}{{ message.content | tojson(indent=2) }}{% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>
{% endif %}{% endif %}
{{- bos_token }}{{ dict(a=1) | tojson }}"""


def test_parity_with_transformers() -> None:
    ctu = pytest.importorskip("transformers.utils.chat_template_utils", reason="transformers is not installed")
    if not hasattr(ctu, "render_jinja_template"):
        pytest.skip("this transformers has no render_jinja_template")
    tools = [
        {"type": "function", "function": {"name": "zoo", "description": "Wetter für München", "parameters": {}}},
        {"type": "function", "function": {"name": "add", "parameters": {"b": 1, "a": 2}}},
    ]
    messages = [
        {"role": "system", "content": "sys <&>"},
        {"role": "user", "content": "héllo"},
        {"role": "assistant", "content": [{"type": "text", "text": "ü", "z": 1, "a": 2}]},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "dropped by break"},
    ]
    ours = make_tokenizer(PARITY_TEMPLATE).apply_chat_template(messages, tools=tools, enable_thinking=False)
    theirs, _ = ctu.render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=PARITY_TEMPLATE,
        add_generation_prompt=True,
        enable_thinking=False,
        bos_token="<s>",
        eos_token="</s>",
    )
    assert ours == theirs[0]
    assert "dropped by break" not in ours and "München" in ours and "<think>" in ours


def test_bad_tokenizer_and_generation_configs_are_one_line_errors(tmp_path) -> None:  # noqa: ANN001
    import json

    from longctx.errors import CheckpointError
    from tests.tiny import write_tokenizer

    write_tokenizer(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for bad, message in (([{"template": "x"}], r"chat_template\[0\] must be an object"),
                         (7, "chat_template must be a string or a list")):
        cfg_path.write_text(json.dumps({**cfg, "chat_template": bad}))
        with pytest.raises(CheckpointError, match=message):
            Tokenizer.from_folder(tmp_path)
    cfg_path.write_text(json.dumps({**cfg, "chat_template": [{"name": "default", "template": "T"},
                                                             {"name": "tool_use", "template": "U"}]}))
    assert Tokenizer.from_folder(tmp_path).chat_template == "T"
    cfg_path.write_text(json.dumps(cfg))
    for bad in ("abc", [1, "x"], -1, True):
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(CheckpointError, match="eos_token_id must be a token id"):
            Tokenizer.from_folder(tmp_path)
