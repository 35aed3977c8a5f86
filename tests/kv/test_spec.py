"""KVSpec text form: exact round trip over every registered method, aliases, and errors that name the bad part."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longctx.errors import SpecError
from longctx.kv.registry import AXES, lookup, methods, params_of
from longctx.kv.spec import DEFAULTS, KVSpec, Method, make_method

# Candidate values per parameter type. A candidate the method rejects (range checks in __post_init__)
# falls back to the default, so every drawn spec is valid without knowing any method's rules.
_STR_CANDIDATES = ("max", "avg", "mean", "sum", "first", "last", "abc")
_VALUES = {
    int: st.one_of(st.integers(0, 8), st.integers(-3, 10**6)),
    float: st.one_of(st.floats(0.0, 1.0), st.floats(0.0, 1e4), st.sampled_from([0.5, 1.0, 2.0, 1e-6])),
    bool: st.booleans(),
    str: st.one_of(st.sampled_from(_STR_CANDIDATES), st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)),
}


def _is_budget_allocator(axis: str, name: str) -> bool:
    cls = lookup(axis, name)  # duo / razor size rows by sinks + window, not by a token amount
    return axis == "budget" and not getattr(cls, "unlimited", False) and not getattr(cls, "cuts_rows", False)


@st.composite
def method_of(draw, axis: str, names: list[str] | None = None) -> Method:  # noqa: ANN001
    name = draw(st.sampled_from(names or sorted(methods(axis))))
    given: dict[str, object] = {}
    if _is_budget_allocator(axis, name):  # exactly one of tokens / fraction
        if draw(st.booleans()):
            given["tokens"] = draw(st.integers(1, 10**6))
        else:
            given["fraction"] = draw(st.floats(1e-6, 1.0))
    for p in params_of(lookup(axis, name)):
        if p.name in given:
            continue
        candidate = draw(_VALUES[p.type]) if p.type in _VALUES else p.default
        try:
            make_method(axis, name, {**given, p.name: candidate})
        except SpecError:
            continue
        given[p.name] = candidate
    return make_method(axis, name, given)


@st.composite
def specs(draw) -> KVSpec:  # noqa: ANN001
    fields = {}
    for axis in AXES:
        if draw(st.booleans()):
            fields[axis] = draw(method_of(axis))
    if "budget" in fields and getattr(lookup("budget", fields["budget"].name), "cuts_rows", False):
        fields["retain"] = make_method("retain", "full")  # duo / razor choose what rows keep (razor: fp rows)
        fields.pop("quant", None)
    if "retain" in fields and getattr(lookup("retain", fields["retain"].name), "merges_evicted", False):
        fields.pop("quant", None)  # merged (averaged) keys and values need fp rows
    positions = lookup("positions", fields["positions"].name) if "positions" in fields else None
    if positions is not None and not positions.stores_rotated_keys:
        fields.pop("select", None)  # select methods score rotated keys
    if fields.get("retain", Method("full")).name != "full" and fields.get("budget", Method("none")).name == "none":
        allocators = [n for n in sorted(methods("budget")) if _is_budget_allocator("budget", n)]
        fields["budget"] = draw(method_of("budget", allocators))
    return KVSpec(**fields)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_parse_of_str_round_trips_exactly(spec: KVSpec) -> None:
    text = str(spec)
    again = KVSpec.parse(text)
    assert again == spec, text
    assert str(again) == text


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_every_axis_method_round_trips_through_of(data: st.DataObject) -> None:
    axis = data.draw(st.sampled_from(AXES))
    m = data.draw(method_of(axis))
    assert make_method(axis, m.name, dict(m.params)) == m
    extra = {"budget": "uniform(tokens=8)"} if axis == "retain" else {}
    assert getattr(KVSpec.of(**{axis: str(m)}, **extra), axis) == m


def test_default_spec_is_full_and_prints_as_retain_full() -> None:
    assert KVSpec() == KVSpec.parse("full") == KVSpec.parse("retain=full")
    assert str(KVSpec()) == "retain=full"
    for axis in AXES:
        assert getattr(KVSpec(), axis) == make_method(axis, DEFAULTS[axis])


def test_alias_method_colon_tokens_is_uniform_token_budget() -> None:
    spec = KVSpec.parse("snapkv:1024")
    assert spec == KVSpec.parse("retain=snapkv budget=uniform(tokens=1024)")
    assert spec.retain == make_method("retain", "snapkv")
    assert spec.budget.get("tokens") == 1024 and spec.budget.get("fraction") == 0.0


def test_alias_method_colon_fraction_is_uniform_fraction_budget() -> None:
    spec = KVSpec.parse("h2o:0.25")
    assert spec == KVSpec.parse("retain=h2o budget=uniform(fraction=0.25)")
    assert spec.budget.get("fraction") == 0.25 and spec.budget.get("tokens") == 0


def test_aliases_combine_with_bare_positions_method() -> None:
    spec = KVSpec.parse("snapkv:512 rerotate")
    assert spec == KVSpec.parse("retain=snapkv budget=uniform(tokens=512) positions=rerotate")
    assert spec.positions.name == "rerotate" and spec.budget.get("tokens") == 512
    assert KVSpec.parse(str(spec)) == spec


def test_bare_method_with_parameters_and_whitespace_parse() -> None:
    a = KVSpec.parse("snapkv(window=8, kernel=3) budget=uniform(tokens=64)")
    b = KVSpec.parse("retain=snapkv( window = 8,kernel=3 ) budget=uniform(tokens=64)")
    assert a == b and a.retain.get("window") == 8 and a.retain.get("kernel") == 3


def test_parse_accepts_a_kvspec_unchanged() -> None:
    spec = KVSpec.parse("h2o:16")
    assert KVSpec.parse(spec) is spec


# (spec text, substrings the message must contain)
MALFORMED = [
    pytest.param("", ["empty"], id="empty"),
    pytest.param("   ", ["empty"], id="blank"),
    pytest.param("retain=foo budget=uniform(tokens=4)", ["'foo'", "snapkv", "h2o", "streamingllm"],
                 id="unknown-method-lists-choices"),
    pytest.param("foo:16", ["'foo'", "snapkv", "tova"], id="unknown-alias-method-lists-choices"),
    pytest.param("foo", ["'foo'", "snapkv", "rerotate"], id="unknown-bare-word-lists-choices"),
    pytest.param("positions=warp", ["'warp'", "native", "rerotate", "self_extend"], id="unknown-positions"),
    pytest.param("frobnicate=snapkv", ["'frobnicate'", "retain", "budget"], id="unknown-axis"),
    pytest.param("retain=snapkv(foo=1) budget=uniform(tokens=4)", ["'foo'", "window", "kernel", "pooling"],
                 id="unknown-parameter-lists-params"),
    pytest.param("retain=snapkv(window=abc) budget=uniform(tokens=4)", ["'window'", "int", "'abc'"],
                 id="bad-int"),
    pytest.param("retain=snapkv(window=1.5) budget=uniform(tokens=4)", ["'window'", "int", "1.5"],
                 id="float-for-int"),
    pytest.param("retain=tova(per_head=maybe) budget=uniform(tokens=4)", ["'per_head'", "bool", "maybe"],
                 id="bad-bool"),
    pytest.param("retain=h2o(recent=lots) budget=uniform(tokens=4)", ["'recent'", "float", "lots"], id="bad-float"),
    pytest.param("retain=snapkv(kernel=4) budget=uniform(tokens=4)", ["kernel", "odd"], id="out-of-range"),
    pytest.param("retain=snapkv(window) budget=uniform(tokens=4)", ["'window'", "key=value"], id="no-value"),
    pytest.param("retain=snapkv(window=3,window=4) budget=uniform(tokens=4)", ["'window'", "twice"],
                 id="parameter-twice"),
    pytest.param("snapkv:abc", ["'abc'", "budget"], id="budget-not-a-number"),
    pytest.param("snapkv:0", ["budget", "positive"], id="budget-zero"),
    pytest.param("snapkv:-3", ["budget", "positive"], id="budget-negative"),
    pytest.param("snapkv:1.5", ["whole number", "1.5"], id="budget-fractional-tokens"),
    pytest.param("retain=snapkv budget=uniform(tokens=1,fraction=0.5)", ["budget=uniform", "exactly one"],
                 id="budget-tokens-and-fraction"),
    pytest.param("retain=snapkv budget=uniform", ["budget=uniform", "exactly one"], id="budget-neither"),
    pytest.param("retain=snapkv budget=pyramid(fraction=1.5)", ["budget=pyramid", "fraction"],
                 id="budget-fraction-above-one"),
    pytest.param("retain=snapkv budget=uniform(tokens=-1)", ["budget=uniform", "tokens"], id="budget-negative-tokens"),
    pytest.param("retain=h2o retain=snapkv budget=uniform(tokens=4)", ["'retain'", "twice"], id="axis-twice"),
    pytest.param("snapkv:16 h2o", ["'h2o'", "'retain'", "twice"], id="alias-then-method-twice"),
    pytest.param("snapkv:16 budget=uniform(tokens=3)", ["'budget'", "twice"], id="alias-budget-twice"),
    pytest.param("rerotate positions=native", ["'positions'", "twice"], id="positions-twice"),
    pytest.param("snapkv", ["retain=snapkv", "budget"], id="retain-without-budget"),
    pytest.param("retain=h2o budget=none", ["retain=h2o", "budget"], id="retain-with-budget-none"),
    pytest.param("retain=", ["retain=", "cannot parse"], id="axis-without-method"),
]


@pytest.mark.parametrize(("text", "needles"), MALFORMED)
def test_malformed_spec_raises_spec_error_naming_the_bad_part(text: str, needles: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        KVSpec.parse(text)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{text!r}: message {msg!r} lacks {needle!r}"


@pytest.mark.parametrize("value", [None, 5, ["full"]])
def test_non_string_spec_raises_spec_error(value: object) -> None:
    with pytest.raises(SpecError, match="string"):
        KVSpec.parse(value)  # type: ignore[arg-type]


def test_spec_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        KVSpec.parse("retain=nope")


def test_of_rejects_unknown_axis_and_validates_like_parse() -> None:
    with pytest.raises(SpecError, match="unknown axis 'colour'"):
        KVSpec.of(colour="red")
    with pytest.raises(SpecError, match="needs a budget"):
        KVSpec.of(retain="h2o")
    spec = KVSpec.of(retain="snapkv", budget={"name": "uniform", "tokens": 64})
    assert spec == KVSpec.parse("snapkv:64")


@pytest.mark.parametrize("text", ["positions=linear(factor=nan)", "positions=yarn(factor=inf)",
                                  "positions=ntk(factor=-inf)"])
def test_non_finite_numbers_rejected_at_parse_time(text: str) -> None:
    with pytest.raises(SpecError, match="must be a finite number"):
        KVSpec.parse(text)
